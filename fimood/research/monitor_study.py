"""The monitor's study, run the way a deployment runs: one reference kept, fresh nights tested against it.

Each model trains on the FashionMNIST training rows whose id hash lies below `trained_share` (at most
45,000 rows, recorded in the checkpoint), so the other training rows and the whole test split are
fresh in-distribution rows it never saw. Features of every fresh row and of every MNIST row are
computed once per model. Then, for each of `references` deployments:

1. the reference: `fit_rows` fresh rows drawn at random, fitted as `fimood fit` fits them (`FitReduce`,
   its calibration split by id hash);
2. its nights: disjoint draws of the *other* fresh rows, 1,000 and 10,000 rows each (no row in two
   nights, no fit, calibration or training row in any, nothing resampled or centred); a shifted night
   is a null night with a share of its rows swapped for MNIST rows (disjoint within its sequence);
3. every method tests every night: the gradient monitor and the NLL rank monitor exactly as
   `fimood monitor` tests a partition (the same calibration rows, the same gates, the same allowance
   for the reference's own error), and the rivals (`monitor_rivals`) on the same rows.

The fresh rows bound what can be measured: a reference's nights are a few (about 10 of 1,000 rows
and 1 of 10,000), so per-night rates pool the references' nights, and no reference sees 365 nights:
the lifetime budget over a year is the synthetic deployment test's (tests/test_shift.py).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from fimood.engine import trainable_parameters
from fimood.evaluation import table_features
from fimood.lake.tables import ImageTable
from fimood.method.baselines import likelihood_ood_score
from fimood.method.detector import DetectorSettings
from fimood.method.reduce import fit_rows
from fimood.method.scoring import DEFAULT_RULE
from fimood.method.shift import (
    DEFAULT_REFERENCE_RISK,
    Evidence,
    LifetimeBudget,
    NightlyBudget,
    PartitionSummary,
    Reference,
    shift_tests,
)
from fimood.method.splits import split_hash, training_rows
from fimood.onboarding.datasets import load_source
from fimood.research.monitor_rivals import (
    BBSD,
    DEFAULT_CLASSIFIER_STEPS,
    MMDDrift,
    PixelPCAHotelling,
    TypicalityBatchTest,
    classifier_outputs,
    train_classifier,
)
from fimood.research.study import StudyConfig, checkpoint, machine, write_study_data
from fimood.storage import join, read_bytes, write_bytes

logger = logging.getLogger(__name__)

MONITORS = ("gradient", "nll")  # tested as `fimood monitor` tests a partition
RIVALS = ("typicality", "pixel-pca", "bbsd", "mmd")  # model-free but for Typicality, which reads the NLL
METHODS = MONITORS + RIVALS
MMD_SETTINGS = {"n_features": 128, "n_permutations": 100}  # 66 nights × 200 references: p-values resolve 1/101


@dataclass(frozen=True)
class MonitorStudyConfig:
    work: str = "study-out"  # the study's data and checkpoints (made there when missing)
    models: tuple[str, ...] = ("glow", "vae", "ddpm")
    preset: str = "small"
    train_steps: int | None = None  # None: each model's own study recipe
    trained_share: float = 0.74  # models train on the training rows whose id hash is below this
    references: int = 200
    fit_rows: int = 5000  # fresh rows given to each reference's fit (a fifth of them, by id hash, calibrate)
    night_rows: tuple[int, ...] = (1000, 10000)
    nights: tuple[int, ...] = (10, 1)  # disjoint nights of each size per reference
    shares: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)  # MNIST share of a shifted night's rows
    alpha: float = 0.01  # per-night false-alarm level of every method
    lifetime_nights: float = 365.0
    reference_risk: float = DEFAULT_REFERENCE_RISK
    min_excess: float = 0.01
    min_mean_shift: float = 0.1
    classifier_steps: int = DEFAULT_CLASSIFIER_STEPS
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.nights) != len(self.night_rows):
            raise ValueError(f"nights gives a count per night size: {self.nights} for {self.night_rows}")


@dataclass
class Pools:
    """Every fresh and every MNIST row, each representation computed once: pool → (n, ...) arrays."""

    ids: list[str]  # fresh rows' ids
    pixels: dict[str, np.ndarray]  # pool → (n, 784) float32
    softmax: dict[str, np.ndarray]  # pool → (n, 10), the classifier's
    embedding: dict[str, np.ndarray]  # pool → (n, 32), the classifier's penultimate layer


@dataclass
class Deployment:
    """One reference's rows: its fit rows and, per night size, disjoint nights (indices into the fresh pool);
    per night size and share, the MNIST rows that replace the tail of each night (indices into MNIST)."""

    fit: np.ndarray
    nights: dict[int, list[np.ndarray]]
    mnist: dict[tuple[int, float], list[np.ndarray]]

    def night(self, rows: int, index: int, share: float) -> dict[str, np.ndarray]:
        n_mnist = round(share * rows)
        fresh = self.nights[rows][index][: rows - n_mnist]
        return {"fresh": fresh, "mnist": self.mnist[rows, share][index] if n_mnist else np.zeros(0, np.int64)}


@dataclass
class MonitorStudyResult:
    config: MonitorStudyConfig
    machine: str
    pool_sizes: dict[str, int]
    outcomes: list[dict] = field(default_factory=list)  # {model, method, rows, share, reference, night, p, flagged}
    references: list[dict] = field(default_factory=list)  # per model: the reference's make-up and guarantee


def fresh_rows(train_ids: list[str], trained_share: float) -> np.ndarray:
    """True for the training rows a model trained on [0, trained_share) never saw."""
    return ~training_rows(train_ids, (0.0, trained_share))


def plan_deployment(rng, n_fresh: int, n_mnist: int, config: MonitorStudyConfig) -> Deployment:
    """Draw one reference's fit rows and its disjoint nights from the fresh pool (see the module's docstring)."""
    order = rng.permutation(n_fresh)
    needed = config.fit_rows + sum(r * k for r, k in zip(config.night_rows, config.nights, strict=True))
    if needed > n_fresh:
        raise ValueError(f"a reference needs {needed} fresh rows (fit and nights), the pool has {n_fresh}")
    fit, cursor, nights = order[: config.fit_rows], config.fit_rows, {}
    for rows, count in zip(config.night_rows, config.nights, strict=True):
        nights[rows] = [order[cursor + i * rows : cursor + (i + 1) * rows] for i in range(count)]
        cursor += rows * count
    mnist = {}
    for rows, count in zip(config.night_rows, config.nights, strict=True):
        for share in config.shares:
            n = round(share * rows)
            if n * count > n_mnist:
                raise ValueError(f"{count} nights of {rows} rows at {share:.0%} need {n * count} MNIST rows")
            drawn = rng.permutation(n_mnist)[: n * count]
            mnist[rows, share] = [drawn[i * n : (i + 1) * n] for i in range(count)]
    return Deployment(fit, nights, mnist)


def run_monitor_study(config: MonitorStudyConfig) -> MonitorStudyResult:
    study = StudyConfig(
        work=config.work, models=config.models, preset=config.preset, train_steps=config.train_steps, seed=config.seed
    )
    urls = write_study_data(study.work, study.rows, study.fit_rows, study.seed)
    train, test, mnist = (
        load_source("fashion-mnist", "train"),
        load_source("fashion-mnist", "test"),
        load_source("mnist"),
    )
    unseen = fresh_rows(train.ids, config.trained_share)
    fresh = _table(
        [i for i, keep in zip(train.ids, unseen, strict=True) if keep] + test.ids,
        np.concatenate([train.images[unseen], test.images]),
    )
    tables = {"fresh": fresh, "mnist": _table(mnist.ids, mnist.images)}
    pools = _model_free_pools(tables, train.images[~unseen], train.labels[~unseen], config)
    result = MonitorStudyResult(config, machine(), {name: len(t.ids) for name, t in tables.items()})
    plans = [
        plan_deployment(np.random.default_rng([config.seed, r]), len(fresh.ids), len(mnist.ids), config)
        for r in range(config.references)
    ]
    rival_outcomes = _rivals(pools, plans, config)
    for name in config.models:
        model, _ = checkpoint(name, urls["fashion-mnist-train"], study, (0.0, config.trained_share))
        features = {pool: _features(name, model, table, study) for pool, table in tables.items()}
        _measure_model(name, model, features, fresh.ids, plans, rival_outcomes, config, result)
    return result


def _table(ids: list[str], images: np.ndarray) -> ImageTable:
    return ImageTable(list(ids), images, [None] * len(ids))


def _model_free_pools(tables: dict[str, ImageTable], images, labels, config: MonitorStudyConfig) -> Pools:
    """Pixels and the rivals' classifier outputs, once; the classifier learns from the models' training rows."""
    torch.manual_seed(config.seed)
    classifier = train_classifier(images, labels, steps=config.classifier_steps, seed=config.seed)
    outputs = {pool: classifier_outputs(classifier, table.images) for pool, table in tables.items()}
    return Pools(
        ids=tables["fresh"].ids,
        pixels={pool: t.images.reshape(len(t.ids), -1).astype(np.float32) for pool, t in tables.items()},
        softmax={pool: softmax for pool, (softmax, _) in outputs.items()},
        embedding={pool: embedding for pool, (_, embedding) in outputs.items()},
    )


def _features(name: str, model, table: ImageTable, study: StudyConfig) -> dict[str, np.ndarray]:
    """Log-norm features and NLL of every row, cached beside the checkpoint by its hash (never pickled)."""
    url = join(study.work, "features", f"{name}-{model.checkpoint_sha256[:16]}-{len(table.ids)}.npz")
    try:
        with np.load(io.BytesIO(read_bytes(url)), allow_pickle=False) as cached:
            return {key: cached[key] for key in cached.files}
    except FileNotFoundError:
        pass
    computed = table_features(model, table, 1, study.feature_settings, label=f"{name}: {len(table.ids)} rows")
    arrays = {"log_sq_norms": computed.log_sq_norms, "nll": computed.nll}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(url, buffer.getvalue())
    return arrays


def _rivals(pools: Pools, plans: list[Deployment], config: MonitorStudyConfig) -> list[dict]:
    """The model-free rivals' outcomes: each deployment's reference is its fit rows."""
    outcomes = []
    for r, plan in enumerate(plans):
        fitted = {
            "pixel-pca": (PixelPCAHotelling().fit(pools.pixels["fresh"][plan.fit]), pools.pixels),
            "bbsd": (BBSD().fit(pools.softmax["fresh"][plan.fit]), pools.softmax),
            "mmd": (
                MMDDrift(**MMD_SETTINGS, seed=config.seed + r).fit(pools.embedding["fresh"][plan.fit]),
                pools.embedding,
            ),
        }
        for method, (rival, arrays) in fitted.items():
            for rows, share, index, night in _nights(plan, config):
                p = rival.p_value(night_rows(arrays, night))
                outcomes.append(_outcome("", method, rows, share, r, index, p, True, config))
        if r % 20 == 0:
            logger.info("monitor study: model-free rivals, reference %d of %d", r + 1, len(plans))
    return outcomes


def _nights(plan: Deployment, config: MonitorStudyConfig):
    for rows, count in zip(config.night_rows, config.nights, strict=True):
        for share in (0.0, *config.shares):
            for index in range(count):
                yield rows, share, index, plan.night(rows, index, share)


def night_rows(arrays: dict[str, np.ndarray], night: dict[str, np.ndarray]) -> np.ndarray:
    """A night's rows of a per-pool representation: pool → (n, ...) arrays, night: pool → row indices."""
    return np.concatenate([arrays[pool][rows] for pool, rows in night.items()])


def _outcome(model, method, rows, share, reference, night, p, large, config) -> dict:
    return {
        "model": model,
        "method": method,
        "rows": rows,
        "share": share,
        "reference": reference,
        "night": night,
        "p_value": float(p),
        "flagged": bool(NightlyBudget(config.alpha).decide([], [Evidence("night", p, large)]).shifted),
    }


def threshold_rows(ids: list[str], fraction: float) -> np.ndarray:
    """The calibration rows that set the default rule's threshold, as `FitReduce` and the detector pick them:
    the rows hashing below `fraction`, in hash order, every second one (the others teach the rule)."""
    hashes = split_hash(ids)
    held_out = np.flatnonzero(hashes < fraction)
    return held_out[np.argsort(hashes[held_out], kind="stable")][1::2]


def _measure_model(name, model, features, fresh_ids, plans, rival_outcomes, config, result) -> None:
    """Every deployment of one model: its reference fitted as `fimood fit` fits it, then every night tested."""
    settings = DetectorSettings(rule=DEFAULT_RULE)
    feature_names = [n for n, _ in trainable_parameters(model)]
    nll = {pool: f["nll"] for pool, f in features.items()}
    for r, plan in enumerate(plans):
        ids = [fresh_ids[i] for i in plan.fit]
        fitted, _, _ = fit_rows(ids, features["fresh"]["log_sq_norms"][plan.fit], nll["fresh"][plan.fit], settings)
        detector = fitted[settings.rule]
        # the NLL monitor and Typicality calibrate on the rows that set the gradient detector's threshold
        calibration = plan.fit[threshold_rows(ids, settings.calibration_fraction)]
        fit_only = plan.fit[split_hash(ids) >= settings.calibration_fraction]
        nll_calibration = np.sort(likelihood_ood_score(nll["fresh"][calibration]))
        threshold = np.quantile(nll_calibration, 1 - settings.false_positive_rate, method="higher")
        monitors = {
            "gradient": (
                Reference.of(detector, feature_names, config.reference_risk),
                detector.calibration_scores_,
                {pool: detector.ood_score(f["log_sq_norms"]) for pool, f in features.items()},
                {pool: detector.z_scores(f["log_sq_norms"]) for pool, f in features.items()},
            ),
            "nll": (
                Reference(
                    len(nll_calibration),
                    int((nll_calibration > threshold).sum()),
                    len(fit_only),
                    [],
                    risk=config.reference_risk,
                ),
                nll_calibration,
                {pool: likelihood_ood_score(values) for pool, values in nll.items()},
                {pool: np.zeros((len(values), 0)) for pool, values in nll.items()},
            ),
        }
        typicality = TypicalityBatchTest(seed=config.seed + r).fit(nll["fresh"][fit_only], nll["fresh"][calibration])
        if r == 0:
            result.references.append(_reference_facts(name, monitors["gradient"][0], config))
        for rows, share, index, night in _nights(plan, config):
            for method, (reference, calibration_scores, scores, z) in monitors.items():
                night_scores = night_rows(scores, night)
                summary = PartitionSummary.from_rows(
                    calibration_scores, night_scores, night_rows(z, night), [None] * len(night_scores)
                )
                tests = shift_tests(summary, reference)
                large = tests.large(config.min_excess, config.min_mean_shift)
                result.outcomes.append(_outcome(name, method, rows, share, r, index, tests.p_value, large, config))
            p_value = typicality.p_value(night_rows(nll, night))
            result.outcomes.append(_outcome(name, "typicality", rows, share, r, index, p_value, True, config))
        if r % 20 == 0:
            logger.info("monitor study: %s, reference %d of %d", name, r + 1, len(plans))
    result.outcomes += [{**outcome, "model": name} for outcome in rival_outcomes]


def _reference_facts(name: str, reference: Reference, config: MonitorStudyConfig) -> dict:
    """What the first deployment's reference is made of, and what it guarantees at each night size."""
    values, _ = reference.mean_axes
    return {
        "model": name,
        "fit_rows": reference.n_fit,
        "calibration_scores": reference.n_calibration,
        "layers": len(reference.layer_names),
        "axes": len(values),
        "condition_number": float(values.max() / values.min()),
        "guarantee": {
            rows: asdict(
                reference.guarantee(
                    rows, config.alpha, f"a night's p ≤ {config.alpha}", config.min_excess, config.min_mean_shift
                )
            )
            for rows in config.night_rows
        },
    }


def summarise(result: MonitorStudyResult) -> dict:
    """The tables: per (model, method, rows, share), nights and flagged; per reference, null flags; lifetime."""
    config = result.config
    cells: dict[tuple, list[bool]] = {}
    by_reference: dict[tuple, list[dict]] = {}
    for o in result.outcomes:
        cells.setdefault((o["model"], o["method"], o["rows"], o["share"]), []).append(o["flagged"])
        if o["share"] == 0.0:
            by_reference.setdefault((o["model"], o["method"], o["rows"], o["reference"]), []).append(o)
    rates = [
        {"model": m, "method": meth, "rows": rows, "share": share, "nights": len(flags), "flagged": int(sum(flags))}
        for (m, meth, rows, share), flags in sorted(cells.items())
    ]
    references = {}
    budget = LifetimeBudget(config.lifetime_nights)
    for (m, meth, rows, _), outcomes in by_reference.items():
        outcomes.sort(key=lambda o: o["night"])
        flagged = sum(o["flagged"] for o in outcomes)
        _, alarms = budget.statistics([o["p_value"] for o in outcomes], [True] * len(outcomes))
        entry = references.setdefault((m, meth, rows), {"references": 0, "with_a_false_alarm": 0, "alarms": 0})
        entry["references"] += 1
        entry["with_a_false_alarm"] += int(flagged > 0)
        entry["alarms"] += int(sum(alarms))
    return {
        "rates": rates,
        "per_reference": [
            {"model": m, "method": meth, "rows": rows, **entry} for (m, meth, rows), entry in sorted(references.items())
        ],
    }


def write_monitor_study(result: MonitorStudyResult, out: str, command: str, seconds: float) -> str:
    """docs-ready Markdown tables (and the JSON beside them) of false alarms and power; returns the Markdown's URL."""
    config, tables = result.config, summarise(result)
    rate = {(e["model"], e["method"], e["rows"], e["share"]): e for e in tables["rates"]}
    lines = [
        "# Monitoring study: one reference per deployment, fresh nights",
        "",
        f"Made by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d} ({result.machine}; {seconds / 60:.0f} min), "
        f"seed {config.seed}, checkpoints and data in `{config.work}`. Each model trained on the FashionMNIST "
        f"training rows whose id hash is below {config.trained_share} (recorded in its checkpoint); the fresh pool "
        f"is the other {result.pool_sizes['fresh']} FashionMNIST rows (unseen training rows and the test split); "
        f"MNIST {result.pool_sizes['mnist']} rows. {config.references} deployments: each fits one reference on "
        f"{config.fit_rows} fresh rows as `fimood fit` does and tests "
        + ", ".join(f"{k} disjoint night(s) of {r} rows" for r, k in zip(config.night_rows, config.nights, strict=True))
        + f" of other fresh rows against it. Every method flags a night at p ≤ {config.alpha}; the gradient and "
        f"NLL monitors also need the effect `fimood monitor` needs (an excess of at least {config.min_excess:.0%} "
        f"of the rows, or the layers' mean moved by {config.min_mean_shift} SD, both lower bounds) and allow for "
        f"the reference's own error with probability {1 - config.reference_risk:.0%}; the rivals are tested as "
        "published, valid on average over references, with no such allowance and no gate.",
        "",
        "## False alarms on shift-free nights (flagged / nights, pooled over the deployments)",
        "",
        "| model | rows a night | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for model in config.models:
        for rows in config.night_rows:
            cells = []
            for method in METHODS:
                e = rate[model, method, rows, 0.0]
                cells.append(f"{e['flagged']}/{e['nights']} ({e['flagged'] / e['nights']:.1%})")
            lines.append(f"| {model} | {rows} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per deployment: references with any false alarm, and the lifetime budget over their nights",
        "",
        f"A reference's nights are few, so its own rate cannot be resolved; the share of references with any "
        f"false alarm is compared with what {config.alpha} a night would give. Lifetime: the e-detector with "
        f"N = {config.lifetime_nights:g} over each reference's nights in order (one partition a night, no gate; "
        f"with {sum(config.nights)} nights a reference, not a test of the budget, which allows nights / N).",
        "",
        "| model | method | rows a night | references | with a false alarm | expected at α | lifetime alarms |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in tables["per_reference"]:
        count = dict(zip(config.night_rows, config.nights, strict=True))[e["rows"]]
        expected = 1 - (1 - config.alpha) ** count
        lines.append(
            f"| {e['model']} | {e['method']} | {e['rows']} | {e['references']} | {e['with_a_false_alarm']} "
            f"({e['with_a_false_alarm'] / e['references']:.1%}) | {expected:.1%} | {e['alarms']} |"
        )
    lines += [
        "",
        "## The gradient monitor's reference (the first deployment's) and its guarantee",
        "",
        "| model | fit rows | calibration scores | layers | axes tested | condition number of R | rows a night "
        "| rate allowance | detectable rate excess | detectable mean shift | reference dominates |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result.references:
        for rows, g in e["guarantee"].items():
            lines.append(
                f"| {e['model']} | {e['fit_rows']} | {e['calibration_scores']} | {e['layers']} | {e['axes']} "
                f"| {e['condition_number']:.3g} | {rows} | {g['rate_allowance']:+.1%} "
                f"| {g['detectable_rate_excess']:+.1%} | {g['detectable_mean_shift']:.2f} "
                f"| {g['reference_dominates']} |"
            )
    lines += ["", "## Power: share of nights flagged, by MNIST share of the night's rows", ""]
    for rows, count in zip(config.night_rows, config.nights, strict=True):
        lines += [
            f"### {rows} rows a night ({config.references} deployments × {count} nights per cell)",
            "",
            "| model | method | " + " | ".join(f"{share:.0%}" for share in config.shares) + " |",
            "|---|---|" + "---|" * len(config.shares),
        ]
        for model in config.models:
            for method in METHODS:
                cells = [
                    f"{rate[model, method, rows, share]['flagged'] / rate[model, method, rows, share]['nights']:.2f}"
                    for share in config.shares
                ]
                lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    markdown = join(out, "monitoring-study.md")
    write_bytes(markdown, "\n".join(lines).encode())
    document = {
        "config": asdict(config),
        "machine": result.machine,
        "command": command,
        "pool_sizes": result.pool_sizes,
        "references": result.references,
        **tables,
    }
    write_bytes(join(out, "monitoring-study.json"), json.dumps(document, indent=1).encode())
    return markdown
