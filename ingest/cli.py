"""Sub-commands of this component, added to the `fallwatch` app: ``ingest``, ``replay`` and ``cameras``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import redis
import typer

from fallwatch.context import app_context
from fallwatch.runtime import stop_on_signals


def ingest_cmd(
    ctx: typer.Context,
    camera: Annotated[Optional[list[str]], typer.Option("--camera", help="Camera id (repeatable); default: every enabled camera.")] = None,
) -> None:
    """Ingest the configured cameras into the frames stream until Ctrl-C / SIGTERM."""
    from fallwatch.redis import RedisHandle  # noqa: PLC0415
    from ingest.camera import run_cameras, select_cameras  # noqa: PLC0415

    actx = app_context(ctx)
    settings = actx.settings
    try:
        cameras = select_cameras(settings, camera)
    except KeyError as exc:
        typer.secho(str(exc.args[0]), fg="red", err=True)
        raise typer.Exit(2) from None
    if not cameras:
        typer.secho("no enabled cameras in settings (cameras: [...] in the config file)", fg="red", err=True)
        raise typer.Exit(2)
    stop = stop_on_signals()
    with RedisHandle(settings.redis, stop) as handle, _alive(settings, handle.client, actx.keys, stop):
        run_cameras(settings, cameras, handle.client, actx.keys, stop)


@contextmanager
def _alive(settings, client, keys, stop: threading.Event) -> Iterator[None]:
    """Serve metrics and keep the ingest heartbeat while the cameras run."""
    from fallwatch.metrics import start_role  # noqa: PLC0415
    from fallwatch.runtime import Heartbeat, worker_name  # noqa: PLC0415

    name = worker_name("ingest")
    start_role(settings.metrics, "ingest", name)
    beat = Heartbeat(client, keys, "ingest", name, settings.metrics)
    thread = threading.Thread(target=beat.run, args=(stop,), name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        try:
            beat.clear()
        except redis.RedisError:
            pass


def replay_cmd(
    ctx: typer.Context,
    dataset: Annotated[Optional[Path], typer.Option("--dataset", help="YOLO dataset root (ROOT/SPLIT/images, labels).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of --dataset.")] = "valid",
    video: Annotated[Optional[list[str]], typer.Option("--video", help="Video file, optionally FILE:fall or FILE:nofall (repeatable).")] = None,
    clips: Annotated[Optional[Path], typer.Option("--clips", help="Clip list (CSV/JSON) or folder of labelled videos.")] = None,
    fps: Annotated[Optional[float], typer.Option("--fps", min=0.01, max=1000, help="Items per second; default ingest.fps.")] = None,
    loop: Annotated[bool, typer.Option("--loop", help="Start again at the end, until Ctrl-C.")] = False,
    camera_id: Annotated[str, typer.Option("--camera-id", help="Camera id on the stream.")] = "replay",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Stop after this many stream items.")] = None,
    speed: Annotated[float, typer.Option("--speed", min=0, help="Pacing: 1 = real time at --fps, 2 = twice as fast, 0 = no pacing: as fast as the edge group reads (a few batches ahead).")] = 1.0,
    fall_class: Annotated[Optional[list[int]], typer.Option("--fall-class", "--fall-classes", metavar="ID", help="YOLO class id meaning fall (repeatable; default 0).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first unreadable file (default: skip it, count it and name it).")] = False,
) -> None:
    """Replay a labelled dataset or labelled videos onto the frames stream, ground truth attached."""
    from fallwatch.datasets import DatasetError  # noqa: PLC0415
    from fallwatch.redis import RedisHandle  # noqa: PLC0415
    from ingest.replay import CAMERA_ID, dataset_source, run_replay, video_source  # noqa: PLC0415
    from ingest.sources import SourceError  # noqa: PLC0415

    actx = app_context(ctx)
    settings = actx.settings
    if (dataset is None) == (not video and clips is None):
        typer.secho("give either --dataset DIR or --video FILE / --clips LIST", fg="red", err=True)
        raise typer.Exit(2)
    try:
        if dataset is not None:
            source = dataset_source(dataset, split, frozenset(fall_class or [0]), strict)
        else:
            source = video_source(video or [], clips, settings.ingest.max_width, strict)
    except (DatasetError, SourceError) as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    if not CAMERA_ID.fullmatch(camera_id):
        typer.secho(f"--camera-id {camera_id!r}: use 1-64 of A-Z a-z 0-9 _ -", fg="red", err=True)
        raise typer.Exit(2)
    stop = stop_on_signals()
    with RedisHandle(settings.redis) as handle:
        try:
            result = run_replay(settings, source, handle.client, actx.keys, stop, fps=fps, loop=loop,
                                camera_id=camera_id, limit=limit, speed=speed)
        except SourceError as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
        edges = next(handle.client.scan_iter(match=actx.keys.heartbeat_pattern("edge"), count=1000), None)
    report_replay(result, edge_running=edges is not None)


def report_replay(result, edge_running: bool) -> None:
    """The summary: what was replayed, every skipped file and why; exit 2 when nothing was."""
    n = len(result.skipped)
    typer.echo(f"replayed {result.items} items ({result.frames} frames) as camera {result.camera_id} "
               f"in {result.seconds:.1f}s" + (f"; skipped {n} file{'s' * (n != 1)}" if n else ""))
    for file, why in result.skipped:
        typer.secho(f"  skipped {file}: {why}", fg="yellow", err=True)
    if result.items == 0:
        typer.secho("nothing was replayed: no readable frame in the input", fg="red", err=True)
        raise typer.Exit(2)
    if not edge_running:
        typer.secho("no edge worker is running: the frames wait on the stream until `fallwatch edge` "
                    "(or `fallwatch up`) starts", fg="yellow", err=True)


def register(app: typer.Typer) -> None:
    """Add this component's commands to ``app``."""
    from ingest import preview  # noqa: PLC0415

    app.command("ingest")(ingest_cmd)
    app.command("replay")(replay_cmd)
    preview.register(app)
