"""The monitor's reduce: committed score tables → one `PartitionSummary` per partition, in Ray.

Ray Data reads the data files of each partition's current version in the score table (the files of
one pinned version, kept for the table's retention); each batch becomes a
partial summary (and its few most OOD rows); the driver only merges partials, never rows.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import ray

from fimood.lake import schema
from fimood.lake.images import decode_cells, shape_of
from fimood.lake.score_table import ScoreTable
from fimood.lake.sources import Partition, ReadSpec, plan_reads, read_blocks
from fimood.method.shift import PartitionSummary
from fimood.passes.runtime import errors_in_one_line
from fimood.storage import StorageOptions

TOP_ROWS = 8  # most OOD rows kept per partition, shown as thumbnails when it shifts
COLUMNS = [schema.ID, schema.OOD_SCORE, schema.ERROR, schema.Z_SCORES]


@dataclass
class SummaryWithExamples:
    summary: PartitionSummary
    most_ood: list[tuple[float, str]] = field(default_factory=list)  # (ood_score, id), highest first
    scores_version: str | None = None  # the committed version summarised (`Committed.key`)


@errors_in_one_line()
def summarise_partitions(
    out_url: str,
    folders: list[str],
    calibration_scores: np.ndarray,
    n_layers: int,
    storage_options: StorageOptions = None,
) -> dict[str, SummaryWithExamples]:
    """Summaries of the committed partitions `folders` of a score table, scored with z-scores (a partition
    without rows has none to say so, and an empty summary)."""
    table = ScoreTable(out_url, storage_options)
    version = table.snapshot()  # one version for the checks and the files read
    committed = table.committed(version) if version is not None else {}
    for folder in folders:
        if folder in committed and not (committed[folder] and table.lineage(committed[folder].lineage_id)["z_scores"]):
            raise ValueError(f"{out_url}: partition {folder or '.'!r} has no committed rows with z-scores to summarise")
    partition_of = table.files(folders, version) if version is not None else {}
    fs = getattr(table.fs, "fs", table.fs)  # the fsspec filesystem itself, for pyarrow
    results = {
        folder: SummaryWithExamples(
            PartitionSummary.empty(len(calibration_scores), n_layers),
            scores_version=committed[folder].key if committed.get(folder) else None,
        )
        for folder in folders
    }
    if not partition_of:
        return results
    rows = ray.data.read_parquet(
        sorted(partition_of), filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), include_paths=True
    ).select_columns([*COLUMNS, "path"])  # Ray pushes the projection down into the read
    partials = rows.map_batches(
        _partial_summaries,
        fn_kwargs={"calibration_scores": calibration_scores, "n_layers": n_layers, "partition_of": partition_of},
        batch_format="pyarrow",
        batch_size=4096,
    )
    for partial in partials.iter_rows():
        result = results[partial["partition"]]
        result.summary = result.summary.merge(_summary_of(partial))
        result.most_ood = heapq.nlargest(TOP_ROWS, result.most_ood + json.loads(partial["most_ood"]))
    return results


def _partial_summaries(
    batch: pa.Table, calibration_scores: np.ndarray, n_layers: int, partition_of: dict[str, str]
) -> pa.Table:
    """One row per partition in the batch: its partial summary, columns as lists."""
    out = []
    paths = np.array(batch.column("path").to_pylist(), dtype=object)
    for path in np.unique(paths):
        part = batch.filter(pa.array(paths == path))
        ok = np.asarray(part.column(schema.ERROR).is_null())
        scores = part.column(schema.OOD_SCORE).to_numpy(zero_copy_only=False)[ok]
        z_lists = part.column(schema.Z_SCORES).filter(pa.array(ok)).combine_chunks()
        z = pc.list_flatten(z_lists).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, n_layers)
        summary = PartitionSummary.from_rows(calibration_scores, scores, z, part.column(schema.ERROR).to_pylist())
        ids = np.array(part.column(schema.ID).to_pylist(), dtype=object)[ok]
        top = np.argsort(-scores)[:TOP_ROWS]
        out.append(
            {
                "partition": partition_of[path],
                "rows": summary.rows,
                "errors_by_reason": json.dumps(summary.errors_by_reason),
                "rank_counts": summary.rank_counts.tolist(),
                "z_sum": summary.z_sum.tolist(),
                "z_sq_sum": summary.z_sq_sum.tolist(),
                "most_ood": json.dumps([(float(scores[i]), str(ids[i])) for i in top]),
            }
        )
    return pa.Table.from_pylist(out)


def _summary_of(row: dict) -> PartitionSummary:
    return PartitionSummary(
        rows=row["rows"],
        errors_by_reason=json.loads(row["errors_by_reason"]),
        rank_counts=np.asarray(row["rank_counts"], np.int64),
        z_sum=np.asarray(row["z_sum"], np.float64),
        z_sq_sum=np.asarray(row["z_sq_sum"], np.float64),
    )


def fetch_images(partition: Partition, spec: ReadSpec, ids: list[str]) -> dict[str, np.ndarray]:
    """The decoded images of `ids` from one input partition, read in a Ray task (uint8 (C, H, W) each)."""
    return ray.get(_fetch_images.remote(partition, spec, list(ids)))


@ray.remote(num_cpus=0)
def _fetch_images(partition: Partition, spec: ReadSpec, ids: list[str]) -> dict[str, np.ndarray]:
    wanted, found = set(ids), {}
    for unit in plan_reads([partition], spec).units:
        for block in read_blocks(unit, spec):
            keep = [i for i, row_id in enumerate(block.ids) if row_id in wanted and block.cells[i] is not None]
            if keep:
                images, errors = decode_cells([block.cells[i] for i in keep], shape_of(block.cells[keep[0]]))
                found.update(
                    {block.ids[i]: image for i, image, error in zip(keep, images, errors, strict=True) if not error}
                )
            if len(found) == len(wanted):
                return found
    return found
