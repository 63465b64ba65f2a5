"""``fallwatch alerts``: the service (plain command), ``tail``, ``ack``, ``resolve`` and ``stats``."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import structlog
import typer

from fallwatch.context import app_context
from fallwatch.schemas import EventOutcome

log = structlog.get_logger(__name__)


def format_event(ev: Any) -> str:
    """One line per AlertEvent for ``tail``."""
    when = datetime.fromtimestamp(ev.at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    parts = [when, f"{ev.type.value:<6}", f"{ev.kind.value:<14}", ev.camera_name or ev.camera_id]
    if ev.confidence is not None:
        parts.append(f"confidence {100 * ev.confidence:.0f}%")
    if ev.decided_by is not None:
        parts.append(f"by {ev.decided_by.value}")
    if ev.acknowledged:
        parts.append(f"acknowledged by {ev.acknowledged_by or '?'}")
    parts += _latch_parts(ev)
    if ev.outcome is not None:
        parts.append(f"resolved as {ev.outcome.value} by {ev.resolved_by or '?'}")
    parts.append(f"event {ev.event_id}")
    return "  ".join(parts)


def _latch_parts(ev: Any) -> list[str]:
    """Escalation tier, whether the fall is still seen, and the outcome, where the event has them."""
    parts = [f"tier {ev.escalation_tier}/{ev.escalation_tiers}"] if ev.escalation_tier else []
    if ev.still_seen is False:
        parts.append("no longer seen")
    if ev.outcome is not None:
        parts.append(f"resolved {ev.outcome.value} by {ev.resolved_by or '?'}")
    return parts


def _guarded(target: Callable[[threading.Event], None], stop: threading.Event, failed: list[str],
             label: str) -> Callable[[], None]:
    def body() -> None:
        try:
            target(stop)
        except Exception:  # report, and take the whole service down cleanly
            log.exception("component_crashed", component=label)
            failed.append(label)
            stop.set()

    return body


def _workers(settings: Any, client: Any, keys: Any, name: str, notify: bool,
             mqtt: bool = True) -> list[tuple[str, Callable]]:
    from alerts.notify import Notifier  # noqa: PLC0415 - keeps `fallwatch --help` fast
    from alerts.service import AlertsService  # noqa: PLC0415

    workers: list[tuple[str, Callable]] = [("alerts", AlertsService(settings, client, keys, name).run)]
    if notify:  # a channel that cannot be used is reported by the notifier; the others still run
        workers.append(("notifier", Notifier(settings, client, keys, f"{name}-notify").run))
    if mqtt and settings.mqtt.enabled:
        workers.append(("mqtt", _mqtt_bridge(settings, client, keys).run))
    return workers


def _mqtt_bridge(settings: Any, client: Any, keys: Any) -> Any:
    from alerts.mqtt import MqttBridge  # noqa: PLC0415

    try:
        return MqttBridge(settings, client, keys)
    except (OSError, ValueError) as exc:  # unreadable CA, certificate or key
        m = settings.mqtt
        files = ", ".join(str(f) for f in (m.ca_certs, m.certfile, m.keyfile) if f)
        typer.secho(f"mqtt: cannot load the TLS files ({files}): {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


def _run_threads(workers: list[tuple[str, Callable]], stop: threading.Event, failed: list[str]) -> None:
    threads = [threading.Thread(target=_guarded(fn, stop, failed, label), name=label, daemon=True)
               for label, fn in workers]
    for t in threads:
        t.start()
    while not stop.wait(0.5):
        pass
    for t in threads:
        t.join(timeout=10)


def run_service(ctx: typer.Context, name: str | None, notify: bool, mqtt: bool = True) -> None:
    from alerts.service import ROLE  # noqa: PLC0415
    from fallwatch.metrics import start_role  # noqa: PLC0415
    from fallwatch.redis import RedisHandle  # noqa: PLC0415
    from fallwatch.runtime import stop_on_signals, worker_name  # noqa: PLC0415

    actx = app_context(ctx)
    settings = actx.settings
    name = name or worker_name(ROLE)
    start_role(settings.metrics, ROLE, name)
    stop = stop_on_signals()
    failed: list[str] = []
    with RedisHandle(settings.redis, stop) as handle:
        _run_threads(_workers(settings, handle.client, actx.keys, name, notify, mqtt), stop, failed)
    if failed:
        raise typer.Exit(1)


def tail(ctx: typer.Context, as_json: bool, history: int, raw: bool = False) -> None:
    from fallwatch.redis import RedisHandle, redis_cli  # noqa: PLC0415
    from fallwatch.runtime import stop_on_signals  # noqa: PLC0415
    from fallwatch.schemas import AlertEvent, SchemaError, decode  # noqa: PLC0415

    actx = app_context(ctx)
    keys = actx.keys
    stop = stop_on_signals()

    def show(parse: Callable[[], AlertEvent]) -> None:
        try:
            ev = parse()
        except SchemaError as exc:
            typer.secho(f"skipped a malformed event: {exc}", fg="yellow", err=True)
            return
        typer.echo(ev.model_dump_json() if as_json else format_event(ev))

    with RedisHandle(actx.settings.redis) as handle:
        client = handle.client
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.alerts_channel())
        typer.echo(f"listening on channel {keys.alerts_channel()}; the same from any shell: "
                   f"{redis_cli(handle.url, 'SUBSCRIBE', keys.alerts_channel())}", err=True)
        if raw:
            return _tail_raw(pubsub, stop)
        for _, fields in reversed(client.xrevrange(keys.alerts_stream(), count=history) if history else []):
            show(lambda f=fields: decode(f, expect=AlertEvent)[0])
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.5)
            if msg is not None:
                show(lambda m=msg: AlertEvent.from_json(m["data"]))
        pubsub.close()


def _tail_raw(pubsub: Any, stop: threading.Event) -> None:
    """Every message exactly as published on the channel (what a subscriber of your own receives)."""
    while not stop.is_set():
        msg = pubsub.get_message(timeout=0.5)
        if msg is not None:
            data = msg["data"]
            typer.echo(data.decode(errors="replace") if isinstance(data, bytes) else str(data))
    pubsub.close()


def acknowledge_cmd(ctx: typer.Context, event_id: str, by: str) -> None:
    from alerts.store import EventNotFound, acknowledge  # noqa: PLC0415
    from fallwatch.redis import RedisHandle  # noqa: PLC0415

    actx = app_context(ctx)
    with RedisHandle(actx.settings.redis) as handle:
        try:
            ev = acknowledge(handle.client, actx.keys, event_id, by, actx.settings.alerts.stream_maxlen)
        except EventNotFound:
            typer.secho(f"no alert event {event_id!r} (see `fallwatch status` or `fallwatch alerts tail --history 20`)",
                        fg="red", err=True)
            raise typer.Exit(2) from None
    typer.echo(format_event(ev))


def resolve_cmd(ctx: typer.Context, event_id: str, outcome: str, note: str, by: str) -> None:
    from alerts.store import BadTransition, EventNotFound, resolve  # noqa: PLC0415
    from fallwatch.redis import RedisHandle  # noqa: PLC0415

    actx = app_context(ctx)
    cfg = actx.settings.alerts
    with RedisHandle(actx.settings.redis) as handle:
        try:
            ev = resolve(handle.client, actx.keys, event_id, by, outcome, cfg.stream_maxlen, note=note,
                         source="cli", cooldown_s=cfg.cooldown_s)
        except EventNotFound:
            typer.secho(f"no alert event {event_id!r}", fg="red", err=True)
            raise typer.Exit(2) from None
        except BadTransition as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
    typer.echo(format_event(ev))


def outcomes_cmd(ctx: typer.Context, out: Path | None, dmd: Path | None, as_json: bool) -> None:
    from alerts.outcomes import apply_to_dmd, frame_labels, precision_by_camera, read_outcomes, write_labels  # noqa: PLC0415
    from fallwatch.redis import RedisHandle  # noqa: PLC0415

    actx = app_context(ctx)
    with RedisHandle(actx.settings.redis) as handle:
        records = read_outcomes(handle.client, actx.keys)
    rows = frame_labels(records)
    if out is not None:
        write_labels(out, rows)
        typer.echo(f"wrote {len(rows)} frame labels from {len(records)} outcomes to {out}", err=True)
    if dmd is not None:
        try:
            n = apply_to_dmd(dmd, rows)
        except ValueError as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"labelled {n} items of {dmd}", err=True)
    report = precision_by_camera(records)
    if as_json:
        typer.echo(json.dumps(report))
        return
    for cam, periods in report.items():
        for p in periods:
            day = datetime.fromtimestamp(p["period_start"]).strftime("%Y-%m-%d")
            prec = "-" if p["precision"] is None else f"{100 * p['precision']:.0f}%"
            typer.echo(f"{cam}  {day}  confirmed {p['confirmed']}  false alarms {p['false_alarm']}  "
                       f"not sure {p['not_sure']}  precision {prec}")


def stats_cmd(ctx: typer.Context, as_json: bool, camera: str | None = None, reset: bool = False) -> None:
    from alerts.stats import format_stats, read_stats, reset_stats  # noqa: PLC0415
    from fallwatch.redis import RedisHandle  # noqa: PLC0415

    actx = app_context(ctx)
    with RedisHandle(actx.settings.redis) as handle:
        report = read_stats(handle.client, actx.keys, camera)
        if reset:
            reset_stats(handle.client, actx.keys)
    typer.echo(json.dumps(report.to_dict()) if as_json else format_stats(report))
    if reset:
        typer.echo("stats reset: counting starts again from zero", err=True)


def register(app: typer.Typer) -> None:
    """Add ``fallwatch alerts`` (service) and its sub-commands to ``app``."""
    alerts_app = typer.Typer(help="Merge verdicts, run alert events, notify caregivers.",
                             invoke_without_command=True, no_args_is_help=False)

    @alerts_app.callback()
    def alerts_main(
        ctx: typer.Context,
        name: Annotated[Optional[str], typer.Option(help="Consumer name (default: host and pid).")] = None,
        notify: Annotated[bool, typer.Option("--notify/--no-notify", help="Also deliver notifications.")] = True,
        mqtt: Annotated[bool, typer.Option("--mqtt/--no-mqtt",
                                           help="Also run the MQTT bridge (when mqtt.host is set).")] = True,
    ) -> None:
        """Run the alerts service (Ctrl-C or SIGTERM stops it cleanly)."""
        if ctx.invoked_subcommand is None:
            run_service(ctx, name, notify, mqtt)

    @alerts_app.command("tail")
    def tail_command(
        ctx: typer.Context,
        as_json: Annotated[bool, typer.Option("--json", help="Print events as JSON lines.")] = False,
        history: Annotated[int, typer.Option(min=0, help="First print the last N events of the alerts stream.")] = 0,
        raw: Annotated[bool, typer.Option("--raw", help="Print each message exactly as published on the channel.")] = False,
    ) -> None:
        """Print alert events live as they are published (and the redis-cli line that does the same)."""
        tail(ctx, as_json, history, raw)

    @alerts_app.command("ack")
    def ack_command(
        ctx: typer.Context,
        event_id: Annotated[str, typer.Argument(metavar="EVENT_ID", help="Event id (from tail, status or a notification).")],
        by: Annotated[str, typer.Option("--by", help="Who acknowledges.")] = "cli",
    ) -> None:
        """Acknowledge an alert event (publishes an update)."""
        acknowledge_cmd(ctx, event_id, by)

    @alerts_app.command("resolve")
    def resolve_command(
        ctx: typer.Context,
        event_id: Annotated[str, typer.Argument(metavar="EVENT_ID", help="Event id (from tail, a notification or the web page).")],
        outcome: Annotated[EventOutcome, typer.Option("--outcome", help="What was found.")],
        note: Annotated[str, typer.Option("--note", help="Optional note (at most 2000 characters).")] = "",
        by: Annotated[str, typer.Option("--by", help="Who resolves.")] = "cli",
    ) -> None:
        """Resolve a fall event with what was found (publishes its end; the outcome is ground truth)."""
        if len(note) > 2000:
            typer.secho("--note: at most 2000 characters", fg="red", err=True)
            raise typer.Exit(2)
        resolve_cmd(ctx, event_id, outcome, note, by)

    @alerts_app.command("outcomes")
    def outcomes_command(
        ctx: typer.Context,
        out: Annotated[Optional[Path], typer.Option("--out", help="Write frame labels (JSON lines: id, label, ...).")] = None,
        dmd: Annotated[Optional[Path], typer.Option("--dmd", help="Set the label field of this distillation "
                                                    "directory's items whose id is a labelled frame id.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print precision per camera and day as JSON.")] = False,
    ) -> None:
        """Outcomes as ground truth: precision of alerts per camera and day; export frame labels."""
        outcomes_cmd(ctx, out, dmd, as_json)

    @alerts_app.command("stats")
    def stats_command(
        ctx: typer.Context,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
        camera: Annotated[Optional[str], typer.Option("--camera", help="Only this camera (a replay: its --camera-id).")] = None,
        reset: Annotated[bool, typer.Option("--reset", help="Print the report, then set every count back to zero.")] = False,
    ) -> None:
        """Online scoring: F1/precision/recall (frames with ground truth), offload rate, latency."""
        stats_cmd(ctx, as_json, camera, reset)

    app.add_typer(alerts_app, name="alerts")
