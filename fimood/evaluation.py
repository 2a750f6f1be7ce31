"""Evaluation: the gradient method against likelihood and Typicality on in-distribution vs OOD sets.

`fimood evaluate` and the detection study share one loop (`evaluate_features`): every method scores
the same rows (or groups), and each OOD set gets every method's AUROC, AUPRs and FPR95.

Per-row scores use the saved detector. The paper's grouped variant (features of the summed loss of
M rows) is an evaluation device: its densities are fitted here, in-process, on the detector's own
fit rows, split into fit and calibration rows and reduced exactly as `fimood fit` does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from fimood.lake.tables import ImageTable, read_image_parquet
from fimood.method.baselines import TypicalityTest, baseline_scores
from fimood.method.detector import DetectorArtifact, DetectorSettings, GradNormDetector, load_detector
from fimood.method.features import Features, FeatureSettings, compute_features
from fimood.method.metrics import detection_metrics
from fimood.method.splits import calibration_rows
from fimood.models import LikelihoodModel
from fimood.progress import Stages
from fimood.storage import StorageOptions, write_bytes

METHOD_NAMES = ("gradient", "typicality", "likelihood")


@dataclass(frozen=True)
class EvaluationRow:
    method: str
    ood_set: str
    group_size: int
    auroc: float
    aupr_in: float
    aupr_out: float
    fpr95: float
    n_id: int
    n_ood: int


def table_features(
    model: LikelihoodModel,
    table: ImageTable,
    group_size: int,
    settings: FeatureSettings,
    rows: np.ndarray | None = None,
    label: str = "features",
) -> Features:
    """Features of the decodable rows of a table (or of `rows` of it), per row or per consecutive group."""
    rows = np.flatnonzero(table.ok) if rows is None else rows[table.ok[rows]]
    return compute_features(
        model,
        table.images[rows],
        [table.ids[i] for i in rows],
        group_size=group_size,
        engine=settings.engine,
        batch_size=settings.batch_size,
        progress=label,
    )


def grouped_fit_features(
    settings: DetectorSettings,
    feature_settings: FeatureSettings,
    model: LikelihoodModel,
    fit_table: ImageTable,
    group_size: int,
    label: str = "fit",
) -> tuple[Features, Features]:
    """Features of groups of `group_size` fit rows, and of groups of calibration rows.

    Rows are split as `fimood fit` splits them (`fimood.method.splits.calibration_rows`), then
    grouped: consecutive rows, within each side.
    """
    calibration = calibration_rows(fit_table.ids, settings.calibration_fraction)
    return tuple(
        table_features(
            model,
            fit_table,
            group_size,
            feature_settings,
            np.flatnonzero(side),
            f"{label} {name} (group {group_size})",
        )
        for side, name in ((~calibration, "fit"), (calibration, "calibration"))
    )


def method_scores(
    gradient: dict[str, GradNormDetector], typicality: TypicalityTest, features: Features
) -> dict[str, np.ndarray]:
    """OOD scores (higher = more OOD) of each gradient detector (by the name given) and both baselines."""
    return {name: density.ood_score(features.log_sq_norms) for name, density in gradient.items()} | baseline_scores(
        typicality, features.nll
    )


def evaluate_features(
    scores_of: Callable[[Features], dict[str, np.ndarray]],
    id_features: Features,
    ood_features: Iterable[tuple[str, Features]],
    group_size: int,
) -> list[EvaluationRow]:
    """One row per (OOD set, method), in that order: every method scores the same rows or groups."""
    id_scores = scores_of(id_features)
    rows = []
    for name, features in ood_features:
        for method, scores in scores_of(features).items():
            metrics = detection_metrics(id_scores[method], scores)
            n_id, n_ood = len(id_scores[method]), len(scores)
            rows.append(EvaluationRow(method, name, group_size, **metrics.as_dict(), n_id=n_id, n_ood=n_ood))
    return rows


def evaluate_tables(
    detector: DetectorArtifact,
    model: LikelihoodModel,
    id_table: ImageTable,
    ood_tables: dict[str, ImageTable],
    group_sizes: tuple[int, ...] = (1,),
    fit_table: ImageTable | None = None,
) -> list[EvaluationRow]:
    """One row per (group size, OOD set, method); rows that could not be decoded are left out."""
    rows = []
    settings, feature_settings = detector.settings, detector.feature_settings
    stages = Stages("evaluate", sum((size not in detector.by_group) + 1 + len(ood_tables) for size in group_sizes))

    def features(table: ImageTable, size: int, name: str) -> Features:
        stages.start(f"features of {name} (group size {size})")
        return table_features(model, table, size, feature_settings, label=f"{name} (group {size})")

    def ood_features(size: int) -> Iterator[tuple[str, Features]]:
        for name, table in ood_tables.items():
            yield name, features(table, size, name)

    for size in group_sizes:
        if size in detector.by_group:
            density = detector.by_group[size]
        elif fit_table is None:
            raise ValueError(f"group size {size} needs the detector's fit rows to fit its density")
        else:
            stages.start(f"fit the density of groups of {size} fit rows")
            fitted, calibration = grouped_fit_features(settings, feature_settings, model, fit_table, size)
            density = settings.detector().fit(fitted.log_sq_norms, calibration.log_sq_norms)
        scores_of = functools.partial(method_scores, {"gradient": density}, detector.typicality)
        id_features = features(id_table, size, "the in-distribution rows")
        rows += evaluate_features(scores_of, id_features, ood_features(size), size)
    return rows


def evaluate(
    detector_url: str,
    id_data_url: str,
    ood_data_urls: dict[str, str],
    *,
    group_sizes: tuple[int, ...] = (1,),
    limit: int | None = None,
    allowed_imports: tuple[str, ...] = (),
    storage_options: StorageOptions = None,
) -> list[EvaluationRow]:
    """Read the in-distribution and OOD tables (and, for grouped variants, the fit rows) and evaluate."""
    detector, model = load_detector(detector_url, storage_options, allowed_imports)

    def read(url: str, rows: int | None = limit) -> ImageTable:
        return read_image_parquet(url, model.image_shape, limit=rows, storage_options=storage_options)

    fit_table = None
    if any(size not in detector.by_group for size in group_sizes):
        fit_table = read(detector.extra["fit_data"], None)
    return evaluate_tables(
        detector,
        model,
        read(id_data_url),
        {name: read(url) for name, url in ood_data_urls.items()},
        group_sizes,
        fit_table,
    )


def format_table(rows: list[EvaluationRow]) -> str:
    """A plain-text table: one line per (OOD set, group size), AUROC and FPR95 for each method."""
    header = f"{'OOD set':<14}{'batch':>6}" + "".join(f"{m + ' AUROC':>18}{'FPR95':>8}" for m in METHOD_NAMES)
    lines = [header, "-" * len(header)]
    keys = sorted({(row.ood_set, row.group_size) for row in rows})
    by_key = {(row.ood_set, row.group_size, row.method): row for row in rows}
    for ood_set, size in keys:
        cells = "".join(
            f"{by_key[ood_set, size, m].auroc:>18.3f}{by_key[ood_set, size, m].fpr95:>8.3f}" for m in METHOD_NAMES
        )
        lines.append(f"{ood_set:<14}{size:>6}{cells}")
    return "\n".join(lines)


def write_json(
    rows: list[EvaluationRow], url: str, extra: dict | None = None, storage_options: StorageOptions = None
) -> None:
    document = {"rows": [asdict(row) for row in rows], **(extra or {})}
    write_bytes(url, json.dumps(document, indent=2).encode(), storage_options)
