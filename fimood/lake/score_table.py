"""The score table: one Delta table per output URL, partitioned by the input folder each row came from.

    <output>/_delta_log/                     the table's versions (what every Delta reader reads)
    <output>/partition=<folder>/*.parquet    data files (the folder percent-encoded: `date%3D2026-11-26`)
    <output>/_fimood/lineage/<id>.json       what a partition was scored from, by `lineage_id`
    <output>/_staging/<run>/                 a run's rows before their commit; no reader looks here

A partition is committed as one Delta commit that removes its previous rows and adds the new ones,
so every reader gets each partition's old version or its new one, whole, on local disk and on S3.
Every row carries its `detector_id` and `lineage_id` (the hash of the input shards and settings its
partition was scored from), 64 characters each, so `--resume` reads them from the log's per-file
statistics, with no data read. A commit replaces the version the run planned from, or nothing: a
partition another run committed meanwhile is left as that run made it. Replaced files stay for
the table's retention (7 days by default) for readers of older versions; each run then vacuums
what is older, and the files of commits that never finished.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs
from deltalake import DeltaTable

from fimood.lake import schema
from fimood.lake.delta import (
    ConcurrentWriters,
    delta_location,
    is_delta_table,
    open_table,
    quote,
    replace_rows,
    unavailable_in_one_line,
)
from fimood.storage import StorageOptions, filesystem, join, resilient, sha256_hex, write_file
from fimood.version import __version__

logger = logging.getLogger(__name__)

ROOT_PARTITION = "."  # the partition value of rows from the data URL itself (Delta stores '' as null)
LINEAGE_FOLDER = "_fimood/lineage"
LEGACY_MARKER = "_SUCCESS"  # what fimood 0.2 left in each output folder


@dataclass(frozen=True)
class Lineage:
    """What a partition is scored from: the detector, the input shards, whether with z-scores."""

    detector_id: str
    inputs: list[dict]  # {"path", "size", "version"} of every input shard its rows come from
    z_scores: bool

    def document(self) -> dict:
        inputs = sorted(({k: row[k] for k in ("path", "size", "version")} for row in self.inputs), key=str)
        return {"inputs": inputs, "z_scores": self.z_scores}

    @property
    def lineage_id(self) -> str:
        return sha256_hex(json.dumps(self.document(), sort_keys=True).encode())

    @property
    def committed_as(self) -> Committed:
        return Committed(self.detector_id, self.lineage_id)

    def covered_by(self, committed: Committed | None) -> bool:
        """True when that version was made by this detector from exactly these inputs (with z-scores, if asked)."""
        with_z = Lineage(self.detector_id, self.inputs, True)
        return committed in ({self.committed_as} | ({with_z.committed_as} if not self.z_scores else set()))


@dataclass(frozen=True)
class Committed:
    """What a partition's current version was made by, as the table's log says."""

    detector_id: str
    lineage_id: str


def partition_value(folder: str) -> str:
    return folder or ROOT_PARTITION


def folder_of(value: str | None) -> str:
    return "" if value in (None, ROOT_PARTITION) else value


class ScoreTable:
    """The score table at an output URL (fsspec URL and storage options, as everywhere in fimood)."""

    def __init__(self, url: str, storage_options: StorageOptions = None):
        self.url = url
        self.uri, self.options = delta_location(url, storage_options)
        fs, root = filesystem(url, storage_options)
        self.fs, self.root = resilient(fs), root.rstrip("/")

    def snapshot(self) -> DeltaTable | None:
        """The table's current version (None before its first commit)."""
        return open_table(self.uri, self.options)

    def check(self) -> None:
        """Refuse, in one line, an output this fimood cannot commit into: an older layout, another table."""
        if is_delta_table(self.fs, self.root):
            table = self.snapshot()
            found = pa.schema(table.schema().to_arrow()) if table is not None else None
            if found is not None and not found.equals(schema.table_schema()):
                raise ValueError(
                    f"{self.url} is a Delta table whose columns are not a fimood score table's (schema version "
                    f"{schema.SCORE_SCHEMA_VERSION}): {found.names}; score into a new output"
                )
        elif self.fs.exists(self.root) and self.fs.glob(f"{self.root}/**/{LEGACY_MARKER}"):
            raise ValueError(
                f"{self.url} holds score folders written by fimood 0.2 (`{LEGACY_MARKER}` markers), not a Delta "
                "table; score into a new output (rows are scored again), or move the old one aside"
            )

    def committed(self, table: DeltaTable | None = None) -> dict[str, Committed | None]:
        """Each partition's current version, by input folder, from the log's per-file statistics (None for
        a partition whose files disagree, which no fimood commit makes)."""
        table = table if table is not None else self.snapshot()
        if table is None:
            return {}
        with unavailable_in_one_line(f"read the log of {self.uri}"):
            files = pa.table(table.get_add_actions(flatten=True))
        found: dict[str, set] = {}
        columns = [f"{bound}.{name}" for name in (schema.DETECTOR_ID, schema.LINEAGE_ID) for bound in ("min", "max")]
        if files.num_rows and not set(columns) <= set(files.column_names):
            return {}  # no statistics: nothing can be taken as committed
        for row in files.select([f"partition.{schema.PARTITION}", *columns]).to_pylist():
            folder = folder_of(row[f"partition.{schema.PARTITION}"])
            found.setdefault(folder, set()).add(tuple(row[column] for column in columns))
        committed = {}
        for folder, bounds in found.items():
            (d_min, d_max, l_min, l_max) = next(iter(bounds))
            whole = len(bounds) == 1 and d_min == d_max and l_min == l_max
            committed[folder] = Committed(d_min, l_min) if whole else None
        return committed

    def replace(self, folder: str, staged: list[str], lineage: Lineage, run: str, planned: Committed | None) -> bool:
        """Commit the staged score files (full paths) as the partition's new version, if its current version is
        still `planned` (what the run saw when it planned). Returns False when another run committed this
        very lineage meanwhile (nothing to do); raises `ConcurrentWriters` when it committed another."""
        value = partition_value(folder)
        write_file(self.fs, join(self.root, LINEAGE_FOLDER, f"{lineage.lineage_id}.json"), self._lineage_json(lineage))
        constants = {
            schema.PARTITION: value,
            schema.FIMOOD_VERSION: __version__,
            schema.LINEAGE_ID: lineage.lineage_id,
        }

        def rows_for(table: DeltaTable | None) -> pa.RecordBatchReader | None:
            current = self.committed(table).get(folder) if table is not None else None
            if current != planned:
                if current == lineage.committed_as:
                    logger.warning(
                        "%s: partition %r was committed by another run meanwhile, as this one would", self.url, value
                    )
                    return None
                raise ConcurrentWriters(
                    f"{self.url}: partition {value!r} was committed by another run since this one read it; that "
                    "version is kept: run again to replace it"
                )
            return pa.RecordBatchReader.from_batches(schema.table_schema(), self._rows(staged, constants))

        return replace_rows(
            self.uri,
            self.options,
            rows_for,
            predicate=f"{schema.PARTITION} = {quote(value)}",
            partition_by=[schema.PARTITION],
            metadata={
                "fimood.partition": value,
                "fimood.detector_id": lineage.detector_id,
                "fimood.lineage_id": lineage.lineage_id,
                "fimood.version": __version__,
                "fimood.run": run,
                "fimood.schema_version": str(schema.SCORE_SCHEMA_VERSION),
            },
            name="fimood scores",
            description=f"fimood score table, schema version {schema.SCORE_SCHEMA_VERSION}: one row per input row",
        )

    @staticmethod
    def _lineage_json(lineage: Lineage) -> bytes:
        return json.dumps({"detector_id": lineage.detector_id, **lineage.document()}, indent=1, sort_keys=True).encode()

    def lineage(self, lineage_id: str) -> dict:
        """What a `lineage_id` stands for: the detector, the input shards, whether with z-scores."""
        return json.loads(self.fs.cat_file(join(self.root, LINEAGE_FOLDER, f"{lineage_id}.json")))

    def _rows(self, staged: list[str], constants: dict[str, str]) -> Iterator[pa.RecordBatch]:
        target = schema.table_schema()
        if not staged:
            return
        files = pads.dataset(staged, filesystem=_arrow_fs(self.fs), format="parquet")
        for batch in files.to_batches():
            columns = {name: batch.column(name) for name in batch.schema.names}
            for name, value in constants.items():
                columns[name] = pa.array([value] * batch.num_rows, pa.string())
            if schema.Z_SCORES not in columns:
                columns[schema.Z_SCORES] = pa.nulls(batch.num_rows, target.field(schema.Z_SCORES).type)
            yield pa.record_batch([columns[name].cast(target.field(name).type) for name in target.names], target)

    def read(
        self, folders: list[str] | None = None, columns: list[str] | None = None, table: DeltaTable | None = None
    ) -> pa.Table:
        """The rows of one version (the current one, or `table`), of these input folders only if given."""
        table = table if table is not None else self.snapshot()
        if table is None:
            return schema.table_schema().empty_table().select(columns or schema.table_schema().names)
        where = None
        if folders is not None:
            where = pads.field(schema.PARTITION).isin([partition_value(folder) for folder in folders])
        with unavailable_in_one_line(f"read {self.uri}"):
            return table.to_pyarrow_dataset().to_table(columns=columns, filter=where)

    def files(self, folders: list[str], table: DeltaTable) -> dict[str, str]:
        """The data files of these partitions in one version (full paths on the filesystem) → their folder."""
        wanted, found = {partition_value(folder) for folder in folders}, {}
        for fragment in table.to_pyarrow_dataset().get_fragments():
            value = pads.get_partition_keys(fragment.partition_expression).get(schema.PARTITION)
            if value in wanted:
                found[join(self.root, fragment.path)] = folder_of(value)
        return found

    def vacuum(self) -> None:
        """Delete files no version within the table's retention needs: replaced ones, and those of commits
        that never finished. A failure is logged, not raised: the commits stand."""
        try:
            table = self.snapshot()
            if table is not None:
                with unavailable_in_one_line(f"vacuum {self.uri}"):
                    removed = table.vacuum(dry_run=False, full=True)
                if removed:
                    logger.info("%s: %d files past the retention removed", self.url, len(removed))
        except Exception as error:  # space is reclaimed by the next run; this one's rows are committed
            logger.warning("%s: could not vacuum (%s); the next run tries again", self.url, error)


def read_scores(url: str, storage_options: StorageOptions = None, columns: list[str] | None = None) -> pa.Table:
    """The score table's current version (`table_schema`), with fimood's storage options; any Delta reader
    gives the same rows (`deltalake.DeltaTable(url).to_pyarrow_table()`, DuckDB's `delta_scan`, ...)."""
    table = ScoreTable(url, storage_options)
    table.check()
    return table.read(columns=columns)


def _arrow_fs(fs) -> pyarrow.fs.FileSystem:
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
