"""The detection study: every scoring rule × model × OOD set × batch size, in one command.

FashionMNIST is in-distribution: each model trains on its train split; the first half of its test
split fits the detectors, exactly as `fimood fit` would (a fifth of its rows, by id hash, held out to
calibrate), and the second half is the held-out in-distribution set. OOD sets: MNIST, scikit-learn's
digits, and three made up here from the held-out half (upside down, inverted grey levels, uniform
noise). Features are computed once per (model, set, batch size) and every rule and baseline scores
the same features.

Data tables and checkpoints in `work` are reused only when the record beside them says they were
made the same way (rows, seed, training steps, preset, and the code that made them); otherwise they
are made again, so a report's command always describes the run that made its figures.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

import fimood
from fimood.engine import trainable_parameters
from fimood.evaluation import evaluate_features, grouped_fit_features, method_scores, table_features
from fimood.lake import images
from fimood.lake.tables import ImageTable, read_image_parquet, write_image_parquet
from fimood.method.baselines import TypicalityTest
from fimood.method.detector import DetectorSettings, GradNormDetector
from fimood.method.features import Features, FeatureSettings
from fimood.method.reduce import fit_rows
from fimood.method.scoring import SCORING_RULES
from fimood.models import MODELS, LikelihoodModel, load_model, model_class
from fimood.models import training as model_training
from fimood.models.training import TrainConfig
from fimood.onboarding import datasets, training
from fimood.onboarding.datasets import load_source
from fimood.onboarding.training import train_checkpoint
from fimood.storage import filesystem, join, read_bytes, write_bytes

logger = logging.getLogger(__name__)

BASELINES = ("typicality", "likelihood")
# How long the study trains each built-in model on FashionMNIST (at batch 64, on 2 CPU cores): glow 4 epochs,
# about 12 min; vae about 2 min; ddpm about 6 min. A model not named here trains DEFAULT_TRAIN_STEPS.
TRAIN_STEPS = {"glow": 3750, "vae": 1500, "ddpm": 1200}
DEFAULT_TRAIN_STEPS = 1500
RECORD = "_made.json"  # beside each data table, inside its folder; `<checkpoint>.json` beside each checkpoint


@dataclass(frozen=True)
class StudyConfig:
    work: str = "study-out"  # data, checkpoints and their records; reused when their record matches
    models: tuple[str, ...] = ("glow", "vae", "ddpm")
    preset: str = "small"
    train_steps: int | None = None  # None: each model's in TRAIN_STEPS
    rows: int = 2000  # rows of each evaluation set (held-out and each OOD set)
    fit_rows: int = 5000  # in-distribution rows the detectors fit on (a fifth of them held out to calibrate)
    group_sizes: tuple[int, ...] = (1, 5)
    engine: str = "auto"
    batch_size: int = 64
    seed: int = 0

    @property
    def feature_settings(self) -> FeatureSettings:
        return FeatureSettings(self.engine, self.batch_size)


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
    models: dict[str, dict] = field(default_factory=dict)  # per model: checkpoint hash, how it was made, ...
    features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # per model: set → (n, L), batch 1
    feature_names: dict[str, list[str]] = field(default_factory=dict)


def code_version(*modules: object) -> str:
    """fimood's version and a hash of these modules' source: what made a table or a checkpoint."""
    source = "".join(inspect.getsource(module) for module in modules)
    return f"{fimood.__version__}+{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def made_up_sets(ids: list[str], images: np.ndarray, seed: int = 0) -> dict[str, tuple[list[str], np.ndarray]]:
    """OOD sets made from in-distribution images (N, C, H, W): upside down, inverted, uniform noise."""
    rng = np.random.default_rng(seed)
    return {
        "fashion-vflip": ([f"vflip/{i}" for i in ids], np.ascontiguousarray(images[:, :, ::-1, :])),
        "fashion-inverted": ([f"inverted/{i}" for i in ids], 255 - images),
        "uniform-noise": ([f"noise/{k:05d}" for k in range(len(ids))], rng.integers(0, 256, images.shape, np.uint8)),
    }


def _matching_record(url: str, recipe: dict) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path) and json.loads(read_bytes(url)).get("recipe") == recipe


def write_study_data(work: str, rows: int, fit_rows: int, seed: int = 0) -> dict[str, str]:
    """Parquet tables for training, fitting, the held-out set and every OOD set.

    A table already in `work` is kept only when its record says it was made with the same rows, seed
    and code; any other is made again.
    """
    code = code_version(datasets, images, sys.modules[__name__])
    recipe = {"rows": rows, "fit_rows": fit_rows, "seed": seed, "code": code}
    urls = {}

    def write(name: str, ids: list[str], table_images: np.ndarray) -> None:
        urls[name] = join(work, "data", name)
        if _matching_record(join(urls[name], RECORD), recipe):
            return
        fs, path = filesystem(urls[name])
        if fs.exists(path):
            logger.info("making %s again: it was made differently", urls[name])
            fs.rm(path, recursive=True)
        write_image_parquet(urls[name], ids, table_images)
        write_bytes(join(urls[name], RECORD), json.dumps({"recipe": recipe, "rows": len(ids)}).encode())

    train, test = load_source("fashion-mnist", "train"), load_source("fashion-mnist", "test")
    half = len(test.ids) // 2
    write("fashion-mnist-train", train.ids, train.images)
    write("fashion-mnist-fit", test.ids[: min(half, fit_rows)], test.images[: min(half, fit_rows)])
    heldout_ids, heldout = test.ids[half : half + rows], test.images[half : half + rows]
    write("fashion-mnist-heldout", heldout_ids, heldout)
    for name in ("mnist", "digits"):
        source = load_source(name)
        write(name, source.ids[:rows], source.images[:rows])
    for name, (ids, made_up) in made_up_sets(heldout_ids, heldout, seed).items():
        write(name, ids, made_up)
    return urls


def checkpoint(
    name: str, train_url: str, config: StudyConfig, id_hash_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[LikelihoodModel, dict]:
    """The study's checkpoint of one model, trained here unless one made the same way is in `work`.

    Returns the model and its record: how it was made (steps, seed, preset, code), when, and how long
    training took.
    """
    cls = model_class(name)
    model_url = join(config.work, "models", name)
    steps = config.train_steps or TRAIN_STEPS.get(name, DEFAULT_TRAIN_STEPS)
    recipe = {
        "model": name,
        "preset": config.preset,
        "steps": steps,
        "seed": config.seed,
        "data": json.loads(read_bytes(join(train_url, RECORD)))["recipe"],
        "code": code_version(sys.modules[cls.__module__], model_training, training),
    }
    if tuple(id_hash_range) != (0.0, 1.0):  # trained on part of the table's rows (`fimood train --id-hash-range`)
        recipe["id_hash_range"] = list(id_hash_range)
        model_url = join(config.work, "models", f"{name}-ids-{id_hash_range[0]:g}-{id_hash_range[1]:g}")
    record_url = f"{model_url}.json"
    if _matching_record(record_url, recipe):
        logger.info("reusing the %s checkpoint at %s, made the same way", name, model_url)
        record = json.loads(read_bytes(record_url))
    else:
        fs, path = filesystem(model_url)
        if fs.exists(path):
            logger.info("training %s again: the checkpoint in %s was made differently", name, model_url)
            fs.rm(path, recursive=True)
        start = time.perf_counter()
        train_config = TrainConfig(steps=steps, seed=config.seed)
        summary = train_checkpoint(
            train_url,
            model_url,
            model_type=name,
            preset=config.preset,
            train_config=train_config,
            id_hash_range=id_hash_range,
        )
        record = {
            "recipe": recipe,
            "sha256": summary.model_sha256,
            "final_training_loss": summary.final_loss,
            "training_seconds": time.perf_counter() - start,
            "trained_at": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            "machine": machine(),
        }
        write_bytes(record_url, json.dumps(record, indent=2).encode())
    model = load_model(model_url)
    if model.checkpoint_sha256 != record["sha256"]:
        raise ValueError(f"{model_url} does not hold the checkpoint its record describes; remove it to train again")
    return model, record


def fit_detectors(
    name: str, model: LikelihoodModel, fit: ImageTable, size: int, config: StudyConfig
) -> tuple[dict[str, GradNormDetector], TypicalityTest, int]:
    """Every rule's detector and the Typicality test for one batch size, and the number of fit rows (or groups).

    Per row, the detectors are the ones `fimood fit` builds from these rows (its reduce, its split);
    in groups, the ones `fimood evaluate` builds.
    """
    settings = DetectorSettings()  # every rule's settings are the defaults, but for the rule
    if size == 1:
        features = table_features(model, fit, 1, config.feature_settings, label=f"{name} fit rows")
        ids = [fit.ids[i] for i in np.flatnonzero(fit.ok)]
        return fit_rows(ids, features.log_sq_norms, features.nll, settings, tuple(SCORING_RULES))
    fit_features, calibration = grouped_fit_features(settings, config.feature_settings, model, fit, size, label=name)
    detectors = {
        rule: GradNormDetector(rule=rule, false_positive_rate=settings.false_positive_rate).fit(
            fit_features.log_sq_norms, calibration.log_sq_norms
        )
        for rule in SCORING_RULES
    }
    return detectors, TypicalityTest.from_entropy(float(fit_features.nll.mean())), len(fit_features.nll)


def evaluate_model(
    name: str, model: LikelihoodModel, tables: dict[str, ImageTable], config: StudyConfig, result: StudyResult
) -> None:
    """Features of every set at every batch size, then every rule and baseline's AUROC and FPR95 (the loop
    `fimood evaluate` runs, with every rule)."""
    ood_names = [key for key in tables if key not in ("fashion-mnist-fit", "fashion-mnist-heldout")]
    for size in config.group_sizes:
        detectors, typicality, n_fit = fit_detectors(name, model, tables["fashion-mnist-fit"], size, config)
        id_features = _features(model, tables["fashion-mnist-heldout"], size, config, f"{name} held-out")
        if size == 1:
            result.models[name].update(n_fit=n_fit, heldout_nll=float(id_features.nll.mean()))
            result.features[name] = {"fashion-mnist": id_features.log_sq_norms}

        def ood_features(size: int = size) -> Iterator[tuple[str, Features]]:
            for ood_name in ood_names:
                features = _features(model, tables[ood_name], size, config, f"{name} {ood_name}")
                if size == 1:
                    result.features[name][ood_name] = features.log_sq_norms
                yield ood_name, features

        gradient = {f"gradient:{rule}": detector for rule, detector in detectors.items()}
        scores_of = functools.partial(method_scores, gradient, typicality)
        for row in evaluate_features(scores_of, id_features, ood_features(), size):
            result.rows.append(StudyRow(name, row.ood_set, size, row.method, row.auroc, row.fpr95, row.n_id, row.n_ood))


def _features(model: LikelihoodModel, table: ImageTable, size: int, config: StudyConfig, label: str) -> Features:
    return table_features(model, table, size, config.feature_settings, label=f"{label} (batch {size})")


def run_study(config: StudyConfig) -> StudyResult:
    """Data → train each model (or reuse one made the same way) → evaluate every rule."""
    unknown = [name for name in config.models if name not in MODELS]
    if unknown:
        raise ValueError(f"models must be among {sorted(MODELS)}, got {unknown}")
    urls = write_study_data(config.work, config.rows, config.fit_rows, config.seed)
    evaluated = {key: url for key, url in urls.items() if key != "fashion-mnist-train"}
    tables_by_shape: dict[tuple[int, int, int], dict[str, ImageTable]] = {}  # decoded once, shared by the models
    result = StudyResult(rows=[])
    for name in config.models:
        model, record = checkpoint(name, urls["fashion-mnist-train"], config)
        torch.manual_seed(config.seed)
        result.models[name] = {
            "sha256": model.checkpoint_sha256,
            "nll_unit": model.nll_unit,
            "parameters": sum(p.numel() for p in model.parameters()),
            "made": {key: record[key] for key in ("recipe", "training_seconds", "trained_at", "machine")},
        }
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
