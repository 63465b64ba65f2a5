"""Planted traffic for tests and benchmarks of live DMD: where edge and cloud disagree is a known
function of the features (``x[a] + x[b] > cut``), unrelated to the edge's confidence.

The cloud is always right; the edge is wrong exactly on the rule's items (and on a random share
``noise`` of the others, which nothing can predict). A "change of traffic"
(a new camera, a moved one) is another pair of feature directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rule:
    a: int
    b: int
    cut: float = 1.0

    def disagree(self, x: np.ndarray) -> np.ndarray:
        return x[:, self.a] + x[:, self.b] > self.cut


@dataclass(frozen=True)
class Planted:
    features: np.ndarray  # (n, dim) float32
    labels: np.ndarray  # ground truth fall
    edge_p: np.ndarray
    cloud_p: np.ndarray
    disagree: np.ndarray


def planted(rng: np.random.Generator, n: int, dim: int, rule: Rule, noise: float = 0.0) -> Planted:
    """``n`` items; a share ``noise`` of them flips agreement at random (what no switcher can learn)."""
    x = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.random(n) < 0.5
    disagree = rule.disagree(x) ^ (rng.random(n) < noise)
    margin = rng.uniform(0.05, 0.45, size=n)
    edge_p = np.where(labels ^ disagree, 0.5 + margin, 0.5 - margin)
    cloud_p = np.where(labels, 0.9, 0.1)
    return Planted(x, labels, edge_p.astype(np.float64), cloud_p.astype(np.float64), disagree)
