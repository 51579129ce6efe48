"""`make bench` (python -m bench): every benchmark module in turn, then all rows in one table.

Each module in MODULES offers `collect(argv) -> Report` (bench/common.py says
how a module adds rows); it prints its own table and writes its JSON as it
finishes, so a long run shows results early.  The options given here go to
every module (`--quick`, `--repeat N`, `--timeout S`); `--only a,b` runs a
subset.  The combined table goes to stdout and its JSON to
bench/results/all.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from datetime import UTC, datetime

from rich.console import Console

from .common import (
    RESULTS_DIR,
    Report,
    busy_note,
    combined_table,
    host_info,
    markdown_rows,
    run_main,
    write_json,
)

#: The modules `make bench` runs, in this order (a module's name in bench/).
MODULES = ("overlay_bench", "session_bench", "start_bench", "memory_bench", "convert_bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description="Run every benchmark; print one table.")
    p.add_argument("--quick", action="store_true", help="small data, one run each: a smoke run")
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="runs per metric (default 5)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up on one timed operation after this long")
    p.add_argument("--only", default=",".join(MODULES), help=f"a subset of {','.join(MODULES)}")
    p.add_argument("--markdown", action="store_true",
                   help="run nothing: print the last combined results (bench/results/all.json) as markdown")
    args = p.parse_args(argv)
    if args.markdown:
        return print_markdown()
    chosen = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODULES]
    if unknown:
        p.error(f"unknown module {', '.join(unknown)}; choose from {','.join(MODULES)}")
    passed = ["--repeat", str(1 if args.quick and args.repeat == 5 else args.repeat)]
    if args.quick:
        passed.append("--quick")
    if args.timeout is not None:
        passed += ["--timeout", str(args.timeout)]
    reports: list[Report] = []
    for name in MODULES:
        if name in chosen:
            module = importlib.import_module(f"bench.{name}")
            reports.append(module.collect(passed))
    probe = Console()
    out = probe if probe.is_terminal else Console(width=200)
    table, footnotes = combined_table(reports, f"make bench: medians of {passed[1]} run(s), "
                                      "ratio = cshare/reference; per-run range over runs taken side by side")
    out.print(table)
    for footnote in footnotes:
        out.print(footnote, markup=False, highlight=False)
    for report in reports:
        busy = busy_note(report)
        if busy is not None:
            out.print(f"note ({report.benchmark}): {busy}")
    for report in reports:
        for flag in report.flags():
            out.print(f"[bold red]flag[/bold red] ({report.benchmark}): {flag}")
    write_json(RESULTS_DIR / "all.json", {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": host_info(),
        "reports": [r.to_json() for r in reports],
    })
    return 0


def print_markdown() -> int:
    """The last `make bench` results as a markdown table (for the README and notes)."""
    path = RESULTS_DIR / "all.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"bench: cannot read {path} ({exc}); run `make bench` first", file=sys.stderr)
        return 1
    print("| metric (median) | cshare | reference | ratio | per-run range | target | kernel |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for report in data["reports"]:
        for row in markdown_rows(report):
            print(row)
    return 0


if __name__ == "__main__":
    run_main("bench", main)
