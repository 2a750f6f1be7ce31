"""The actor pool: one model replica per actor, mapping batches of decoded rows to features or to
score-table rows.

    rows (id, pixels, error, partition) ──actor pool: one model replica per actor──► features (or scores)
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy
from ray.data.extensions import ArrowTensorArray

from fimood.engine import check_covered
from fimood.lake import schema
from fimood.lake.sources import ReadSpec, ReadUnit
from fimood.method.detector import DetectorArtifact
from fimood.method.features import featurize_rows
from fimood.models import GpuUnusable, LikelihoodModel
from fimood.passes.config import PipelineConfig
from fimood.passes.reading import ShardDatasource, matrix
from fimood.storage import StorageOptions

IO_TASKS_PER_ACTOR = 2  # read (and write) tasks in flight per model replica
MEMORY_SPLITS = "memory_splits"  # times a batch was halved because the GPU ran out of memory (on its first row)
logger = logging.getLogger(__name__)


def replica_device() -> str:
    """The replica's device: the GPU Ray gave it, else the CPU. A GPU torch cannot use stops the run."""
    gpus = ray.get_gpu_ids()
    if not gpus:
        return "cpu"
    if not torch.cuda.is_available():
        raise GpuUnusable(
            f"a model replica was given GPU {gpus[0]} but its torch {torch.__version__} cannot use CUDA (a CPU "
            "build, or no driver on the node): install a CUDA build of torch on the GPU nodes, or pass "
            "--gpus-per-actor 0 to score on CPUs"
        )
    return "cuda"


def gpus_per_actor(config: PipelineConfig) -> float:
    """GPUs each replica asks for: `config.gpus_per_actor` when given; else 1 when the cluster has GPUs or its
    autoscaler can add GPU nodes (the node groups it publishes to Ray: KubeRay's worker groups, the
    cluster launcher's node types, even at zero nodes now), else 0."""
    if config.gpus_per_actor is not None:
        return config.gpus_per_actor
    if ray.cluster_resources().get("GPU", 0) > 0:
        return 1.0
    if (autoscalable_resources() or {}).get("GPU", 0) > 0:
        logger.info("no GPU node yet, but the autoscaler can add some: each replica asks for one GPU")
        return 1.0
    logger.info("no GPU in the cluster, nor any its autoscaler can add: replicas run on CPUs")
    return 0.0


def autoscalable_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler can provide, from the node groups it publishes to
    Ray's GCS (as Ray Data and Ray Train read them); None without an autoscaler."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception as error:  # a Ray that does not publish it: decide from what is there now
        logger.info("could not read the autoscaler's node groups (%s)", error)
        return None


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
        self.model = model.to(replica_device())
        self.engine = engine

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        images = matrix(batch, "pixels")
        rows = featurize_rows(self.model, ids, images, batch.column("error").to_pylist(), engine=self.engine)
        splits = np.zeros(len(ids), np.int32)
        splits[:1] = rows.memory_splits  # counted once per batch, so sums over rows count batches' splits
        return (
            batch.drop_columns(["pixels", "error"])
            .append_column("log_sq_norms", ArrowTensorArray.from_numpy(rows.log_sq_norms))
            .append_column("nll", pa.array(rows.nll))
            .append_column("error", pa.array(rows.errors, pa.string()))
            .append_column(MEMORY_SPLITS, pa.array(splits))
        )


class ScoreActor:
    """A model replica plus the detector; maps a batch of rows to score-table rows (`fimood.lake.schema`)."""

    def __init__(self, detector: DetectorArtifact, z_scores: bool, **feature_kwargs):
        self.features = FeatureActor(**feature_kwargs)
        self.detector, self.z_scores = detector, z_scores

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_table(self.detector, self.features(batch), self.z_scores)


def score_table(detector: DetectorArtifact, features: pa.Table, z_scores: bool = False) -> pa.Table:
    """A batch of features as score-table rows, with the `partition` column the write tasks split on (and
    `memory_splits`, which they count); rows with an error have null scores."""
    ok = np.asarray(features.column("error").is_null())
    scores = detector.per_row.score_rows(matrix(features, "log_sq_norms")[ok], z_scores)
    columns = {
        schema.ID: features.column("id"),
        schema.OOD_SCORE: _rows_of(scores.ood_score, ok),
        schema.P_VALUE: _rows_of(scores.p_value, ok),
        schema.IS_OOD: _rows_of(scores.is_ood, ok),
        schema.NLL: _rows_of(features.column("nll").to_numpy()[ok], ok),
        schema.ERROR: features.column("error"),
        schema.DETECTOR_ID: pa.array([detector.detector_id] * len(ok), pa.string()),
    }
    if z_scores:
        columns[schema.Z_SCORES] = _rows_of(scores.z_scores, ok)
    table = pa.Table.from_pydict(columns, schema=schema.score_schema(z_scores))
    return table.append_column("partition", features.column("partition")).append_column(
        MEMORY_SPLITS, features.column(MEMORY_SPLITS)
    )


def _rows_of(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """Values of the scored rows spread over every row of the batch, null where a row was not scored."""
    full = np.zeros((len(ok), *values.shape[1:]), values.dtype)
    full[ok] = values
    return pa.array(list(full) if full.ndim > 1 else full, mask=~ok)


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
    in_flight = min(IO_TASKS_PER_ACTOR * config.most_actors, len(units))
    rows = ray.data.read_datasource(ShardDatasource(units, spec, model.image_shape), num_cpus=0, concurrency=in_flight)
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
        compute=ActorPoolStrategy(
            min_size=config.num_actors, max_size=config.most_actors, enable_true_multi_threading=True
        ),
        num_cpus=config.cpus_per_actor,
        num_gpus=gpus_per_actor(config),
        batch_size=config.batch_size,
        batch_format="pyarrow",
    )
