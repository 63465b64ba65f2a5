"""The DMD switcher: a small MLP that predicts whether the edge and cloud models agree.

Input: the edge model's feature vector (ViLT's 1536-d activation inside its VQA head).
Output: one logit; sigmoid(logit) is the probability that the cloud model would give the
same fall / no-fall answer as the edge model. A high value means the edge verdict can stand,
a low value means the item is worth offloading: offload when ``agreement < threshold``.

A checkpoint is a directory: ``model.safetensors`` (the MLP weights) and ``switcher.json``
(config, edge model id, questions, feature size, standardisation statistics, training curve
and metrics, and the calibrated threshold once set). :class:`Switcher` runs it in torch inference mode on one thread, so the
edge hot path pays a few small matrix products per batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from switcher.records import atomic_write_bytes, read_versioned_json

FORMAT = "fallwatch-switcher/1"
WEIGHTS, CARD = "model.safetensors", "switcher.json"
REQUIRED = ("config", "edge_model_id", "questions", "feature_dim", "standardise")


@dataclass
class SwitcherConfig:
    in_features: int = 1536  # edge feature size (ViLT VQA head: 1536)
    hidden: tuple[int, ...] = (512, 128)  # widths of the hidden layers, each Linear -> ReLU -> Dropout
    dropout: float = 0.3  # dropout after every hidden layer
    lr: float = 1e-4  # Adam learning rate
    batch_size: int = 32  # training mini-batch
    max_epochs: int = 100  # upper bound; early stopping usually ends sooner
    patience: int = 10  # stop after this many epochs without a better validation loss
    pos_weight: float | None = None  # BCEWithLogits weight of the "agree" class; None = 1
    seed: int = 0  # weights, dropout and batch order
    extra: dict[str, object] = field(default_factory=dict)  # free-form notes kept with the checkpoint

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "SwitcherConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "hidden" in known:
            known["hidden"] = tuple(int(h) for h in known["hidden"])  # type: ignore[union-attr]
        return cls(**known)


class SwitcherMLP(nn.Module):
    """in_features -> 512 -> 128 -> 1 with ReLU and dropout (widths from the config)."""

    def __init__(self, cfg: SwitcherConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = cfg.in_features
        for hidden in cfg.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) standardised features -> (B,) agreement logits."""
        return self.net(x).squeeze(-1)


# --- checkpoints -------------------------------------------------------------------------------


class SwitcherError(ValueError):
    """A switcher checkpoint is missing or unreadable; the message names the file."""


class SwitcherMismatch(SwitcherError):
    """The checkpoint was trained for another edge model, question set or feature size."""


def save_checkpoint(out: Path, model: SwitcherMLP, card: Mapping[str, Any]) -> None:
    """Write ``model.safetensors`` and ``switcher.json`` into the directory ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    write_card(out, card)


def write_card(out: Path, card: Mapping[str, Any]) -> None:
    atomic_write_bytes(Path(out) / CARD, (json.dumps({**card, "format": FORMAT}, indent=2) + "\n").encode())


def read_card(path: Path) -> dict[str, Any]:
    missing = f"{path}: not a switcher checkpoint (no {CARD}); train one with `fallwatch switcher train`"
    card = read_versioned_json(Path(path) / CARD, FORMAT, SwitcherError, missing)
    absent = [k for k in REQUIRED if k not in card]
    if absent:
        raise SwitcherError(f"{Path(path) / CARD}: missing {absent}")
    return card


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights_path = Path(path) / WEIGHTS
    try:
        return load_file(str(weights_path))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise SwitcherError(f"{weights_path}: cannot read switcher weights ({exc})") from None


@contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread inside the block. For an MLP this small more threads only add overhead,
    and on a busy machine (the edge model's threads) a lot of it: 0.3 ms per batch of 8 with one
    thread, tails of 10 ms and more with several."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_identity(path: Path | str, card: Mapping[str, Any], edge_model_id: str | None = None,
                   questions: Sequence[str] | None = None) -> None:
    """SwitcherMismatch if the card was trained for another edge model or question set."""
    if edge_model_id is not None and card["edge_model_id"] != edge_model_id:
        raise SwitcherMismatch(
            f"{path}: switcher was trained on features of edge model {card['edge_model_id']!r}, "
            f"but the edge model is {edge_model_id!r}; distill and train a switcher for this model"
        )
    if questions is not None and tuple(card["questions"]) != tuple(questions):
        raise SwitcherMismatch(
            f"{path}: switcher was trained with questions {card['questions']!r}, "
            f"but the edge model asks {list(questions)!r}; features differ per question set"
        )


def weights_version(weights: Mapping[str, np.ndarray]) -> str:
    """A short content hash of a switcher's weights: its version when the card names none."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    return digest.hexdigest()[:12]


class Switcher:
    """A trained switcher, ready for the edge hot path (inference mode, one thread, no autograd)."""

    def __init__(self, path: Path, card: Mapping[str, Any], weights: Mapping[str, np.ndarray]):
        self.path = Path(path)
        self.card = dict(card)
        self.config = SwitcherConfig.from_dict(card["config"])
        self.feature_dim: int = int(card["feature_dim"])
        self.edge_model_id: str = str(card["edge_model_id"])
        self.questions: tuple[str, ...] = tuple(card["questions"])
        threshold = card.get("threshold")
        self.threshold: float | None = None if threshold is None else float(threshold)
        self._mean = torch.tensor(card["standardise"]["mean"], dtype=torch.float32)
        self._inv_std = 1.0 / torch.tensor(card["standardise"]["std"], dtype=torch.float32)
        self._layers = self._linear_layers(weights)
        self.version: str = str(card.get("version") or weights_version(weights))

    def _linear_layers(self, weights: Mapping[str, np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        names = sorted({k.rsplit(".", 1)[0] for k in weights}, key=lambda n: int(n.split(".")[-1]))
        layers = [(torch.from_numpy(np.ascontiguousarray(weights[f"{n}.weight"].T, dtype=np.float32)),
                   torch.from_numpy(weights[f"{n}.bias"].astype(np.float32))) for n in names]
        expected = [self.feature_dim, *self.config.hidden, 1]
        shapes = [tuple(w.shape) for w, _ in layers]
        if shapes != list(zip(expected[:-1], expected[1:])):
            raise SwitcherError(f"{self.path / WEIGHTS}: layer shapes {shapes} do not match the config {expected}")
        return layers

    @classmethod
    def load(cls, path: Path, edge_model_id: str | None = None, questions: Sequence[str] | None = None) -> "Switcher":
        """Load a checkpoint; SwitcherMismatch if it was trained for another edge model or questions."""
        card = read_card(path)
        check_identity(path, card, edge_model_id, questions)
        return cls(path, card, _load_weights(path))

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise SwitcherMismatch(f"switcher {self.path} expects (B, {self.feature_dim}) features, got {x.shape}")
        with single_thread(), torch.inference_mode():
            h = (torch.from_numpy(np.ascontiguousarray(x)) - self._mean) * self._inv_std
            for n, (w, b) in enumerate(self._layers):
                h = torch.addmm(b, h, w)
                if n < len(self._layers) - 1:
                    h = torch.relu(h)
            return h[:, 0].numpy()

    def agreement(self, features: np.ndarray) -> np.ndarray:
        """(B,) probability that the cloud model agrees with the edge model on each item."""
        z = self.logits(features).astype(np.float64)
        return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # a sigmoid that cannot overflow

    def offload(self, agreement: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """(B,) bool: items to send to the cloud, ``agreement < threshold``."""
        t = self.threshold if threshold is None else threshold
        if t is None:
            return np.zeros(np.shape(agreement), dtype=bool)
        return np.asarray(agreement) < t
