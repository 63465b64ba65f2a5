"""Bucket calibration: how much to offload, and the agreement threshold that does it.

Deferral rule (the same at run time): an item goes to the cloud when its score is strictly
below the threshold, ``score < threshold``. For DMD the score is the switcher's agreement
probability; for the uncertainty baseline (Narayan et al.) it is ``|edge p_fall - 0.5|``.

"Defer the lowest x%" maps to a threshold as follows, with ``s`` the scores sorted ascending,
``N`` items and ``k = floor(x * N + 0.5)`` items to defer (x * N rounded half up):

* ``k = 0``: threshold ``min(0, s[0])`` (nothing is below it);
* ``k = N``: threshold ``max(1, next float above s[N-1])`` (everything is below it);
* otherwise the midpoint of ``s[k-1]`` and ``s[k]`` (or ``s[k]`` if the midpoint rounds down).

Ties: when ``s[k-1] == s[k]`` the midpoint equals the tied value, so every item with that
score stays on the edge and fewer than ``k`` items are deferred. Curves therefore report the
offload fraction actually achieved next to the fraction asked for.

Combined prediction: the cloud model's on deferred items, the edge model's on the rest,
scored by F1 (fall = positive) against ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from switcher.metrics import f1_score
from switcher.records import DmdData

COARSE_GRID = tuple(round(i / 10, 2) for i in range(11))  # the paper's 0%, 10%, ..., 100% buckets
FINE_GRID = tuple(round(i / 20, 2) for i in range(21))  # 5% steps


@dataclass(frozen=True)
class CurvePoint:
    target_fraction: float  # fraction asked to be deferred
    threshold: float
    deferred: int
    offload_fraction: float  # fraction actually deferred (ties stay on the edge)
    f1: float


@dataclass(frozen=True)
class Calibration:
    method: str  # "peak" | "budget"
    threshold: float
    offload_fraction: float
    f1: float | None  # on the labelled items; None without any
    budget: float | None
    items: int  # labelled items behind the curves
    curves: dict[str, list[CurvePoint]]  # dmd / uncertainty, on the 10% and 5% grids

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["curves"] = {k: [asdict(p) for p in v] for k, v in self.curves.items()}
        return data


def threshold_for_fraction(scores: np.ndarray, fraction: float) -> float:
    """The threshold with which ``scores < threshold`` defers the lowest ``fraction`` of items."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction to defer must be within [0, 1], got {fraction}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = s.size
    if n == 0:
        raise ValueError("cannot pick a threshold without items")
    k = int(math.floor(fraction * n + 0.5 + 1e-9))  # round half up, immune to 0.15 * 10 = 1.4999...
    if k == 0:
        return float(min(0.0, s[0]))
    if k == n:
        return float(max(1.0, np.nextafter(s[-1], np.inf)))
    lo, hi = s[k - 1], s[k]
    mid = (lo + hi) / 2
    return float(mid if mid > lo else hi)


def defer_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Items deferred to the cloud: ``score < threshold``."""
    return np.asarray(scores, dtype=np.float64) < threshold


def combined(edge_pred: np.ndarray, cloud_pred: np.ndarray, deferred: np.ndarray) -> np.ndarray:
    return np.where(deferred, np.asarray(cloud_pred, dtype=bool), np.asarray(edge_pred, dtype=bool))


def uncertainty_scores(edge_p_fall: np.ndarray) -> np.ndarray:
    """The baseline's score: distance of the edge fall probability from 0.5 (lowest = least sure)."""
    return np.abs(np.asarray(edge_p_fall, dtype=np.float64) - 0.5)


def bucket_curve(
    scores: np.ndarray,
    edge_pred: np.ndarray,
    cloud_pred: np.ndarray,
    labels: np.ndarray,
    grid: Sequence[float] = FINE_GRID,
) -> list[CurvePoint]:
    """Combined F1 when the lowest-scored x% are deferred, for each x in ``grid``."""
    points = []
    for fraction in grid:
        t = threshold_for_fraction(scores, fraction)
        mask = defer_mask(scores, t)
        f1 = f1_score(labels, combined(edge_pred, cloud_pred, mask))
        points.append(CurvePoint(float(fraction), t, int(mask.sum()), float(mask.mean()), f1))
    return points


def pick_peak(curve: Sequence[CurvePoint]) -> CurvePoint:
    """The point of highest F1; among equal F1 the one that offloads least."""
    return max(curve, key=lambda p: (p.f1, -p.offload_fraction))


def method_curves(agreement: np.ndarray, data: DmdData) -> dict[str, list[CurvePoint]]:
    """DMD and uncertainty-baseline curves on both grids for labelled distillation data."""
    labels = data.labels()
    edge, cloud = data.column("edge_pred", bool), data.column("cloud_pred", bool)
    uncertainty = uncertainty_scores(data.column("edge_p_fall"))
    curves = {}
    for grid_name, grid in (("10", COARSE_GRID), ("5", FINE_GRID)):
        curves[f"dmd_{grid_name}"] = bucket_curve(agreement, edge, cloud, labels, grid)
        curves[f"uncertainty_{grid_name}"] = bucket_curve(uncertainty, edge, cloud, labels, grid)
    return curves


def calibration_card(card: dict, result: Calibration, agreement: np.ndarray, data: DmdData) -> dict:
    """``card`` with the threshold and calibration set, including the agreement rate expected among
    the items kept on the edge (the drift monitor's baseline)."""
    kept = np.asarray(agreement) >= result.threshold
    return {**card, "threshold": result.threshold,
            "calibration": {**result.to_dict(), "data": {"dataset": data.meta.dataset, "split": data.meta.split},
                            "expected_agreement": float(data.agree[kept].mean()) if kept.any() else None}}


def calibrate(agreement: np.ndarray, data: DmdData, budget: float | None = None) -> Calibration:
    """Pick the threshold: the F1 peak of the 5% DMD curve, or the one that offloads ``budget``.

    The peak needs ground truth. A budget does not (it is about traffic, so it counts every
    item): unlabelled data, e.g. frames of your own cameras, can be calibrated with a budget,
    and then gets no curves and no F1.
    """
    agreement = np.asarray(agreement)
    data_l = data.labelled()
    agreement_l = agreement[data.has_labels]
    if len(data_l) == 0 and budget is None:
        raise ValueError(f"{data.meta.dataset} ({data.meta.split}): no labelled items for the F1 peak; "
                         "label some items or calibrate with a --budget")
    curves = method_curves(agreement_l, data_l) if len(data_l) else {}
    if budget is None:
        best = pick_peak(curves["dmd_5"])
        return Calibration("peak", best.threshold, best.offload_fraction, best.f1, None, len(data_l), curves)
    t = threshold_for_fraction(agreement, budget)
    f1 = None
    if len(data_l):
        mask = defer_mask(agreement_l, t)
        f1 = f1_score(data_l.labels(), combined(data_l.column("edge_pred", bool), data_l.column("cloud_pred", bool), mask))
    return Calibration("budget", t, float(defer_mask(agreement, t).mean()), f1, budget, len(data_l), curves)
