"""``fallwatch web``: serve the caregiver station; ``fallwatch web user add|list|remove``."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import structlog
import typer

from fallwatch.context import app_context

log = structlog.get_logger(__name__)
ROLE = "web"
FileOpt = Annotated[Optional[Path], typer.Option("--file", help="Users file (default: web.users_file).")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(message, fg="red", err=True)
    return typer.Exit(code)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise _fail(f"web: cannot listen on {host}:{port} ({exc})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_web(ctx: typer.Context, host: str | None, port: int | None) -> None:
    import uvicorn  # noqa: PLC0415 - keeps `fallwatch --help` fast

    from fallwatch.metrics import start_role  # noqa: PLC0415
    from fallwatch.redis import RedisHandle, RedisUnavailable, check  # noqa: PLC0415
    from fallwatch.runtime import Heartbeat, worker_name  # noqa: PLC0415
    from web.app import create_app  # noqa: PLC0415
    from web.users import UsersError, all_users  # noqa: PLC0415

    actx = app_context(ctx)
    settings, cfg = actx.settings, actx.settings.web
    try:
        if not all_users(settings):
            raise _fail(f"web: no users; add one with `fallwatch web user add NAME --role admin` "
                        f"(writes {cfg.users_file})")
    except UsersError as exc:
        raise _fail(f"web: {exc}") from None
    if (cfg.tls_certfile is None) != (cfg.tls_keyfile is None):
        raise _fail("web: set both web.tls_certfile and web.tls_keyfile, or neither")
    name = worker_name(ROLE)
    start_role(settings.metrics, ROLE, name)
    sock = bind(host or cfg.host, cfg.port if port is None else port)
    try:
        with RedisHandle(settings.redis) as handle:
            check(handle.client, settings.redis.min_server_version)
            app = create_app(settings, handle.client, actx.keys)
            scheme = "https" if cfg.tls_certfile else "http"
            bound_host, bound_port = sock.getsockname()[:2]
            typer.echo(f"caregiver station at {scheme}://{bound_host}:{bound_port}/", err=True)
            log.info("web_serving", url=f"{scheme}://{bound_host}:{bound_port}/")
            stop = threading.Event()
            beat = Heartbeat(handle.client, actx.keys, ROLE, name, settings.metrics)
            threading.Thread(target=beat.run, args=(stop,), name="heartbeat", daemon=True).start()
            config = uvicorn.Config(app, log_config=None, access_log=False, proxy_headers=True,
                                    forwarded_allow_ips=cfg.forwarded_allow_ips, timeout_graceful_shutdown=3,
                                    ssl_certfile=cfg.tls_certfile, ssl_keyfile=cfg.tls_keyfile)
            try:
                _server_class()(config, app.state.web.hub.release).run(sockets=[sock])
            finally:
                stop.set()
                beat.clear()
    except RedisUnavailable as exc:
        raise _fail(f"web: {exc}", 1) from None
    finally:
        sock.close()


def _server_class():
    import uvicorn  # noqa: PLC0415

    class Server(uvicorn.Server):
        """Ends the open event streams as soon as a stop is asked, so the graceful shutdown is quick."""

        def __init__(self, config: uvicorn.Config, on_exit):
            super().__init__(config)
            self.on_exit = on_exit

        def handle_exit(self, sig, frame) -> None:
            self.on_exit()
            super().handle_exit(sig, frame)

    return Server


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return typer.prompt("Password", hide_input=True, confirmation_prompt=True)


def user_add(ctx: typer.Context, name: str, role: str, file: Path | None, password_stdin: bool) -> None:
    from pydantic import ValidationError  # noqa: PLC0415

    from web.users import UsersError, add_user  # noqa: PLC0415

    path = file or app_context(ctx).settings.web.users_file
    password = _read_password(password_stdin)
    try:
        add_user(path, name, role, password)
    except UsersError as exc:
        raise _fail(str(exc)) from None
    except ValidationError as exc:
        raise _fail("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())) from None
    typer.echo(f"{name} ({role}) saved to {path} (argon2 hash; the password itself is not stored)")


def user_list(ctx: typer.Context, file: Path | None) -> None:
    from web.users import UsersError, all_users, read_users_file  # noqa: PLC0415

    settings = app_context(ctx).settings
    try:
        users = read_users_file(file) if file else list(all_users(settings).values())
    except UsersError as exc:
        raise _fail(str(exc)) from None
    for u in users:
        typer.echo(f"{u.name}\t{u.role}")


def user_remove(ctx: typer.Context, name: str, file: Path | None) -> None:
    from web.users import UsersError, remove_user  # noqa: PLC0415

    path = file or app_context(ctx).settings.web.users_file
    try:
        removed = remove_user(path, name)
    except UsersError as exc:
        raise _fail(str(exc)) from None
    if not removed:
        raise _fail(f"no user {name!r} in {path}", 1)
    typer.echo(f"removed {name} from {path}")


def register(app: typer.Typer) -> None:
    """Add ``fallwatch web`` (serve) and ``fallwatch web user ...`` to ``app``."""
    web_app = typer.Typer(help="The caregiver station: live alerts, acknowledgement, outcomes, cameras.",
                          invoke_without_command=True, no_args_is_help=False)
    user_app = typer.Typer(help="Web users and roles (argon2 password hashes).", no_args_is_help=True)
    web_app.add_typer(user_app, name="user")

    @web_app.callback()
    def web_main(
        ctx: typer.Context,
        host: Annotated[Optional[str], typer.Option(help="Bind address (default: web.host).")] = None,
        port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="Port (default: web.port).")] = None,
    ) -> None:
        """Serve the caregiver station (Ctrl-C or SIGTERM stops it)."""
        if ctx.invoked_subcommand is None:
            run_web(ctx, host, port)

    @user_app.command("add")
    def add_command(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="Login name.")],
        role: Annotated[str, typer.Option(help="caregiver or admin.")] = "caregiver",
        file: FileOpt = None,
        password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
    ) -> None:
        """Add a user (or set a new password): prompts for the password and stores its argon2 hash."""
        user_add(ctx, name, role, file, password_stdin)

    @user_app.command("list")
    def list_command(ctx: typer.Context, file: FileOpt = None) -> None:
        """List users and roles."""
        user_list(ctx, file)

    @user_app.command("remove")
    def remove_command(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Login name.")],
                       file: FileOpt = None) -> None:
        """Remove a user from the users file."""
        user_remove(ctx, name, file)

    app.add_typer(web_app, name="web")
