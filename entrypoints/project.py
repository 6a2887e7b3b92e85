"""What every entry point shares: parsing MLflow's parameters and adopting its run."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from mlexp.commands.cli import cli, without_uri_credentials
from mlexp.commands.options import user_errors
from mlexp.credentials import adopt_environment


def parse(command: str, argv: list[str]) -> dict[str, Any]:
    """The option values of `mlexp COMMAND argv`, parsed by that command's own declarations."""
    with cli.commands[command].make_context(f"mlexp {command}", list(argv)) as ctx:
        return dict(ctx.params)


def project_run_id() -> str | None:
    """The run `mlflow run` created for this entry point (None when started by hand)."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def run_entry_point(command: str, call: Callable[[dict[str, Any], str | None], None]) -> None:
    """Parse this process's arguments as `mlexp COMMAND` would and call the library with them,
    user errors as one line and exit status 2, as the CLI does."""
    with user_errors():
        adopt_environment()
        call(parse(command, without_uri_credentials(sys.argv[1:])), project_run_id())
