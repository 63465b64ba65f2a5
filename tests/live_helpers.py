"""Small switcher checkpoints for live DMD tests (random weights, the real checkpoint format)."""

from __future__ import annotations

from pathlib import Path


def make_checkpoint(out: Path, edge_model_id: str, questions, dim: int, seed: int, threshold: float = 0.5,
                    calibration: dict | None = None) -> Path:
    import torch

    from switcher.model import SwitcherConfig, SwitcherMLP, save_checkpoint

    torch.manual_seed(seed)
    cfg = SwitcherConfig(in_features=dim, hidden=(16,), seed=seed)
    card = {"config": cfg.to_dict(), "edge_model_id": edge_model_id, "questions": list(questions),
            "feature_dim": dim, "standardise": {"mean": [0.0] * dim, "std": [1.0] * dim}, "threshold": threshold,
            "calibration": calibration}
    save_checkpoint(out, SwitcherMLP(cfg), card)
    return out
