"""The fit pass: features of every in-distribution row on an actor pool, reduced in Ray tasks: each task
reduces its batch into a partial fit, and merge tasks merge the partials as they come, so the driver
holds references and one merged fit, O(features² + calibration sample), whatever the number of rows.

    actors: features ──► tasks: partial fits ──► merge tasks (MERGE_FAN_IN at a time) ──► driver: one fit
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from fimood.engine import trainable_parameters
from fimood.lake.sources import list_partitions, plan_reads
from fimood.method.detector import DetectorArtifact, DetectorSettings
from fimood.method.reduce import FitReduce
from fimood.models import load_model
from fimood.passes.actors import IO_TASKS_PER_ACTOR, MEMORY_SPLITS, check_strict, feature_rows
from fimood.passes.config import PipelineConfig
from fimood.passes.reading import footers_in_tasks, matrix
from fimood.passes.runtime import errors_in_one_line, start_ray
from fimood.progress import count_errors, rate
from fimood.storage import absolute_url, overlaps

logger = logging.getLogger(__name__)


@dataclass
class FitSummary:
    """What a fit pass read."""

    rows: int
    seconds: float
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    memory_splits: int = 0  # times a batch was halved because the GPU ran out of memory

    @property
    def errors(self) -> int:
        return sum(self.errors_by_reason.values())

    def __str__(self) -> str:
        text = f"{self.rows} rows ({count_errors(self.errors_by_reason)}) in {rate(self.rows, self.seconds)}"
        if self.memory_splits:
            text += f"; batches halved {self.memory_splits} times as the GPU ran out of memory"
        return text


@errors_in_one_line()
def fit(
    model_url: str,
    data_url: str,
    config: PipelineConfig,
    settings: DetectorSettings | None = None,
    max_calibration_rows: int = 100_000,
) -> tuple[DetectorArtifact, FitSummary]:
    """Feature pass over `data_url` on an actor pool, streamed into the fit reduce on the driver.

    Raises:
        ValueError: when a shard cannot be read, or more than `config.max_error_fraction` of the rows
            could not be scored: a fit where most rows fail is a bug (wrong column, wrong model), not data.
    """
    start = time.perf_counter()
    settings = settings or DetectorSettings()
    model = load_model(model_url, config.storage_options, allowed_imports=config.allowed_imports)
    check_strict(model, config)
    names = [name for name, _ in trainable_parameters(model)]
    spec = config.read_spec(data_url)
    listed = list_partitions(data_url, config.input_format, config.storage_options)
    start_ray(config.address)
    plan = plan_reads(listed, spec, footers_in_tasks)
    if plan.unreadable:
        named = "; ".join(f"{path}: {reason}" for path, reason in sorted(plan.unreadable.items()))
        raise ValueError(f"{len(plan.unreadable)} shards cannot be read, so nothing was fitted: {named}")
    units, rows_in = plan.units, plan.rows
    # rows of the model's training table (or a folder inside it, or one holding it) in its id-hash range were trained on
    training = model.training_data
    reads_training_data = training is not None and overlaps(training["data"], data_url, config.storage_options)
    training_range = tuple(training["id_hash_range"]) if reads_training_data else None
    empty = FitReduce(len(names), settings.calibration_fraction, max_calibration_rows, training_range)
    features = feature_rows(units, spec, model_url, model, config)
    partials = features.map_batches(
        partial_fit,
        fn_kwargs={"empty": empty.to_bytes()},
        batch_size=ROWS_PER_PARTIAL,
        batch_format="pyarrow",
        num_cpus=0,
        concurrency=IO_TASKS_PER_ACTOR * config.most_actors,
    )
    merged = merged_in_tasks(partials)
    reduce, rows = FitReduce.from_bytes(merged["fit"]), merged["rows"]
    reasons = Counter(json.loads(merged["errors"]))
    summary = FitSummary(rows, time.perf_counter() - start, dict(reasons), merged[MEMORY_SPLITS])
    if rows != sum(rows_in):
        raise RuntimeError(f"fit read {rows} rows where the shards hold {sum(rows_in)}; nothing was fitted")
    if summary.errors > config.max_error_fraction * rows:
        raise ValueError(
            f"fit: {count_errors(summary.errors_by_reason)} in {rows} rows, above the max error fraction "
            f"{config.max_error_fraction}; check the data and the model, nothing was fitted"
        )
    if summary.errors:
        logger.warning("left %d of %d rows out of the fit: they could not be scored", summary.errors, rows)
    training_rows_in_fit = None if training is None else reduce.training_rows
    if training_rows_in_fit:
        fitted = rows - summary.errors
        logger.warning(
            "fit: %d of %d rows (%.1f%%) are rows the model was trained on (%s, id hash in [%g, %g)), which it fits "
            "better than fresh rows, so the detector's in-distribution reference is wrong; fit on rows the model was "
            "not trained on, e.g. train with --id-hash-range 0 0.75 and fit on a table of the rest",
            training_rows_in_fit,
            fitted,
            100 * training_rows_in_fit / fitted,
            training["data"],
            *training["id_hash_range"],
        )
    per_row, typicality = reduce.finish(settings.false_positive_rate, settings.rule)
    detector = DetectorArtifact(
        model_uri=absolute_url(model_url),
        model_sha256=model.checkpoint_sha256,
        feature_names=names,
        settings=settings,
        by_group={1: per_row},
        typicality=typicality,
        extra={
            "fit_data": absolute_url(data_url),
            "training_rows_in_fit": training_rows_in_fit,
            "training_data": training,
        },
        feature_settings=config.feature_settings,
    )
    return detector, summary


ROWS_PER_PARTIAL = 4096  # feature rows a task reduces into one partial fit
MERGE_FAN_IN = 16  # partial fits one merge task merges
PARTIAL = pa.schema(
    [
        pa.field("fit", pa.binary()),  # `FitReduce.to_bytes`
        pa.field("rows", pa.int64()),
        pa.field("errors", pa.string()),  # JSON: reason → rows
        pa.field(MEMORY_SPLITS, pa.int64()),
    ]
)


def partial_fit(batch: pa.Table, empty: bytes) -> pa.Table:
    """A task: the partial fit of a batch of feature rows (rows with an error counted, not fitted)."""
    reduce = FitReduce.from_bytes(empty)
    ok = np.asarray(batch.column("error").is_null())
    ids = [row_id for row_id, keep in zip(batch.column("id").to_pylist(), ok, strict=True) if keep]
    reduce.add(ids, matrix(batch, "log_sq_norms")[ok], batch.column("nll").to_numpy()[ok])
    reasons = Counter(reason for reason in batch.column("error").to_pylist() if reason is not None)
    splits = pc.sum(batch.column(MEMORY_SPLITS)).as_py() or 0
    return pa.Table.from_pylist(
        [{"fit": reduce.to_bytes(), "rows": len(ok), "errors": json.dumps(reasons), MEMORY_SPLITS: splits}], PARTIAL
    )


def merged_in_tasks(partials: ray.data.Dataset) -> dict:
    """All partial fits merged into one, in merge tasks launched as the partials are made (each merges the
    previous merge and the next MERGE_FAN_IN - 1 partials); the driver holds only their references."""
    waiting: list = []
    for bundle in partials.iter_internal_ref_bundles():
        for entry, part in zip(bundle.blocks, bundle.slices, strict=True):
            waiting.append((entry.ref, None if part is None else (part.start_offset, part.end_offset)))
        if len(waiting) >= MERGE_FAN_IN:
            waiting = [(_merge.remote(waiting), None)]
    return ray.get(_merge.remote(waiting)).to_pylist()[0]


@ray.remote(num_cpus=0)
def _merge(parts: list) -> pa.Table:
    """Partial fits (blocks of `PARTIAL` rows, or slices of them) merged into one `PARTIAL` row."""
    tables = []
    for ref, part in parts:
        table = ray.get(ref)
        tables.append(table if part is None else table.slice(part[0], part[1] - part[0]))
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    if not rows:
        raise RuntimeError("the fit pass made no partial fits")
    reduce, reasons = FitReduce.from_bytes(rows[0]["fit"]), Counter()
    for row in rows[1:]:
        reduce.merge(FitReduce.from_bytes(row["fit"]))
    for row in rows:
        reasons.update(json.loads(row["errors"]))
    merged = {
        "fit": reduce.to_bytes(),
        "rows": sum(row["rows"] for row in rows),
        "errors": json.dumps(reasons),
        MEMORY_SPLITS: sum(row[MEMORY_SPLITS] for row in rows),
    }
    return pa.Table.from_pylist([merged], PARTIAL)
