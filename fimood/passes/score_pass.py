"""The score pass: every selected input folder's rows through one dataset and one actor pool, staged by
partition, then each partition committed whole, as one Delta commit, into the score table at the
output (`fimood.lake.score_table`)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from ray.data import Datasink
from ray.data.block import BlockAccessor

from fimood.lake import schema
from fimood.lake.delta import ConcurrentWriters
from fimood.lake.score_table import Committed, Lineage, ScoreTable
from fimood.lake.sources import Partition, list_partitions, plan_reads
from fimood.lake.staging import Staging
from fimood.lake.tables import parquet_bytes
from fimood.method.detector import load_detector
from fimood.passes.actors import IO_TASKS_PER_ACTOR, ScoreActor, check_strict, feature_rows
from fimood.passes.config import PipelineConfig
from fimood.passes.runtime import start_ray, storage_errors_in_one_line
from fimood.progress import count_errors, rate
from fimood.storage import filesystem, join, overlaps, write_file

MIN_ROWS_PER_OUTPUT_FILE = 65_536  # the writer gathers rows up to this many per file, so partitions are not confetti


@dataclass
class PartitionResult:
    """What happened to one input partition in a score pass."""

    folder: str
    status: str  # "committed", "skipped" (already committed from the same inputs by the same detector) or "failed"
    rows_in: int = 0  # for a skipped partition: unknown (0); its rows are not read
    rows: int = 0  # rows in the committed output, read back after the commit
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    reason: str = ""  # why it failed
    unreadable: dict[str, str] = field(default_factory=dict)  # shards left out: path → why they cannot be read
    duplicate_ids: int = 0  # rows whose id an earlier row of the partition has (each is scored; ids are not unique)

    @property
    def errors(self) -> int:
        return sum(self.errors_by_reason.values())


@dataclass
class ScoreSummary:
    """What a score pass did, partition by partition."""

    partitions: list[PartitionResult]
    seconds: float

    def _with(self, status: str) -> list[PartitionResult]:
        return [p for p in self.partitions if p.status == status]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self._with("committed"))

    @property
    def errors(self) -> int:
        return sum(p.errors for p in self._with("committed"))

    @property
    def skipped(self) -> list[PartitionResult]:
        return self._with("skipped")

    @property
    def failed(self) -> list[PartitionResult]:
        return self._with("failed")

    @property
    def unreadable(self) -> dict[str, str]:
        """Every shard that could not be read (its partition's other shards were scored)."""
        return {path: why for p in self.partitions for path, why in p.unreadable.items()}

    def __str__(self) -> str:
        reasons = Counter()
        for partition in self._with("committed"):
            reasons.update(partition.errors_by_reason)
        text = (
            f"{self.rows} rows ({count_errors(dict(reasons))}) in "
            f"{len(self._with('committed'))} partitions, {rate(self.rows, self.seconds)}"
        )
        duplicates = sum(p.duplicate_ids for p in self._with("committed"))
        if duplicates:
            text += f"; {duplicates} rows repeat an id (each scored)"
        if self.skipped:
            text += f"; {len(self.skipped)} partitions already committed"
        if self.failed:
            text += f"; {len(self.failed)} partitions FAILED: " + "; ".join(
                f"{p.folder or '.'}: {p.reason}" for p in self.failed
            )
        if self.unreadable:
            text += f"; {len(self.unreadable)} shards UNREADABLE, left out: " + "; ".join(
                f"{path}: {why}" for path, why in sorted(self.unreadable.items())
            )
        return text


class ScoringFailed(RuntimeError):
    """Some partitions could not be committed, or some shards could not be read; the rest was. `summary` says which."""

    def __init__(self, summary: ScoreSummary):
        names = ", ".join(p.folder or "." for p in summary.failed)
        problems = [f"{len(summary.failed)} partitions not committed ({names})"] if summary.failed else []
        if summary.unreadable:
            problems.append(f"{len(summary.unreadable)} shards unreadable ({', '.join(sorted(summary.unreadable))})")
        super().__init__(f"{'; '.join(problems)}: {summary}")
        self.summary = summary


@storage_errors_in_one_line()
def score(
    detector_url: str,
    data_url: str,
    out_url: str,
    config: PipelineConfig,
    *,
    resume: bool = False,
    z_scores: bool = False,
    partitions: Sequence[str] = (),
) -> ScoreSummary:
    """Score the rows of `data_url` into the score table at `out_url`, each input folder its own partition.

    Every selected partition's rows go through one dataset and one actor pool, are staged, and each
    partition is then committed whole, as one Delta commit replacing its previous version
    (`fimood.lake.score_table`). `resume` skips a partition whose committed version was made by the
    same detector from the same input shards (path, size, version); a new, changed or removed shard
    scores it again. A commit replaces only the version this run planned from: a partition another
    run committed meanwhile keeps that run's version.

    Args:
        partitions: globs of input folders to score (`date=2026-11-*`); empty: every folder.
    Raises:
        ScoringFailed: after committing the others, when a partition's rows out differ from its
            rows in, or its error fraction is above `config.max_error_fraction`, or a shard cannot
            be read at all (its partition is committed from its other shards, and its lineage lists
            only those, so the next `resume` scores the partition again).
    """
    start = time.perf_counter()
    if overlaps(data_url, out_url, config.storage_options):
        raise ValueError(f"the output {out_url} overlaps the input {data_url}; score into a folder outside it")
    detector, model = load_detector(detector_url, config.storage_options, config.allowed_imports)
    check_strict(model, config)
    listed = list_partitions(data_url, config.input_format, config.storage_options, partitions)
    fs, out_root = filesystem(out_url, config.storage_options)
    table = ScoreTable(out_url, config.storage_options)
    table.check()
    planned = table.committed()  # each partition's version now: a commit replaces this one, or none
    results, todo = [], []
    for partition in listed:
        lineage = Lineage(detector.detector_id, _inputs(partition), z_scores)
        if resume and lineage.covered_by(planned.get(partition.folder)):
            results.append(PartitionResult(partition.folder, "skipped"))
        else:
            todo.append(partition)
    if todo:
        spec = config.read_spec(data_url)
        plan = plan_reads(todo, spec)
        with Staging(fs, out_root) as staging:
            sink = StagingDatasink(fs, staging.path)
            if plan.units:  # none when every selected shard is unreadable
                start_ray(config.address)
                scores = feature_rows(
                    plan.units,
                    spec,
                    detector.model_uri,
                    model,
                    config,
                    ScoreActor,
                    detector=detector,
                    z_scores=z_scores,
                )
                scores.write_datasink(
                    sink, ray_remote_args={"num_cpus": 0}, concurrency=IO_TASKS_PER_ACTOR * config.num_actors
                )
            for index, partition in enumerate(todo):
                unreadable = {path: plan.unreadable[path] for path in plan.unreadable_in(partition)}
                if len(unreadable) == len(partition.shards):
                    reason = "no shard can be read; the previous version is kept"
                    results.append(PartitionResult(partition.folder, "failed", reason=reason, unreadable=unreadable))
                    continue
                lineage = Lineage(detector.detector_id, _inputs(partition, unreadable), z_scores)
                staged = sink.written.get(index, [])
                commit = Commit(table, lineage, staging.run, planned.get(partition.folder))
                result = _commit(partition, commit, staged, plan.rows[index], config.max_error_fraction)
                result.unreadable = unreadable
                results.append(result)
        table.vacuum()
    results.sort(key=lambda result: result.folder)
    summary = ScoreSummary(results, time.perf_counter() - start)
    if summary.failed or summary.unreadable:
        raise ScoringFailed(summary)
    return summary


class StagingDatasink(Datasink):
    """Writes score rows into the staging folder of their partition, `<staging>/partition=<index>/`.

    A write task gathers at least MIN_ROWS_PER_OUTPUT_FILE rows and writes one file per partition
    among them, named by the task's index: a retried task overwrites its own files. `written`
    (partition index → staged file paths) is filled on the driver when the write completes.
    """

    def __init__(self, fs: AbstractFileSystem, staging_path: str):
        self.fs, self.staging_path = fs, staging_path
        self.written: dict[int, list[str]] = {}

    @property
    def min_rows_per_write(self) -> int:
        return MIN_ROWS_PER_OUTPUT_FILE

    def write(self, blocks, ctx) -> list[tuple[int, str]]:
        table = pa.concat_tables([BlockAccessor.for_block(block).to_arrow() for block in blocks])
        written = []
        for index in pc.unique(table.column("partition")).to_pylist():
            rows = table.filter(pc.equal(table.column("partition"), index)).drop_columns(["partition"])
            path = join(self.staging_path, f"partition={index}", f"{ctx.task_idx:06d}.parquet")
            write_file(self.fs, path, parquet_bytes(rows))
            written.append((index, path))
        return written

    def on_write_complete(self, write_result) -> None:
        for returns in write_result.write_returns:
            for index, path in returns:
                self.written.setdefault(index, []).append(path)


def _inputs(partition: Partition, left_out: dict[str, str] | None = None) -> list[dict]:
    return [shard.as_dict() for shard in partition.shards if shard.path not in (left_out or {})]


@dataclass(frozen=True)
class Commit:
    """Where a partition's rows go, what they were scored from, by which run, over which version."""

    table: ScoreTable
    lineage: Lineage
    run: str
    planned: Committed | None  # the partition's version when the run planned; only it may be replaced


def _commit(
    partition: Partition, commit: Commit, staged: list[str], rows_in: int, max_error_fraction: float
) -> PartitionResult:
    """Commit one partition's staged files as its new version, unless its rows or errors say something went
    wrong, or another run committed it since this one planned; then count what the table holds for it."""
    table = commit.table
    rows, reasons, _ = _count_files(table.fs, staged)
    errors = sum(reasons.values())
    result = PartitionResult(partition.folder, "failed", rows_in, rows, reasons)
    if rows != rows_in:
        result.reason = f"{rows} rows scored from {rows_in} rows in; the previous version is kept"
        return result
    if errors > max_error_fraction * rows:
        result.reason = f"{count_errors(reasons)} in {rows} rows, above the max error fraction {max_error_fraction}"
        return result
    try:
        table.replace(partition.folder, staged, commit.lineage, commit.run, commit.planned)
    except ConcurrentWriters as error:
        result.reason = str(error)
        return result
    committed = table.read([partition.folder], columns=[schema.ID, schema.ERROR])
    result.rows, result.errors_by_reason, result.duplicate_ids = _count(committed)
    if result.rows != rows_in:
        result.reason = f"{result.rows} rows committed from {rows_in} rows in"
        return result
    result.status = "committed"
    return result


def _count_files(fs, paths: list[str]) -> tuple[int, dict[str, int], int]:
    """`_count` of these score files (only their `id` and `error` columns are read)."""
    tables = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, columns=[schema.ID, schema.ERROR]))
    empty = schema.score_schema().empty_table().select([schema.ID, schema.ERROR])
    return _count(pa.concat_tables(tables) if tables else empty)


def _count(table: pa.Table) -> tuple[int, dict[str, int], int]:
    """Rows in a table of score rows, their errors counted by reason, and how many rows repeat an earlier
    row's id."""
    error = table.column(schema.ERROR)
    counts = pc.value_counts(error.drop_null()) if error.null_count < len(error) else []
    reasons = {item["values"].as_py(): item["counts"].as_py() for item in counts}
    distinct = pc.count_distinct(table.column(schema.ID)).as_py()
    return table.num_rows, reasons, table.num_rows - distinct
