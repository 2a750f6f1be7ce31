"""The rows of a Ray pass: read units read and decoded by Ray Data read tasks, then one actor pool of
model replicas. The fit and score passes (`fit_pass`, `score_pass`) are built on it.

    listing + footers (driver) ──► read units ──read tasks: fetch + decode──► rows (id, pixels, error, partition)
        ──actor pool: one model replica per actor──► features (or scores)

Read and write tasks reserve no CPU: next to the model replicas they are light, and any reservation
would starve them whenever the actor pool holds every CPU of a node (a CPU-only run with
--cpus-per-actor equal to its cores); how many run at once is capped instead.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy, Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask
from ray.data.extensions import ArrowTensorArray

from fimood.engine import METHODS, check_covered
from fimood.lake.images import decode_cells
from fimood.lake.sources import ReadSpec, ReadUnit, check_format, read_unit
from fimood.method.detector import DetectorArtifact
from fimood.method.features import featurize_rows
from fimood.models import LikelihoodModel
from fimood.storage import StorageOptions, StorageUnavailable

logger = logging.getLogger(__name__)

IO_TASKS_PER_ACTOR = 2  # read (and write) tasks in flight per model replica


@dataclass(frozen=True)
class PipelineConfig:
    """How rows are read and how the feature pass runs."""

    input_format: str = "parquet"  # "parquet" or "images"
    image_column: str = "image"
    id_column: str = "id"  # when absent, ids are derived: `<shard path>#<row>`
    batch_size: int = 64
    num_actors: int = 1
    cpus_per_actor: int = 1  # Ray CPUs, and torch threads, per model replica
    engine: str = "auto"  # the gradient engine (`fimood.engine.METHODS`)
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else a local Ray
    allowed_imports: tuple[str, ...] = ()  # packages a checkpoint may name its model class from
    max_error_fraction: float = 0.5  # above it a pass fails instead of writing (or fitting on) a table of errors
    strict: bool = False  # refuse, before any work, a model with a tensor no hooks rule covers (no vmap fallback)
    storage_options: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        check_format(self.input_format)
        for name in ("batch_size", "num_actors", "cpus_per_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.engine not in METHODS:
            raise ValueError(f"engine must be one of {METHODS}, got {self.engine!r}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction!r}")

    def read_spec(self, url: str) -> ReadSpec:
        return ReadSpec(url, self.input_format, self.image_column, self.id_column, self.storage_options)


def quiet_ray() -> None:
    """Keep Ray's start-up notices out of a user's output: its Python logs only from ERROR, its C++
    core's only when fatal (for a Ray started afterwards). Without it a local run shows a warning that
    token authentication is on, and an error-level line for every actor pool ("constructor arguments
    in the object store": a known Ray issue, ray-project/ray#57733) that reads like a failure and is not.
    """
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in ("ray", "ray.data"):  # Ray Data's logger has a level of its own
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def storage_errors_in_one_line() -> Iterator[None]:
    """A `StorageUnavailable` raised in a Ray task reaches the caller as its one line, not inside Ray's trace."""
    try:
        yield
    except Exception as error:
        cause = storage_cause(error)
        if cause is None:
            raise
        raise StorageUnavailable(cause) from None


def storage_cause(error: BaseException) -> str | None:
    """The message of the `StorageUnavailable` behind an error. Ray keeps a task's error as `cause`, but
    Ray Data's map errors keep only its text, so the message is taken from there when no object is left."""
    text = str(error)
    for _ in range(20):  # causes chain shallowly; the bound only guards against cycles
        inner = getattr(error, "cause", None)
        if isinstance(inner, BaseException):
            error = inner
        elif isinstance(error, StorageUnavailable):
            return str(error)
        elif (error := error.__cause__ or error.__context__) is None:
            break
    found = re.search(rf"{StorageUnavailable.__module__}\.{StorageUnavailable.__name__}: (.+)", text)
    return found.group(1) if found else None


def start_ray(address: str | None = None) -> None:
    """Connect to `address` or RAY_ADDRESS; with neither, start a local Ray.

    Ray logs at the level its logger is set to (the CLI sets ERROR unless -v), not lower; when that is
    ERROR (`quiet_ray`), the workers' own log lines stay in Ray's log files instead of the user's terminal.
    """
    if not ray.is_initialized():
        level = max(logging.WARNING, logging.getLogger("ray").getEffectiveLevel())
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            logging_level=level,
            log_to_driver=level < logging.ERROR,
        )


class ShardDatasource(Datasource):
    """A Ray Data reader of read units (`fimood.lake.sources.plan_reads`): one read task per unit.

    Images are decoded in the read task, so actors receive uint8 pixels (N, C, H, W) and a GPU
    replica spends no time on decoding; rows that cannot be decoded carry their reason in `error`.
    """

    def __init__(self, units: list[ReadUnit], spec: ReadSpec, image_shape: tuple[int, int, int]):
        super().__init__()
        self.units, self.spec, self.image_shape = units, spec, tuple(image_shape)

    def estimate_inmemory_data_size(self) -> int:
        return sum(unit.rows for unit in self.units) * math.prod(self.image_shape)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        return [
            ReadTask(
                functools.partial(_read_block, unit, self.spec, self.image_shape),
                BlockMetadata(
                    num_rows=unit.rows,
                    size_bytes=unit.rows * math.prod(self.image_shape),
                    input_files=list(unit.paths),
                    exec_stats=None,
                ),
                per_task_row_limit=per_task_row_limit,
            )
            for unit in self.units
        ]


def _read_block(unit: ReadUnit, spec: ReadSpec, image_shape: tuple[int, int, int]) -> Iterator[pa.Table]:
    ids, cells = read_unit(unit, spec)
    images, errors = decode_cells(cells, image_shape)
    yield pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "pixels": ArrowTensorArray.from_numpy(images),
            "error": pa.array(errors, pa.string()),
            "partition": pa.array(np.full(len(ids), unit.partition, np.int32)),
        }
    )


class FeatureActor:
    """One model replica (on the GPU when the actor has one); maps a batch of rows to their features.

    It loads the checkpoint itself, with the class the driver resolved (registry or allow-list), and
    refuses it unless its content hash is the one the driver checked: a model replaced while the job
    runs is never scored with. Its constructor's arguments stay small, so Ray can restart it anywhere.
    """

    def __init__(
        self,
        model_class: type[LikelihoodModel],
        model_url: str,
        model_sha256: str,
        storage_options: StorageOptions,
        engine: str,
        threads: int,
    ):
        torch.set_num_threads(threads)
        model = model_class.from_pretrained(model_url, storage_options)
        if model.checkpoint_sha256 != model_sha256:
            raise ValueError(
                f"the model at {model_url} changed while the job ran (sha256 {model.checkpoint_sha256[:12]}, "
                f"expected {model_sha256[:12]}); fit the detector again"
            )
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = engine

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        images = matrix(batch, "pixels")
        rows = featurize_rows(self.model, ids, images, batch.column("error").to_pylist(), engine=self.engine)
        return (
            batch.drop_columns(["pixels", "error"])
            .append_column("log_sq_norms", ArrowTensorArray.from_numpy(rows.log_sq_norms))
            .append_column("nll", pa.array(rows.nll))
            .append_column("error", pa.array(rows.errors, pa.string()))
        )


class ScoreActor:
    """A model replica plus the detector; maps a batch of rows to score-table rows."""

    def __init__(self, detector: DetectorArtifact, z_scores: bool, **feature_kwargs):
        self.features = FeatureActor(**feature_kwargs)
        self.detector, self.z_scores = detector, z_scores

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_columns(self.detector, self.features(batch), self.z_scores)


def matrix(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column as one array, rows first."""
    return np.concatenate([chunk.to_numpy() for chunk in table.column(name).chunks])


def score_columns(detector: DetectorArtifact, features: pa.Table, z_scores: bool = False) -> pa.Table:
    """The score table for a batch of features: the row's own columns, then ood_score, p_value,
    is_ood, nll, error and detector_id; rows with an error have null scores."""
    per_row = detector.by_group[1]
    failed = np.asarray(features.column("error").is_valid())
    log_sq_norms = matrix(features, "log_sq_norms")[~failed]
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


def check_strict(model: LikelihoodModel, config: PipelineConfig) -> None:
    """With `config.strict`, on the driver before Ray starts: every trainable tensor has a hooks rule."""
    if config.strict:
        if config.engine not in ("auto", "hooks") or not getattr(model, "layers_see_samples", True):
            raise ValueError(f"strict mode checks the hooks engine's rules; the engine here is {config.engine!r}")
        dtype = next(model.parameters()).dtype
        check_covered(model, torch.zeros(1, *model.image_shape, dtype=dtype))


def feature_rows(
    units: list[ReadUnit],
    spec: ReadSpec,
    model_url: str,
    model: LikelihoodModel,
    config: PipelineConfig,
    actor: type = FeatureActor,
    **actor_kwargs,
) -> ray.data.Dataset:
    """Rows of every read unit through one actor pool of replicas of `model` (FeatureActor or ScoreActor)."""
    in_flight = min(IO_TASKS_PER_ACTOR * config.num_actors, len(units))
    rows = ray.data.read_datasource(ShardDatasource(units, spec, model.image_shape), num_cpus=0, concurrency=in_flight)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    replica = {
        "model_class": type(model),
        "model_url": model_url,
        "model_sha256": model.checkpoint_sha256,
        "storage_options": config.storage_options,
        "engine": config.engine,
        "threads": config.cpus_per_actor,
    }
    return rows.map_batches(
        actor,
        fn_constructor_kwargs={**actor_kwargs, **replica},
        # The model runs on the actor's own thread: by default Ray Data calls it from a helper thread,
        # where torch's OpenMP team ran at about half speed (0.70 s against 0.43 s per 64 rows, 2 cores).
        compute=ActorPoolStrategy(size=config.num_actors, enable_true_multi_threading=True),
        num_cpus=config.cpus_per_actor,
        num_gpus=gpus,
        batch_size=config.batch_size,
        batch_format="pyarrow",
    )


def count_errors(by_reason: dict[str, int]) -> str:
    """`3 errors: 2 image is missing; 1 ...`, most frequent reason first."""
    reasons = "; ".join(f"{count} {reason}" for reason, count in sorted(by_reason.items(), key=lambda kv: -kv[1]))
    return f"{sum(by_reason.values())} errors" + (f": {reasons}" if reasons else "")


def rate(rows: int, seconds: float) -> str:
    return f"{seconds:.1f} s, {rows / max(seconds, 1e-9):.1f} rows/s"
