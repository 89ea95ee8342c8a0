"""Rich consoles for the commands: tables stay readable when output goes to a file or a pipe."""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Rich falls back to 80 columns without a terminal, which squeezes the findings tables into
# truncated cells; a file or a pipe gets a wide, uncoloured table instead (COLUMNS still wins).
PIPE_WIDTH = 200


def stdout_console() -> Console:
    """The console for a command's result on standard output."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)
