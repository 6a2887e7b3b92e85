"""Where the `mlexp` command started before mlexp 0.2: an `mlexp` script installed then names
`mlexp.cli:main`, so it keeps working until the package is installed again."""

from mlexp.commands.cli import main

__all__ = ["main"]
