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

from fimood.lake.schema import parquet_list
from fimood.lake.tables import parquet_bytes
from fimood.monitor.result import PartitionVerdict
from fimood.storage import StorageOptions, filesystem, join, resilient, write_file

SCHEMA_VERSION = 3  # 2: `mean_shift`, `layers_p` of every layer's mean; 3: per stream, valid given the reference

HISTORY_SCHEMA = pa.schema(
    [
        ("partition", pa.string()),
        ("detector_id", pa.string()),
        ("monitored_at", pa.string()),
        ("verdict", pa.string()),
        ("stream", pa.string()),
        ("budget", pa.string()),
        ("min_excess", pa.float64()),
        ("reference_risk", pa.float64()),
        ("detectable_rate_excess", pa.float64()),
        ("detectable_mean_shift", pa.float64()),
        ("reference_dominates", pa.bool_()),
        ("rows", pa.int64()),
        ("scored", pa.int64()),
        ("errors_by_reason", parquet_list(pa.struct([("reason", pa.string()), ("count", pa.int64())]))),
        ("flagged", pa.int64()),
        *[
            (name, pa.float64())
            for name in (
                "ood_rate",
                "expected_rate",
                "excess_rate_ci_low",
                "excess_rate_ci_high",
                "rate_p",
                "auc",
                "rank_p",
                "layers_p",
                "excess",
                "mean_shift",
                "largest_layer_shift",
                "p_value",
                "e_value",
                "statistic",
            )
        ],
        ("top_layers", parquet_list(pa.string())),
        ("layer_shift", parquet_list(pa.float64())),
        ("rank_counts", parquet_list(pa.int64())),
        ("z_sum", parquet_list(pa.float64())),
        ("z_sq_sum", parquet_list(pa.float64())),
        ("schema_version", pa.int32()),
    ]
)


def history_file(stream: str, partition: str) -> str:
    """A row's file, relative to the history's root."""
    return f"stream={stream}/{hashlib.sha256(partition.encode()).hexdigest()[:20]}.parquet"


def write_history_rows(history_url: str, stream: str, rows: list[dict], storage_options: StorageOptions = None) -> None:
    """Write (or replace) each row's file; a row is a dict of `HISTORY_SCHEMA`'s columns (missing ones null).

    Every file has the same columns and types, empty lists included, so the folder reads as one table.
    """
    fs, root = filesystem(history_url, storage_options)
    for row in rows:
        table = pa.Table.from_pylist([{**row, "schema_version": SCHEMA_VERSION}], schema=HISTORY_SCHEMA)
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


def history_row(
    verdict: PartitionVerdict, detector_id: str, stream: str, budget: str, min_excess: float, now: str
) -> dict:
    """What the history keeps of one partition: its summary (mergeable), its tests and its verdict."""
    tests, summary, guarantee = verdict.tests, verdict.summary, verdict.guarantee
    return {
        "partition": verdict.partition,
        "detector_id": detector_id,
        "monitored_at": now,
        "verdict": verdict.verdict,
        "stream": stream,
        "budget": budget,
        "min_excess": min_excess,
        "reference_risk": guarantee.risk,
        "detectable_rate_excess": guarantee.detectable_rate_excess,
        "detectable_mean_shift": guarantee.detectable_mean_shift,
        "reference_dominates": guarantee.reference_dominates,
        "rows": summary.rows,
        "scored": tests.scored,
        "errors_by_reason": [{"reason": k, "count": n} for k, n in sorted(summary.errors_by_reason.items())],
        "flagged": tests.flagged,
        "ood_rate": tests.ood_rate,
        "expected_rate": tests.expected_rate,
        "excess_rate_ci_low": tests.excess_rate_ci[0],
        "excess_rate_ci_high": tests.excess_rate_ci[1],
        "rate_p": tests.rate_p,
        "auc": tests.auc,
        "rank_p": tests.rank_p,
        "layers_p": tests.layers_p,
        "excess": tests.excess,
        "mean_shift": tests.mean_shift,
        "largest_layer_shift": tests.largest_layer_shift,
        "p_value": tests.p_value,
        "e_value": verdict.e_value,
        "statistic": verdict.statistic,
        "top_layers": tests.top_layers,
        "layer_shift": tests.layer_shift.tolist(),
        "rank_counts": summary.rank_counts.tolist(),
        "z_sum": summary.z_sum.tolist(),
        "z_sq_sum": summary.z_sq_sum.tolist(),
    }
