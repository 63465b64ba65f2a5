"""`fallwatch edge`: run an edge worker in the foreground."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fallwatch.context import app_context


def load_edge(settings):
    """The edge model and, when configured, the switcher checked against it."""
    from edge_worker.model import EdgeModel

    model = EdgeModel.load(settings.edge)
    switcher = None
    if settings.switcher.checkpoint is not None:
        from switcher.model import Switcher

        switcher = Switcher.load(settings.switcher.checkpoint, model.model_id, model.questions)
    return model, switcher


def edge(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Option(help="Consumer name (default: edge-HOST-PID).")] = None,
) -> None:
    """Score frames from the frames stream; publish confident verdicts, offload the rest to the cloud queue."""
    from edge_worker.hub import ModelNotAvailable
    from edge_worker.worker import EdgeWorker
    from fallwatch.metrics import start_role
    from fallwatch.redis import RedisHandle
    from fallwatch.runtime import stop_on_signals, worker_name

    app_ctx = app_context(ctx)
    settings = app_ctx.settings
    try:
        model, switcher = load_edge(settings)
    except ModelNotAvailable as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    name = name or worker_name("edge")
    start_role(settings.metrics, "edge", name)
    stop = stop_on_signals()
    with RedisHandle(settings.redis) as handle:
        EdgeWorker(settings, handle.client, app_ctx.keys, model, switcher, name=name).run(stop)


def register(app: typer.Typer) -> None:
    app.command("edge")(edge)
