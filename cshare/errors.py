"""The one exception type cshare's modules raise for the user to read.

Kept apart from cshare.cli.console (which imports rich and typer) so that the work
modules, and the fast command path of cshare.cli.launch, load without them.
"""

from __future__ import annotations


class CshareError(Exception):
    """A failure to report to the user as one line, then exit non-zero."""


def error_line(message: str) -> str:
    """The one line an error is shown as: `cshare: error: MESSAGE`, whitespace folded."""
    return f"cshare: error: {' '.join(message.split())}"
