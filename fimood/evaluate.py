"""Evaluation: the gradient method against likelihood and Typicality on in-distribution vs OOD sets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from fimood.baselines import likelihood_ood_score
from fimood.detector import Detector
from fimood.features import Features, compute_features, seeds_from_ids
from fimood.io import ImageTable, read_image_parquet
from fimood.metrics import detection_metrics
from fimood.models import LikelihoodModel
from fimood.storage import StorageOptions, write_bytes
from fimood.workflow import load_detector_and_model

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


def method_scores(detector: Detector, group_size: int, features: Features) -> dict[str, np.ndarray]:
    """OOD scores (higher = more OOD) of each method for the same rows or groups."""
    return {
        "gradient": detector.by_group[group_size].ood_score(features.log_sq_norms),
        "typicality": detector.typicality.ood_score(features.nll),
        "likelihood": likelihood_ood_score(features.nll),
    }


def evaluate_tables(
    detector: Detector, model: LikelihoodModel, id_table: ImageTable, ood_tables: dict[str, ImageTable]
) -> list[EvaluationRow]:
    """One row per (group size, OOD set, method); rows that could not be decoded are left out."""

    def features(table: ImageTable, size: int, label: str) -> Features:
        ok = np.flatnonzero(table.ok)
        return compute_features(
            model,
            table.images[ok],
            seeds_from_ids([table.ids[i] for i in ok]),
            group_size=size,
            method=detector.settings.method,
            batch_size=detector.settings.batch_size,
            progress=label,
        )

    rows = []
    for size in detector.settings.group_sizes:
        id_scores = method_scores(detector, size, features(id_table, size, f"in-distribution (group {size})"))
        for name, table in ood_tables.items():
            ood_scores = method_scores(detector, size, features(table, size, f"{name} (group {size})"))
            for method in METHOD_NAMES:
                metrics = detection_metrics(id_scores[method], ood_scores[method])
                rows.append(
                    EvaluationRow(
                        method=method,
                        ood_set=name,
                        group_size=size,
                        **metrics.as_dict(),
                        n_id=len(id_scores[method]),
                        n_ood=len(ood_scores[method]),
                    )
                )
    return rows


def evaluate(
    detector_url: str,
    id_data_url: str,
    ood_data_urls: dict[str, str],
    *,
    limit: int | None = None,
    storage_options: StorageOptions = None,
) -> list[EvaluationRow]:
    """Read the in-distribution and OOD tables and evaluate every method on them."""
    detector, model = load_detector_and_model(detector_url, storage_options)

    def read(url: str) -> ImageTable:
        return read_image_parquet(url, model.image_shape, limit=limit, storage_options=storage_options)

    return evaluate_tables(detector, model, read(id_data_url), {name: read(url) for name, url in ood_data_urls.items()})


def format_table(rows: list[EvaluationRow]) -> str:
    """A plain-text table: one line per (OOD set, group size), AUROC and FPR95 for each method."""
    header = f"{'OOD set':<14}{'batch':>6}" + "".join(f"{m + ' AUROC':>18}{'FPR95':>8}" for m in METHOD_NAMES)
    lines = [header, "-" * len(header)]
    keys = sorted({(row.ood_set, row.group_size) for row in rows}, key=lambda key: (key[0], key[1]))
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
