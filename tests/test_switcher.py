"""The switcher model, its checkpoint and the runtime API the edge worker calls."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from switcher.model import Switcher, SwitcherConfig, SwitcherError, SwitcherMismatch, SwitcherMLP
from switcher.records import DmdMeta, write_arrays
from switcher.train import resolve_pos_weight, train_switcher

QUESTIONS = ("Is the person falling?",)


def test_architecture_matches_the_paper() -> None:
    model = SwitcherMLP(SwitcherConfig())
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1536, 512), (512, 128), (128, 1)]
    assert sum(isinstance(m, nn.ReLU) for m in model.net) == 2
    assert [m.p for m in model.net if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    cfg = SwitcherConfig()
    assert (cfg.lr, cfg.max_epochs) == (1e-4, 100)
    assert model(torch.zeros(4, 1536)).shape == (4,)


def _data(tmp_path: Path, name: str, n: int, dim: int, seed: int, edge: str = "edge-a"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32) * 3 + 5  # not standardised on purpose
    edge_p = rng.random(n)
    cloud_p = np.where(x[:, 0] > 5, edge_p, 1 - edge_p)  # agree exactly when x0 > 5
    meta = DmdMeta(edge_model_id=edge, questions=QUESTIONS, feature_dim=dim, cloud_model_id="cloud",
                   cloud_question="?", dataset=name, split=name, kind="image")
    return write_arrays(tmp_path / name, meta, x, edge_p, cloud_p, rng.random(n) < 0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sw")
    train, val = _data(root, "train", 120, 8, 0), _data(root, "val", 40, 8, 1)
    cfg = SwitcherConfig(in_features=8, hidden=(16, 8), max_epochs=15, patience=3, seed=7, batch_size=16)
    result = train_switcher(train, val, root / "ckpt", cfg)
    return root, train, val, cfg, result


def test_checkpoint_records_what_the_runtime_needs(checkpoint) -> None:
    root, train, _, _, result = checkpoint
    assert (root / "ckpt" / "model.safetensors").is_file()
    card = json.loads((root / "ckpt" / "switcher.json").read_text())
    assert card["edge_model_id"] == "edge-a" and card["questions"] == list(QUESTIONS) and card["feature_dim"] == 8
    np.testing.assert_allclose(card["standardise"]["mean"], train.features.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(card["standardise"]["std"], train.features.std(axis=0), rtol=1e-5)
    assert len(card["curve"]) == result.epochs_run and card["threshold"] is None
    assert card["metrics"]["best_epoch"] == result.best_epoch
    assert card["config"]["hidden"] == [16, 8]


def test_numpy_runtime_equals_torch_model(checkpoint) -> None:
    root, _, val, cfg, _ = checkpoint
    sw = Switcher.load(root / "ckpt", "edge-a", QUESTIONS)
    from safetensors.torch import load_file

    model = SwitcherMLP(cfg)
    model.load_state_dict(load_file(str(root / "ckpt" / "model.safetensors")))
    model.eval()
    card = sw.card["standardise"]
    x = (val.features - np.array(card["mean"], np.float32)) / np.array(card["std"], np.float32)
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(x.astype(np.float32)))).numpy()
    got = sw.agreement(val.features)
    assert got.shape == (len(val),) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert sw.offload(np.array([0.2, 0.8]), threshold=0.5).tolist() == [True, False]
    assert not sw.offload(np.array([0.0])).any()  # no threshold yet: never offload


def test_load_rejects_another_edge_model_or_questions(checkpoint) -> None:
    root = checkpoint[0]
    with pytest.raises(SwitcherMismatch, match="edge-b"):
        Switcher.load(root / "ckpt", edge_model_id="edge-b")
    with pytest.raises(SwitcherMismatch, match="Is someone lying"):
        Switcher.load(root / "ckpt", "edge-a", ["Is someone lying on the floor?"])
    sw = Switcher.load(root / "ckpt")
    with pytest.raises(SwitcherMismatch, match=r"\(B, 8\)"):
        sw.agreement(np.zeros((2, 9), np.float32))
    with pytest.raises(SwitcherError, match="switcher.json"):
        Switcher.load(root / "nowhere")


def test_broken_checkpoints_are_named(checkpoint, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint[0] / "ckpt", broken)
    card = json.loads((broken / "switcher.json").read_text())
    del card["standardise"]
    (broken / "switcher.json").write_text(json.dumps(card))
    with pytest.raises(SwitcherError, match="standardise"):
        Switcher.load(broken)
    (broken / "switcher.json").write_text("{not json")
    with pytest.raises(SwitcherError, match="not valid JSON"):
        Switcher.load(broken)
    shutil.copy(checkpoint[0] / "ckpt" / "switcher.json", broken / "switcher.json")
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SwitcherError, match="model.safetensors"):
        Switcher.load(broken)


def test_training_is_seeded(checkpoint, tmp_path: Path) -> None:
    root, train, val, cfg, result = checkpoint
    again = train_switcher(train, val, tmp_path / "again", cfg)
    assert [e.val_loss for e in again.curve] == [e.val_loss for e in result.curve]
    a = Switcher.load(root / "ckpt").agreement(val.features)
    b = Switcher.load(tmp_path / "again").agreement(val.features)
    assert np.array_equal(a, b)


def test_train_refuses_mixed_edge_models(checkpoint, tmp_path: Path) -> None:
    _, train, _, cfg, _ = checkpoint
    other = _data(tmp_path, "other", 20, 8, 3, edge="edge-b")
    with pytest.raises(ValueError, match="edge-b"):
        train_switcher(train, other, tmp_path / "x", cfg)


def test_pos_weight_option() -> None:
    agree = np.array([True, True, True, False])
    assert resolve_pos_weight("auto", agree) == pytest.approx(1 / 3)
    assert resolve_pos_weight("none", agree) is None
    assert resolve_pos_weight("2.5", agree) == 2.5
    with pytest.raises(ValueError):
        resolve_pos_weight("-1", agree)


def test_agreement_is_cheap_on_the_hot_path(tmp_path: Path) -> None:
    """A full-size (1536-d) switcher on a batch of 8 must cost well under 1% of ViLT (~40 ms/image)."""
    from switcher.model import save_checkpoint

    cfg = SwitcherConfig()
    card = {"config": cfg.to_dict(), "edge_model_id": "e", "questions": list(QUESTIONS), "feature_dim": 1536,
            "standardise": {"mean": [0.0] * 1536, "std": [1.0] * 1536}, "threshold": 0.5}
    save_checkpoint(tmp_path / "big", SwitcherMLP(cfg), card)
    sw = Switcher.load(tmp_path / "big")
    x = np.random.default_rng(0).normal(size=(8, 1536)).astype(np.float32)
    sw.agreement(x)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        sw.agreement(x)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 3e-3, f"median {np.median(times) * 1e3:.2f} ms for 8 items"
