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
    edge_model: Annotated[Optional[str], typer.Option("--edge", help="Edge model: hub id, local path or 'tiny' "
                                                      "(default: edge.model).")] = None,
) -> None:
    """Score frames from the frames stream; publish confident verdicts, offload the rest to the cloud queue."""
    from edge_worker.worker import EdgeWorker
    from fallwatch.metrics import start_role
    from fallwatch.redis import RedisHandle
    from fallwatch.runtime import exit_stopped, stop_on_signals, worker_name

    app_ctx = app_context(ctx)
    settings = app_ctx.settings
    if edge_model is not None:
        settings = settings.model_copy(update={"edge": settings.edge.model_copy(update={"model": edge_model})})
    stop = stop_on_signals()
    with RedisHandle(settings.redis, stop) as handle:  # an unreachable server is reported before the model loads
        model, switcher = _load_or_exit(settings)
        name = name or worker_name("edge")
        start_role(settings.metrics, "edge", name)
        EdgeWorker(settings, handle.client, app_ctx.keys, model, switcher, name=name).run(stop)
    exit_stopped()


def _load_or_exit(settings):
    from fallwatch.hub import ModelNotAvailable
    from switcher.model import SwitcherError

    try:
        return load_edge(settings)
    except ModelNotAvailable as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    except SwitcherError as exc:
        typer.secho(f"switcher.checkpoint: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command("edge")(edge)
