"""Commands of live DMD.

    fallwatch dmd export --out DIR [--since T]     the live store as a distillation directory
    fallwatch switcher publish CKPT                make a checkpoint current (edge workers hot-reload it)
    fallwatch switcher refresh [--promote]         challenger trained on the store vs the champion
    fallwatch switcher rollback                    back to the version promoted before the current one
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from fallwatch.context import app_context

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(message, fg="red", err=True)
    return typer.Exit(code)


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds from epoch seconds, an ISO 8601 time, or an age such as ``36h`` or ``7d``."""
    text = text.strip()
    age = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text)
    if age:
        return (now if now is not None else time.time()) - float(age.group(1)) * _UNITS[age.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"--since must be epoch seconds, an ISO time or an age like 36h / 7d, got {text!r}") from None


def export_cmd(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="New distillation directory to write.")],
    since: Annotated[Optional[str], typer.Option(help="Only records from this time: epoch, ISO time, or an age (36h, 7d).")] = None,
) -> None:
    """Write the live DMD store in the `fallwatch distill` format (switcher train / calibrate / evaluate read it)."""
    from fallwatch.redis import RedisHandle, RedisUnavailable
    from switcher.live import export
    from switcher.records import DmdError

    app_ctx = app_context(ctx)
    try:
        start = None if since is None else parse_since(since)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    try:
        with RedisHandle(app_ctx.settings.redis) as handle:
            meta = export(handle.client, app_ctx.keys, app_ctx.settings, out, start)
    except DmdError as exc:
        raise _fail(str(exc), 2) from None
    except RedisUnavailable as exc:
        raise _fail(f"redis: {exc}") from None
    typer.echo(json.dumps({"out": str(out), "items": meta.items, "edge": meta.edge_model_id,
                           "feature_dim": meta.feature_dim}))


def _redis_call(ctx: typer.Context, fn):
    """Run ``fn(client, keys, settings)`` on the configured Redis; switcher errors exit 2."""
    from fallwatch.redis import RedisHandle, RedisUnavailable
    from switcher.model import SwitcherError

    app_ctx = app_context(ctx)
    try:
        with RedisHandle(app_ctx.settings.redis) as handle:
            return fn(handle.client, app_ctx.keys, app_ctx.settings)
    except SwitcherError as exc:
        raise _fail(str(exc), 2) from None
    except RedisUnavailable as exc:
        raise _fail(f"redis: {exc}") from None


def publish_cmd(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="Checkpoint directory to make current.")],
) -> None:
    """Publish a checkpoint in Redis and make it current: edge workers load it between batches."""
    from switcher.publish import publish

    version = _redis_call(ctx, lambda client, keys, _s: publish(client, keys, path))
    typer.echo(json.dumps({"version": version}))


def rollback_cmd(ctx: typer.Context) -> None:
    """Return to the switcher version promoted before the current one."""
    from switcher.publish import rollback

    version = _redis_call(ctx, lambda client, keys, _s: rollback(client, keys))
    typer.echo(json.dumps({"version": version}))


def refresh_cmd(
    ctx: typer.Context,
    promote: Annotated[bool, typer.Option(help="Publish the challenger if it beats the champion by dmd.refresh_margin.")] = False,
    budget: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Offload fraction to calibrate and compare at (default: the champion's).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Challenger checkpoint directory (default: under dmd.checkpoints_dir).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split and the training.")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Most training epochs.")] = 60,
    since: Annotated[Optional[str], typer.Option(help="Only records from this time (e.g. the drift event's start).")] = None,
) -> None:
    """Train a challenger on the live store (inverse-propensity weights) and compare it with the champion."""
    from switcher.refresh import RefreshError, refresh

    try:
        start = None if since is None else parse_since(since)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None

    def run(client, keys, settings):
        try:
            return refresh(client, keys, settings, promote, budget, seed, epochs, out, start)
        except RefreshError as exc:
            raise _fail(str(exc), 2) from None

    report = _redis_call(ctx, run)
    typer.echo(report.reason)
    typer.echo(json.dumps(report.to_dict()))


def register_live(app: typer.Typer, switcher_app: typer.Typer) -> None:
    """Add `dmd export` to ``app`` and the live switcher commands to ``switcher_app``."""
    dmd_app = typer.Typer(help="The live DMD store.", no_args_is_help=True)
    dmd_app.command("export")(export_cmd)
    app.add_typer(dmd_app, name="dmd")
    switcher_app.command("publish")(publish_cmd)
    switcher_app.command("rollback")(rollback_cmd)
    switcher_app.command("refresh")(refresh_cmd)
