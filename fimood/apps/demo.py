"""The end-to-end demo: FashionMNIST in-distribution, MNIST and digits out, all under one folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fimood import passes
from fimood.apps.datasets import load_source
from fimood.apps.evaluate import EvaluationRow, evaluate, format_table, write_json
from fimood.apps.stages import Stages
from fimood.apps.training import TrainSummary, train_checkpoint
from fimood.lake.tables import write_image_parquet
from fimood.models.training import TrainConfig
from fimood.storage import join

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    preset: str = "small"
    train_steps: int = 1500
    engine: str = "auto"
    seed: int = 0


@dataclass
class DemoResult:
    train: TrainSummary
    rows: list[EvaluationRow]
    score: passes.ScoreSummary

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


def run_demo(config: DemoConfig) -> DemoResult:
    """Data → train Glow → fit (the Ray pipeline) on half the test split → evaluate at batch 1 and 5 →
    score MNIST (the Ray pipeline)."""
    stages = Stages("demo", 5)
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
    scored = passes.score(detector_url, data["mnist"], join(config.out, "scores", "mnist"), run)
    return DemoResult(train=trained, rows=rows, score=scored)
