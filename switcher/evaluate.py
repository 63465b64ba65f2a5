"""Table 1 of the paper for any distilled test set: small alone, large alone, uncertainty
deferral and DMD deferral, with F1 (bootstrap 95% interval), offload, time and energy.

Costs come from what `fallwatch distill` measured per item (batch wall time / batch size):
every approach that uses the edge model pays its time on all items, plus the cloud model's
time on the deferred ones. Energy: the cloud's measured energy on deferred items, plus the
edge's when measured (the edge is not metered by default, so it then counts as zero);
``None`` when the cloud's energy was not measured (the small-only row: the edge's own meter).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from switcher.calibrate import FINE_GRID, combined, defer_mask, threshold_for_fraction, uncertainty_scores
from switcher.metrics import binary_scores, bootstrap_ci
from switcher.model import Switcher, SwitcherMismatch
from switcher.records import DmdData

APPROACHES = ("small_only", "large_only", "uncertainty", "dmd")
PAPER_TABLE1 = {  # Wei et al., 106 test images of Fall Detection - Eldercare Robot
    "small_only": {"f1": 58.2, "offload": None, "time_s": None, "energy_kj": None},
    "large_only": {"f1": 87.5, "offload": 1.0, "time_s": 663.0, "energy_kj": 190.7},
    "uncertainty": {"f1": 76.1, "offload": 0.6, "time_s": None, "energy_kj": None},
    "dmd": {"f1": 92.1, "offload": 0.6, "time_s": 405.0, "energy_kj": 115.4},
}
LABELS = {"small_only": "Small model alone (ViLT)", "large_only": "Large model alone (LLaVA-NeXT-Video)",
          "uncertainty": "Uncertainty deferral (Narayan et al.)", "dmd": "DMD switcher"}


@dataclass(frozen=True)
class Row:
    approach: str
    f1: float
    f1_ci95: tuple[float, float]
    precision: float
    recall: float
    accuracy: float
    offload_fraction: float
    time_s: float
    energy_kj: float | None
    threshold: float | None = None


@dataclass(frozen=True)
class Costs:
    """Per-item measurements of one distilled set."""

    edge_s: np.ndarray
    cloud_s: np.ndarray
    edge_j: np.ndarray | None
    cloud_j: np.ndarray | None

    @classmethod
    def of(cls, data: DmdData) -> "Costs":
        return cls(data.column("edge_time_s"), data.column("cloud_time_s"),
                   data.energy("edge_energy_j"), data.energy("cloud_energy_j"))

    def time_s(self, deferred: np.ndarray, use_edge: bool = True) -> float:
        edge = float(self.edge_s.sum()) if use_edge else 0.0
        return edge + float(self.cloud_s[deferred].sum())

    def energy_kj(self, deferred: np.ndarray, use_edge: bool = True) -> float | None:
        """Energy in kJ: None when the cloud was not metered; an unmetered edge counts as zero."""
        if self.cloud_j is None:
            return None
        edge = float(self.edge_j.sum()) if (use_edge and self.edge_j is not None) else 0.0
        cloud = float(self.cloud_j[deferred].sum()) if deferred.any() else 0.0
        return (edge + cloud) / 1000


def _row(approach: str, labels: np.ndarray, pred: np.ndarray, deferred: np.ndarray, costs: Costs,
         seed: int, n_boot: int, threshold: float | None = None) -> Row:
    s = binary_scores(labels, pred)
    use_edge = approach != "large_only"
    energy = costs.energy_kj(deferred, use_edge)
    if approach == "small_only":  # the edge alone: its own meter or nothing
        energy = None if costs.edge_j is None else float(costs.edge_j.sum()) / 1000
    return Row(approach, s.f1, bootstrap_ci(labels, pred, n=n_boot, seed=seed), s.precision, s.recall, s.accuracy,
               float(deferred.mean()), costs.time_s(deferred, use_edge), energy, threshold)


def check_same_edge(switcher: Switcher, data: DmdData) -> None:
    if (data.meta.edge_model_id, tuple(data.meta.questions)) != (switcher.edge_model_id, switcher.questions):
        raise SwitcherMismatch(
            f"{data.meta.dataset} ({data.meta.split}) was distilled with edge model {data.meta.edge_model_id!r} "
            f"{list(data.meta.questions)}, the switcher {switcher.path} expects {switcher.edge_model_id!r} "
            f"{list(switcher.questions)}"
        )


def evaluate(switcher: Switcher, data: DmdData, threshold: float | None = None,
             seed: int = 0, n_boot: int = 1000) -> dict[str, object]:
    """The report as plain data (see the module docstring); labelled items only."""
    check_same_edge(switcher, data)
    t = switcher.threshold if threshold is None else threshold
    if t is None:
        raise ValueError(f"{switcher.path}: no threshold; run `fallwatch switcher calibrate` or pass --threshold")
    data = data.labelled()
    if len(data) == 0:
        raise ValueError(f"{data.meta.dataset} ({data.meta.split}): no items with ground truth to evaluate")
    labels = data.labels()
    edge, cloud = data.column("edge_pred", bool), data.column("cloud_pred", bool)
    agreement = switcher.agreement(data.features)
    uncertainty = uncertainty_scores(data.column("edge_p_fall"))
    costs = Costs.of(data)
    n = len(data)
    dmd_deferred = defer_mask(agreement, t)
    unc_deferred = defer_mask(uncertainty, threshold_for_fraction(uncertainty, dmd_deferred.sum() / n))
    rows = [
        _row("small_only", labels, edge, np.zeros(n, bool), costs, seed, n_boot),
        _row("large_only", labels, cloud, np.ones(n, bool), costs, seed, n_boot),
        _row("uncertainty", labels, combined(edge, cloud, unc_deferred), unc_deferred, costs, seed, n_boot),
        _row("dmd", labels, combined(edge, cloud, dmd_deferred), dmd_deferred, costs, seed, n_boot, float(t)),
    ]
    curves = {name: _curve(scores, labels, edge, cloud, costs) for name, scores in
              (("dmd", agreement), ("uncertainty", uncertainty))}
    return {
        "rows": [_row_dict(r) for r in rows],
        "curves": {k: [[p[0], p[1]] for p in v] for k, v in curves.items()},
        "time_curves": {k: [[p[0], p[2]] for p in v] for k, v in curves.items()},
        "energy_curves": {k: [[p[0], p[3]] for p in v] for k, v in curves.items()} if costs.cloud_j is not None else None,
        "items": n,
        "threshold": float(t),
        "data": {"dataset": data.meta.dataset, "split": data.meta.split, "edge_model": data.meta.edge_model_id,
                 "cloud_model": data.meta.cloud_model_id},
        "switcher": str(switcher.path),
        "bootstrap": {"resamples": n_boot, "seed": seed},
    }


def _row_dict(row: Row) -> dict[str, object]:
    data = asdict(row)
    data["f1_ci95"] = list(row.f1_ci95)
    return data


def _curve(scores, labels, edge, cloud, costs: Costs) -> list[tuple[float, float, float, float | None]]:
    """(offload fraction, F1, time s, energy kJ) for each 5% bucket."""
    points = []
    for fraction in FINE_GRID:
        mask = defer_mask(scores, threshold_for_fraction(scores, fraction))
        pred = combined(edge, cloud, mask)
        points.append((float(mask.mean()), binary_scores(labels, pred).f1, costs.time_s(mask), costs.energy_kj(mask)))
    return points


# --- writing -----------------------------------------------------------------------------------


def write_report(report: dict[str, object], out: Path) -> list[Path]:
    """report.json, report.md and the PNG plots in ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return [out / "report.json", out / "report.md", *plot(report, out)]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(report: dict[str, object]) -> str:
    rows = report["rows"]
    data = report["data"]
    lines = [
        "# fallwatch evaluation: Table 1",
        "",
        f"Data: `{data['dataset']}` split `{data['split']}`, {report['items']} labelled items; "
        f"edge `{data['edge_model']}`, cloud `{data['cloud_model']}`; switcher `{report['switcher']}`, "
        f"threshold {report['threshold']:.4f} (offload when agreement < threshold).",
        "",
        "| Approach | F1 (%) | F1 95% CI | Precision | Recall | Accuracy | Offload (%) | Time (s) | Energy (kJ) "
        "| Paper F1 | Paper offload | Paper time (s) | Paper energy (kJ) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = PAPER_TABLE1[r["approach"]]
        lo, hi = r["f1_ci95"]
        lines.append(
            f"| {LABELS[r['approach']]} | {_pct(r['f1'])} | {_pct(lo)}–{_pct(hi)} | {_pct(r['precision'])} | "
            f"{_pct(r['recall'])} | {_pct(r['accuracy'])} | {_pct(r['offload_fraction'])} | {_num(r['time_s'])} | "
            f"{_num(r['energy_kj'])} | {_num(p['f1'])} | {_pct(p['offload'])} | {_num(p['time_s'], '{:.0f}')} | "
            f"{_num(p['energy_kj'])} |"
        )
    lines += [
        "",
        "F1 treats fall as the positive class. The uncertainty row defers as many items as the DMD row, "
        "choosing those whose edge fall probability is closest to 0.5. Time is the measured edge time on every "
        "item plus the cloud time on deferred items (the large-only row counts the cloud only). Energy is the "
        "cloud's measured energy on deferred items plus the edge's when measured (only reported when the cloud was "
        "metered); – means not measured.",
        "Paper numbers: Wei et al., 106 test images of Fall Detection – Eldercare Robot, for reference.",
        "",
        "![F1 vs deferred](f1_vs_deferred.png)",
        "![Time vs deferred](time_vs_deferred.png)",
    ]
    if report.get("energy_curves"):
        lines.append("![Energy vs deferred](energy_vs_deferred.png)")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, object], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["approach"]: r for r in report["rows"]}
    specs = [("curves", "f1_vs_deferred.png", "F1", 100.0),
             ("time_curves", "time_vs_deferred.png", "time (s)", 1.0)]
    if report.get("energy_curves"):
        specs.append(("energy_curves", "energy_vs_deferred.png", "energy (kJ)", 1.0))
    written = []
    for key, name, ylabel, scale in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, style in (("dmd", "o-"), ("uncertainty", "s--")):
            pts = report[key][method]
            ax.plot([100 * p[0] for p in pts], [scale * p[1] for p in pts], style, label=LABELS[method], markersize=3)
        if key == "curves":
            for approach, colour in (("small_only", "grey"), ("large_only", "black")):
                ax.axhline(100 * rows[approach]["f1"], color=colour, linestyle=":", label=LABELS[approach])
        ax.set_xlabel("items deferred to the cloud (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    return written
