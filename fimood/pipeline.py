"""The Ray Data passes: read shards from storage, features on an actor pool, the fit reduce, scoring.

    shards ──read tasks──► rows (id, image, partition keys) ──actor pool: model replica──► features
    fit:   features ──stream to the driver──► FitReduce ──► detector artifact
    score: per input partition: rows ──actors: features + detector──► scores ──write staged──► commit

Every row comes out: scored, or with `error` set. Per-row seeds come from ids, so results do not
depend on batch size, actor count or placement.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy
from ray.data.extensions import ArrowTensorArray

from fimood.detector import Detector, DetectorSettings
from fimood.engine import trainable_parameters
from fimood.features import featurize_rows
from fimood.models import load_model, load_model_with_hash
from fimood.reduce import FitReduce
from fimood.sources import Shard, list_shards, read_shard
from fimood.storage import StorageOptions, filesystem, join
from fimood.workflow import load_detector_and_model

logger = logging.getLogger(__name__)

COMMIT_MARKER = "_SUCCESS"


@dataclass(frozen=True)
class PipelineConfig:
    """How rows are read and how the feature pass runs."""

    input_format: str = "parquet"  # "parquet" or "images"
    image_column: str = "image"
    id_column: str = "id"  # when absent, ids are derived: `<shard path>#<row>`
    batch_size: int = 64
    num_actors: int = 1
    cpus_per_actor: int = 1  # torch threads per model replica follow this (Ray sets OMP_NUM_THREADS)
    method: str = "auto"
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else a local Ray
    allowed_imports: tuple[str, ...] = ()  # packages a checkpoint may name its model class from
    storage_options: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.input_format not in ("parquet", "images"):
            raise ValueError(f"input_format must be 'parquet' or 'images', got {self.input_format!r}")
        for name in ("batch_size", "num_actors", "cpus_per_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class PassSummary:
    rows: int
    errors: int
    seconds: float
    skipped_partitions: int = 0

    def __str__(self) -> str:
        skipped = f", {self.skipped_partitions} partitions already committed" if self.skipped_partitions else ""
        return (
            f"{self.rows} rows ({self.errors} errors) in {self.seconds:.1f} s, "
            f"{self.rows / max(self.seconds, 1e-9):.1f} rows/s{skipped}"
        )


def start_ray(address: str | None = None) -> None:
    """Connect to `address` or RAY_ADDRESS; with neither, start a local Ray."""
    if not ray.is_initialized():
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )


class FeatureActor:
    """One model replica (on the GPU when the actor has one); maps a batch of rows to their features."""

    def __init__(
        self, model_url: str, storage_options: StorageOptions, method: str, allowed_imports: tuple[str, ...] = ()
    ):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_url, storage_options, allowed_imports=allowed_imports).to(device)
        self.method = method

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        rows = featurize_rows(self.model, ids, batch.column("image").to_pylist(), method=self.method)
        return (
            batch.drop_columns(["image"])
            .append_column("log_sq_norms", ArrowTensorArray.from_numpy(rows.log_sq_norms))
            .append_column("nll", pa.array(rows.nll))
            .append_column("error", pa.array(rows.errors, pa.string()))
        )


class ScoreActor:
    """A model replica plus the detector; maps a batch of rows to score-table rows."""

    def __init__(
        self,
        model_url: str,
        storage_options: StorageOptions,
        method: str,
        detector: Detector,
        z_scores: bool,
        allowed_imports: tuple[str, ...] = (),
    ):
        self.features = FeatureActor(model_url, storage_options, method, allowed_imports)
        self.detector, self.z_scores = detector, z_scores

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_columns(self.detector, self.features(batch), self.z_scores)


def _matrix(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column as one (n, L) array."""
    return np.concatenate([chunk.to_numpy() for chunk in table.column(name).chunks])


def score_columns(detector: Detector, features: pa.Table, z_scores: bool = False) -> pa.Table:
    """The score table (DESIGN.md) for a batch of features: the row's own columns, then ood_score,
    p_value, is_ood, nll, error and detector_id; rows with an error have null scores."""
    per_row = detector.by_group[1]
    failed = np.asarray(features.column("error").is_valid())
    log_sq_norms = _matrix(features, "log_sq_norms")[~failed]
    ood_score = np.zeros(len(failed))
    ood_score[~failed] = per_row.ood_score(log_sq_norms)
    table = features.drop_columns(["log_sq_norms", "nll", "error"])
    columns = {
        "ood_score": pa.array(ood_score, mask=failed),
        "p_value": pa.array(per_row.p_value(ood_score), mask=failed),
        "is_ood": pa.array(per_row.predict(ood_score), mask=failed),
        "nll": pa.array(np.nan_to_num(features.column("nll").to_numpy()), mask=failed),
        "error": features.column("error"),
        "detector_id": pa.array([detector.detector_id] * len(failed), pa.string()),
    }
    if z_scores:
        z = np.zeros((len(failed), int(per_row.rule_.kept_features_.sum())))
        z[~failed] = per_row.rule_.z_scores(log_sq_norms)
        columns["z_scores"] = pa.array(list(z), pa.list_(pa.float64()), mask=failed)
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def _rows(shards: list[Shard], url: str, config: PipelineConfig) -> ray.data.Dataset:
    """A dataset of rows (id, image, partition keys), one read task per shard."""

    def read(batch: pa.Table) -> pa.Table:
        tables = [
            read_shard(
                shards[index],
                url,
                input_format=config.input_format,
                image_column=config.image_column,
                id_column=config.id_column,
                storage_options=config.storage_options,
            )
            for index in batch.column("shard").to_pylist()
        ]
        return pa.concat_tables(tables)

    items = [{"shard": index} for index in range(len(shards))]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read, batch_size=1, batch_format="pyarrow"
    )


def _actor_options(config: PipelineConfig) -> dict:
    """A GPU per actor when the cluster has GPUs, else a CPU actor pool."""
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return {
        "compute": ActorPoolStrategy(size=config.num_actors),
        "num_gpus": gpus,
        "batch_size": config.batch_size,
        "batch_format": "pyarrow",
    }


def fit(
    model_url: str,
    data_url: str,
    config: PipelineConfig,
    settings: DetectorSettings | None = None,
    max_calibration_rows: int = 100_000,
) -> tuple[Detector, PassSummary]:
    """Feature pass over `data_url` on an actor pool, streamed into the fit reduce on the driver."""
    start = time.perf_counter()
    settings = settings or DetectorSettings(method=config.method, batch_size=config.batch_size)
    start_ray(config.address)
    model, model_sha256 = load_model_with_hash(
        model_url, config.storage_options, allowed_imports=config.allowed_imports
    )
    names = [name for name, _ in trainable_parameters(model)]
    features = _rows(list_shards(data_url, config.input_format, config.storage_options), data_url, config)
    features = features.map_batches(
        FeatureActor,
        fn_constructor_kwargs={
            "model_url": model_url,
            "storage_options": config.storage_options,
            "method": config.method,
            "allowed_imports": config.allowed_imports,
        },
        **_actor_options(config),
    )
    reduce = FitReduce(len(names), settings.calibration_fraction, max_calibration_rows)
    rows = errors = 0
    for batch in features.iter_batches(batch_size=1024, batch_format="pyarrow"):
        ok = np.asarray(batch.column("error").is_null())
        rows, errors = rows + len(ok), errors + int((~ok).sum())
        ids = [i for i, keep in zip(batch.column("id").to_pylist(), ok, strict=True) if keep]
        reduce.add(ids, _matrix(batch, "log_sq_norms")[ok], batch.column("nll").to_numpy()[ok])
    if errors:
        logger.warning("left %d of %d rows out of the fit: they could not be scored", errors, rows)
    per_row, typicality = reduce.finish(settings.false_positive_rate, settings.rule)
    detector = Detector(
        model_uri=model_url,
        model_sha256=model_sha256,
        feature_names=names,
        settings=settings,
        by_group={1: per_row},
        typicality=typicality,
        extra={"fit_data": data_url},
    )
    return detector, PassSummary(rows=rows, errors=errors, seconds=time.perf_counter() - start)


def score(
    detector_url: str,
    data_url: str,
    out_url: str,
    config: PipelineConfig,
    *,
    resume: bool = False,
    z_scores: bool = False,
) -> PassSummary:
    """Score every row of `data_url` into `out_url`, one committed output partition per input partition.

    Each partition is written to a staging folder and committed all at once (its `_SUCCESS` marker
    goes last); a re-run replaces a partition, and `resume` skips partitions already committed by
    the same detector.
    """
    start = time.perf_counter()
    start_ray(config.address)
    detector, _ = load_detector_and_model(detector_url, config.storage_options, config.allowed_imports)
    fs, out_root = filesystem(out_url, config.storage_options)
    arrow_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    shards = list_shards(data_url, config.input_format, config.storage_options)
    summary = PassSummary(rows=0, errors=0, seconds=0.0)
    run = uuid.uuid4().hex[:12]
    for partition, group in groupby(shards, key=lambda shard: shard.partition):
        final = "/".join([out_root.rstrip("/"), *(f"{key}={value}" for key, value in partition)])
        if resume and _committed_by(fs, final, detector.detector_id):
            summary.skipped_partitions += 1
            continue
        staging = join(out_root, "_staging", run, *(f"{key}={value}" for key, value in partition))
        scores = _rows(list(group), data_url, config).map_batches(
            ScoreActor,
            fn_constructor_kwargs={
                "model_url": detector.model_uri,
                "storage_options": config.storage_options,
                "method": config.method,
                "detector": detector,
                "z_scores": z_scores,
                "allowed_imports": config.allowed_imports,
            },
            **_actor_options(config),
        )
        scores = scores.drop_columns([key for key, _ in partition])  # the folder names carry them
        scores.write_parquet(staging, filesystem=arrow_fs)
        written = pq.ParquetDataset(staging, filesystem=arrow_fs).read(columns=["error"])
        errors = written.num_rows - written.column("error").null_count
        _commit(fs, staging, final, {"detector_id": detector.detector_id, "rows": written.num_rows, "errors": errors})
        summary.rows, summary.errors = summary.rows + written.num_rows, summary.errors + errors
    staging_root = join(out_root, "_staging")
    if fs.exists(join(staging_root, run)):
        fs.rm(join(staging_root, run), recursive=True)
    if fs.exists(staging_root) and not fs.ls(staging_root):
        fs.rmdir(staging_root)
    summary.seconds = time.perf_counter() - start
    return summary


def _committed_by(fs, folder: str, detector_id: str) -> bool:
    marker = f"{folder}/{COMMIT_MARKER}"
    return fs.exists(marker) and json.loads(fs.cat_file(marker)).get("detector_id") == detector_id


def _commit(fs, staging: str, final: str, marker: dict) -> None:
    """Replace the partition's data files with the staged ones; the marker is written last.

    On a local filesystem each file appears by an atomic rename; on object stores, readers should
    wait for `_SUCCESS`, as with Hadoop-style committers.
    """
    fs.makedirs(final, exist_ok=True)
    if fs.exists(f"{final}/{COMMIT_MARKER}"):
        fs.rm(f"{final}/{COMMIT_MARKER}")
    old = fs.glob(f"{final}/*.parquet")
    for path in fs.ls(staging, detail=False):
        fs.mv(path, f"{final}/{path.rsplit('/', 1)[-1]}")
    for path in old:
        fs.rm(path)
    fs.pipe_file(f"{final}/{COMMIT_MARKER}", json.dumps(marker).encode())
