"""The `cshare` program's entry point: the convert family's fast path, else typer.

Loading typer and rich costs ~0.17 s, most of a small run's time, and convert
and restore are timed against `chmod -R`.  A plain invocation of convert,
restore or verify (see convert_cmd.fast_path) therefore runs without them;
everything else, including --help and any option fast_path does not know, goes
to the typer app in cshare.cli.app, which does the same work.
"""

from __future__ import annotations

import sys

FAST_COMMANDS = ("convert", "restore", "verify")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in FAST_COMMANDS:
        from .convert_cmd import fast_path

        if fast_path(sys.argv[1:]):
            return
    from .app import app

    app()


if __name__ == "__main__":
    main()
