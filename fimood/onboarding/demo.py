"""The end-to-end demo: FashionMNIST in-distribution, MNIST and digits out, all under one folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fimood import passes
from fimood.evaluation import EvaluationRow, evaluate, format_table, write_json
from fimood.lake import schema
from fimood.lake.score_table import read_scores
from fimood.lake.tables import read_image_parquet, write_image_parquet
from fimood.models.training import TrainConfig
from fimood.monitor import MonitorConfig, MonitorResult, run_monitor
from fimood.onboarding.datasets import load_source
from fimood.onboarding.training import TrainSummary, train_checkpoint
from fimood.progress import Stages
from fimood.storage import join

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    preset: str = "small"
    train_steps: int = 1500
    engine: str = "auto"
    seed: int = 0
    night_rows: int = 500  # rows of each of the monitored week's nights


NIGHTS = [f"2026-11-0{day}" for day in range(1, 8)]
SHIFTED_NIGHTS = NIGHTS[4:]  # 20% MNIST mixed in
MNIST_SHARE = 0.2


@dataclass
class DemoResult:
    train: TrainSummary
    rows: list[EvaluationRow]
    score: passes.ScoreSummary
    score_table: str  # where the score table is: a Delta table
    read_back: pa.Table  # its `id` and `is_ood` columns, read back through the Delta reader
    monitor: MonitorResult

    def read_back_line(self) -> str:
        flagged = sum(self.read_back.column("is_ood").to_pylist(), start=0)
        return (
            f"read back as a Delta table: {self.read_back.num_rows} rows, {flagged} flagged OOD; in DuckDB: "
            f"SELECT * FROM delta_scan('{self.score_table}')"
        )

    def report(self) -> str:
        return (
            f"Glow trained {self.train.steps} steps; FashionMNIST held-out test bits/dim: "
            f"{self.train.test_nll:.3f}\n\n{format_table(self.rows)}"
        )


def write_demo_data(out: str) -> dict[str, str]:
    """FashionMNIST train, the two halves of its test split, MNIST and digits, as Parquet folders."""
    urls = {}
    train = load_source("fashion-mnist", "train")
    test = load_source("fashion-mnist", "test")
    half = len(test.ids) // 2
    parts = {
        "fashion-mnist-train": (train.ids, train.images, train.labels),
        "fashion-mnist-fit": (test.ids[:half], test.images[:half], test.labels[:half]),
        "fashion-mnist-heldout": (test.ids[half:], test.images[half:], test.labels[half:]),
    }
    for name in ("mnist", "digits"):
        source = load_source(name)
        parts[name] = (source.ids, source.images, source.labels)
    for name, (ids, images, labels) in parts.items():
        urls[name] = join(out, "data", name)
        write_image_parquet(urls[name], ids, images, labels)
        logger.info("wrote %d rows to %s", len(ids), urls[name])
    return urls


def write_week(out: str, heldout: str, mnist: str, night_rows: int) -> str:
    """A lake of seven nightly partitions of held-out FashionMNIST rows, the last three with 20% MNIST."""
    fashion, digits = read_image_parquet(heldout, (1, 28, 28)), read_image_parquet(mnist, (1, 28, 28))
    lake = join(out, "lake")
    taken = {"fashion": 0, "mnist": 0}
    for night in NIGHTS:
        n_mnist = round(MNIST_SHARE * night_rows) if night in SHIFTED_NIGHTS else 0
        parts = {"fashion": (fashion, night_rows - n_mnist), "mnist": (digits, n_mnist)}
        ids, images = [], []
        for name, (table, n) in parts.items():
            rows = slice(taken[name], taken[name] + n)
            ids += table.ids[rows]
            images.append(table.images[rows])
            taken[name] += n
        write_image_parquet(join(lake, f"date={night}"), ids, np.concatenate(images))
    return lake


def run_demo(config: DemoConfig) -> DemoResult:
    """Data → train Glow → fit (the Ray pipeline) on half the test split → evaluate at batch 1 and 5 →
    score MNIST (the Ray pipeline) → monitor a week of nights."""
    stages = Stages("demo", 6)
    stages.start(f"write the demo data under {config.out}/data")
    data = write_demo_data(config.out)
    model_url, detector_url = join(config.out, "model"), join(config.out, "detector")
    stages.start(f"train a {config.preset} Glow on FashionMNIST ({config.train_steps} steps)")
    trained = train_checkpoint(
        data["fashion-mnist-train"],
        model_url,
        preset=config.preset,
        train_config=TrainConfig(steps=config.train_steps, seed=config.seed),
        test_data_url=data["fashion-mnist-heldout"],
    )
    stages.start("fit the detector on the first half of the FashionMNIST test split (Ray pipeline)")
    run = passes.PipelineConfig(engine=config.engine)
    detector, _ = passes.fit(model_url, data["fashion-mnist-fit"], run)
    detector.save(detector_url)
    stages.start("evaluate the second half against MNIST and digits, per row and in groups of 5")
    ood_sets = {"mnist": data["mnist"], "digits": data["digits"]}
    rows = evaluate(detector_url, data["fashion-mnist-heldout"], ood_sets, group_sizes=(1, 5))
    write_json(
        rows,
        join(config.out, "evaluation.json"),
        {"test_nll": trained.test_nll, "train_steps": trained.steps},
    )
    stages.start("score MNIST (Ray pipeline)")
    score_table = join(config.out, "scores", "mnist")
    scored = passes.score(detector_url, data["mnist"], score_table, run)
    read_back = read_scores(score_table, columns=[schema.ID, schema.IS_OOD])
    stages.start("monitor a week of nightly partitions, the last three with 20% MNIST (Ray pipeline)")
    monitored = MonitorConfig(
        detector=detector_url,
        data=write_week(config.out, data["fashion-mnist-heldout"], data["mnist"], config.night_rows),
        scores=join(config.out, "monitor", "scores"),
        history=join(config.out, "monitor", "history"),
        report=join(config.out, "monitor", "report"),
        pipeline=run,
    )
    return DemoResult(trained, rows, scored, score_table, read_back, run_monitor(monitored))
