"""Binary classification metrics (fall = positive class), ROC AUC and a seeded bootstrap."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BinaryScores:
    f1: float
    precision: float
    recall: float
    accuracy: float
    tp: int
    fp: int
    fn: int
    tn: int


def _div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def binary_scores(y_true: np.ndarray, y_pred: np.ndarray) -> BinaryScores:
    """Precision, recall, F1 and accuracy; a ratio with a zero denominator is 0."""
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if t.shape != p.shape:
        raise ValueError(f"labels {t.shape} and predictions {p.shape} differ in shape")
    tp, fp = int(np.sum(t & p)), int(np.sum(~t & p))
    fn, tn = int(np.sum(t & ~p)), int(np.sum(~t & ~p))
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    return BinaryScores(
        f1=_div(2 * tp, 2 * tp + fp + fn), precision=precision, recall=recall,
        accuracy=_div(tp + tn, t.size), tp=tp, fp=fp, fn=fn, tn=tn,
    )


def f1_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return binary_scores(y_true, y_pred).f1


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count one half); None with only one class present."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(score, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_vals = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float] = f1_score,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` over items resampled with replacement."""
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if t.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, t.size, size=(n, t.size))
    values = np.array([metric(t[i], p[i]) for i in idx])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)
