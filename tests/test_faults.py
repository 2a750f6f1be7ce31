"""Faults: a model replica that dies in the middle of a score pass is restarted by Ray, its batch retried,
and the output is the one an undisturbed run writes (every row once, the same scores); a driver killed
mid-pass leaves whole partitions, and the rerun scores only the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from conftest import pixel_gaussian_nll, read_scores
from torch import Tensor, nn

from fimood import passes
from fimood.lake.score_table import ScoreTable
from fimood.lake.tables import write_image_parquet
from fimood.models import register_model, save_model
from fimood.models.base import ConfiguredModel, Preset
from fimood.onboarding.datasets import load_source


@dataclass(frozen=True)
class DiesOnceConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)
    marker: str = ""  # while `<marker>.armed` exists and `<marker>.died` does not, the next nll kills its process

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(self.image_shape))


@register_model
class DiesOnce(ConfiguredModel):
    """A per-pixel Gaussian that kills the process it runs in once, when armed: a worker lost mid-job."""

    model_type = "test-dies-once"
    config_class = DiesOnceConfig
    presets: ClassVar[dict[str, Preset]] = {"tiny": Preset({})}

    def __init__(self, config: DiesOnceConfig | None = None):
        super().__init__()
        self.config = config or DiesOnceConfig()
        self.scale = nn.Conv2d(1, 1, 3, padding=1)

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        marker = self.config.marker
        if marker and os.path.exists(f"{marker}.armed") and not os.path.exists(f"{marker}.died"):
            Path(f"{marker}.died").touch()
            os._exit(1)  # as a killed or crashed worker: no exception, no cleanup
        return pixel_gaussian_nll(self.scale, x)


@pytest.fixture(scope="module")
def dies_once(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    model = DiesOnce(DiesOnceConfig(marker=str(root / "fault")))
    fashion = load_source("fashion-mnist", "test", limit=600)
    urls = {name: str(root / name) for name in ("model", "fit", "lake", "detector")}
    save_model(model, urls["model"])
    write_image_parquet(urls["fit"], fashion.ids[:300], fashion.images[:300], rows_per_shard=100)
    for day in ("2026-11-01", "2026-11-02"):
        rows = slice(300, 450) if day.endswith("1") else slice(450, 600)
        write_image_parquet(f"{urls['lake']}/date={day}", fashion.ids[rows], fashion.images[rows], rows_per_shard=50)
    detector, _ = passes.fit(urls["model"], urls["fit"], passes.PipelineConfig(batch_size=32))
    detector.save(urls["detector"])
    return root, urls


def sorted_scores(url: str) -> pa.Table:
    table = read_scores(url)
    return table.sort_by("id").select(["id", "ood_score", "is_ood", "partition"])


def test_a_replica_that_dies_mid_job_is_restarted_and_no_row_is_lost_or_doubled(dies_once):
    root, urls = dies_once
    config = passes.PipelineConfig(batch_size=32)
    passes.score(urls["detector"], urls["lake"], str(root / "undisturbed"), config)
    (root / "fault.armed").touch()
    summary = passes.score(urls["detector"], urls["lake"], str(root / "disturbed"), config)
    assert (root / "fault.died").exists(), "the replica did die"
    assert summary.rows == 300 and summary.errors == 0
    disturbed, undisturbed = sorted_scores(str(root / "disturbed")), sorted_scores(str(root / "undisturbed"))
    assert disturbed.column("id").to_pylist() == undisturbed.column("id").to_pylist()  # each row exactly once
    np.testing.assert_array_equal(disturbed.column("ood_score"), undisturbed.column("ood_score"))


def test_a_job_killed_halfway_then_resumed_writes_what_one_undisturbed_run_writes(dies_once):
    """The driver is killed once its first partition is committed: readers see whole partitions only, and
    the resumed run scores only the partitions the killed one had not committed."""
    root, urls = dies_once
    out = root / "killed"
    cli = (  # the test model's class registered; write tasks of 50 rows, so partitions complete one by one
        "import sys, test_faults; from fimood.cli import main; from fimood.passes import score_pass; "
        "score_pass.ROWS_PER_OUTPUT_FILE = 50; sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", cli, "score", "--detector", urls["detector"], "--data", urls["lake"]]
    command += ["--out", str(out), "--resume", "--batch-size", "32"]
    tests = str(Path(__file__).parent)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": tests}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, table = time.monotonic() + 120, ScoreTable(str(out))
    while not (table.snapshot() and table.committed()) and job.poll() is None:
        assert time.monotonic() < deadline, "no partition was committed"
        time.sleep(0.05)
    job.kill()  # mid-pass: a partition committed, the other in flight (or just committed)
    assert job.wait() == -signal.SIGKILL, "the job ended before it could be killed"
    committed = read_scores(str(out))
    assert set(Counter(committed.column("partition").to_pylist()).values()) <= {150}, "whole partitions only"

    resumed = passes.score(urls["detector"], urls["lake"], str(out), passes.PipelineConfig(batch_size=32), resume=True)
    assert {p.folder for p in resumed.skipped} == set(committed.column("partition").to_pylist())
    if not (root / "undisturbed").exists():
        passes.score(urls["detector"], urls["lake"], str(root / "undisturbed"), passes.PipelineConfig(batch_size=32))
    assert sorted_scores(str(out)).equals(sorted_scores(str(root / "undisturbed")))
