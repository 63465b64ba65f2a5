"""Metrics, bucket curves, thresholds and Table 1 on hand-built predictions with hand-computed answers.

Ten items (fall = 1):

    idx          0    1    2    3    4    5    6    7    8    9
    label        1    1    1    1    0    0    0    0    1    0
    edge p     .45  .30  .90  .56  .52  .12  .20  .47  .35  .05   -> edge pred 0 0 1 1 1 0 0 0 0 0
    cloud pred   1    1    1    1    0    0    0    1    1    0
    agreement  .10  .20  .90  .80  .30  .70  .60  .40  .50  .95

Edge alone: TP 2 FP 1 FN 3 -> F1 4/8. Cloud alone: TP 5 FP 1 FN 0 -> F1 10/11.
DMD defers by agreement: 0, 1, 4, 7, 8, 6, 5, 3, 2, 9 ->
    F1 after k deferred: 4/8, 6/9, 8/10, 8/9, 8/10, 10/11, 10/11 ...
Uncertainty defers by |p - .5|: 4 (.02), 7 (.03), 0 (.05), 3 (.06), 8 (.15), 1, 6, 5, 2, 9 ->
    F1 after k deferred: 4/8, 4/7, 4/8, 6/9, 6/9, 8/10, 10/11 ...
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from switcher.calibrate import (
    COARSE_GRID,
    FINE_GRID,
    bucket_curve,
    calibrate,
    defer_mask,
    pick_peak,
    threshold_for_fraction,
    uncertainty_scores,
)
from switcher.evaluate import evaluate, write_report
from switcher.metrics import binary_scores, bootstrap_ci, roc_auc
from switcher.model import Switcher, SwitcherConfig, SwitcherMLP, save_checkpoint
from switcher.records import DmdMeta, write_arrays

LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0], bool)
EDGE_P = np.array([0.45, 0.30, 0.90, 0.56, 0.52, 0.12, 0.20, 0.47, 0.35, 0.05])
CLOUD_PRED = np.array([1, 1, 1, 1, 0, 0, 0, 1, 1, 0], bool)
AGREEMENT = np.array([0.10, 0.20, 0.90, 0.80, 0.30, 0.70, 0.60, 0.40, 0.50, 0.95])
DMD_F1_BY_K = [4 / 8, 6 / 9, 8 / 10, 8 / 9, 8 / 10] + [10 / 11] * 6
UNC_F1_BY_K = [4 / 8, 4 / 7, 4 / 8, 6 / 9, 6 / 9, 8 / 10] + [10 / 11] * 5
META = DmdMeta(edge_model_id="hand-edge", questions=("Is the person falling?",), feature_dim=1,
               cloud_model_id="hand-cloud", cloud_question="?", dataset="hand", split="test", kind="image")


def _k(fraction: float, n: int = 10) -> int:
    return int(np.floor(fraction * n + 0.5 + 1e-9))


def identity_switcher(path: Path, threshold: float | None = None) -> Switcher:
    """A 1-feature switcher whose agreement is sigmoid(feature): features = logit(agreement)."""
    model = SwitcherMLP(SwitcherConfig(in_features=1, hidden=()))
    with torch.no_grad():
        model.net[0].weight.fill_(1.0)
        model.net[0].bias.zero_()
    card = {"config": SwitcherConfig(in_features=1, hidden=()).to_dict(), "edge_model_id": META.edge_model_id,
            "questions": list(META.questions), "feature_dim": 1, "standardise": {"mean": [0.0], "std": [1.0]},
            "threshold": threshold}
    save_checkpoint(path, model, card)
    return Switcher.load(path)


@pytest.fixture
def hand(tmp_path: Path):
    features = np.log(AGREEMENT / (1 - AGREEMENT)).reshape(-1, 1).astype(np.float32)
    cloud_p = np.where(CLOUD_PRED, 0.8, 0.2)
    data = write_arrays(tmp_path / "dmd", META, features, EDGE_P, cloud_p, LABELS,
                        edge_time_s=np.full(10, 0.1), cloud_time_s=np.full(10, 1.0), cloud_energy_j=np.full(10, 100.0))
    return data


def test_binary_scores_and_auc_by_hand() -> None:
    s = binary_scores(LABELS, EDGE_P >= 0.5)
    assert (s.tp, s.fp, s.fn, s.tn) == (2, 1, 3, 4)
    assert s.f1 == pytest.approx(0.5) and s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(0.4)
    assert s.accuracy == pytest.approx(0.6)
    assert binary_scores([0, 0], [0, 0]).f1 == 0.0  # no positives at all: zero by convention
    assert roc_auc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.5]) == pytest.approx(0.75)
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1], [0.2, 0.3]) is None


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    pred = np.array([1, 1, 1, 1, 0, 0, 0, 1, 1, 0], bool)
    lo, hi = bootstrap_ci(LABELS, pred, seed=1)
    assert (lo, hi) == bootstrap_ci(LABELS, pred, seed=1)
    assert 0.0 <= lo <= 10 / 11 <= hi <= 1.0 and lo < hi


def test_dmd_bucket_curve_matches_hand_computation() -> None:
    curve = bucket_curve(AGREEMENT, EDGE_P >= 0.5, CLOUD_PRED, LABELS, COARSE_GRID)
    assert [p.deferred for p in curve] == list(range(11))
    np.testing.assert_allclose([p.f1 for p in curve], DMD_F1_BY_K)
    fine = bucket_curve(AGREEMENT, EDGE_P >= 0.5, CLOUD_PRED, LABELS, FINE_GRID)
    np.testing.assert_allclose([p.f1 for p in fine], [DMD_F1_BY_K[_k(f)] for f in FINE_GRID])
    assert [p.deferred for p in fine] == [_k(f) for f in FINE_GRID]


def test_uncertainty_baseline_defers_least_certain_first() -> None:
    scores = uncertainty_scores(EDGE_P)
    order = [int(i) for i in np.argsort(scores)]
    assert order == [4, 7, 0, 3, 8, 1, 6, 5, 2, 9]
    curve = bucket_curve(scores, EDGE_P >= 0.5, CLOUD_PRED, LABELS, COARSE_GRID)
    np.testing.assert_allclose([p.f1 for p in curve], UNC_F1_BY_K)


def test_peak_and_budget_thresholds(hand) -> None:
    result = calibrate(AGREEMENT, hand)
    assert result.method == "peak"
    assert result.f1 == pytest.approx(10 / 11)
    assert result.offload_fraction == pytest.approx(0.5)  # the first (cheapest) point at the peak
    assert result.threshold == pytest.approx(0.55)  # midway between the 5th (.50) and 6th (.60) lowest
    budget = calibrate(AGREEMENT, hand, budget=0.3)
    assert budget.threshold == pytest.approx(0.35) and budget.offload_fraction == pytest.approx(0.3)
    assert budget.f1 == pytest.approx(8 / 9)
    assert set(result.curves) == {"dmd_10", "dmd_5", "uncertainty_10", "uncertainty_5"}


def test_pick_peak_prefers_less_offload_on_equal_f1() -> None:
    curve = bucket_curve(AGREEMENT, EDGE_P >= 0.5, CLOUD_PRED, LABELS, COARSE_GRID)
    assert pick_peak(curve).deferred == 5
    assert pick_peak(curve[:5]).deferred == 3


def test_threshold_rule_and_ties() -> None:
    scores = np.array([0.2, 0.5, 0.5, 0.5, 0.9])
    assert threshold_for_fraction(scores, 0.0) == 0.0 and not defer_mask(scores, 0.0).any()
    assert defer_mask(scores, threshold_for_fraction(scores, 1.0)).all()
    assert defer_mask(scores, threshold_for_fraction(scores, 0.2)).tolist() == [True, False, False, False, False]
    # asking for 2 of 5 cuts through the tie at 0.5: tied items all stay on the edge
    t = threshold_for_fraction(scores, 0.4)
    assert t == 0.5 and defer_mask(scores, t).sum() == 1
    saturated = np.array([1.0, 1.0])
    assert defer_mask(saturated, threshold_for_fraction(saturated, 1.0)).all()
    with pytest.raises(ValueError):
        threshold_for_fraction(scores, 1.5)


def test_evaluate_table_by_hand(hand, tmp_path: Path) -> None:
    sw = identity_switcher(tmp_path / "sw", threshold=0.55)
    np.testing.assert_allclose(sw.agreement(hand.features), AGREEMENT, atol=1e-6)
    report = evaluate(sw, hand, seed=3, n_boot=200)
    rows = {r["approach"]: r for r in report["rows"]}
    assert rows["small_only"]["f1"] == pytest.approx(0.5) and rows["small_only"]["offload_fraction"] == 0.0
    assert rows["large_only"]["f1"] == pytest.approx(10 / 11) and rows["large_only"]["offload_fraction"] == 1.0
    assert rows["dmd"]["f1"] == pytest.approx(10 / 11) and rows["dmd"]["offload_fraction"] == pytest.approx(0.5)
    assert rows["uncertainty"]["f1"] == pytest.approx(0.8) and rows["uncertainty"]["offload_fraction"] == pytest.approx(0.5)
    assert rows["small_only"]["time_s"] == pytest.approx(1.0) and rows["large_only"]["time_s"] == pytest.approx(10.0)
    assert rows["dmd"]["time_s"] == pytest.approx(6.0) and rows["uncertainty"]["time_s"] == pytest.approx(6.0)
    assert rows["small_only"]["energy_kj"] is None  # the edge was not metered
    assert rows["large_only"]["energy_kj"] == pytest.approx(1.0) and rows["dmd"]["energy_kj"] == pytest.approx(0.5)
    for row in rows.values():
        lo, hi = row["f1_ci95"]
        assert lo <= row["f1"] <= hi
    np.testing.assert_allclose([p[1] for p in report["curves"]["dmd"]], [DMD_F1_BY_K[_k(f)] for f in FINE_GRID])
    files = write_report(report, tmp_path / "report")
    names = {f.name for f in files}
    assert names == {"report.json", "report.md", "f1_vs_deferred.png", "time_vs_deferred.png", "energy_vs_deferred.png"}
    assert json.loads((tmp_path / "report" / "report.json").read_text())["rows"][3]["approach"] == "dmd"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| DMD switcher | 90.9 |" in md and "92.1" in md


def test_evaluate_refuses_other_edge_model_or_missing_threshold(hand, tmp_path: Path) -> None:
    from switcher.model import SwitcherMismatch

    sw = identity_switcher(tmp_path / "sw")
    with pytest.raises(ValueError, match="calibrate"):
        evaluate(sw, hand)
    other = write_arrays(tmp_path / "other", DmdMeta(**{**META.__dict__, "edge_model_id": "another"}),
                         hand.features, EDGE_P, np.where(CLOUD_PRED, 0.8, 0.2), LABELS)
    with pytest.raises(SwitcherMismatch, match="another"):
        evaluate(sw, other, threshold=0.5)


def test_calibrate_cli_stores_threshold_in_checkpoint(hand, tmp_path: Path) -> None:
    import typer

    from switcher.cli import register

    app = typer.Typer()
    register(app)
    identity_switcher(tmp_path / "sw")
    result = CliRunner().invoke(app, ["switcher", "calibrate", "--switcher", str(tmp_path / "sw"),
                                      "--dmd", str(tmp_path / "dmd"), "--budget", "0.3"])
    assert result.exit_code == 0, result.output
    assert Switcher.load(tmp_path / "sw").threshold == pytest.approx(0.35)
    card = json.loads((tmp_path / "sw" / "switcher.json").read_text())
    assert card["calibration"]["method"] == "budget" and len(card["calibration"]["curves"]["dmd_5"]) == 21


def test_budget_calibration_works_without_ground_truth(tmp_path: Path) -> None:
    features = np.log(AGREEMENT / (1 - AGREEMENT)).reshape(-1, 1).astype(np.float32)
    unlabelled = write_arrays(tmp_path / "cams", META, features, EDGE_P, np.where(CLOUD_PRED, 0.8, 0.2))
    result = calibrate(AGREEMENT, unlabelled, budget=0.3)
    assert result.threshold == pytest.approx(0.35) and result.f1 is None and result.curves == {}
    with pytest.raises(ValueError, match="budget"):
        calibrate(AGREEMENT, unlabelled)
