"""The score pass: every selected input folder's rows through one dataset and one actor pool, written by
Ray's write tasks as data files of the score table at the output, each partition committed whole as
soon as its last rows are written (`fimood.lake.score_table`).

    read tasks ──► actors: score rows ──► write tasks: data files ──► driver: counts ──commit thread──► Delta log
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import ray

from fimood.lake import schema
from fimood.lake.score_table import (
    COMMITTED,
    SAME_LINEAGE,
    Committed,
    DataFile,
    Lineage,
    PartitionVersion,
    ScoreTable,
)
from fimood.lake.sources import Partition, list_partitions, plan_reads
from fimood.method.detector import load_detector
from fimood.passes.actors import IO_TASKS_PER_ACTOR, MEMORY_SPLITS, ScoreActor, check_strict, feature_rows
from fimood.passes.config import PipelineConfig
from fimood.passes.reading import footers_in_tasks
from fimood.passes.runtime import errors_in_one_line, start_ray
from fimood.progress import count_errors, rate
from fimood.storage import overlaps

logger = logging.getLogger(__name__)

ROWS_PER_OUTPUT_FILE = 4096  # a write task gathers this many rows: files that are not confetti, commits soon


@dataclass
class PartitionResult:
    """What happened to one input partition in a score pass."""

    folder: str
    status: str  # "committed", "skipped" (already committed from the same inputs by the same detector) or "failed"
    rows_in: int = 0  # for a skipped partition: unknown (0); its rows are not read
    rows: int = 0  # rows written for it, as its write tasks counted them
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    reason: str = ""  # why it failed
    unreadable: dict[str, str] = field(default_factory=dict)  # shards left out: path → why they cannot be read
    duplicate_ids: int = 0  # rows whose id an earlier row of the partition has (each is scored; ids are not unique)
    memory_splits: int = 0  # times one of its batches was halved because the GPU ran out of memory

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
        splits = sum(p.memory_splits for p in self.partitions)
        if splits:
            text += f"; batches halved {splits} times as the GPU ran out of memory (a smaller --batch-size avoids it)"
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


@errors_in_one_line()
def score(
    detector_url: str,
    data_url: str,
    out_url: str,
    config: PipelineConfig,
    *,
    resume: bool = False,
    z_scores: bool = False,
    partitions: Sequence[str] = (),
    listed: list[Partition] | None = None,
) -> ScoreSummary:
    """Score the rows of `data_url` into the score table at `out_url`, each input folder its own partition.

    Every selected partition's rows go through one dataset and one actor pool; write tasks write them
    as data files of the table, and each partition is committed as soon as its last rows are written,
    beside the pass, replacing its previous version (`fimood.lake.score_table`): a run that dies
    loses only the partitions in flight. `resume` skips a partition whose committed version was made
    by the same detector from the same input shards (path, size, version); a new, changed or removed
    shard scores it again. A commit replaces only the version this run planned from: a partition
    another run committed meanwhile keeps that run's version.

    Args:
        partitions: globs of input folders to score (`date=2026-11-*`); empty: every folder.
        listed: those partitions, when the caller listed them already (the monitor lists once).
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
    if listed is None:
        listed = list_partitions(data_url, config.input_format, config.storage_options, partitions)
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
        start_ray(config.address)
        plan = plan_reads(todo, spec, footers_in_tasks)
        table.create()
        committer = Committer(table, config.max_error_fraction)
        for index, partition in enumerate(todo):
            unreadable = {path: plan.unreadable[path] for path in plan.unreadable_in(partition)}
            if len(unreadable) == len(partition.shards):
                reason = "no shard can be read; the previous version is kept"
                results.append(PartitionResult(partition.folder, "failed", reason=reason, unreadable=unreadable))
            else:
                lineage = Lineage(detector.detector_id, _inputs(partition, unreadable), z_scores)
                committer.expect(
                    index, partition.folder, lineage, planned.get(partition.folder), plan.rows[index], unreadable
                )
        with committer:
            if plan.units:  # none when every selected shard is unreadable
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
                written = scores.map_batches(
                    write_files,
                    fn_kwargs={"table": table, "folders": [p.folder for p in todo], "lineages": committer.lineage_ids},
                    batch_size=ROWS_PER_OUTPUT_FILE,
                    batch_format="pyarrow",
                    num_cpus=0,
                    concurrency=IO_TASKS_PER_ACTOR * config.most_actors,
                )
                for files in written.iter_batches(batch_size=None, batch_format="pyarrow"):
                    committer.add(files)
        results.extend(committer.results)
        table.vacuum()
    results.sort(key=lambda result: result.folder)
    summary = ScoreSummary(results, time.perf_counter() - start)
    if summary.failed or summary.unreadable:
        raise ScoringFailed(summary)
    return summary


WRITTEN = pa.schema(
    [
        pa.field("partition", pa.int32()),
        pa.field("path", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("rows", pa.int64()),
        pa.field("statistics", pa.string()),
        pa.field("errors", pa.string()),  # JSON: reason → rows
        pa.field(MEMORY_SPLITS, pa.int64()),  # batches halved because the GPU ran out of memory
    ]
)


def write_files(batch: pa.Table, table: ScoreTable, folders: list[str], lineages: dict[int, str]) -> pa.Table:
    """A write task: one data file of the table per partition among the batch's score rows; returns what
    each file holds (rows, errors by reason), so the driver counts rows without reading any."""
    written = []
    for index in pc.unique(batch.column("partition")).to_pylist():
        rows = batch.filter(pc.equal(batch.column("partition"), index))
        splits = pc.sum(rows.column(MEMORY_SPLITS)).as_py() or 0
        rows = rows.drop_columns(["partition", MEMORY_SPLITS])
        file = table.write_data_file(folders[index], rows, lineages[index])
        errors = json.dumps(Counter(error for error in rows.column(schema.ERROR).to_pylist() if error is not None))
        written.append({"partition": index, **file.__dict__, "errors": errors, MEMORY_SPLITS: splits})
    return pa.Table.from_pylist(written, schema=WRITTEN)


@dataclass
class _Pending:
    """A partition of the run, until it is committed: what it was scored from, what its write tasks wrote."""

    folder: str
    lineage: Lineage
    planned: Committed | None
    rows_in: int
    unreadable: dict[str, str]
    files: list[DataFile] = field(default_factory=list)
    rows: int = 0
    reasons: Counter = field(default_factory=Counter)
    memory_splits: int = 0

    def problem(self, max_error_fraction: float) -> str:
        """Why its rows must not be committed ('' when they may be)."""
        if self.rows != self.rows_in:
            return f"{self.rows} rows scored from {self.rows_in} rows in; the previous version is kept"
        if sum(self.reasons.values()) > max_error_fraction * self.rows:
            errors = count_errors(dict(self.reasons))
            return f"{errors} in {self.rows} rows, above the max error fraction {max_error_fraction}"
        return ""


class Committer:
    """Commits each partition of a run as soon as its write tasks have written all its rows, in a thread
    beside the pass, so the actors never wait on storage: every partition completed since the last
    commit goes into the next one (one Delta commit, each partition replacing its planned version).

    Rows are counted from what the write tasks return; ids repeated within a partition are counted by
    a Ray task reading only the new files' ids. Used as a context manager: on leaving, the partitions
    already complete are committed (even when the pass failed), and those that never completed fail.
    """

    def __init__(self, table: ScoreTable, max_error_fraction: float):
        self.table, self.max_error_fraction = table, max_error_fraction
        self.run = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.pending: dict[int, _Pending] = {}
        self.results: list[PartitionResult] = []
        self._complete: queue.Queue[int | None] = queue.Queue()
        self._error: BaseException | None = None
        self._done: set[int] = set()
        self._thread = threading.Thread(target=self._commit_as_they_complete, name="fimood-commit", daemon=True)

    @property
    def lineage_ids(self) -> dict[int, str]:
        return {index: pending.lineage.lineage_id for index, pending in self.pending.items()}

    def expect(
        self, index: int, folder: str, lineage: Lineage, planned: Committed | None, rows_in: int, unreadable: dict
    ) -> None:
        """A partition of the run: its index in the rows' `partition` column, and its row count from the plan."""
        self.pending[index] = _Pending(folder, lineage, planned, rows_in, unreadable)

    def __enter__(self) -> Committer:
        self._thread.start()
        for index, pending in self.pending.items():
            if pending.rows_in == 0:
                self._complete.put(index)
        return self

    def add(self, written: pa.Table) -> None:
        """What write tasks wrote (`WRITTEN` rows); a partition whose rows are all written is committed next."""
        if self._error is not None:
            raise self._error
        for row in written.to_pylist():
            pending = self.pending[row["partition"]]
            pending.files.append(DataFile(row["path"], row["size"], row["rows"], row["statistics"]))
            pending.rows += row["rows"]
            pending.reasons.update(json.loads(row["errors"]))
            pending.memory_splits += row[MEMORY_SPLITS]
            if pending.rows >= pending.rows_in and pending.rows - row["rows"] < pending.rows_in:
                self._complete.put(row["partition"])

    def __exit__(self, *exc_info) -> None:
        self._complete.put(None)
        self._thread.join()
        for index in sorted(set(self.pending) - self._done):
            pending = self.pending[index]
            reason = pending.problem(self.max_error_fraction) or "not committed: the run stopped first"
            self._result(pending, "failed", reason)
        if self._error is not None and exc_info[1] is None:
            raise self._error

    def _commit_as_they_complete(self) -> None:
        while True:
            group = [self._complete.get()]
            while not self._complete.empty():
                group.append(self._complete.get())
            stop = None in group
            group = [index for index in group if index is not None]
            if group and self._error is None:
                try:
                    self._commit(group)
                except BaseException as error:  # raised in the driver's thread, by `add` or on leaving
                    self._error = error
            if stop:
                return

    def _commit(self, group: list[int]) -> None:
        good = []
        for index in group:
            pending = self.pending[index]
            self._done.add(index)
            problem = pending.problem(self.max_error_fraction)
            if problem:
                self._result(pending, "failed", problem)
            else:
                good.append(pending)
        versions = [PartitionVersion(p.folder, p.lineage, p.planned, tuple(p.files)) for p in good]
        if not versions:
            return
        duplicates = ray.get(count_repeated_ids.remote(self.table, [[f.path for f in p.files] for p in good]))
        outcome = self.table.commit(versions, self.run)
        for pending, repeated in zip(good, duplicates, strict=True):
            said = outcome[pending.folder]
            if said in (COMMITTED, SAME_LINEAGE):
                self._result(pending, "committed", duplicate_ids=repeated)
            else:
                self._result(pending, "failed", said)
        logger.info("%s: committed %d partitions", self.table.url, sum(o == COMMITTED for o in outcome.values()))

    def _result(self, pending: _Pending, status: str, reason: str = "", duplicate_ids: int = 0) -> None:
        self.results.append(
            PartitionResult(
                pending.folder,
                status,
                pending.rows_in,
                pending.rows,
                dict(pending.reasons),
                reason,
                pending.unreadable,
                duplicate_ids,
                pending.memory_splits,
            )
        )


@ray.remote(num_cpus=0)
def count_repeated_ids(table: ScoreTable, files_by_partition: list[list[str]]) -> list[int]:
    """For each partition, how many of its rows repeat an id an earlier row has (only `id` is read)."""
    repeated = []
    for paths in files_by_partition:
        ids = [table.read_file(path, [schema.ID]).column(schema.ID) for path in paths]
        column = pa.chunked_array([chunk for part in ids for chunk in part.chunks], pa.string())
        repeated.append(len(column) - pc.count_distinct(column).as_py())
    return repeated


def _inputs(partition: Partition, left_out: dict[str, str] | None = None) -> list[dict]:
    return [shard.as_dict() for shard in partition.shards if shard.path not in (left_out or {})]
