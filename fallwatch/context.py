"""What the CLI hands to every sub-command: the settings, loaded once, and shared helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer

from fallwatch.keys import Keys
from fallwatch.settings import ConfigError, Settings, load_settings


@dataclass
class AppContext:
    config_file: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        """Load the settings on first use (once per process) and keep them."""
        if self._settings is None:
            try:
                self.load()
            except ConfigError as exc:
                typer.secho(str(exc), fg="red", err=True)
                raise typer.Exit(2) from None
        return self._settings

    def load(self) -> Settings:
        """Load the settings now; raises ConfigError."""
        self._settings = load_settings(self.config_file)
        return self._settings

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.redis.key_prefix)


def app_context(ctx: typer.Context) -> AppContext:
    """The AppContext of the running command (created by the root callback)."""
    root = ctx.find_root()
    if not isinstance(root.obj, AppContext):
        root.obj = AppContext()
    return root.obj
