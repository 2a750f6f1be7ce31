"""The detection study: every scoring rule × model × OOD set × batch size, in one command.

FashionMNIST is in-distribution: each model trains on its train split; the first half of its test
split fits the detectors (a fifth of its rows, by id hash, held out to calibrate, as in the pipeline) and the second
half is the held-out in-distribution set. OOD sets: MNIST, scikit-learn's digits, and three made up
here from the held-out half (upside down, inverted grey levels, uniform noise). Features are
computed once per (model, set, batch size) and every rule and baseline scores the same features.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field

import numpy as np
import torch

from fimood.baselines import TypicalityTest, baseline_scores
from fimood.data import load_source
from fimood.density import FeatureStats
from fimood.detector import DetectorSettings
from fimood.engine import trainable_parameters
from fimood.evaluate import table_features
from fimood.features import Features
from fimood.io import ImageTable, read_image_parquet, write_image_parquet
from fimood.metrics import detection_metrics
from fimood.models import LikelihoodModel, load_model_with_hash
from fimood.reduce import split_hash
from fimood.scoring import SCORING_RULES, ScoringRule, make_rule
from fimood.storage import filesystem, join
from fimood.train import TrainConfig
from fimood.workflow import train_checkpoint

logger = logging.getLogger(__name__)

MODELS = ("glow", "vae", "ddpm")
# Glow: 4 epochs at batch 64, the length of METHOD.md's reference runs (~12 min on 2 CPU cores);
# VAE and DDPM: ~2 and ~6 min.
TRAIN_STEPS = {"glow": 3750, "vae": 1500, "ddpm": 1200}
BASELINES = ("typicality", "likelihood")
CALIBRATION_FRACTION = DetectorSettings().calibration_fraction  # the pipeline's split


@dataclass(frozen=True)
class StudyConfig:
    work: str = "study-out"  # data, checkpoints and features; checkpoints found here are reused
    models: tuple[str, ...] = MODELS
    preset: str = "small"
    train_steps: int | None = None  # None: TRAIN_STEPS per model
    rows: int = 2000  # rows of each evaluation set (held-out and each OOD set)
    fit_rows: int = 5000  # in-distribution rows the detectors fit on (a fifth of them left out as calibration)
    group_sizes: tuple[int, ...] = (1, 5)
    method: str = "auto"
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class StudyRow:
    model: str
    ood_set: str
    group_size: int
    method: str  # "gradient:<rule>", "typicality" or "likelihood"
    auroc: float
    fpr95: float
    n_id: int
    n_ood: int


@dataclass
class StudyResult:
    rows: list[StudyRow]
    models: dict[str, dict] = field(default_factory=dict)  # per model: checkpoint hash, held-out NLL, ...
    features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # per model: set → (n, L), batch 1
    feature_names: dict[str, list[str]] = field(default_factory=dict)


def made_up_sets(ids: list[str], images: np.ndarray, seed: int = 0) -> dict[str, tuple[list[str], np.ndarray]]:
    """OOD sets made from in-distribution images (N, C, H, W): upside down, inverted, uniform noise."""
    rng = np.random.default_rng(seed)
    return {
        "fashion-vflip": ([f"vflip/{i}" for i in ids], np.ascontiguousarray(images[:, :, ::-1, :])),
        "fashion-inverted": ([f"inverted/{i}" for i in ids], 255 - images),
        "uniform-noise": ([f"noise/{k:05d}" for k in range(len(ids))], rng.integers(0, 256, images.shape, np.uint8)),
    }


def write_study_data(work: str, rows: int, fit_rows: int, seed: int = 0) -> dict[str, str]:
    """Parquet tables for training, fitting, the held-out set and every OOD set; existing tables are kept."""
    fs, _ = filesystem(work)
    urls = {}

    def write(name: str, ids: list[str], images: np.ndarray) -> None:
        urls[name] = join(work, "data", name)
        if not fs.exists(filesystem(urls[name])[1]):
            write_image_parquet(urls[name], ids, images)

    train, test = load_source("fashion-mnist", "train"), load_source("fashion-mnist", "test")
    half = len(test.ids) // 2
    write("fashion-mnist-train", train.ids, train.images)
    write("fashion-mnist-fit", test.ids[: min(half, fit_rows)], test.images[: min(half, fit_rows)])
    heldout_ids, heldout = test.ids[half : half + rows], test.images[half : half + rows]
    write("fashion-mnist-heldout", heldout_ids, heldout)
    for name in ("mnist", "digits"):
        source = load_source(name)
        write(name, source.ids[:rows], source.images[:rows])
    for name, (ids, images) in made_up_sets(heldout_ids, heldout, seed).items():
        write(name, ids, images)
    return urls


def score_methods(rules: list[ScoringRule], typicality: TypicalityTest, features: Features) -> dict[str, np.ndarray]:
    """OOD scores (higher = more OOD) of every rule and baseline for the same rows or groups."""
    gradient = {f"gradient:{rule.name}": rule.ood_score(features.log_sq_norms) for rule in rules}
    return gradient | baseline_scores(typicality, features.nll)


def evaluate_model(
    name: str, model: LikelihoodModel, tables: dict[str, ImageTable], config: StudyConfig, result: StudyResult
) -> None:
    """Features of every set at every batch size, then every rule and baseline's AUROC and FPR95."""
    fit = tables["fashion-mnist-fit"]
    calibration = split_hash(fit.ids) < CALIBRATION_FRACTION
    ood_names = [key for key in tables if key not in ("fashion-mnist-fit", "fashion-mnist-heldout")]
    for size in config.group_sizes:
        fit_features = _features(model, fit, size, config, f"{name} fit", np.flatnonzero(~calibration))
        held_out = _features(model, fit, size, config, f"{name} calibration", np.flatnonzero(calibration))
        stats = FeatureStats.from_array(fit_features.log_sq_norms)
        rules = [make_rule(rule).fit_stats(stats).calibrate(held_out.log_sq_norms) for rule in SCORING_RULES]
        typicality = TypicalityTest.from_entropy(float(fit_features.nll.mean()))
        id_features = _features(model, tables["fashion-mnist-heldout"], size, config, f"{name} held-out")
        id_scores = score_methods(rules, typicality, id_features)
        if size == 1:
            result.models[name].update(n_fit=len(fit_features.nll), heldout_nll=float(id_features.nll.mean()))
            result.features[name] = {"fashion-mnist": id_features.log_sq_norms}
        for ood_name in ood_names:
            ood_features = _features(model, tables[ood_name], size, config, f"{name} {ood_name}")
            if size == 1:
                result.features[name][ood_name] = ood_features.log_sq_norms
            for method, scores in score_methods(rules, typicality, ood_features).items():
                metrics = detection_metrics(id_scores[method], scores)
                n_id, n_ood = len(id_scores[method]), len(scores)
                result.rows.append(StudyRow(name, ood_name, size, method, metrics.auroc, metrics.fpr95, n_id, n_ood))


def _features(
    model: LikelihoodModel,
    table: ImageTable,
    size: int,
    config: StudyConfig,
    label: str,
    rows: np.ndarray | None = None,
) -> Features:
    return table_features(model, table, size, config.method, config.batch_size, rows, f"{label} (batch {size})")


def run_study(config: StudyConfig) -> StudyResult:
    """Data → train each model (a checkpoint already in `work` is reused) → evaluate every rule."""
    urls = write_study_data(config.work, config.rows, config.fit_rows, config.seed)
    evaluated = {key: url for key, url in urls.items() if key != "fashion-mnist-train"}
    tables_by_shape: dict[tuple[int, int, int], dict[str, ImageTable]] = {}  # decoded once, shared by the models
    result = StudyResult(rows=[])
    for name in config.models:
        model_url = join(config.work, "models", name)
        fs, model_path = filesystem(model_url)
        if not any(fs.exists(f"{model_path}/{marker}") for marker in ("config.json", "model_index.json")):
            train_config = TrainConfig(steps=config.train_steps or TRAIN_STEPS[name], seed=config.seed)
            train_checkpoint(
                urls["fashion-mnist-train"], model_url, model_type=name, preset=config.preset, train_config=train_config
            )
        else:
            logger.info("reusing the %s checkpoint at %s", name, model_url)
        torch.manual_seed(config.seed)
        model, sha256 = load_model_with_hash(model_url)
        n_parameters = sum(p.numel() for p in model.parameters())
        result.models[name] = {"sha256": sha256, "nll_unit": model.nll_unit, "parameters": n_parameters}
        result.feature_names[name] = [n for n, _ in trainable_parameters(model)]
        if model.image_shape not in tables_by_shape:
            tables_by_shape[model.image_shape] = {
                key: read_image_parquet(url, model.image_shape) for key, url in evaluated.items()
            }
        evaluate_model(name, model, tables_by_shape[model.image_shape], config, result)
    return result


def mean_auroc(rows: list[StudyRow], method: str, group_size: int = 1) -> float:
    """Mean AUROC of a method over every model and OOD set at one batch size."""
    return float(np.mean([row.auroc for row in rows if row.method == method and row.group_size == group_size]))


def machine() -> str:
    """The CPU and software the figures come from."""
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
