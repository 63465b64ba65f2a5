"""A planted rule: disagreement is a known function of the features, unrelated to edge confidence.

The cloud model is always right; the edge model is wrong exactly when x0 + x1 > 1, and its fall
probability is as far from 0.5 on its mistakes as anywhere else. The uncertainty baseline cannot
find the mistakes; a trained switcher must.
"""

from __future__ import annotations


import numpy as np
import pytest

from switcher.calibrate import combined, defer_mask, threshold_for_fraction, uncertainty_scores
from switcher.metrics import f1_score, roc_auc
from switcher.model import Switcher, SwitcherConfig
from switcher.records import DmdMeta, write_arrays
from switcher.train import train_switcher

DIM = 16
META = DmdMeta(edge_model_id="planted-edge", questions=("Is the person falling?",), feature_dim=DIM,
               cloud_model_id="planted-cloud", cloud_question="?", dataset="planted", split="?", kind="image")


def planted(rng: np.random.Generator, n: int):
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    labels = rng.random(n) < 0.5
    disagree = x[:, 0] + x[:, 1] > 1.0
    edge_pred = labels ^ disagree
    margin = rng.uniform(0.02, 0.5, size=n)  # confidence independent of being wrong
    edge_p = np.where(edge_pred, 0.5 + margin, 0.5 - margin)
    edge_p = np.clip(edge_p, 0.0, 0.999)
    cloud_p = np.where(labels, 0.9, 0.1)
    return x, edge_p, cloud_p, labels, disagree


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(11)
    sets = {}
    for name, n in (("train", 500), ("val", 150), ("test", 400)):
        x, edge_p, cloud_p, labels, disagree = planted(rng, n)
        meta = DmdMeta(**{**META.__dict__, "split": name})
        sets[name] = (write_arrays(root / name, meta, x, edge_p, cloud_p, labels), disagree)
    cfg = SwitcherConfig(in_features=DIM, seed=0, batch_size=64)
    result = train_switcher(sets["train"][0], sets["val"][0], root / "ckpt", cfg)
    return root, sets, result


def test_switcher_ranks_planted_disagreements(trained) -> None:
    root, sets, result = trained
    test, disagree = sets["test"]
    assert np.array_equal(~test.agree, disagree)  # the DMD label is exactly the planted rule
    switcher = Switcher.load(root / "ckpt", "planted-edge", ["Is the person falling?"])
    agreement = switcher.agreement(test.features)
    auc = roc_auc(test.agree, agreement)
    assert auc is not None and auc > 0.9, auc
    assert result.metrics["val_auc"] > 0.9
    # uncertainty carries no signal here: its AUC stays near chance
    assert abs(roc_auc(test.agree, uncertainty_scores(test.column("edge_p_fall"))) - 0.5) < 0.1


def test_dmd_deferral_beats_uncertainty_at_equal_offload(trained) -> None:
    root, sets, _ = trained
    test, _ = sets["test"]
    switcher = Switcher.load(root / "ckpt")
    agreement = switcher.agreement(test.features)
    labels, edge, cloud = test.labels(), test.column("edge_pred", bool), test.column("cloud_pred", bool)
    uncertainty = uncertainty_scores(test.column("edge_p_fall"))
    for fraction in (0.1, 0.2, 0.3):
        dmd = defer_mask(agreement, threshold_for_fraction(agreement, fraction))
        unc = defer_mask(uncertainty, threshold_for_fraction(uncertainty, fraction))
        assert dmd.sum() == unc.sum()
        f1_dmd = f1_score(labels, combined(edge, cloud, dmd))
        f1_unc = f1_score(labels, combined(edge, cloud, unc))
        assert f1_dmd > f1_unc + 0.05, (fraction, f1_dmd, f1_unc)


def test_training_stops_early_and_records_its_curve(trained) -> None:
    root, _, result = trained
    assert 1 <= result.best_epoch <= result.epochs_run <= 100
    losses = [e.val_loss for e in result.curve]
    assert min(losses) == pytest.approx(result.metrics["val_loss"])
    if result.epochs_run < 100:  # early stop: patience epochs without improvement after the best
        assert result.epochs_run - result.best_epoch == 10
    assert losses[result.best_epoch - 1] < losses[0]
