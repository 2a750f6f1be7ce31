"""The monitor's history: one Delta table, one row per (stream, partition), that any Delta reader opens.

    <history>/_delta_log/ ...  <history>/stream=<name>/*.parquet

A stream is what the monitor's lifetime budget runs over (one monitored dataset with one detector,
or a name the user gives). A night's rows replace that stream's rows of the same partitions in one
commit, so a partition never appears twice and a reader gets the history before the night or after
it, whole; monitors writing other nights at the same time keep each other's rows (a commit that
loses the race is tried again on the new version). Histories of fimood 0.2 (one Parquet file per
row, no `_delta_log`) are refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable

from fimood.lake.delta import (
    ConcurrentWriters,
    delta_location,
    is_delta_table,
    open_table,
    quote,
    replace_rows,
    unavailable_in_one_line,
)
from fimood.lake.schema import parquet_list
from fimood.monitor.result import PartitionVerdict
from fimood.storage import StorageOptions, filesystem, resilient
from fimood.version import __version__

LEGACY_FOLDERS = ("stream=*", "detector=*")  # fimood 0.2's history, by stream (schema 3) or detector (2)
SCHEMA_VERSION = 4  # 2: `mean_shift`, `layers_p` of every layer's mean; 3: per stream; 4: Delta, the version tested

HISTORY_SCHEMA = pa.schema(
    [
        ("partition", pa.string()),
        ("detector_id", pa.string()),
        ("scores_version", pa.string()),  # the score table's version of the partition that was tested
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


@dataclass(frozen=True)
class StreamHistory:
    """A stream's rows as one version of the history had them, and that version's files of the stream."""

    rows: list[dict]
    files: frozenset[str]


def read_stream(history_url: str, stream: str, storage_options: StorageOptions = None) -> StreamHistory:
    """Every row kept for `stream`, in partition order (none when the history is new), and what a write
    made on them checks: that no other monitor wrote the stream since."""
    table = open_table(*_location(history_url, storage_options))
    if table is None:
        return StreamHistory([], frozenset())
    with unavailable_in_one_line(f"read {history_url}"):
        rows = table.to_pyarrow_dataset().to_table(filter=pads.field("stream") == stream).to_pylist()
    return StreamHistory(sorted(rows, key=lambda row: row["partition"]), _stream_files(table, stream))


def read_history(history_url: str, stream: str, storage_options: StorageOptions = None) -> list[dict]:
    """Every row kept for `stream`, in partition order (none when the history is new)."""
    return read_stream(history_url, stream, storage_options).rows


def write_history_rows(
    history_url: str,
    stream: str,
    rows: list[dict],
    storage_options: StorageOptions = None,
    read: StreamHistory | None = None,
) -> None:
    """Write (or replace) the stream's rows of these partitions, in one commit; a row is a dict of
    `HISTORY_SCHEMA`'s columns (missing ones null).

    Given `read` (what the rows were decided on), the write is made only if no other monitor wrote the
    stream since: else the decision would rest on a past it did not see, and `ConcurrentWriters` says
    so in one line (run the night again). Without it, rows of other partitions are simply kept.
    """
    if not rows:
        return
    uri, options = _location(history_url, storage_options)
    table = pa.Table.from_pylist(
        [{**row, "stream": stream, "schema_version": SCHEMA_VERSION} for row in rows], schema=HISTORY_SCHEMA
    )

    def rows_for(version: DeltaTable | None) -> pa.Table:
        if read is not None and _stream_files(version, stream) != read.files:
            raise ConcurrentWriters(
                f"{history_url}: another monitor wrote stream {stream!r} since this one read its history; its "
                "nights are kept and this night's verdicts are not written: run this night again"
            )
        return table

    partitions = ", ".join(quote(row["partition"]) for row in rows)
    replace_rows(
        uri,
        options,
        rows_for,
        predicate=f"stream = {quote(stream)} AND partition IN ({partitions})",
        partition_by=["stream"],
        metadata={"fimood.stream": stream, "fimood.version": __version__, "fimood.schema_version": str(SCHEMA_VERSION)},
        name="fimood monitor history",
        description=f"fimood monitor history, schema version {SCHEMA_VERSION}: one row per (stream, partition)",
    )


def _stream_files(table: DeltaTable | None, stream: str) -> frozenset[str]:
    if table is None:
        return frozenset()
    with unavailable_in_one_line("read the history's log"):
        files = pa.table(table.get_add_actions(flatten=True))
    if not files.num_rows:
        return frozenset()
    mine = pc.equal(files.column("partition.stream"), stream)
    return frozenset(files.filter(mine).column("path").to_pylist())


def check_history(history_url: str, storage_options: StorageOptions = None) -> None:
    """Refuse, in one line, a history this fimood cannot keep (one of fimood 0.2)."""
    _location(history_url, storage_options)


def _location(history_url: str, storage_options: StorageOptions) -> tuple[str, dict[str, str]]:
    """The history's Delta location, after refusing a history of fimood 0.2 in one line."""
    fs, root = filesystem(history_url, storage_options)
    fs, root = resilient(fs), root.rstrip("/")
    legacy = fs.exists(root) and not is_delta_table(fs, root)  # (a new table's data lands before its log)
    found = [path for folder in LEGACY_FOLDERS for path in fs.glob(f"{root}/{folder}/*.parquet")] if legacy else []
    if any(not path.rsplit("/", 1)[-1].startswith("part-") for path in found):  # delta-rs names its files part-*
        raise ValueError(
            f"{history_url} is a monitor history of fimood 0.2 (a Parquet file per row), not a Delta table; "
            "give the monitor a new --history (its lifetime budget starts again there)"
        )
    return delta_location(history_url, storage_options)


def history_row(
    verdict: PartitionVerdict, detector_id: str, stream: str, budget: str, min_excess: float, now: str
) -> dict:
    """What the history keeps of one partition: its summary (mergeable), its tests and its verdict."""
    tests, summary, guarantee = verdict.tests, verdict.summary, verdict.guarantee
    return {
        "partition": verdict.partition,
        "detector_id": detector_id,
        "scores_version": verdict.scores_version,
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
