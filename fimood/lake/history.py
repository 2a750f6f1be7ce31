"""The monitor's history: one Parquet file per (partition, stream), a table any Parquet reader opens.

    <history>/stream=<name>/<hash of the partition's folder>.parquet   (one row: summary and verdicts)

A stream is what the monitor's lifetime budget runs over (one monitored dataset with one detector,
or a name the user gives). Re-running a night rewrites its partitions' files whole (one atomic write
each), so a partition never appears twice; runs for different nights write different files, so
neither loses the other's rows. The folder reads as one table, with `stream` as a Hive partition
column, e.g. `pyarrow.dataset.dataset(url, partitioning="hive")`. Histories written before schema 3
were kept per detector (`detector=<id>/`); a stream starts without them.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from fimood.lake.tables import parquet_bytes
from fimood.storage import StorageOptions, filesystem, join, resilient, write_file

SCHEMA_VERSION = 3  # 2: `mean_shift`, `layers_p` of every layer's mean; 3: per stream, valid given the reference


def history_file(stream: str, partition: str) -> str:
    """A row's file, relative to the history's root."""
    return f"stream={stream}/{hashlib.sha256(partition.encode()).hexdigest()[:20]}.parquet"


def write_history_rows(
    history_url: str,
    stream: str,
    rows: list[dict],
    schema: pa.Schema | None = None,
    storage_options: StorageOptions = None,
) -> None:
    """Write (or replace) each row's file; a row is a dict with at least `partition`.

    Give the `schema` (a `schema_version` column is added to it): every file then has the same
    columns and types, empty lists included, so the folder reads as one table.
    """
    fs, root = filesystem(history_url, storage_options)
    if schema is not None:
        schema = schema.append(pa.field("schema_version", pa.int32()))
    for row in rows:
        table = pa.Table.from_pylist([{**row, "schema_version": SCHEMA_VERSION}], schema=schema)
        write_file(fs, join(root, history_file(stream, row["partition"])), parquet_bytes(table))


def read_history(history_url: str, stream: str, storage_options: StorageOptions = None) -> list[dict]:
    """Every row kept for `stream`, in partition order (none when the history is new)."""
    fs, root = filesystem(join(history_url, f"stream={stream}"), storage_options)
    fs = resilient(fs)
    if not fs.exists(root):
        return []
    rows = []
    for path in sorted(fs.glob(f"{root}/*.parquet")):
        with fs.open(path, "rb") as handle:
            rows.extend(pq.read_table(handle).to_pylist())
    return sorted(rows, key=lambda row: row["partition"])
