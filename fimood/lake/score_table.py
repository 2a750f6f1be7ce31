"""The score table: one Delta table per output URL, partitioned by the input folder each row came from.

    <output>/_delta_log/                     the table's versions (what every Delta reader reads)
    <output>/partition=<folder>/*.parquet    data files (the folder percent-encoded: `date%3D2026-11-26`)
    <output>/_fimood/lineage/<id>.json       what a partition was scored from, by `lineage_id`

Ray's write tasks write data files straight into the table's folder; they are in no version until
a commit lists them. A commit adds the new files of one or more partitions and removes their
previous ones, together, so every reader gets each partition's old version or its new one, whole,
on local disk and on S3. Every row carries its `detector_id` and `lineage_id` (the hash of the
input shards and settings its partition was scored from), 64 characters each, so `--resume` reads
them from the log's per-file statistics, with no data read. A commit replaces the version the run
planned from, or nothing: a partition another run committed meanwhile is left as that run made it.
Replaced files stay for the table's retention (7 days by default) for readers of older versions, as
do files no commit listed (a run that died, or lost a race); each run then vacuums what is older.
"""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction

from fimood.lake import schema
from fimood.lake.delta import (
    ConcurrentWriters,
    delta_location,
    is_delta_table,
    open_table,
    tuned,
    unavailable_in_one_line,
)
from fimood.lake.tables import parquet_bytes
from fimood.storage import (
    StorageOptions,
    StorageUnavailable,
    filesystem,
    join,
    resilient,
    retrying,
    sha256_hex,
    write_file,
)
from fimood.version import __version__

logger = logging.getLogger(__name__)

ROOT_PARTITION = "."  # the partition value of rows from the data URL itself (Delta stores '' as null)
LINEAGE_FOLDER = "_fimood/lineage"
LEGACY_MARKER = "_SUCCESS"  # what fimood 0.2 left in each output folder
COMMITTED, SAME_LINEAGE = "committed", "same lineage"  # what `ScoreTable.commit` did with a partition
DESCRIPTION = f"fimood score table, schema version {schema.SCORE_SCHEMA_VERSION}: one row per input row"
COMMIT_ATTEMPTS = 30  # a commit losing the race to other runs' commits tries again on theirs, this many times
SIDECAR_THREADS = 16  # lineage sidecars are written in parallel: on object stores each is a round trip
STATISTICS = (schema.ID, schema.ERROR, schema.DETECTOR_ID, schema.FIMOOD_VERSION, schema.LINEAGE_ID)  # min/max kept


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

    @property
    def key(self) -> str:
        """One string for the version's origin: equal keys, the same rows scored the same way."""
        return f"{self.detector_id}:{self.lineage_id}"


@dataclass(frozen=True)
class DataFile:
    """A data file written into the table's folder, in no version until a commit lists it."""

    path: str  # relative to the table's root, as the log names it
    size: int
    rows: int
    statistics: str  # Delta's per-file statistics (JSON): what `committed` and readers' pruning read

    def action(self, folder: str) -> AddAction:
        values = {schema.PARTITION: partition_value(folder)}
        return AddAction(self.path, self.size, values, int(time.time() * 1000), True, self.statistics)


@dataclass(frozen=True)
class PartitionVersion:
    """A partition's new version: its files, what they were scored from, and the version it replaces."""

    folder: str
    lineage: Lineage
    planned: Committed | None  # the partition's version when the run planned; only it may be replaced
    files: tuple[DataFile, ...]


def _statistics(table: pa.Table) -> str:
    """Delta's statistics of a data file: rows, nulls per column, bounds of its string columns (exact)."""
    minimum, maximum = {}, {}
    for name in STATISTICS:
        bounds = pc.min_max(table.column(name))
        if bounds["min"].is_valid:
            minimum[name], maximum[name] = bounds["min"].as_py(), bounds["max"].as_py()
    nulls = {name: table.column(name).null_count for name in table.column_names}
    return json.dumps({"numRecords": table.num_rows, "minValues": minimum, "maxValues": maximum, "nullCount": nulls})


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

    def create(self) -> None:
        """Create the table, empty, unless it exists; a racing creator's table is as good as this one's."""
        if self.snapshot() is not None:
            return
        try:
            with unavailable_in_one_line(f"create {self.uri}"):
                DeltaTable.create(
                    self.uri,
                    schema.table_schema(),
                    mode="error",
                    partition_by=[schema.PARTITION],
                    name="fimood scores",
                    description=DESCRIPTION,
                    storage_options=tuned(self.uri, self.options),
                    commit_properties=CommitProperties(max_commit_retries=0),
                )
        except StorageUnavailable:
            raise
        except Exception:
            if self.snapshot() is None:
                raise
        self.check()

    def write_data_file(self, folder: str, rows: pa.Table, lineage_id: str) -> DataFile:
        """Write score rows (`score_schema`) of one partition as a data file of the table, in no version yet:
        a commit lists it, or a vacuum past the retention removes it. Called in Ray's write tasks."""
        target = schema.table_schema()
        columns = {name: rows.column(name) for name in rows.column_names}
        columns[schema.FIMOOD_VERSION] = pa.array([__version__] * rows.num_rows, pa.string())
        columns[schema.LINEAGE_ID] = pa.array([lineage_id] * rows.num_rows, pa.string())
        if schema.Z_SCORES not in columns:
            columns[schema.Z_SCORES] = pa.nulls(rows.num_rows, target.field(schema.Z_SCORES).type)
        fields = [field for field in target if field.name != schema.PARTITION]
        table = pa.Table.from_arrays([columns[f.name].cast(f.type) for f in fields], schema=pa.schema(fields))
        path = f"{schema.PARTITION}={urllib.parse.quote(partition_value(folder), safe='')}/part-{uuid.uuid4()}.parquet"
        data = parquet_bytes(table)
        write_file(self.fs, join(self.root, path), data)
        return DataFile(path, len(data), table.num_rows, _statistics(table))

    def commit(self, versions: list[PartitionVersion], run: str) -> dict[str, str]:
        """Commit new versions of partitions, in one Delta commit, each replacing the version its run planned
        from. Returns, by folder: COMMITTED; SAME_LINEAGE when another run committed this very lineage
        meanwhile (nothing to do); or, when it committed another, why this one was not committed."""
        with ThreadPoolExecutor(SIDECAR_THREADS) as pool:
            list(pool.map(self._write_lineage, [version.lineage for version in versions]))
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            table = self.snapshot()
            current = self.committed(table)
            outcome, ready = {}, []
            for version in versions:
                now = current.get(version.folder)
                if now == version.planned:
                    ready.append(version)
                elif now == version.lineage.committed_as:
                    outcome[version.folder] = SAME_LINEAGE
                else:
                    outcome[version.folder] = (
                        f"another run committed partition {partition_value(version.folder)!r} since this one read "
                        "it; that version is kept: run again to replace it"
                    )
            if not ready:
                return outcome
            try:
                with unavailable_in_one_line(f"commit {len(ready)} partitions to {self.uri}"):
                    table.create_write_transaction(
                        [file.action(version.folder) for version in ready for file in version.files],
                        mode="overwrite",
                        schema=schema.table_schema(),
                        partition_by=[schema.PARTITION],
                        partition_filters=[(schema.PARTITION, "in", [partition_value(v.folder) for v in ready])],
                        commit_properties=CommitProperties(
                            max_commit_retries=0,  # pinned to the version checked above: a race is tried again here
                            custom_metadata={
                                "fimood.run": run,
                                "fimood.partitions": str(len(ready)),
                                "fimood.version": __version__,
                                "fimood.schema_version": str(schema.SCORE_SCHEMA_VERSION),
                            },
                        ),
                    )
                return outcome | {version.folder: COMMITTED for version in ready}
            except CommitFailedError as error:
                logger.info("%s: another writer committed first (%s); trying again", self.url, error)
                time.sleep(random.uniform(0, min(5.0, 0.05 * 2**attempt)))  # spread, so racers do not meet again
        raise ConcurrentWriters(
            f"{self.url}: other writers committed first {COMMIT_ATTEMPTS} times in a row; what they committed is "
            "kept: run again once they are done"
        )

    def _write_lineage(self, lineage: Lineage) -> None:
        document = {"detector_id": lineage.detector_id, **lineage.document()}
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        write_file(self.fs, join(self.root, LINEAGE_FOLDER, f"{lineage.lineage_id}.json"), data)

    def lineage(self, lineage_id: str) -> dict:
        """What a `lineage_id` stands for: the detector, the input shards, whether with z-scores."""
        return json.loads(self.fs.cat_file(join(self.root, LINEAGE_FOLDER, f"{lineage_id}.json")))

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

    def read_file(self, path: str, columns: list[str]) -> pa.Table:
        """Columns of one data file (its path relative to the table's root, as `DataFile.path`), read again
        from the start while the store does not answer (a handle's reads are not the filesystem's calls)."""

        def read() -> pa.Table:
            with self.fs.open(join(self.root, path), "rb") as handle:
                return pq.read_table(handle, columns=columns)

        return retrying(read, f"read {path}")

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
