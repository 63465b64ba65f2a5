"""Train the switcher on distilled data: features -> "do edge and cloud agree?".

Adam (lr 1e-4 by default), BCEWithLogits with an optional positive-class weight, mini-batches
in a seeded order, early stopping on the validation loss (the best epoch's weights are kept),
features standardised with statistics fitted on the training set only.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import nn

from switcher.metrics import roc_auc
from switcher.model import SwitcherConfig, SwitcherMLP, save_checkpoint, single_thread
from switcher.records import DmdData

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_auc: float | None


@dataclass(frozen=True)
class TrainResult:
    path: Path
    best_epoch: int
    epochs_run: int
    metrics: dict[str, object]
    curve: tuple[EpochStats, ...]


@dataclass(frozen=True)
class Standardiser:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardiser":
        std = x.std(axis=0)
        return cls(x.mean(axis=0).astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


def resolve_pos_weight(option: str | float | None, agree: np.ndarray) -> float | None:
    """``auto``: (#disagree / #agree) so both classes weigh the same; a number; or None (1)."""
    if option is None or option == "none":
        return None
    if option == "auto":
        n_pos = int(np.sum(agree))
        n_neg = int(agree.size - n_pos)
        return float(n_neg / n_pos) if n_pos and n_neg else None
    value = float(option)
    if value <= 0:
        raise ValueError(f"pos_weight must be positive, got {value}")
    return value


def _loss_fn(pos_weight: float | None) -> nn.Module:
    weight = None if pos_weight is None else torch.tensor([pos_weight], dtype=torch.float32)
    return nn.BCEWithLogitsLoss(pos_weight=weight, reduction="none")


def _weighted(losses: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """The mean loss, or with sample weights (inverse propensities) the weighted mean."""
    return losses.mean() if w is None else (losses * w).sum() / w.sum()


def _evaluate(model: SwitcherMLP, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
              w: torch.Tensor | None = None) -> tuple[float, np.ndarray]:
    model.eval()
    with torch.inference_mode():
        logits = model(x)
        return float(_weighted(loss_fn(logits, y), w)), logits.numpy()


def _train_epoch(model, loss_fn, opt, x: torch.Tensor, y: torch.Tensor, batch: int, gen: torch.Generator,
                 w: torch.Tensor | None = None) -> float:
    model.train()
    order = torch.randperm(x.shape[0], generator=gen)
    total = 0.0
    for start in range(0, x.shape[0], batch):
        idx = order[start:start + batch]
        opt.zero_grad()
        loss = _weighted(loss_fn(model(x[idx]), y[idx]), None if w is None else w[idx])
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / x.shape[0]


def fit(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    cfg: SwitcherConfig, progress: bool = False, weights: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[SwitcherMLP, list[EpochStats], int]:
    """Train on standardised arrays; returns the best-epoch model, the curve and the best epoch.
    ``weights``: (train, val) sample weights, e.g. inverse inclusion probabilities."""
    with single_thread():
        return _fit(x_train, y_train, x_val, y_val, cfg, progress, weights)


def _tensor(w: np.ndarray | None) -> torch.Tensor | None:
    return None if w is None else torch.from_numpy(np.asarray(w, dtype=np.float32))


def _fit(x_train, y_train, x_val, y_val, cfg: SwitcherConfig, progress: bool,
         weights=None) -> tuple[SwitcherMLP, list[EpochStats], int]:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SwitcherMLP(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = _loss_fn(cfg.pos_weight)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.float32))
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val.astype(np.float32))
    wt, wv = (None, None) if weights is None else (_tensor(weights[0]), _tensor(weights[1]))
    best_loss, best_state, best_epoch, waited = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    curve: list[EpochStats] = []
    bar = tqdm(range(1, cfg.max_epochs + 1), desc="switcher", unit="epoch", disable=not progress)
    for epoch in bar:
        train_loss = _train_epoch(model, loss_fn, opt, xt, yt, cfg.batch_size, gen, wt)
        val_loss, val_logits = _evaluate(model, loss_fn, xv, yv, wv)
        curve.append(EpochStats(epoch, train_loss, val_loss, roc_auc(y_val, val_logits)))
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if val_loss < best_loss - 1e-7:
            best_loss, best_state, best_epoch, waited = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return model, curve, best_epoch


def _check_compatible(train: DmdData, val: DmdData) -> None:
    a, b = train.meta, val.meta
    if (a.edge_model_id, a.questions, a.feature_dim) != (b.edge_model_id, b.questions, b.feature_dim):
        raise ValueError(
            f"train data ({a.dataset}) was distilled with edge model {a.edge_model_id!r} {list(a.questions)}, "
            f"val data ({b.dataset}) with {b.edge_model_id!r} {list(b.questions)}; they must match"
        )
    if len(train) == 0 or len(val) == 0:
        raise ValueError("train and val distillation data must both hold items")


def train_switcher(
    train: DmdData, val: DmdData, out: Path, cfg: SwitcherConfig, progress: bool = False,
    weights: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainResult:
    """Train on ``train``, stop early on ``val`` and write the checkpoint directory ``out``.
    ``weights``: per-item (train, val) loss weights; None weighs every item alike."""
    _check_compatible(train, val)
    if cfg.in_features != train.meta.feature_dim:
        cfg = SwitcherConfig(**{**asdict(cfg), "in_features": train.meta.feature_dim})
    scaler = Standardiser.fit(train.features)
    model, curve, best_epoch = fit(scaler(train.features), train.agree, scaler(val.features), val.agree, cfg, progress,
                                   weights)
    best = curve[best_epoch - 1]
    metrics = _metrics(model, scaler, val, best, cfg, train)
    card = {
        "config": cfg.to_dict(),
        "edge_model_id": train.meta.edge_model_id,
        "questions": list(train.meta.questions),
        "feature_dim": train.meta.feature_dim,
        "cloud_model_id": train.meta.cloud_model_id,
        "standardise": {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()},
        "metrics": metrics,
        "curve": [asdict(e) for e in curve],
        "data": {"train": _source(train), "val": _source(val)},
        "threshold": None,
        "calibration": None,
    }
    save_checkpoint(out, model, card)
    log.info("switcher_trained", out=str(out), best_epoch=best_epoch, epochs=len(curve),
             val_loss=best.val_loss, val_auc=best.val_auc)
    return TrainResult(Path(out), best_epoch, len(curve), metrics, tuple(curve))


def _source(data: DmdData) -> dict[str, object]:
    return {"dataset": data.meta.dataset, "split": data.meta.split, "items": len(data),
            "agree_fraction": float(data.agree.mean())}


def _metrics(model: SwitcherMLP, scaler: Standardiser, val: DmdData, best: EpochStats,
             cfg: SwitcherConfig, train: DmdData) -> dict[str, object]:
    with torch.inference_mode():
        prob = torch.sigmoid(model(torch.from_numpy(scaler(val.features)))).numpy()
    return {
        "best_epoch": best.epoch,
        "val_loss": best.val_loss,
        "val_auc": best.val_auc,
        "val_accuracy": float(np.mean((prob >= 0.5) == val.agree)),
        "train_items": len(train),
        "val_items": len(val),
        "pos_weight": cfg.pos_weight,
    }
