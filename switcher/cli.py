"""Sub-commands of this component, added to the `fallwatch` app."""

import typer


def register(app: typer.Typer) -> None:
    """Add this component's commands to ``app``."""
    return None
