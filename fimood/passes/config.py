"""How a Ray pass reads rows and runs its actor pool: `PipelineConfig`, the one home of those settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from fimood.lake.sources import ReadSpec, check_format
from fimood.method.features import FeatureSettings


@dataclass(frozen=True)
class PipelineConfig:
    """How rows are read and how the feature pass runs."""

    input_format: str = "parquet"  # "parquet" or "images"
    image_column: str = "image"
    id_column: str = "id"  # when absent, ids are derived: `<shard path>#<row>`
    batch_size: int = 64
    num_actors: int = 1  # model replicas; with max_actors, the fewest the pool keeps
    max_actors: int | None = None  # the pool grows to this many replicas while rows wait for one; None: num_actors
    cpus_per_actor: int = 1  # Ray CPUs, and torch threads, per model replica
    gpus_per_actor: float | None = None  # fractional shares a card; None: 1 when the cluster has or can add GPUs
    engine: str = "auto"  # the gradient engine (`fimood.engine.METHODS`)
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else a local Ray
    allowed_imports: tuple[str, ...] = ()  # packages a checkpoint may name its model class from
    max_error_fraction: float = 0.5  # above it a pass fails instead of writing (or fitting on) a table of errors
    strict: bool = False  # refuse, before any work, a model with a tensor no hooks rule covers (no vmap fallback)
    storage_options: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        check_format(self.input_format)
        for name in ("num_actors", "cpus_per_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be at least num_actors ({self.num_actors})")
        gpus = self.gpus_per_actor
        if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
            raise ValueError(f"gpus_per_actor must be a share of one GPU (0 to 1) or a whole number, got {gpus}")
        FeatureSettings(self.engine, self.batch_size)  # checks both
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction!r}")

    @property
    def feature_settings(self) -> FeatureSettings:
        """How the actors compute features: what a fit records in its detector."""
        return FeatureSettings(self.engine, self.batch_size)

    @property
    def most_actors(self) -> int:
        """The most model replicas the pool may hold at once."""
        return self.max_actors or self.num_actors

    def read_spec(self, url: str) -> ReadSpec:
        return ReadSpec(url, self.input_format, self.image_column, self.id_column, self.storage_options)
