"""From images to the method's features: per-row seeds, batched gradient norms, log-norms and NLL."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from fimood.engine import METHODS, grad_norms, trainable_parameters
from fimood.method.statistics import LOG_SQ_NORM_FLOOR
from fimood.models.base import LikelihoodModel, pixels
from fimood.models.grouped import GroupSum

logger = logging.getLogger(__name__)


def seeds_from_ids(ids: Sequence[str]) -> np.ndarray:
    """A stable int64 seed per row id (BLAKE2b), so a row's noise never depends on batch or worker."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True) for i in ids],
        dtype=np.int64,
    )


def log_sq_norms(sq_norms: np.ndarray) -> np.ndarray:
    """log ‖g‖², clamped at LOG_SQ_NORM_FLOOR instead of -inf (clamped rows are counted by FeatureStats)."""
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(np.asarray(sq_norms, dtype=np.float64)), LOG_SQ_NORM_FLOOR)


@dataclass(frozen=True)
class FeatureSettings:
    """How features are computed: the gradient engine (`fimood.engine.METHODS`) and rows per gradient batch.

    A detector's manifest records the ones its fit rows' features had; `fimood evaluate` computes with them.
    """

    engine: str = "auto"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.engine not in METHODS:
            raise ValueError(f"engine must be one of {METHODS}, got {self.engine!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class Features:
    """Features of n rows (or n groups of rows)."""

    log_sq_norms: np.ndarray  # (n, L)
    nll: np.ndarray  # (n,) per row, or each group's mean NLL


def compute_features(
    model: LikelihoodModel,
    images: np.ndarray,
    ids: Sequence[str],
    *,
    group_size: int = 1,
    engine: str = "auto",
    batch_size: int = 64,
    progress: bool | str = False,
) -> Features:
    """Features of uint8 images (N, C, H, W) with their row ids, one row per image, or per group of `group_size`.

    Each row's noise is seeded by its id (`seeds_from_ids`), so its features never depend on the batch.
    Groups are consecutive rows (the paper's batch-size-M variant: features of the summed loss of M
    rows); trailing rows that do not fill a group are left out, and the count is logged.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if len(ids) != len(images) or not all(isinstance(i, str) for i in ids):
        raise ValueError(
            f"ids must be one string per image (each row's noise is seeded by its id), got {len(ids)} "
            f"{type(next(iter(ids), '')).__name__} ids for {len(images)} images"
        )
    n_groups = len(images) // group_size
    if n_groups * group_size < len(images):
        logger.info("left out %d trailing rows that do not fill a group of %d", len(images) % group_size, group_size)
    seeds = seeds_from_ids(ids)
    parameter = next(model.parameters())
    scored = model if group_size == 1 else GroupSum(model)
    rows_per_batch = max(1, batch_size // group_size)
    log_norms, nlls = [], []
    starts = range(0, n_groups, rows_per_batch)
    for start in tqdm(starts, desc=progress or "features", disable=not progress, unit="batch"):
        stop = min(start + rows_per_batch, n_groups) * group_size
        x = pixels(images[start * group_size : stop], parameter.dtype, parameter.device)
        s = torch.as_tensor(seeds[start * group_size : stop], device=parameter.device)
        if group_size > 1:
            x, s = x.reshape(-1, group_size, *x.shape[1:]), s.reshape(-1, group_size)
        result = grad_norms(scored, x, s, engine)
        log_norms.append(log_sq_norms(result.sq_norms.detach().cpu().double().numpy()))
        nlls.append(result.nll.detach().cpu().double().numpy() / group_size)
    n_features = len(trainable_parameters(model))
    return Features(
        log_sq_norms=np.concatenate(log_norms) if log_norms else np.zeros((0, n_features)),
        nll=np.concatenate(nlls) if nlls else np.zeros(0),
    )


@dataclass
class RowFeatures:
    """Features of rows as they came in: rows that could not be scored keep NaN and a reason."""

    log_sq_norms: np.ndarray  # (n, L), NaN rows where error is set
    nll: np.ndarray  # (n,)
    errors: list[str | None]  # (n,)
    memory_splits: int = 0  # times a batch was halved because the device ran out of memory


def featurize_rows(
    model: LikelihoodModel, ids: list[str], images: np.ndarray, errors: list[str | None], *, engine: str = "auto"
) -> RowFeatures:
    """Features of decoded rows: uint8 images (n, C, H, W), each row's decoding error or None.

    This is the row boundary: a row that could not be decoded, a row the model fails on and a
    non-finite result each become that row's error, never a failed batch. A batch the device has no
    memory for is halved until it fits (each row's features do not depend on its batch), and counted.
    """
    n_features = len(trainable_parameters(model))
    errors = list(errors)
    log_norms = np.full((len(ids), n_features), np.nan)
    nll = np.full(len(ids), np.nan)
    ok = np.array([error is None for error in errors], dtype=bool)
    splits = 0
    try:
        splits = _fill_halving(model, images, ids, np.flatnonzero(ok), engine, log_norms, nll)
    except Exception:  # one bad row must not sink the batch: find it by scoring rows one at a time
        logger.warning("a batch of %d rows failed; scoring its rows one at a time", ok.sum(), exc_info=True)
        for row in np.flatnonzero(ok):
            try:
                _fill(model, images, ids, np.array([row]), engine, log_norms, nll)
            except Exception as error:
                errors[row] = f"scoring failed: {type(error).__name__}: {error}"
    for row in np.flatnonzero(ok):
        if errors[row] is None and not (np.isfinite(nll[row]) and np.isfinite(log_norms[row]).all()):
            errors[row] = "the model gave a non-finite NLL or gradient"
    failed = np.array([error is not None for error in errors], dtype=bool)
    log_norms[failed], nll[failed] = np.nan, np.nan
    return RowFeatures(log_sq_norms=log_norms, nll=nll, errors=errors, memory_splits=splits)


def _fill_halving(model: LikelihoodModel, images, ids, rows: np.ndarray, engine: str, log_norms, nll) -> int:
    """`_fill`, halving the rows while the device runs out of memory; returns how many halvings it took."""
    try:
        _fill(model, images, ids, rows, engine, log_norms, nll)
        return 0
    except torch.OutOfMemoryError:
        if len(rows) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning("a batch of %d rows ran out of device memory; scoring it in halves", len(rows))
        half = len(rows) // 2
        return 1 + sum(
            _fill_halving(model, images, ids, part, engine, log_norms, nll) for part in (rows[:half], rows[half:])
        )


def _fill(
    model: LikelihoodModel,
    images: np.ndarray,
    ids: list[str],
    rows: np.ndarray,
    engine: str,
    log_norms: np.ndarray,
    nll: np.ndarray,
) -> None:
    if len(rows) == 0:
        return
    features = compute_features(model, images[rows], [ids[i] for i in rows], engine=engine, batch_size=len(rows))
    log_norms[rows], nll[rows] = features.log_sq_norms, features.nll
