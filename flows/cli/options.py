"""What every ``wildface`` command that takes ``--config`` does with it."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from flows.config import WildfaceConfig


def load_config_or_exit(config: Optional[str], overrides: Optional[Iterable[str]] = None) -> "WildfaceConfig":
    """The validated configuration, or the config's error (a YAML mistake as one
    ``file:line:column: problem`` line, the fields that do not validate) on stderr and exit
    status 2, without a traceback."""
    from flows.config import ConfigError, load_config

    try:
        return load_config(config, list(overrides or []))
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
