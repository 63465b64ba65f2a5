"""``fallwatch cameras preview``: one frame of a camera with its masks drawn, for checking them by eye."""

from __future__ import annotations

import threading
from contextlib import closing
from pathlib import Path
from typing import Annotated

import typer

from fallwatch.context import app_context

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def grab_frame(settings, camera_id: str):
    """The first frame (HxWx3 uint8 RGB) the camera delivers, as ingest would sample it."""
    from ingest.camera import source_for  # noqa: PLC0415 - keeps `fallwatch --help` fast
    from ingest.sampling import FpsSampler  # noqa: PLC0415
    from ingest.sources import SourceError  # noqa: PLC0415

    cam = settings.camera(camera_id)
    ing = settings.effective_ingest(cam)
    source = source_for(cam, ing)
    with closing(source.frames(FpsSampler(ing.fps), threading.Event())) as frames:
        for raw in frames:
            return raw.rgb
    raise SourceError(f"{source.name}: no frame")


def write_preview(rgb, masks, out: Path) -> None:
    import cv2  # noqa: PLC0415

    from ingest.masks import preview  # noqa: PLC0415

    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(preview(rgb, masks), cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out}")


def preview_cmd(
    ctx: typer.Context,
    camera: Annotated[str, typer.Option("--camera", help="Camera id from the settings.")],
    out: Annotated[Path, typer.Option("--out", help="Image file to write (.png or .jpg).")],
) -> None:
    """Grab one frame from a camera and draw its masks: privacy filled, ignore tinted, every polygon outlined."""
    from ingest.records import clean_error  # noqa: PLC0415
    from ingest.sources import SourceError  # noqa: PLC0415

    settings = app_context(ctx).settings
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        _fail(f"--out {out}: use a .png or .jpg file name", 2)
    try:
        cam = settings.camera(camera)
    except KeyError as exc:
        _fail(str(exc.args[0]), 2)
    try:
        rgb = grab_frame(settings, camera)
        write_preview(rgb, cam.masks, out)
    except SourceError as exc:
        _fail(f"camera {camera}: {clean_error(str(exc), cam.url.get_secret_value())}", 1)
    except OSError as exc:
        _fail(str(exc), 1)
    typer.echo(f"wrote {out} ({rgb.shape[1]}x{rgb.shape[0]}, {len(cam.masks)} masks)")


def _fail(message: str, code: int) -> None:
    typer.secho(message, fg="red", err=True)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``fallwatch cameras`` and its sub-commands to ``app``."""
    cameras_app = typer.Typer(help="Look at the configured cameras.", no_args_is_help=True)
    cameras_app.command("preview")(preview_cmd)
    app.add_typer(cameras_app, name="cameras")
