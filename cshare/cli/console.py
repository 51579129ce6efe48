"""Shared terminal output for the cshare commands: one-line errors, progress, tables."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from ..errors import CshareError, error_line

__all__ = ["CshareError", "fail", "print_json", "progress", "stderr", "stdout"]

stdout = Console()
stderr = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `cshare: error: MESSAGE` on one line and exit with `code`."""
    # No rich markup: the message may contain paths with brackets.
    print(error_line(message), file=sys.stderr)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def progress(quiet: bool = False) -> Progress:
    """A progress bar showing count and rate; silent when not a terminal or quiet."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=stderr,
        disable=quiet or not stderr.is_terminal,
        transient=False,
    )
