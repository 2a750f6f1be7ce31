"""The monitor's study: false alarms on shift-free nights and power on nights with MNIST mixed into
FashionMNIST, for each study model, side by side with the same tests on the likelihood (NLL) and on
Typicality's statistic, and a per-pixel Kolmogorov–Smirnov test with Bonferroni's correction.

Features are computed once per model for three pools: the fit rows (the detector, as `fimood fit`
builds it, and the alternatives' reference: its calibration rows), the second half of FashionMNIST's
test split (the in-distribution pool, 5,000 rows) and MNIST (5,000 rows). Nights are drawn from the
pools: each night is summarised and tested exactly as `fimood monitor` does, from per-row arrays.

`gradient-centred` is the gradient monitor on nights whose layer z-scores carry a fresh draw of the
reference's own error instead of the pool's: a night larger than the pool (10,000 rows of 5,000)
repeats its rows, so every such night shares the pool's mean offset, which a fresh night would not;
over 228 layers a test of the layers' mean sees it (docs/monitoring.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import scipy.special

from fimood.apps.datasets import load_source
from fimood.apps.evaluate import table_features
from fimood.apps.study import StudyConfig, checkpoint, machine, write_study_data
from fimood.lake.tables import ImageTable, read_image_parquet
from fimood.method.baselines import likelihood_ood_score
from fimood.method.reduce import FitReduce
from fimood.method.scoring import DEFAULT_RULE
from fimood.method.shift import LifetimeBudget, PartitionSummary, Reference, shift_tests
from fimood.method.splits import calibration_rows
from fimood.storage import join, write_bytes

logger = logging.getLogger(__name__)

METHODS = ("gradient", "gradient-centred", "likelihood", "typicality", "pixels-ks")


@dataclass(frozen=True)
class MonitorStudyConfig:
    work: str = "study-out"  # the detection study's data and checkpoints (made there when missing)
    models: tuple[str, ...] = ("glow", "vae", "ddpm")
    preset: str = "small"  # the study's checkpoints: its preset and training steps (None: each model's own)
    train_steps: int | None = None
    shares: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)  # MNIST share of a night's rows
    night_rows: tuple[int, ...] = (1000, 10000)
    null_nights: int = 1000
    power_nights: int = 100
    alpha: float = 0.01  # per-night false-alarm level of every method
    lifetime_nights: tuple[float, ...] = (20.0, 365.0)  # lifetime budgets measured on the null nights
    min_excess: float = 0.01
    min_mean_shift: float = 0.1
    seed: int = 0


@dataclass
class Statistic:
    """One per-row statistic's reference (sorted calibration scores, threshold) and its pools' values."""

    reference: Reference
    calibration: np.ndarray
    pools: dict[str, np.ndarray]  # pool → (n,) scores
    z: dict[str, np.ndarray] = field(default_factory=dict)  # pool → (n, L) z-scores (gradient only)
    fresh_offset: np.ndarray | None = None  # (L, k) factor: each night's z-scores move by a fresh draw of it


@dataclass
class MonitorStudyResult:
    config: MonitorStudyConfig
    machine: str
    false_alarms: list[dict]  # {model, method, rows, nights, flagged}
    lifetime: list[dict]  # {model, method, rows, nights, budget, alarms}
    power: list[dict]  # {model, method, rows, share, nights, flagged}
    pool_sizes: dict[str, int]
    references: list[dict] = field(default_factory=list)  # per model: the reference, and the pool as one night


def run_monitor_study(config: MonitorStudyConfig) -> MonitorStudyResult:
    study = StudyConfig(
        work=config.work, models=config.models, preset=config.preset, train_steps=config.train_steps, seed=config.seed
    )
    urls = write_study_data(study.work, study.rows, study.fit_rows, study.seed)
    test = load_source("fashion-mnist", "test")
    half = len(test.ids) // 2
    pools = {
        "fashion-mnist": _table(test.ids[half:], test.images[half:]),
        "mnist": _table(*_source("mnist")),
    }
    fit = read_image_parquet(urls["fashion-mnist-fit"], (1, 28, 28))
    pixels = _pixel_statistic(fit, pools)
    rng = np.random.default_rng(config.seed)
    result = MonitorStudyResult(config, machine(), [], [], [], {name: len(t.ids) for name, t in pools.items()})
    for name in config.models:
        model, _ = checkpoint(name, urls["fashion-mnist-train"], study)
        statistics = _model_statistics(name, model, fit, pools, study)
        statistics["pixels-ks"] = pixels
        result.references.append(_reference_facts(name, statistics["gradient"]))
        _measure(name, statistics, config, rng, result)
    return result


def _reference_facts(name: str, gradient: Statistic) -> dict:
    """What the gradient monitor's reference is made of, and the in-distribution pool tested as one night
    of distinct rows (the layer test): the pool is a fair sample if this is not significant."""
    reference, pool = gradient.reference, gradient.z["fashion-mnist"]
    values, _ = reference.mean_axes
    p_value, mean_shift = reference.mean_test(pool.mean(axis=0), len(pool))
    return {
        "model": name,
        "fit_rows": reference.n_fit,
        "calibration_scores": reference.n_calibration,
        "layers": len(reference.layer_names),
        "axes": len(values),
        "condition_number": float(values.max() / values.min()),
        "pool_rows": len(pool),
        "pool_layers_p": p_value,
        "pool_mean_shift": mean_shift,
    }


def _source(name: str):
    source = load_source(name)
    return source.ids, source.images


def _table(ids, images) -> ImageTable:
    return ImageTable(list(ids), images, [None] * len(ids))


def _model_statistics(name, model, fit: ImageTable, pools: dict[str, ImageTable], study: StudyConfig) -> dict:
    """The gradient detector as `fimood fit` builds it, and the likelihood and Typicality on its calibration rows."""
    settings = study.settings(DEFAULT_RULE)
    fit_features = table_features(model, fit, 1, study.engine, study.batch_size, label=f"{name} fit rows")
    reduce = FitReduce(fit_features.log_sq_norms.shape[1], settings.calibration_fraction)
    reduce.add([fit.ids[i] for i in np.flatnonzero(fit.ok)], fit_features.log_sq_norms, fit_features.nll)
    detector, typicality = reduce.finish(settings.false_positive_rate, DEFAULT_RULE)
    features = {
        pool: table_features(model, table, 1, study.engine, study.batch_size, label=f"{name} {pool} pool")
        for pool, table in pools.items()
    }
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gradient = Statistic(
        Reference.of(detector, names),
        detector.calibration_scores_,
        {pool: detector.ood_score(f.log_sq_norms) for pool, f in features.items()},
        {pool: detector.rule_.z_scores(f.log_sq_norms) for pool, f in features.items()},
    )
    held_out = calibration_rows([fit.ids[i] for i in np.flatnonzero(fit.ok)], settings.calibration_fraction)
    alternatives = {
        "likelihood": likelihood_ood_score,
        "typicality": typicality.ood_score,
    }
    in_distribution = gradient.z["fashion-mnist"]
    centred = {**gradient.z, "fashion-mnist": in_distribution - in_distribution.mean(axis=0)}
    values, vectors = gradient.reference.mean_axes  # R's factor, over the axes it has spread on
    fit_error = vectors * np.sqrt(values / gradient.reference.n_fit)
    statistics = {
        "gradient": gradient,
        "gradient-centred": Statistic(gradient.reference, gradient.calibration, gradient.pools, centred, fit_error),
    }
    for method, statistic in alternatives.items():
        calibration = np.sort(statistic(fit_features.nll[held_out]))
        threshold = np.quantile(calibration, 1 - settings.false_positive_rate, method="higher")
        statistics[method] = Statistic(
            Reference(len(calibration), int((calibration > threshold).sum()), int((~held_out).sum()), []),
            calibration,
            {pool: statistic(f.nll) for pool, f in features.items()},
        )
    return statistics


@dataclass
class PixelStatistic:
    """Per-pixel value histograms of the reference (the fit rows) and of each pool's rows."""

    reference: np.ndarray  # (P, 256) counts
    pools: dict[str, np.ndarray]  # pool → (n, P) uint8 pixels


def _pixel_statistic(fit: ImageTable, pools: dict[str, ImageTable]) -> PixelStatistic:
    flat = fit.images.reshape(len(fit.ids), -1)
    return PixelStatistic(
        _pixel_histograms(flat), {pool: t.images.reshape(len(t.ids), -1) for pool, t in pools.items()}
    )


def _pixel_histograms(pixels: np.ndarray) -> np.ndarray:
    """(n, P) uint8 → (P, 256) counts of each value per pixel."""
    n_pixels = pixels.shape[1]
    codes = (np.arange(n_pixels) * 256 + pixels.astype(np.int64)).ravel()
    return np.bincount(codes, minlength=n_pixels * 256).reshape(n_pixels, 256)


def pixel_ks_p_value(reference: np.ndarray, night: np.ndarray) -> float:
    """Bonferroni over pixels of two-sample KS p-values (asymptotic), from value histograms."""
    n, m = night.sum(axis=1)[0], reference.sum(axis=1)[0]
    gap = np.abs(np.cumsum(night, axis=1) / n - np.cumsum(reference, axis=1) / m).max(axis=1)
    p_values = scipy.special.kolmogorov(np.sqrt(n * m / (n + m)) * gap)
    return float(min(1.0, len(p_values) * p_values.min()))


def _night(rng, pool_sizes: dict[str, int], rows: int, share: float) -> dict[str, np.ndarray]:
    """Row indices per pool for one night: round(share·rows) MNIST rows, the rest FashionMNIST; drawn
    without replacement when the pool is large enough, else with (10,000-row nights of a 5,000-row pool)."""
    n_ood = round(share * rows)
    draws = {"fashion-mnist": rows - n_ood, "mnist": n_ood}
    return {pool: rng.choice(pool_sizes[pool], n, replace=n > pool_sizes[pool]) for pool, n in draws.items()}


def night_p_value_and_effect(
    method: str, statistic, night: dict[str, np.ndarray], config: MonitorStudyConfig, rng=None
) -> tuple[float, bool]:
    """A night's p-value under one method, and whether its effect is large enough, as `fimood monitor`
    decides both (the pixel test has no effect size: any significant night counts)."""
    if method == "pixels-ks":
        counts = sum(_pixel_histograms(statistic.pools[pool][rows]) for pool, rows in night.items() if len(rows))
        return pixel_ks_p_value(statistic.reference, counts), True
    scores = np.concatenate([statistic.pools[pool][rows] for pool, rows in night.items()])
    layers = len(statistic.reference.layer_names)
    z = (
        np.concatenate([statistic.z[pool][rows] for pool, rows in night.items()])
        if layers
        else np.zeros((len(scores), 0))
    )
    if statistic.fresh_offset is not None:
        z = z + statistic.fresh_offset @ rng.standard_normal(statistic.fresh_offset.shape[1])
    summary = PartitionSummary.from_rows(statistic.calibration, scores, z, [None] * len(scores))
    tests = shift_tests(summary, statistic.reference)
    return tests.p_value, tests.large(config.min_excess, config.min_mean_shift)


def _measure(name: str, statistics: dict, config: MonitorStudyConfig, rng, result: MonitorStudyResult) -> None:
    sizes = result.pool_sizes
    for rows in config.night_rows:
        nights = [_night(rng, sizes, rows, 0.0) for _ in range(config.null_nights)]
        for method in METHODS:
            outcomes = [night_p_value_and_effect(method, statistics[method], n, config, rng) for n in nights]
            flagged = sum(p <= config.alpha and large for p, large in outcomes)
            result.false_alarms.append(
                {"model": name, "method": method, "rows": rows, "nights": len(nights), "flagged": flagged}
            )
            if method.startswith("gradient"):
                for budget_nights in config.lifetime_nights:
                    _, alarms = LifetimeBudget(budget_nights).statistics(
                        [p for p, _ in outcomes], [large for _, large in outcomes]
                    )
                    result.lifetime.append(
                        {
                            "model": name,
                            "method": method,
                            "rows": rows,
                            "nights": len(nights),
                            "budget": budget_nights,
                            "alarms": sum(alarms),
                        }
                    )
        logger.info("monitor study: %s, %d-row null nights measured", name, rows)
        for share in config.shares:
            nights = [_night(rng, sizes, rows, share) for _ in range(config.power_nights)]
            for method in METHODS:
                outcomes = [night_p_value_and_effect(method, statistics[method], n, config, rng) for n in nights]
                flagged = sum(p <= config.alpha and large for p, large in outcomes)
                result.power.append(
                    {
                        "model": name,
                        "method": method,
                        "rows": rows,
                        "share": share,
                        "nights": len(nights),
                        "flagged": flagged,
                    }
                )
        logger.info("monitor study: %s, %d-row nights with MNIST measured", name, rows)


def write_monitor_study(result: MonitorStudyResult, out: str, command: str, seconds: float) -> str:
    """docs-ready Markdown tables (and the JSON beside them) of false alarms and power; returns the Markdown's URL."""
    config = result.config
    lines = [
        "# Monitoring study: false alarms and power",
        "",
        f"Made by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d} ({result.machine}; {seconds / 60:.0f} min), "
        f"with the detection study's checkpoints and data in `{config.work}` (seed {config.seed}). Pools: "
        + ", ".join(f"{name} {size} rows" for name, size in result.pool_sizes.items())
        + f". Every method flags a night at p ≤ {config.alpha}; the monitor's methods (gradient, likelihood, "
        f"typicality) also need an effect as `fimood monitor` does: an excess of at least {config.min_excess:.0%} "
        f"of the night's rows, or (gradient) the layers' mean moved by {config.min_mean_shift} standard deviations. "
        "`gradient-centred` is the gradient monitor on nights whose layer z-scores carry a fresh draw of the "
        "reference's own error in place of the in-distribution pool's mean offset: a night larger than the pool "
        "repeats its rows, so every such night shares that offset where fresh nights would not "
        "(docs/monitoring.md says why it matters at 10,000 rows and not at 1,000).",
        "",
        "## False alarms on shift-free nights (flagged / nights)",
        "",
        "| model | rows a night | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for model in config.models:
        for rows in config.night_rows:
            cells = [
                f"{e['flagged']}/{e['nights']} ({e['flagged'] / e['nights']:.1%})"
                for method in METHODS
                for e in result.false_alarms
                if e["model"] == model and e["rows"] == rows and e["method"] == method
            ]
            lines.append(f"| {model} | {rows} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## The lifetime budget on the same nights, in order (gradient monitor)",
        "",
        "| model | method | rows a night | nights | budget N | flagged nights | at most, in expectation |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in result.lifetime:
        bound = e["nights"] / e["budget"] / (1 - LifetimeBudget(e["budget"]).still_shifted_level)
        lines.append(
            f"| {e['model']} | {e['method']} | {e['rows']} | {e['nights']} | {e['budget']:g} | {e['alarms']} "
            f"| {bound:.1f} |"
        )
    lines += [
        "",
        "## The gradient monitor's reference, and the in-distribution pool as one night",
        "",
        "| model | fit rows | calibration scores | layers | axes tested | condition number of R "
        "| pool rows | pool's layer-test p | pool's mean shift |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result.references:
        lines.append(
            f"| {e['model']} | {e['fit_rows']} | {e['calibration_scores']} | {e['layers']} | {e['axes']} "
            f"| {e['condition_number']:.3g} | {e['pool_rows']} | {e['pool_layers_p']:.2f} "
            f"| {e['pool_mean_shift']:.3f} |"
        )
    lines += ["", "## Power: share of nights flagged, by MNIST share of the night's rows", ""]
    for rows in config.night_rows:
        lines += [
            f"### {rows} rows a night ({config.power_nights} nights per cell)",
            "",
            "| model | method | " + " | ".join(f"{share:.0%}" for share in config.shares) + " |",
            "|---|---|" + "---|" * len(config.shares),
        ]
        for model in config.models:
            for method in METHODS:
                cells = [
                    f"{e['flagged'] / e['nights']:.2f}"
                    for share in config.shares
                    for e in result.power
                    if (e["model"], e["method"], e["rows"], e["share"]) == (model, method, rows, share)
                ]
                lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    markdown = join(out, "monitoring-study.md")
    write_bytes(markdown, "\n".join(lines).encode())
    document = {
        "config": asdict(config),
        "machine": result.machine,
        "command": command,
        "false_alarms": result.false_alarms,
        "lifetime": result.lifetime,
        "power": result.power,
        "pool_sizes": result.pool_sizes,
        "references": result.references,
    }
    write_bytes(join(out, "monitoring-study.json"), json.dumps(document, indent=1).encode())
    return markdown
