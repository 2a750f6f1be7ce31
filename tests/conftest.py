"""Shared fixtures: small float64 models and user-defined likelihood models with odd structure."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import Tensor, nn

from fimood import passes
from fimood.lake import schema
from fimood.lake.score_table import Lineage, PartitionVersion
from fimood.lake.score_table import read_scores as read_score_table
from fimood.lake.tables import write_image_parquet
from fimood.method.baselines import TypicalityTest
from fimood.method.detector import DetectorArtifact, DetectorSettings, GradNormDetector
from fimood.models import Glow, GlowConfig, LikelihoodModel, save_model
from fimood.models.training import TrainConfig, train
from fimood.onboarding.datasets import load_source

# A loopback test cluster and its clients run without Ray's token auth (production keeps it on).
os.environ["RAY_AUTH_MODE"] = "disabled"
# Ray's command line from this interpreter's own environment: PATH may not hold a `ray` (a fresh machine's
# does not, as the README runs the tests) or may hold another one.
RAY_COMMAND = (sys.executable, "-m", "ray.scripts.scripts")
TESTS = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One light Ray head on loopback for the whole session (2 CPUs, small object store), which the tests
    use as a driver and submit jobs to; stopped by ending its process group.

    Yields the dashboard address that `ray job submit` talks to.
    """
    import ray

    gcs_port, dashboard_port = free_port(), free_port()
    head = subprocess.Popen(
        [
            *RAY_COMMAND,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--object-store-memory=300000000",
            "--disable-usage-stats",
            f"--temp-dir={tmp_path_factory.mktemp('ray')}",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # the workers can import the test modules, as a real cluster's can import a user's package (runtime_env)
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))},
    )
    try:
        ray.init(address=f"127.0.0.1:{gcs_port}", logging_level="WARNING")
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)


def pixel_gaussian_nll(scale: nn.Conv2d, x: Tensor) -> Tensor:
    """The NLL per row of a per-pixel Gaussian whose log-scale a conv gives: the test models' likelihood."""
    log_scale = scale(x)
    log_prob = -0.5 * (x * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
    return -log_prob.flatten(1).mean(1)


def tiny_glow(dtype: torch.dtype = torch.float64, seed: int = 0, image_shape=(1, 8, 8)) -> Glow:
    """A tiny Glow, ActNorm initialised on random data, zero-convs made non-zero (every gradient non-trivial)."""
    torch.manual_seed(seed)
    model = Glow(GlowConfig(image_shape=image_shape, hidden_channels=4, depth=2, levels=2)).to(dtype)
    model.initialize(torch.rand(16, *image_shape, dtype=dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "net.4" in name or "split_priors" in name or name.startswith("top_prior"):
                p.add_(0.05 * torch.randn_like(p))
    return model


class OddUserModel(LikelihoodModel):
    """A user's model: Linear on a 3-D input, GroupNorm, a parameter used twice, a frozen parameter."""

    image_shape = (1, 4, 6)

    def __init__(self) -> None:
        super().__init__()
        self.row_linear = nn.Linear(6, 5)  # applied to (B, 4, 6): rows as a sequence
        self.norm = nn.GroupNorm(2, 4)
        self.shared = nn.Parameter(torch.randn(5) * 0.3)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)
        self.head = nn.Linear(5, 1, bias=False)

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        h = torch.tanh(self.row_linear(x[:, 0]))  # (B, 4, 5)
        h = self.norm(h) * self.shared + self.frozen  # GroupNorm over the 4 "channels"
        h = torch.tanh(h + self.shared)  # the shared parameter's second use
        return (self.head(h).squeeze(-1) ** 2).sum(1) + 0.5 * math.log(2 * math.pi)


@pytest.fixture
def glow64() -> Glow:
    return tiny_glow()


@pytest.fixture
def user_model() -> OddUserModel:
    torch.manual_seed(1)
    return OddUserModel().double()


def small_detector(extra: dict | None = None) -> DetectorArtifact:
    """A fitted detector over two made-up features, with the manifest's `extra`."""
    rng = np.random.default_rng(0)
    return DetectorArtifact(
        model_uri="memory://model",
        model_sha256="ab" * 32,
        feature_names=["a", "b"],
        settings=DetectorSettings(),
        by_group={1: GradNormDetector().fit(rng.normal(size=(50, 2)), rng.normal(size=(20, 2)))},
        typicality=TypicalityTest().fit(rng.normal(size=50)),
        extra=extra or {},
    )


def assert_rel_close(actual: Tensor, expected: Tensor, rtol: float = 1e-6) -> None:
    scale = expected.abs().clamp_min(1e-12)
    worst = ((actual - expected).abs() / scale).max().item()
    assert worst <= rtol, f"max relative difference {worst:.3g} > {rtol}"


DAYS = ("2026-11-25", "2026-11-26")


def read_scores(url: str, storage_options: dict | None = None) -> pa.Table:
    """The score table's current version at `url`, as a Delta reader sees it."""
    return read_score_table(url, storage_options)


SCORE_ROWS = 40  # per partition, in each version `commit_scores` writes


def commit_scores(table, folders: list[str], version: int) -> None:
    """Commit a version of every partition `folders` names, as the score pass does, from one data file each;
    its ids say the version (`v3-<folder>-<i>`)."""
    table.create()
    for folder in folders:
        rows = {
            schema.ID: [f"v{version}-{folder}-{i}" for i in range(SCORE_ROWS)],
            schema.OOD_SCORE: [float(i) for i in range(SCORE_ROWS)],
            schema.P_VALUE: [0.5] * SCORE_ROWS,
            schema.IS_OOD: [False] * SCORE_ROWS,
            schema.NLL: [1.0] * SCORE_ROWS,
            schema.ERROR: [None] * SCORE_ROWS,
            schema.DETECTOR_ID: ["d" * 64] * SCORE_ROWS,
        }
        lineage = Lineage("d" * 64, [{"path": f"v{version}", "size": 0, "version": ""}], False)
        file = table.write_data_file(folder, pa.table(rows, schema=schema.score_schema()), lineage.lineage_id)
        planned = table.committed().get(folder)
        assert table.commit([PartitionVersion(folder, lineage, planned, (file,))], f"run-{version}") == {
            folder: "committed"
        }


def duckdb_with_delta():
    """A DuckDB connection with its Delta extension loaded from the pip package (no download: the machine
    is offline; users with internet run `INSTALL delta` once)."""
    import duckdb
    import duckdb_ext

    extensions = Path(duckdb_ext.__path__[0]) / "extensions"
    connection = duckdb.connect(config={"extension_directory": str(extensions)})
    connection.sql("LOAD delta")
    return connection


@pytest.fixture(scope="session")
def lake(tmp_path_factory, ray_session):
    """A tiny Glow trained on FashionMNIST, a fit table, and an MNIST table in two daily partitions."""
    root = tmp_path_factory.mktemp("lake")
    fashion = load_source("fashion-mnist", "test", limit=400)
    mnist = load_source("mnist", limit=120)
    torch.manual_seed(0)
    model = Glow.from_preset("tiny")
    train(model, fashion.images[:200], TrainConfig(steps=15, batch_size=32, warmup_steps=5), progress=False)
    urls = {"model": str(root / "model"), "fit": str(root / "fit"), "mnist": str(root / "mnist")}
    save_model(model, urls["model"])
    write_image_parquet(urls["fit"], fashion.ids[200:], fashion.images[200:], rows_per_shard=50)
    for day, rows in zip(DAYS, (slice(0, 70), slice(70, 120)), strict=True):
        write_image_parquet(f"{urls['mnist']}/date={day}", mnist.ids[rows], mnist.images[rows], rows_per_shard=32)
    detector, summary = passes.fit(urls["model"], urls["fit"], passes.PipelineConfig(batch_size=32))
    assert summary.rows == 200 and summary.errors == 0
    urls["detector"] = str(root / "detector")
    detector.save(urls["detector"])
    return urls
