"""Commands of the DMD pipeline: datasets, distillation, the switcher, calibration, evaluation.

    fallwatch dataset synth --out DIR            licence-free synthetic dataset (YOLO + clips)
    fallwatch dataset stats ROOT                 images, falls and boxes per class per split
    fallwatch dataset split --src ROOT --out DIR group-aware seeded re-split (e.g. 0.7/0.2/0.1)
    fallwatch distill --dataset DIR --split S --out DMD_DIR
    fallwatch switcher train --train DMD_DIR --val DMD_DIR --out CKPT
    fallwatch switcher calibrate --switcher CKPT --dmd DMD_DIR [--budget F]
    fallwatch switcher info CKPT
    fallwatch evaluate --switcher CKPT --dmd DMD_DIR --out REPORT_DIR
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from fallwatch.context import app_context


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(message, fg="red", err=True)
    return typer.Exit(code)


def _classes(text: str) -> frozenset[int]:
    try:
        return frozenset(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise typer.BadParameter(f"fall classes must be comma-separated integers, got {text!r}") from None


# --- dataset -----------------------------------------------------------------------------------


def synth(
    out: Annotated[Path, typer.Option(help="Output folder (created).")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    n: Annotated[int, typer.Option(help="Source images; 60/20/20 over train/valid/test.")] = 28,
    copies: Annotated[int, typer.Option(help="Augmented copies of each training source.")] = 3,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 320,
    clips: Annotated[int, typer.Option(help="Video clips (half falls).")] = 8,
) -> None:
    """Write a licence-free synthetic fall dataset: YOLO images (train/valid/test) and H.264 clips."""
    from fallwatch.synth import SynthConfig, make_dataset

    if n < 3 or copies < 1 or size < 64 or clips < 0:
        raise _fail("need --n >= 3, --copies >= 1, --size >= 64, --clips >= 0", 2)
    held_out = max(1, round(n * 0.2))
    cfg = SynthConfig(seed=seed, sources={"train": n - 2 * held_out, "valid": held_out, "test": held_out},
                      train_copies=copies, image_size=size, clips=clips)
    summary = make_dataset(cfg, out, progress=True)
    typer.echo(json.dumps({"out": str(summary.out), "images": summary.images, "falls": summary.falls,
                           "clips": summary.clips}))


def stats(
    root: Annotated[Path, typer.Argument(metavar="ROOT", help="YOLO dataset root.")],
    split: Annotated[Optional[list[str]], typer.Option(help="Split(s); default: every folder with images/.")] = None,
    fall_classes: Annotated[str, typer.Option("--fall-classes", "--fall-class", metavar="IDS", help="Class ids that mean fall, comma-separated.")] = "0",
) -> None:
    """Count images, falls, groups and boxes per class in each split."""
    from fallwatch.datasets import DatasetError, dataset_stats, load_yolo

    splits = split or sorted(p.name for p in Path(root).iterdir() if (p / "images").is_dir())
    try:
        result = {s: dataset_stats(load_yolo(root, s, _classes(fall_classes))).as_dict() for s in splits}
    except DatasetError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(result, indent=2))


def split_cmd(
    src: Annotated[Path, typer.Option(help="YOLO dataset root to re-split.")],
    out: Annotated[Path, typer.Option(help="Output root (YOLO layout).")],
    from_splits: Annotated[str, typer.Option("--from", help="Source splits pooled together.")] = "train,valid",
    ratios: Annotated[str, typer.Option(help="name=ratio pairs.")] = "train=0.7,valid=0.2,test=0.1",
    seed: Annotated[int, typer.Option(help="Shuffle seed.")] = 0,
    link: Annotated[bool, typer.Option(help="Hard-link files instead of copying.")] = False,
    fall_classes: Annotated[str, typer.Option("--fall-classes", "--fall-class", metavar="IDS", help="Class ids that mean fall, comma-separated (for class balance).")] = "0",
) -> None:
    """Re-split a dataset by ratios, keeping augmented copies of one photo (name before .rf.) together."""
    from fallwatch.datasets import DatasetError, dataset_stats, load_yolo, resplit, write_yolo

    try:
        wanted = {k.strip(): float(v) for k, v in (p.split("=") for p in ratios.split(","))}
    except ValueError:
        raise _fail(f"--ratios must look like train=0.7,valid=0.2,test=0.1, got {ratios!r}", 2) from None
    try:
        items = [i for s in from_splits.split(",") for i in load_yolo(src, s.strip(), _classes(fall_classes))]
        splits = resplit(items, wanted, seed)
    except DatasetError as exc:
        raise _fail(str(exc)) from None
    write_yolo(splits, out, link=link)
    typer.echo(json.dumps({s: dataset_stats(v).as_dict() for s, v in splits.items()}, indent=2))


# --- distill -----------------------------------------------------------------------------------


def distill_cmd(
    ctx: typer.Context,
    dataset: Annotated[Path, typer.Option(help="YOLO root (with --split), or a clip list / clip folder.")],
    out: Annotated[Path, typer.Option(help="Distillation directory (resumed if it exists).")],
    split: Annotated[str, typer.Option(help="Split of a YOLO dataset.")] = "valid",
    edge: Annotated[Optional[str], typer.Option(help="Edge model id/path/'tiny' (default: edge.model).")] = None,
    cloud: Annotated[Optional[str], typer.Option(help="Cloud model id/path/'tiny' (default: cloud.model).")] = None,
    edge_device: Annotated[Optional[str], typer.Option(help="Override edge.device.")] = None,
    cloud_device: Annotated[Optional[str], typer.Option(help="Override cloud.device.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Items per batch for both models.")] = 8,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where tiny models are built.")] = None,
    fall_classes: Annotated[str, typer.Option("--fall-classes", "--fall-class", metavar="IDS", help="Class ids that mean fall, comma-separated.")] = "0",
    paper_json: Annotated[bool, typer.Option(help="Also write paper.json in the paper's format.")] = False,
) -> None:
    """Run a dataset through the edge and cloud models zero-shot and record where they agree."""
    from cloud_worker.model import CloudModel
    from fallwatch.hub import ModelNotAvailable
    from edge_worker.model import EdgeModel
    from fallwatch.datasets import DatasetError
    from switcher.distill import dataset_items, distill
    from switcher.records import DmdError

    settings = app_context(ctx).settings
    edge_cfg = settings.edge.model_copy(update=_overrides(model=edge, device=edge_device))
    cloud_cfg = settings.cloud.model_copy(update=_overrides(model=cloud, device=cloud_device))
    try:
        items = dataset_items(dataset, split, _classes(fall_classes))
        edge_model = EdgeModel.load(edge_cfg, cache_dir)
        cloud_model = CloudModel.load(cloud_cfg, cache_dir)
        meta = distill(items, edge_model, cloud_model, out, dataset=str(Path(dataset).resolve()), split=split,
                       batch_size=batch_size, num_frames=cloud_cfg.num_frames, paper_json=paper_json, progress=True)
    except (DatasetError, DmdError, ModelNotAvailable) as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps({"out": str(out), "items": meta.items, "edge": meta.edge_model_id,
                           "cloud": meta.cloud_model_id, "feature_dim": meta.feature_dim}))


def _overrides(**values: object) -> dict[str, object]:
    return {k: v for k, v in values.items() if v is not None}


# --- switcher ----------------------------------------------------------------------------------


def train_cmd(
    train: Annotated[list[Path], typer.Option(help="Distillation directory(ies) to train on.")],
    val: Annotated[Path, typer.Option(help="Distillation directory for early stopping.")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    pos_weight: Annotated[str, typer.Option(help="'auto' (#disagree/#agree), 'none' or a number.")] = "none",
    seed: Annotated[int, typer.Option(help="Seed of weights, dropout and batch order.")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs.")] = 100,
    patience: Annotated[int, typer.Option(min=1, help="Stop after this many epochs without a better val loss.")] = 10,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Mini-batch size.")] = 32,
) -> None:
    """Train the switcher (features -> do edge and cloud agree?) with early stopping."""
    from switcher.model import SwitcherConfig
    from switcher.records import DmdError, concat, load_dmd
    from switcher.train import resolve_pos_weight, train_switcher

    try:
        train_data = concat(load_dmd(p) for p in train)
        val_data = load_dmd(val)
        weight = resolve_pos_weight(pos_weight, train_data.agree)
    except (DmdError, ValueError) as exc:
        raise _fail(str(exc)) from None
    cfg = SwitcherConfig(in_features=train_data.meta.feature_dim, lr=lr, batch_size=batch_size, max_epochs=epochs,
                         patience=patience, pos_weight=weight, seed=seed)
    result = train_switcher(train_data, val_data, out, cfg, progress=True)
    typer.echo(json.dumps({"out": str(result.path), "epochs": result.epochs_run, **result.metrics}))


def calibrate_cmd(
    switcher_path: Annotated[Path, typer.Option("--switcher", help="Checkpoint directory.")],
    data: Annotated[Path, typer.Option("--dmd", metavar="DMD_DIR", help="Labelled distillation directory (e.g. the valid split).")],
    budget: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Offload this fraction instead of the F1 peak.")] = None,
) -> None:
    """Pick the agreement threshold from the bucket curves and store it in the checkpoint."""
    from switcher.calibrate import calibrate, calibration_card
    from switcher.evaluate import check_same_edge
    from switcher.model import Switcher, SwitcherError, read_card, write_card
    from switcher.records import DmdError, load_dmd

    try:
        sw = Switcher.load(switcher_path)
        dmd = load_dmd(data)
        check_same_edge(sw, dmd)
        agreement = sw.agreement(dmd.features)
        result = calibrate(agreement, dmd, budget)
    except (SwitcherError, DmdError, ValueError) as exc:
        raise _fail(str(exc)) from None
    write_card(switcher_path, calibration_card(read_card(switcher_path), result, agreement, dmd))
    _print_curves(result)
    typer.echo(json.dumps({"threshold": result.threshold, "method": result.method,
                           "offload_fraction": result.offload_fraction, "f1": result.f1}))


def _print_curves(result) -> None:
    if not result.curves:
        typer.echo("no ground truth: no F1 curves")
        return
    typer.echo("deferred  DMD F1  uncertainty F1   (10% buckets)")
    for d, u in zip(result.curves["dmd_10"], result.curves["uncertainty_10"]):
        typer.echo(f"{100 * d.target_fraction:7.0f}%  {100 * d.f1:6.1f}  {100 * u.f1:14.1f}")


def info(path: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Checkpoint directory.")]) -> None:
    """Show a checkpoint's edge model, questions, metrics and threshold."""
    from switcher.model import SwitcherError, read_card

    try:
        card = read_card(path)
    except SwitcherError as exc:
        raise _fail(str(exc)) from None
    keep = ("edge_model_id", "questions", "feature_dim", "cloud_model_id", "config", "metrics", "threshold", "data")
    summary = {k: card.get(k) for k in keep}
    if card.get("calibration"):
        summary["calibration"] = {k: card["calibration"].get(k) for k in ("method", "offload_fraction", "f1", "budget")}
    typer.echo(json.dumps(summary, indent=2))


# --- evaluate ----------------------------------------------------------------------------------


def evaluate_cmd(
    switcher_path: Annotated[Path, typer.Option("--switcher", help="Calibrated checkpoint directory.")],
    data: Annotated[Path, typer.Option("--dmd", metavar="DMD_DIR", help="Labelled distillation directory (the test split).")],
    out: Annotated[Path, typer.Option(help="Report directory (report.json, report.md, PNG plots).")],
    threshold: Annotated[Optional[float], typer.Option(help="Override the checkpoint's threshold.")] = None,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    resamples: Annotated[int, typer.Option(min=10, help="Bootstrap resamples for the F1 interval.")] = 1000,
) -> None:
    """Table 1: small alone, large alone, uncertainty and DMD deferral, with plots."""
    from switcher.evaluate import evaluate, write_report
    from switcher.model import Switcher, SwitcherError
    from switcher.records import DmdError, load_dmd

    try:
        report = evaluate(Switcher.load(switcher_path), load_dmd(data), threshold, seed, resamples)
    except (SwitcherError, DmdError, ValueError) as exc:
        raise _fail(str(exc)) from None
    files = write_report(report, out)
    for row in report["rows"]:
        typer.echo(f"{row['approach']:12s} F1 {100 * row['f1']:5.1f}  offload {100 * row['offload_fraction']:5.1f}%  "
                   f"time {row['time_s']:.2f}s")
    typer.echo(json.dumps({"files": [str(f) for f in files]}))


def register(app: typer.Typer) -> None:
    """Add the dataset, distill, switcher and evaluate commands to ``app``."""
    dataset_app = typer.Typer(help="Fall datasets: synthetic data, statistics, re-splits.", no_args_is_help=True)
    dataset_app.command("synth")(synth)
    dataset_app.command("stats")(stats)
    dataset_app.command("split")(split_cmd)
    app.add_typer(dataset_app, name="dataset")
    app.command("distill")(distill_cmd)
    switcher_app = typer.Typer(help="Train, calibrate and inspect the DMD switcher.", no_args_is_help=True)
    switcher_app.command("train")(train_cmd)
    switcher_app.command("calibrate")(calibrate_cmd)
    switcher_app.command("info")(info)
    app.add_typer(switcher_app, name="switcher")
    app.command("evaluate")(evaluate_cmd)
    from switcher.live_cli import register_live

    register_live(app, switcher_app)
