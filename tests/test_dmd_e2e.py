"""End to end with the tiny offline models: synth -> distill -> train -> calibrate -> evaluate.

Also: an interrupted distillation, resumed, equals an uninterrupted one and does not redo the
finished batch; clip datasets distil too; the paper's JSON export.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from fallwatch.synth import SynthConfig, make_dataset
from switcher.cli import register
from switcher.distill import BatchDone, dataset_items, distill
from switcher.records import DmdError, load_dmd

pytestmark = pytest.mark.slow

SYNTH = SynthConfig(seed=5, sources={"train": 8, "valid": 5, "test": 5}, train_copies=2, image_size=160,
                    clips=4, clip_size=(160, 120), clip_fps=8, clip_seconds=1.5)
TIMING = ("edge_time_s", "cloud_time_s", "edge_energy_j", "cloud_energy_j")


class Counting:
    """Wraps a model and counts the items it scores."""

    def __init__(self, model):
        self.model = model
        self.scored = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def score(self, items):
        self.scored += len(items)
        return self.model.score(items)


class Renamed(Counting):
    """The same model under another id."""

    model_id = "another-edge"


@pytest.fixture(scope="module")
def models():
    from cloud_worker.model import CloudModel
    from edge_worker.model import EdgeModel
    from fallwatch.settings import CloudSettings, EdgeSettings

    return EdgeModel.load(EdgeSettings(model="tiny")), CloudModel.load(CloudSettings(model="tiny", device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    make_dataset(SYNTH, out)
    return out


def _run(app: typer.Typer, *args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.output


def _comparable(path: Path) -> tuple[list[dict], np.ndarray]:
    data = load_dmd(path)
    rows = [{k: v for k, v in asdict(i).items() if k not in TIMING} for i in data.items]
    return rows, data.features


def test_resumed_distill_equals_uninterrupted(models, synth: Path, tmp_path: Path) -> None:
    edge, cloud = models
    items = dataset_items(synth, "valid")
    assert len(items) == 5
    kwargs = {"dataset": str(synth), "split": "valid", "batch_size": 2}
    distill(items, edge, cloud, tmp_path / "whole", **kwargs)

    def crash_after_first(done: BatchDone) -> None:
        if done.index == 0:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        distill(items, edge, cloud, tmp_path / "resumed", on_batch=crash_after_first, **kwargs)
    with pytest.raises(DmdError, match="incomplete"):
        load_dmd(tmp_path / "resumed")
    counting_edge, counting_cloud = Counting(edge), Counting(cloud)
    distill(items, counting_edge, counting_cloud, tmp_path / "resumed", paper_json=True, **kwargs)
    assert counting_edge.scored == 3 and counting_cloud.scored == 3  # the first batch was not redone
    whole_rows, whole_feats = _comparable(tmp_path / "whole")
    resumed_rows, resumed_feats = _comparable(tmp_path / "resumed")
    assert resumed_rows == whole_rows
    np.testing.assert_array_equal(resumed_feats, whole_feats)
    data = load_dmd(tmp_path / "resumed")
    assert data.features.shape == (5, edge.feature_dim) and data.meta.kind == "image"
    assert all(i.edge_time_s > 0 and i.cloud_time_s > 0 for i in data.items)
    assert [i.agree for i in data.items] == [i.edge_pred == i.cloud_pred for i in data.items]
    paper = json.loads((tmp_path / "resumed" / "paper.json").read_text())
    assert [set(r) for r in paper] == [{"image_path", "last_hidden_layer", "label"}] * 5
    assert len(paper[0]["last_hidden_layer"]) == edge.feature_dim
    # a different edge model cannot continue this directory
    with pytest.raises(DmdError, match="other settings"):
        distill(items, Renamed(edge), cloud, tmp_path / "resumed", **kwargs)


def test_torn_item_line_is_dropped_on_resume(models, synth: Path, tmp_path: Path) -> None:
    edge, cloud = models
    items = dataset_items(synth, "test")
    kwargs = {"dataset": str(synth), "split": "test", "batch_size": 4}

    def crash(done: BatchDone) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(items, edge, cloud, tmp_path / "d", on_batch=crash, **kwargs)
    lines = (tmp_path / "d" / "items.jsonl").read_text()
    (tmp_path / "d" / "items.jsonl").write_text(lines + lines.splitlines()[0][:30])  # crash mid-line
    counting = Counting(edge)
    distill(items, counting, cloud, tmp_path / "d", **kwargs)
    assert counting.scored == 1 and len(load_dmd(tmp_path / "d")) == 5


def test_clip_dataset_distils(models, synth: Path, tmp_path: Path) -> None:
    edge, cloud = models
    items = dataset_items(synth / "clips", "any")
    assert [i.kind for i in items] == ["clip"] * 4 and [i.label for i in items] == [True, False, True, False]
    distill(items, edge, cloud, tmp_path / "clips", dataset=str(synth / "clips"), split="clips", batch_size=4)
    data = load_dmd(tmp_path / "clips")
    assert data.meta.kind == "clip" and data.features.shape == (4, edge.feature_dim)


def test_pipeline_through_the_cli(models, synth: Path, tmp_path: Path) -> None:
    edge, cloud = models
    for split in ("train", "valid", "test"):
        distill(dataset_items(synth, split), edge, cloud, tmp_path / f"dmd-{split}", dataset=str(synth), split=split,
                batch_size=8)
    app = typer.Typer()
    register(app)
    out = _run(app, "dataset", "stats", synth)
    assert json.loads(out)["train"]["images"] == 16
    # distil once more through the CLI (loads the tiny models itself) and compare with the library run
    _run(app, "distill", "--dataset", synth, "--split", "test", "--edge", "tiny", "--cloud", "tiny",
         "--cloud-device", "cpu", "--out", tmp_path / "cli-test", "--batch-size", "8")
    assert [i.id for i in load_dmd(tmp_path / "cli-test").items] == [i.id for i in load_dmd(tmp_path / "dmd-test").items]
    ckpt = tmp_path / "switcher"
    _run(app, "switcher", "train", "--train", tmp_path / "dmd-train", "--val", tmp_path / "dmd-valid", "--out", ckpt,
         "--epochs", "5", "--patience", "2", "--pos-weight", "auto")
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "switcher.json"}
    _run(app, "switcher", "calibrate", "--switcher", ckpt, "--dmd", tmp_path / "dmd-valid")
    card = json.loads((ckpt / "switcher.json").read_text())
    assert card["threshold"] is not None and card["calibration"]["method"] == "peak"
    info = json.loads(_run(app, "switcher", "info", ckpt))
    assert info["edge_model_id"] == "tiny" and info["threshold"] == card["threshold"]
    report_dir = tmp_path / "report"
    _run(app, "evaluate", "--switcher", ckpt, "--dmd", tmp_path / "dmd-test", "--out", report_dir, "--resamples", "50")
    report = json.loads((report_dir / "report.json").read_text())
    assert [r["approach"] for r in report["rows"]] == ["small_only", "large_only", "uncertainty", "dmd"]
    for row in report["rows"]:
        assert set(row) >= {"f1", "f1_ci95", "precision", "recall", "accuracy", "offload_fraction", "time_s", "energy_kj"}
        assert row["energy_kj"] is None  # nothing is metered on a CPU
    assert set(report["curves"]) == {"dmd", "uncertainty"} and len(report["curves"]["dmd"]) == 21
    assert {p.name for p in report_dir.iterdir()} == {"report.json", "report.md", "f1_vs_deferred.png",
                                                      "time_vs_deferred.png"}


def test_edge_worker_loads_the_switcher_for_its_model(models, synth: Path, tmp_path: Path) -> None:
    from edge_worker.cli import load_edge
    from fallwatch.settings import Settings
    from switcher.model import SwitcherConfig, SwitcherMismatch
    from switcher.train import train_switcher

    edge, cloud = models
    for split in ("valid", "test"):
        distill(dataset_items(synth, split), edge, cloud, tmp_path / split, dataset=str(synth), split=split)
    cfg = SwitcherConfig(in_features=edge.feature_dim, max_epochs=3)
    train_switcher(load_dmd(tmp_path / "valid"), load_dmd(tmp_path / "test"), tmp_path / "sw", cfg)
    settings = Settings(edge={"model": "tiny"}, switcher={"checkpoint": str(tmp_path / "sw")})
    model, switcher = load_edge(settings)
    scores = model.score([np.zeros((64, 64, 3), np.uint8)] * 2)
    agreement = switcher.agreement(scores.features)
    assert agreement.shape == (2,) and np.all((agreement >= 0) & (agreement <= 1))
    other = Settings(edge={"model": "tiny", "questions": ["Is someone on the floor?"]},
                     switcher={"checkpoint": str(tmp_path / "sw")})
    with pytest.raises(SwitcherMismatch, match="questions"):
        load_edge(other)
