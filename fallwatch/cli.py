"""The one ``fallwatch`` command. Components add sub-commands through the ``fallwatch.cli``
entry-point group (a ``register(app)`` function each), so this core package imports none of them.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import click
import redis
import structlog
import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

from fallwatch import __version__
from fallwatch import logging as fw_logging
from fallwatch.context import AppContext, app_context
from fallwatch.errors import UserError
from fallwatch.keys import Keys
from fallwatch.runtime import stop_on_signals
from fallwatch.redis import (EmbeddedRedis, RedisHandle, RedisUnavailable, RedisUnreachable, StoppedWaiting, check,
                             redact_url)
from fallwatch.settings import ConfigError, load_settings
from fallwatch.supervisor import RoleSpec, Supervisor, child_env

class _OneLineErrors(TyperGroup):
    """Every command: a user error (unreachable Redis, a wrong path) is one line and exit 2, no traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except StoppedWaiting:
            raise typer.Exit(0) from None
        except RedisUnreachable as exc:
            fail(f"{exc} (start the server, or fix redis.url)")
        except (UserError, RedisUnavailable) as exc:
            fail(str(exc))
        except redis.RedisError as exc:  # lost mid-command, or refused
            fail(f"Redis: {exc} (check redis.url, and that the server runs)")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one red line to stderr and exit (2: the user can fix it)."""
    typer.secho(message, fg="red", err=True)
    raise typer.Exit(code)


def _flag_type(self: TyperOption, ctx: click.Context) -> str | None:
    """Help shows no type for a flag (it takes no value), only for options that take one."""
    return None if self.is_flag else _VALUE_TYPE(self, ctx)


def _usage_name(self: TyperArgument) -> str:
    """A required argument as click writes it (EVENT_ID), an optional one in brackets ([FILE])."""
    name = self.display_name_raw + ("..." if self.nargs != 1 else "")
    return name if self.required else f"[{name}]"


_VALUE_TYPE = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]
TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]

app = typer.Typer(
    cls=_OneLineErrors,
    name="fallwatch",
    help="Edge-cloud fall detection for eldercare cameras.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Validate and show configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

log = structlog.get_logger("fallwatch.cli")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fallwatch {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (or $FALLWATCH_CONFIG).")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="Override logging.level.")] = None,
    log_format: Annotated[Optional[str], typer.Option(help="auto | json | console.")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """fallwatch: watch cameras, notice falls, tell a caregiver."""
    ctx.obj = AppContext(config_file=config)
    level, fmt = log_level or "info", log_format or "auto"
    try:
        cfg = ctx.obj.load().logging
        level, fmt = log_level or cfg.level, log_format or cfg.format
    except ConfigError:
        pass  # reported by the command that needs the settings
    fw_logging.configure(level, fmt)


@config_app.command("validate")
def config_validate(
    ctx: typer.Context,
    file: Annotated[Optional[Path], typer.Argument(metavar="FILE", help="YAML file; default: --config / $FALLWATCH_CONFIG.")] = None,
    paths: Annotated[bool, typer.Option("--paths/--no-paths", help="Check that the files it names exist "
                                        "(--no-paths for a config used inside a container).")] = True,
) -> None:
    """Check a config file (with the environment applied), the paths it names and its notification URLs.
    Exit 2 on errors, naming each field."""
    from fallwatch.checks import notification_problems, path_problems  # noqa: PLC0415

    path = file or app_context(ctx).config_file
    try:
        settings = load_settings(path)
        problems = (path_problems(settings) if paths else []) + notification_problems(settings)
    except ConfigError as exc:
        problems = exc.errors
    for field_path, msg in problems:
        typer.secho(f"{field_path}: {msg}", fg="red", err=True)
    if problems:
        raise typer.Exit(2)
    n = len(settings.cameras)
    typer.echo(f"ok: {path or 'environment/defaults'} ({n} camera{'' if n == 1 else 's'})")


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the effective settings as JSON, secrets redacted."""
    typer.echo(json.dumps(app_context(ctx).settings.redacted(), indent=2, default=str))


@app.command("redis")
def redis_cmd(ctx: typer.Context) -> None:
    """Run the embedded redis-server in the foreground (Ctrl-C stops it)."""
    cfg = app_context(ctx).settings.redis
    if cfg.url is not None:
        typer.secho("redis.url is set: fallwatch uses that server, no embedded one is needed.", fg="yellow", err=True)
        raise typer.Exit(1)
    server = EmbeddedRedis(cfg.data_dir, appendonly=cfg.embedded_appendonly)
    stop = stop_on_signals()
    with server:
        typer.echo(f"embedded redis at {server.url} (data in {server.data_dir}); Ctrl-C to stop")
        while not stop.wait(0.2) and server.running:
            pass
    if not stop.is_set():
        typer.secho("redis-server exited unexpectedly", fg="red", err=True)
        raise typer.Exit(1)


@app.command("health")
def health(
    ctx: typer.Context,
    role: Annotated[str, typer.Argument(metavar="ROLE", help="redis (PING + version), or a role whose heartbeat to check: ingest, edge, cloud, alerts, web.")] = "redis",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check health and exit 0 (healthy) or 1. Without redis.url, starts and stops an embedded server."""
    settings = app_context(ctx).settings
    checker = HEALTH_CHECKS.get(role)
    if checker is None:
        typer.secho(f"unknown role {role!r}; known: {sorted(HEALTH_CHECKS)}", fg="red", err=True)
        raise typer.Exit(2)
    try:
        with RedisHandle(settings.redis) as handle:
            info = checker(settings, handle)
            info.setdefault("redis", redact_url(handle.url))
    except RedisUnavailable as exc:
        _report({"ok": False, "role": role, "error": str(exc)}, as_json)
        raise typer.Exit(1) from None
    _report({"ok": True, "role": role, **info}, as_json)


def _report(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result))
    elif result["ok"]:
        typer.secho("healthy: " + _pairs(result), fg="green")
    else:
        typer.secho(f"unhealthy: {result['error']}", fg="red", err=True)


def _pairs(result: dict[str, object]) -> str:
    """``key=value`` pairs for people (lists comma-separated), without the ok flag."""
    show = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in result.items() if k != "ok"}
    return " ".join(f"{k}={v}" for k, v in show.items())


def _redis_health(settings, handle: RedisHandle) -> dict[str, object]:
    return check(handle.client, settings.redis.min_server_version)


def _heartbeat_health(role: str):
    def checker(settings, handle: RedisHandle) -> dict[str, object]:
        check(handle.client, settings.redis.min_server_version)
        keys = Keys(settings.redis.key_prefix)
        pattern = keys.heartbeat_pattern(role)
        alive = sorted(keys.heartbeat_of(k)[1] for k in handle.client.scan_iter(match=pattern, count=1000))
        if not alive:
            raise RedisUnavailable(f"no live {role} worker (no heartbeat under {pattern})")
        return {"workers": alive}

    return checker


def _alerts_health(settings, handle: RedisHandle) -> dict[str, object]:
    """A live alerts worker whose notifier can use every configured channel."""
    info = _heartbeat_health("alerts")(settings, handle)
    broken = handle.client.hvals(Keys(settings.redis.key_prefix).notify_broken())
    if broken:
        raise RedisUnavailable("; ".join(sorted(b.decode() for b in broken)) + " (deliveries stay in the outbox)")
    return info


# role -> check(settings, RedisHandle) -> info dict; raise RedisUnavailable when unhealthy.
HEALTH_CHECKS = {"redis": _redis_health,
                 **{role: _heartbeat_health(role) for role in ("ingest", "edge", "cloud", "web")},
                 "alerts": _alerts_health}


@app.command("up")
def up(
    ctx: typer.Context,
    edge_workers: Annotated[int, typer.Option(min=0, max=64, help="Edge worker processes.")] = 1,
    cloud: Annotated[bool, typer.Option(help="Run a cloud worker here too (needs the cloud model).")] = True,
    ingest: Annotated[bool, typer.Option(help="Ingest the cameras in settings.")] = True,
    web: Annotated[bool, typer.Option(help="Run the caregiver web station (when web users exist).")] = True,
) -> None:
    """Run every role on this machine (embedded Redis unless redis.url is set); Ctrl-C stops all."""
    app_ctx = app_context(ctx)
    settings = app_ctx.settings
    specs = role_specs(settings, edge_workers, cloud, ingest, web)
    stop = stop_on_signals()
    with RedisHandle(settings.redis, stop) as handle:
        log.info("up", redis=redact_url(handle.url), roles=[s.name for s in specs])
        Supervisor(specs, child_env(handle.child_url), config=app_ctx.config_file).run(stop)


@app.command("demo")
def demo(
    json_out: Annotated[Optional[Path], typer.Option("--json-out", help="Write the summary JSON here.")] = None,
    workdir: Annotated[Path, typer.Option(help="Where the demo writes data, models and Redis files.")] = Path(".fallwatch/demo"),
    edge: Annotated[str, typer.Option(help="Edge model: hub id, local path or 'tiny'.")] = "tiny",
    cloud: Annotated[str, typer.Option(help="Cloud model: hub id, local path or 'tiny'.")] = "tiny",
    cloud_device: Annotated[str, typer.Option(help="Device of the cloud model (cuda for the real one).")] = "cpu",
    dataset: Annotated[Optional[Path], typer.Option(help="YOLO dataset with train/valid splits (default: synthetic).")] = None,
    clips: Annotated[Optional[Path], typer.Option(help="Labelled clips to stream (default: synthetic).")] = None,
    timeout_s: Annotated[float, typer.Option(min=10, help="Give up waiting for final verdicts after this.")] = 150.0,
) -> None:
    """Run the whole system end to end on synthetic data and tiny models (or yours), then summarise."""
    from fallwatch.demo import DemoConfig, format_summary, run_demo  # noqa: PLC0415 - the demo pulls in every component

    cfg = DemoConfig(workdir=workdir, edge=edge, cloud=cloud, cloud_device=cloud_device, dataset=dataset,
                     clips=clips, timeout_s=timeout_s)
    try:
        summary = run_demo(cfg)
    except RuntimeError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_summary(summary, tiny="tiny" in (edge, cloud)))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2) + "\n")
        typer.echo(f"summary JSON: {json_out}")
    if summary["lost"] != 0 or summary["frames_ingested"] == 0:
        typer.secho(f"demo lost {summary['lost']} of {summary['frames_ingested']} frames", fg="red", err=True)
        raise typer.Exit(1)


def role_specs(settings, edge_workers: int, cloud: bool, ingest: bool, web: bool = False) -> list[RoleSpec]:
    specs = []
    if ingest and any(c.enabled for c in settings.cameras):
        specs.append(RoleSpec("ingest", ("ingest",)))
    specs += [RoleSpec(f"edge-{i + 1}", ("edge",)) for i in range(edge_workers)]
    if cloud:
        specs.append(RoleSpec("cloud", ("cloud",)))
    specs.append(RoleSpec("alerts", ("alerts",)))
    if web and settings.web.enabled:
        if settings.web.users or settings.web.users_file.exists():
            specs.append(RoleSpec("web", ("web",)))
        else:
            log.warning("web_not_started", reason="no web users", hint="fallwatch web user add NAME --role admin")
    return specs


@app.command("status")
def status_cmd(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON snapshot and exit.")] = False,
    once: Annotated[bool, typer.Option("--once", help="Print the tables once instead of refreshing.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, max=3600, help="Refresh period in seconds.")] = 2.0,
    events: Annotated[int, typer.Option(min=0, max=1000, help="Recent alert events to show.")] = 10,
) -> None:
    """Cameras, streams (length, lag, pending), cloud queue, live workers, recent events, offload rate."""
    from fallwatch.status import gather, render  # noqa: PLC0415 - keeps `fallwatch --help` fast

    settings = app_context(ctx).settings
    with RedisHandle(settings.redis) as handle:
        if as_json or once:
            snap = gather(handle.client, settings, events)
            if as_json:
                typer.echo(snap.model_dump_json(indent=2))
            else:
                _print_rich(render(snap))
            return
        _live_status(lambda: render(gather(handle.client, settings, events)), interval)


def _print_rich(renderable: object) -> None:
    from rich.console import Console  # noqa: PLC0415

    Console().print(renderable)


def _live_status(build, interval: float) -> None:
    from rich.live import Live  # noqa: PLC0415

    stop = stop_on_signals()
    with Live(build(), refresh_per_second=4, screen=False) as live:
        while not stop.wait(interval):
            live.update(build())


def _load_plugins() -> None:
    for ep in entry_points(group="fallwatch.cli"):
        try:
            ep.load()(app)
        except Exception as exc:  # noqa: BLE001 - a broken component must not take the whole CLI down
            print(f"fallwatch: sub-commands of {ep.name!r} are unavailable: {exc}", file=sys.stderr)


def main() -> None:
    _load_plugins()
    app()
