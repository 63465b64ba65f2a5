"""``fallwatch models``: check that the edge and cloud models load and score, build the tiny presets."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import structlog
import typer

from fallwatch.context import app_context

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EdgeCheck:
    model: str
    load_s: float
    feature_dim: int
    image_tokens: int  # ViLT image tokens of the test image (patches + CLS)
    text_tokens: int  # ViLT text positions per question
    p_fall: float
    ms_per_item: float


@dataclass(frozen=True)
class CloudCheck:
    model: str
    device: str
    dtype: str
    load_s: float
    image_tokens: int  # of the test image
    video_tokens: int  # of the test clip
    prompt_tokens: list[int]  # [image prompt, clip prompt]
    p_fall_image: float
    p_fall_video: float
    ms_per_item: float
    energy_j: float | None  # the whole GPU's NVML counter over the call (other processes included)
    gpu_other_processes: int | None = None  # other processes on the GPU meanwhile; None: not known


@dataclass(frozen=True)
class CheckReport:
    ok: bool
    edge: EdgeCheck
    cloud: CloudCheck
    inputs: dict[str, str]
    notes: list[str] = field(default_factory=list)


def register(app: typer.Typer) -> None:
    """Add the ``models`` command group to ``app``."""
    models_app = typer.Typer(
        help="Check the edge and cloud models; build the offline tiny presets.", no_args_is_help=True
    )
    models_app.command("check")(check)
    models_app.command("make-tiny")(make_tiny)
    app.add_typer(models_app, name="models")


def check(
    ctx: typer.Context,
    edge: Annotated[Optional[str], typer.Option(help="Edge model: hub id, directory or 'tiny' (default: edge.model).")] = None,
    cloud: Annotated[Optional[str], typer.Option(help="Cloud model: hub id, directory or 'tiny' (default: cloud.model).")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Image file to score (default: a drawn test image).", exists=True, dir_okay=False)] = None,
    video: Annotated[Optional[Path], typer.Option(help="Video file to score (default: a drawn test clip).", exists=True, dir_okay=False)] = None,
    cloud_device: Annotated[Optional[str], typer.Option(help="Override cloud.device for this check.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where tiny models are built (default ~/.cache/fallwatch/models).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Load both models, score a test image and clip, print p_fall, token counts and timings."""
    settings = app_context(ctx).settings
    try:
        report = run_check(settings, edge, cloud, image, video, cloud_device, cache_dir)
    except Exception as exc:  # noqa: BLE001 - every failure is one red line and a non-zero exit
        fail(exc)
    if as_json:
        typer.echo(json.dumps(asdict(report)))
    else:
        print_report(report)


def make_tiny(
    out: Annotated[Path, typer.Option(help="Directory that receives tiny-vilt/ and tiny-llava-next-video/.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build both offline tiny models (seeded random weights, local tokenizers) into OUT."""
    from cloud_worker.tiny import ensure_tiny_llava
    from edge_worker.tiny import ensure_tiny_vilt

    try:
        paths = [ensure_tiny_vilt(out, seed), ensure_tiny_llava(out, seed)]
    except Exception as exc:  # noqa: BLE001
        fail(exc)
    for path in paths:
        typer.echo(str(path))


def fail(exc: BaseException) -> NoReturn:
    """One red line on stderr (the traceback only in debug logs): exit 2 when the model cannot be
    loaded as configured (a setting or a directory to fix), 1 for anything else."""
    from fallwatch.hub import ModelNotAvailable

    log.debug("models_command_failed", exc_info=exc)
    known = isinstance(exc, (ModelNotAvailable, ValueError, OSError))
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    typer.secho(f"error: {message}" if known else f"error: {type(exc).__name__}: {message}", fg="red", err=True)
    raise typer.Exit(2 if isinstance(exc, ModelNotAvailable) else 1)


def run_check(
    settings: Any,
    edge: str | None,
    cloud: str | None,
    image: Path | None,
    video: Path | None,
    cloud_device: str | None,
    cache_dir: Path | None,
) -> CheckReport:
    from edge_worker import samples

    notes: list[str] = []
    cloud_cfg = settings.cloud.model_copy(update={"model": cloud or settings.cloud.model})
    cloud_cfg = _usable_cloud_device(cloud_cfg, cloud_device, notes)
    frame = samples.read_image(image) if image else samples.drawn_image()
    clip = samples.read_clip(video, cloud_cfg.num_frames) if video else samples.drawn_clip(cloud_cfg.num_frames)
    edge_cfg = settings.edge.model_copy(update={"model": edge or settings.edge.model})
    inputs = {"image": str(image or "built-in: person lying"), "video": str(video or "built-in: person falling")}
    edge_check, cloud_check = _check_edge(edge_cfg, frame, cache_dir), _check_cloud(cloud_cfg, frame, clip, cache_dir)
    probabilities = {
        "edge p_fall": edge_check.p_fall,
        "cloud p_fall (image)": cloud_check.p_fall_image,
        "cloud p_fall (video)": cloud_check.p_fall_video,
    }
    for name, value in probabilities.items():
        if not 0.0 <= value <= 1.0:  # also catches NaN
            raise ValueError(f"{name} is {value}, not a probability: the model output is broken")
    return CheckReport(True, edge_check, cloud_check, inputs, notes)


def _usable_cloud_device(cfg: Any, override: str | None, notes: list[str]) -> Any:
    import torch

    device = override or cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        notes.append(f"cloud.device {device!r} has no CUDA here: the check runs the cloud model on the CPU")
        device = "cpu"
    return cfg.model_copy(update={"device": device})


def _check_edge(cfg: Any, frame: Any, cache_dir: Path | None) -> EdgeCheck:
    from edge_worker.model import EdgeModel

    start = time.perf_counter()
    model = EdgeModel.load(cfg, cache_dir)
    load_s = time.perf_counter() - start
    for _ in range(2):  # warm-up: the first CPU runs pay one-off kernel set-up
        model.score([frame])
    scores = model.score([frame])
    return EdgeCheck(
        model=cfg.model,
        load_s=round(load_s, 3),
        feature_dim=model.feature_dim,
        image_tokens=model.image_tokens(frame),
        text_tokens=int(model.model.config.max_position_embeddings),
        p_fall=float(scores.p_fall[0]),
        ms_per_item=round(1000 * scores.wall_s, 2),
    )


def _check_cloud(cfg: Any, frame: Any, clip: Any, cache_dir: Path | None) -> CloudCheck:
    from cloud_worker.model import CloudModel

    start = time.perf_counter()
    model = CloudModel.load(cfg, cache_dir)
    load_s = time.perf_counter() - start
    model.score([frame])  # warm-up
    scores = model.score([frame, clip])
    return CloudCheck(
        model=cfg.model,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        load_s=round(load_s, 3),
        image_tokens=model.token_counts(frame).image,
        video_tokens=model.token_counts(clip).video,
        prompt_tokens=scores.prompt_tokens,
        p_fall_image=float(scores.p_fall[0]),
        p_fall_video=float(scores.p_fall[1]),
        ms_per_item=round(1000 * scores.wall_s / 2, 2),
        energy_j=scores.energy_j,
        gpu_other_processes=scores.gpu_other_processes,
    )


def print_report(report: CheckReport) -> None:
    e, c = report.edge, report.cloud
    typer.echo(f"image: {report.inputs['image']}   video: {report.inputs['video']}")
    typer.echo(
        f"edge  {e.model}: loaded in {e.load_s:.2f} s, feature size {e.feature_dim}, "
        f"{e.image_tokens} image + {e.text_tokens} text tokens, p_fall {e.p_fall:.3f}, {e.ms_per_item:.1f} ms/item"
    )
    energy = "n/a" if c.energy_j is None else f"{c.energy_j:.1f} J (whole GPU, {c.gpu_other_processes} other processes)"
    typer.echo(
        f"cloud {c.model} ({c.device}, {c.dtype}): loaded in {c.load_s:.2f} s, {c.image_tokens} image tokens, "
        f"{c.video_tokens} video tokens, prompts {c.prompt_tokens} tokens, p_fall image {c.p_fall_image:.3f} "
        f"video {c.p_fall_video:.3f}, {c.ms_per_item:.1f} ms/item, energy {energy}"
    )
    for note in report.notes:
        typer.secho(f"note: {note}", fg="yellow")
    typer.secho("ok", fg="green")
