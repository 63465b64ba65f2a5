"""`fallwatch cloud`: run a cloud (GPU) worker in the foreground."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fallwatch.context import app_context


def cloud(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Option(help="Worker name (default: cloud-HOST-PID).")] = None,
    burst: Annotated[bool, typer.Option(help="Quit when the queue is empty.")] = False,
) -> None:
    """Serve the cloud queue: load the cloud model once, score offloaded frames in micro-batches."""
    from cloud_worker.model import CloudModel
    from cloud_worker.worker import build_worker, run
    from fallwatch.hub import ModelNotAvailable
    from fallwatch.metrics import CloudMetrics, start_role
    from fallwatch.redis import RedisHandle
    from fallwatch.runtime import exit_stopped, stop_on_signals, worker_name

    app_ctx = app_context(ctx)
    settings = app_ctx.settings
    stop = stop_on_signals()
    with RedisHandle(settings.redis, stop) as handle:  # an unreachable server is reported before the model loads
        try:
            model = CloudModel.load(settings.cloud)
        except ModelNotAvailable as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(1) from None
        name = name or worker_name("cloud")
        start_role(settings.metrics, "cloud", name)
        CloudMetrics.create().watch_gpus()
        worker = build_worker(settings, handle.client, app_ctx.keys, model, name)
        run(worker, stop, burst=burst, retry=settings.redis)
    exit_stopped()


def register(app: typer.Typer) -> None:
    app.command("cloud")(cloud)
