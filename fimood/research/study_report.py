"""The detection study's outputs: a Markdown report, its JSON, and plots of the features."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np

from fimood.method.metrics import detection_metrics
from fimood.method.scoring import DEFAULT_RULE, SCORING_RULES, DiagonalGaussian
from fimood.plotting import pyplot, write_figure
from fimood.research.study import BASELINES, StudyConfig, StudyResult, StudyRow, machine, mean_auroc
from fimood.storage import join, write_bytes

# Stated before any figure was made; the study only applies it (docs/scoring-rules.md).
DEFAULT_RULE_CRITERION = (
    "The product default is the gradient-only rule with the highest mean per-row (batch size 1) AUROC over "
    "every model and every OOD set of this study; ties go to the lower mean FPR95. Never a choice made on one pair."
)
METHOD_LABELS = {f"gradient:{rule}": rule for rule in SCORING_RULES} | {
    "typicality": "Typicality",
    "likelihood": "likelihood",
}


def chosen_rule(rows: list[StudyRow]) -> str:
    """The rule `DEFAULT_RULE_CRITERION` picks."""

    def key(rule: str) -> tuple[float, float]:
        fpr = np.mean([r.fpr95 for r in rows if r.method == f"gradient:{rule}" and r.group_size == 1])
        return (-mean_auroc(rows, f"gradient:{rule}"), float(fpr))

    present = [
        rule for rule in SCORING_RULES if any(r.method == f"gradient:{rule}" and r.group_size == 1 for r in rows)
    ]
    return min(present, key=key)


def results_table(rows: list[StudyRow], group_size: int) -> str:
    """Markdown: one line per (model, OOD set), "AUROC / FPR95" per method; the best AUROC in bold."""
    methods = list(METHOD_LABELS)
    lines = [
        "| model | OOD set | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    by_key = {(r.model, r.ood_set, r.method): r for r in rows if r.group_size == group_size}
    for model, ood_set in dict.fromkeys((r.model, r.ood_set) for r in rows if r.group_size == group_size):
        best = max(by_key[model, ood_set, m].auroc for m in methods)
        cells = []
        for m in methods:
            row = by_key[model, ood_set, m]
            auroc = f"**{row.auroc:.3f}**" if row.auroc == best else f"{row.auroc:.3f}"
            cells.append(f"{auroc} / {row.fpr95:.2f}")
        lines.append(f"| {model} | {ood_set} | " + " | ".join(cells) + " |")
    means = [f"{mean_auroc(rows, m, group_size):.3f}" for m in methods]
    lines.append("| **mean AUROC** | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def summary_table(rows: list[StudyRow], rule: str) -> str:
    """Markdown for the README: the gradient method (one rule) against Typicality at batch 1 and 5 and likelihood."""
    by_key = {(r.model, r.ood_set, r.group_size, r.method): r for r in rows}
    columns = [
        (f"gradient ({rule}), batch 1", 1, f"gradient:{rule}"),
        ("Typicality, batch 1", 1, "typicality"),
        (f"gradient ({rule}), batch 5", 5, f"gradient:{rule}"),
        ("Typicality, batch 5", 5, "typicality"),
        ("likelihood, batch 1", 1, "likelihood"),
    ]
    columns = [c for c in columns if any(key[2] == c[1] for key in by_key)]
    lines = [
        "| model | OOD set | " + " | ".join(c[0] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for model, ood_set in dict.fromkeys((r.model, r.ood_set) for r in rows):
        cells = [by_key[model, ood_set, size, method] for _, size, method in columns]
        lines.append(f"| {model} | {ood_set} | " + " | ".join(f"{c.auroc:.3f} / {c.fpr95:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def models_table(result: StudyResult) -> str:
    """Markdown: each model, and how its checkpoint was made (steps, seed, code, when, how long, where)."""
    lines = [
        "| model | parameters | features | fit rows | held-out NLL | how the checkpoint was made | sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, info in result.models.items():
        made, recipe = info["made"], info["made"]["recipe"]
        how = (
            f"{recipe['preset']} preset, {recipe['steps']:,} steps, seed {recipe['seed']}, code {recipe['code']}; "
            f"trained {made['trained_at']} in {made['training_seconds'] / 60:.1f} min ({made['machine']})"
        )
        lines.append(
            f"| {name} | {info['parameters']:,} | {len(result.feature_names[name])} | {info['n_fit']} | "
            f"{info['heldout_nll']:.3f} {info['nll_unit']} | {how} | `{info['sha256'][:12]}` |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class PrincipalAxes:
    """The top principal axes of in-distribution features' correlation, to see where other rows sit on them."""

    standardised: DiagonalGaussian  # fitted on the in-distribution rows; its z-scores standardise any rows
    axes: np.ndarray  # (n_kept, n_axes), scaled so that coordinates are in in-distribution standard deviations
    shares: np.ndarray  # each axis's share of the in-distribution variance

    @classmethod
    def fit(cls, in_distribution: np.ndarray, n_axes: int) -> PrincipalAxes:
        """Axes oriented so that every layer's gradient growing moves along them positively."""
        standardised = DiagonalGaussian().fit(in_distribution)
        eigenvalues, eigenvectors = np.linalg.eigh(np.corrcoef(standardised.z_scores(in_distribution), rowvar=False))
        order = np.argsort(eigenvalues)[::-1][:n_axes]
        axes = eigenvectors[:, order] * np.where(eigenvectors[:, order].sum(0) < 0, -1.0, 1.0)
        return cls(standardised, axes / np.sqrt(eigenvalues[order]), eigenvalues[order] / len(eigenvalues))

    def project(self, features: np.ndarray) -> np.ndarray:
        """(n, n_axes) coordinates of rows' features."""
        return self.standardised.z_scores(features) @ self.axes


def geometry_table(result: StudyResult, n_axes: int = 3) -> str:
    """Markdown: where each OOD set's per-row features sit along the in-distribution's main axes."""
    header = " | ".join(f"axis {k + 1}" for k in range(n_axes))
    lines = [f"| model | set | {header} | AUROC along axis 1 |", "|---|---|" + "---|" * (n_axes + 1)]
    for model, sets in result.features.items():
        axes = PrincipalAxes.fit(sets["fashion-mnist"], n_axes)
        shares = " | ".join(f"{share:.0%} of the variance" for share in axes.shares)
        lines.append(f"| {model} | (axis) | {shares} | |")
        in_distribution = axes.project(sets["fashion-mnist"])
        for name, features in sets.items():
            if name == "fashion-mnist":
                continue
            coordinates = axes.project(features)
            spreads = zip(coordinates.mean(0), coordinates.std(0), strict=True)
            cells = " | ".join(f"{mean:+.2f} / {spread:.2f}" for mean, spread in spreads)
            auroc = detection_metrics(in_distribution[:, 0], coordinates[:, 0]).auroc
            lines.append(f"| {model} | {name} | {cells} | {auroc:.3f} |")
    return "\n".join(lines)


def plot_feature_distributions(result: StudyResult, model: str, path: str, n_panels: int = 12) -> None:
    """Histograms of log‖∇θℓ‖² for layers spread through `model`: held-out FashionMNIST against each OOD set."""
    plt = pyplot()
    names = result.feature_names[model]
    sets = result.features[model]
    picks = np.unique(np.linspace(0, len(names) - 1, n_panels).round().astype(int))
    columns = 4
    figure, axes = plt.subplots(-(-len(picks) // columns), columns, figsize=(16, 3.2 * -(-len(picks) // columns)))
    for axis, index in zip(axes.flat, picks, strict=False):
        values = np.concatenate([features[:, index] for features in sets.values()])
        bins = np.linspace(*np.percentile(values, [0.5, 99.5]), 40)
        for label, features in sets.items():
            axis.hist(features[:, index], bins=bins, density=True, histtype="step", label=label)
        axis.set_title(names[index], fontsize=8)
        axis.set_xlabel("log ‖∇θℓ NLL‖²", fontsize=8)
    for axis in axes.flat[len(picks) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"{model}: per-layer features, held-out FashionMNIST (in-distribution) vs OOD sets")
    write_figure(figure, path, dpi=90)


def plot_principal_axes(result: StudyResult, model: str, path: str, max_points: int = 1000) -> None:
    """Scatter of every set's rows along the in-distribution's first two principal axes, one panel per OOD set."""
    plt = pyplot()
    sets = result.features[model]
    axes = PrincipalAxes.fit(sets["fashion-mnist"], 2)
    in_distribution = axes.project(sets["fashion-mnist"])[:max_points]
    ood = {name: axes.project(features)[:max_points] for name, features in sets.items() if name != "fashion-mnist"}
    # a few far rows (noise) would squeeze every panel: the view holds 99% of the points
    low, high = np.percentile(np.concatenate([in_distribution, *ood.values()]), [0.5, 99.5], axis=0)
    figure, panels = plt.subplots(1, len(ood), figsize=(4 * len(ood), 4), sharex=True, sharey=True)
    for panel, (name, coordinates) in zip(np.atleast_1d(panels), ood.items(), strict=True):
        panel.scatter(*in_distribution.T, s=3, alpha=0.4, label="fashion-mnist (held out)")
        panel.scatter(*coordinates.T, s=3, alpha=0.4, label=name)
        panel.set_title(name, fontsize=9)
        panel.set_xlabel(f"axis 1, common mode ({axes.shares[0]:.0%})", fontsize=8)
        panel.legend(fontsize=7, markerscale=3)
    first, margin = np.atleast_1d(panels)[0], 0.05 * (high - low)
    first.set_xlim(low[0] - margin[0], high[0] + margin[0])  # shared by every panel
    first.set_ylim(low[1] - margin[1], high[1] + margin[1])
    first.set_ylabel(f"axis 2 ({axes.shares[1]:.0%})", fontsize=8)
    figure.suptitle(f"{model}: per-row features along the in-distribution's first two principal axes (ID std units)")
    write_figure(figure, path, dpi=80)


def write_report(result: StudyResult, config: StudyConfig, out: str, command: str, seconds: float) -> str:
    """Write `detection-study.md`, `detection-study.json` and the two plots under `out`; returns the chosen rule."""
    rule = chosen_rule(result.rows)
    group_sizes = sorted({r.group_size for r in result.rows})
    means = ", ".join(f"{name} {mean_auroc(result.rows, f'gradient:{name}'):.3f}" for name in SCORING_RULES)
    baselines = ", ".join(f"{name} {mean_auroc(result.rows, name):.3f}" for name in BASELINES)
    plot_model = "glow" if "glow" in result.models else next(iter(result.models))
    sections = [
        "# Detection study: scoring rules × models × OOD sets",
        f"Made by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d} ({machine()}; {seconds / 60:.0f} min, "
        "checkpoints reused or trained as the models table says).",
        "In-distribution: FashionMNIST. Each model trains on the train split; the rules fit on the first half "
        "of the test split, as `fimood fit` fits them (a fifth of it, by id hash, held out to calibrate: the "
        "threshold, the p-values, and what the `combined` rules learn from held-out rows); in groups of 5, as "
        f"`fimood evaluate` fits them. The held-out set is {config.rows} rows of the second half. OOD sets: "
        "MNIST, scikit-learn's 8×8 digits (upsampled), and "
        "three made up from the held-out rows: `fashion-vflip` (upside down), `fashion-inverted` (255 − pixel), "
        "`uniform-noise`. Each cell is AUROC / FPR at 95% TPR (OOD is the positive class); the best AUROC of a "
        "line is in bold. Rules: docs/scoring-rules.md.",
        "## The default rule",
        DEFAULT_RULE_CRITERION,
        f"Mean per-row AUROC: {means} (baselines: {baselines}). The criterion picks **{rule}**; "
        f"the product default (`fimood.method.scoring.DEFAULT_RULE`) is `{DEFAULT_RULE}`.",
        "## Models",
        models_table(result),
        *[
            part
            for size in group_sizes
            for part in (
                f"## Batch size {size}" + (" (per row)" if size == 1 else ""),
                results_table(result.rows, size),
            )
        ],
        f"## Summary for the README (rule: {rule})",
        summary_table(result.rows, rule),
        "## Per-layer features",
        f"![per-layer feature distributions of {plot_model}](detection-study-features.png)",
        "## Where the OOD rows sit",
        "Axis k is the k-th principal axis of the held-out in-distribution rows' standardised features, oriented "
        "so that every layer's gradient growing moves along it positively (axis 1 is then the common mode: all "
        "layers larger together). Each cell is an OOD set's mean / spread along the axis, in in-distribution "
        "standard deviations (the in-distribution rows: +0.00 / 1.00). A set that moves about one standard "
        "deviation along an axis that carries much of the variance, with a small spread, sits inside the "
        "in-distribution bulk, where a density of these features finds its rows ordinary; the last column is what "
        "a test looking only along axis 1, one-sided, would reach (per row).",
        geometry_table(result),
        f"![{plot_model}: rows along the first two axes](detection-study-axes.png)",
    ]
    write_bytes(join(out, "detection-study.md"), ("\n\n".join(sections) + "\n").encode())
    document = {
        "command": command,
        "config": asdict(config),
        "machine": machine(),
        "models": result.models,
        "chosen_rule": rule,
        "rows": [asdict(row) for row in result.rows],
    }
    write_bytes(join(out, "detection-study.json"), json.dumps(document, indent=2).encode())
    plot_feature_distributions(result, plot_model, join(out, "detection-study-features.png"))
    plot_principal_axes(result, plot_model, join(out, "detection-study-axes.png"))
    return rule
