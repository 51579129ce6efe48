"""What every benchmark shares: timing, medians and ratios, cached data, cache dropping, the report.

The report model is deliberately plain: a benchmark has *metrics* (rows), each
measured on several *systems* (columns); each (metric, system) cell keeps its
raw run values or the one-line reason it failed.  Ratios compare one system
with the others per metric; the first comparison is the primary one, and a
metric is flagged when the subject is worse than its target (or the
comparison's limit) times the reference.  The same model renders the table,
the one combined table of `make bench` and the JSON file, so they cannot
disagree.

How a benchmark module adds rows (the API other modules rely on; keep it stable):

    report = Report("podman", ["cshare", "fuse-overlayfs"], [],
                    [Comparison("cshare", "fuse-overlayfs")])
    report.add_metric("start", "podman run --rm IMAGE true", target=1.1)
    report.add_metric("pss_idle", "PSS of one more mount, idle", unit="MB", target=5.0 / 2.2)
    for run in range(repeat):                      # interleave the systems run by run
        report.record("start", "cshare", seconds)  # one value per run and system
        report.record("start", "fuse-overlayfs", seconds)
    report.fail("start", "cshare", "why, on one line")  # the cell shows `failed` and has no median

Values are seconds unless the metric's `unit` says otherwise ("MB").  Values
recorded in the same order for both systems are paired run by run: the
`spread` of a ratio is the lowest and highest of those per-run ratios.  For
`make bench` (python -m bench) a module also offers `collect(argv) ->
Report`, which runs it (printing its own table and JSON, as running the module
does: `run_collect`) and returns the report; bench/__main__.py lists the
modules and prints every row of every report in one table.  A `collect` is
`begin` (options, root, bytecode), the module's own data and run, and
`timed_report`.

Everything here except the functions that touch the machine (drop_caches,
run_timed, prepared_data, require_root) is pure and unit-tested in
tests/test_bench_common.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

DATA_ROOT = Path("/var/tmp/cshare-bench")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
JSON_VERSION = 1

console = Console(stderr=True)
if not console.is_terminal:  # a log file: long progress lines stay on one line
    console = Console(stderr=True, width=160)


class BenchFailure(Exception):
    """One measurement could not be taken; the message is the one-line reason shown."""


# ------------------------------------------------------------------ pure helpers
def median(values: Iterable[float]) -> float | None:
    """The median of `values`, or None when there are none."""
    vals = list(values)
    if not vals:
        return None
    return float(statistics.median(vals))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator/denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def format_ratio(value: float | None) -> str:
    """`1.23x`, `12.3x`, `123x`; an em dash when there is no ratio."""
    if value is None:
        return "—"
    if value < 10:
        return f"{value:.2f}x"
    if value < 100:
        return f"{value:.1f}x"
    return f"{value:.0f}x"


def format_seconds(value: float | None) -> str:
    """A duration with a unit that keeps three significant figures readable."""
    if value is None:
        return "—"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    if value < 100:
        return f"{value:.2f} s"
    return f"{value:.0f} s"


def format_value(value: float | None, unit: str) -> str:
    """A cell: seconds through format_seconds, anything else with its unit."""
    if unit == "s" or value is None:
        return format_seconds(value)
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def paired_ratios(subject: Sequence[float], reference: Sequence[float]) -> list[float]:
    """subject[i]/reference[i] for the runs both have (run i of each was taken side by side)."""
    return [s / r for s, r in zip(subject, reference, strict=False) if r > 0]


def format_spread(ratios: Sequence[float]) -> str:
    """`1.05-1.31x` over the per-run ratios; one run: its ratio; none: an em dash."""
    if not ratios:
        return "—"
    low, high = min(ratios), max(ratios)
    if len(ratios) == 1 or format_ratio(low) == format_ratio(high):
        return format_ratio(low)
    return f"{format_ratio(low)[:-1]}-{format_ratio(high)}"


def one_line(text: str, limit: int = 160) -> str:
    """Collapse whitespace so a failure reason fits a table cell and a JSON string."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def parse_systems(text: str, known: Sequence[str]) -> list[str]:
    """`a,b` -> ["a", "b"], in the order of `known`; ValueError names an unknown system."""
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValueError(f"unknown system {', '.join(unknown)}; choose from {','.join(known)}")
    if not wanted:
        raise ValueError(f"no system given; choose from {','.join(known)}")
    return [s for s in known if s in wanted]


# ------------------------------------------------------------------ the report
@dataclass
class Cell:
    """The runs of one metric on one system, or why it could not be measured."""

    runs: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        # A cell that failed in any run has no median: a median of the runs
        # that happened to succeed would hide the failure.
        return None if self.error else median(self.runs)


@dataclass
class Metric:
    """One row: a label, the unit of its values, the target ratio of the primary comparison."""

    key: str
    label: str
    cells: dict[str, Cell]
    unit: str = "s"
    target: float | None = None


@dataclass(frozen=True)
class Comparison:
    """subject/reference per metric; flagged when above `limit` (if a limit is set)."""

    subject: str
    reference: str
    limit: float | None = None

    @property
    def name(self) -> str:
        return f"{self.subject}/{self.reference}"


class Report:
    """Metrics x systems, filled as the benchmark runs; rendered as a table and as JSON."""

    def __init__(
        self,
        benchmark: str,
        systems: Sequence[str],
        metrics: Sequence[tuple[str, str]],
        comparisons: Sequence[Comparison],
        params: dict[str, Any] | None = None,
    ) -> None:
        self.benchmark = benchmark
        self.systems = list(systems)
        self.metrics: dict[str, Metric] = {}
        for key, label in metrics:
            self.add_metric(key, label)
        # Only comparisons whose both sides are being measured make sense.
        self.comparisons = [
            c for c in comparisons if c.subject in self.systems and c.reference in self.systems
        ]
        self.params: dict[str, Any] = dict(params or {})
        self.system_info: dict[str, dict[str, Any]] = {s: {} for s in self.systems}
        self.notes: list[str] = []
        self.started = datetime.now(UTC)
        self.finished: datetime | None = None
        self.load_started = load_average()
        self.load_finished: float | None = None

    # -- filling
    def add_metric(self, key: str, label: str, *, unit: str = "s", target: float | None = None) -> None:
        """A new row (after the existing ones); `target`: the limit of the primary comparison's ratio."""
        if key in self.metrics:
            raise ValueError(f"metric {key!r} is already in the {self.benchmark} report")
        self.metrics[key] = Metric(key, label, {s: Cell() for s in self.systems}, unit, target)

    def record(self, metric: str, system: str, seconds: float) -> None:
        self.metrics[metric].cells[system].runs.append(seconds)

    def fail(self, metric: str, system: str, reason: str) -> None:
        cell = self.metrics[metric].cells[system]
        if cell.error is None:  # the first reason is the informative one
            cell.error = one_line(reason)

    def failed(self, metric: str, system: str) -> bool:
        return self.metrics[metric].cells[system].error is not None

    def fail_all(self, metrics: Iterable[str], system: str, reason: str) -> None:
        for m in metrics:
            self.fail(m, system, reason)

    # -- reading
    def ratio(self, metric: str, comparison: Comparison) -> float | None:
        cells = self.metrics[metric].cells
        return ratio(cells[comparison.subject].median, cells[comparison.reference].median)

    def spread(self, metric: str, comparison: Comparison) -> list[float]:
        """The per-run ratios of one metric (empty when either cell failed)."""
        cells = self.metrics[metric].cells
        subject, reference = cells[comparison.subject], cells[comparison.reference]
        if subject.error or reference.error:
            return []
        return paired_ratios(subject.runs, reference.runs)

    def limit(self, metric: str, comparison: Comparison) -> float | None:
        """The metric's target for the primary comparison, else the comparison's own limit."""
        target = self.metrics[metric].target
        if target is not None and self.comparisons and comparison == self.comparisons[0]:
            return target
        return comparison.limit

    def flags(self) -> list[str]:
        """One sentence per metric where a subject is worse than its limit allows."""
        out = []
        for metric in self.metrics.values():
            for comp in self.comparisons:
                r = self.ratio(metric.key, comp)
                limit = self.limit(metric.key, comp)
                if limit is not None and r is not None and r > limit:
                    what = "the time" if metric.unit == "s" else "the value"
                    out.append(
                        f"{metric.label}: {comp.subject} takes {format_ratio(r)} "
                        f"{what} of {comp.reference} (limit {format_ratio(limit)})"
                    )
        return out

    def to_json(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for metric in self.metrics.values():
            metrics[metric.key] = {
                "label": metric.label,
                "unit": metric.unit,
                "target": metric.target,
                "results": {
                    s: {"runs": list(c.runs), "median": c.median, "error": c.error}
                    for s, c in metric.cells.items()
                },
                "ratios": {c.name: self.ratio(metric.key, c) for c in self.comparisons},
                "spreads": {c.name: self.spread(metric.key, c) for c in self.comparisons},
            }
        return {
            "benchmark": self.benchmark,
            "version": JSON_VERSION,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": self.finished.isoformat(timespec="seconds") if self.finished else None,
            "host": host_info(),
            "params": self.params,
            "systems": {s: self.system_info[s] for s in self.systems},
            "metrics": metrics,
            "comparisons": [
                {"name": c.name, "subject": c.subject, "reference": c.reference, "limit": c.limit}
                for c in self.comparisons
            ],
            "flags": self.flags(),
            "notes": list(self.notes),
            "load_average": {"started": self.load_started, "finished": self.load_finished},
        }

    def table(self, title: str) -> tuple[Table, list[str]]:
        """The rich table, and the footnotes that give each distinct failure reason once."""
        table = Table(title=title, title_justify="left")
        table.add_column("metric (median)", no_wrap=True)
        for s in self.systems:
            table.add_column(s, justify="right", no_wrap=True)
        for c in self.comparisons:
            table.add_column(c.name, justify="right", no_wrap=True)
        if self.comparisons:
            table.add_column("per-run range", justify="right", no_wrap=True)
            table.add_column("target", justify="right", no_wrap=True)
        footnotes: list[str] = []
        for metric in self.metrics.values():
            row = [metric.label]
            for s in self.systems:
                cell = metric.cells[s]
                if cell.error:
                    # The same reason usually fails a whole column: give it once, below.
                    note = f"{s}: failed: {cell.error}"
                    if note not in footnotes:
                        footnotes.append(note)
                    row.append(f"[red]failed [{footnotes.index(note) + 1}][/red]")
                else:
                    row.append(format_value(cell.median, metric.unit))
            for c in self.comparisons:
                row.append(self._ratio_text(metric.key, c))
            if self.comparisons:
                primary = self.comparisons[0]
                row.append(format_spread(self.spread(metric.key, primary)))
                limit = self.limit(metric.key, primary)
                row.append(f"≤ {format_ratio(limit)}" if limit is not None else "")
            table.add_row(*row)
        return table, [f"[{i}] {n}" for i, n in enumerate(footnotes, 1)]

    def _ratio_text(self, metric: str, comparison: Comparison) -> str:
        r = self.ratio(metric, comparison)
        text = format_ratio(r)
        limit = self.limit(metric, comparison)
        if limit is not None and r is not None and r > limit:
            text = f"[bold red]{text} ![/bold red]"
        return text


def combined_table(reports: Sequence[Report], title: str) -> tuple[Table, list[str]]:
    """Every row of every report in one table: cshare, its reference (named), the ratio,
    the per-run range and the target; the kernel overlay where it was measured."""
    table = Table(title=title, title_justify="left")
    for name, justify in (("metric (median)", "left"), ("cshare", "right"), ("reference", "right"),
                          ("ratio", "right"), ("per-run range", "right"), ("target", "right"),
                          ("kernel", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    footnotes: list[str] = []

    def cell_text(report: Report, metric: Metric, system: str) -> str:
        cell = metric.cells.get(system)
        if cell is None:
            return ""
        if cell.error:
            note = f"{report.benchmark} {system}: failed: {cell.error}"
            if note not in footnotes:
                footnotes.append(note)
            return f"[red]failed [{footnotes.index(note) + 1}][/red]"
        return format_value(cell.median, metric.unit)

    for report in reports:
        primary = report.comparisons[0] if report.comparisons else None
        for metric in report.metrics.values():
            subject = primary.subject if primary else (report.systems[0] if report.systems else "")
            reference = ""
            if primary is not None:
                reference = f"{cell_text(report, metric, primary.reference)} ({primary.reference})"
            limit = report.limit(metric.key, primary) if primary else None
            table.add_row(
                metric.label,
                cell_text(report, metric, subject),
                reference,
                report._ratio_text(metric.key, primary) if primary else "",
                format_spread(report.spread(metric.key, primary)) if primary else "",
                f"≤ {format_ratio(limit)}" if limit is not None else "",
                cell_text(report, metric, "kernel") if "kernel" in report.systems else "",
            )
    return table, [f"[{i}] {n}" for i, n in enumerate(footnotes, 1)]


def load_average() -> float | None:
    """The 1-minute load average (None where the system does not say)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def busy_note(report: Report) -> str | None:
    """A warning when other work competed for the CPUs while the report was measured."""
    cpus = os.cpu_count() or 1
    loads = [x for x in (report.load_started, report.load_finished) if x is not None]
    if not loads or max(loads) <= cpus:
        return None
    return (f"the 1-minute load average was {max(loads):.1f} on {cpus} CPUs during this run: "
            "other work competed with the measurements; trust the per-run ranges, not single ratios")


def markdown_rows(report: dict[str, Any]) -> list[str]:
    """One report's JSON (Report.to_json) as markdown table rows, like the combined table:
    metric | cshare | reference | ratio | per-run range | target | kernel."""
    comparisons = report.get("comparisons") or []
    primary = comparisons[0] if comparisons else None
    rows = []
    for metric in report["metrics"].values():
        def cell(system: str, metric: dict[str, Any] = metric) -> str:
            found = metric["results"].get(system)
            if found is None:
                return ""
            return "failed" if found["error"] else format_value(found["median"], metric.get("unit", "s"))

        if primary is None:
            first = next(iter(metric["results"]), "")
            rows.append(f"| {metric['label']} | {cell(first)} | | | | | |")
            continue
        name = primary["name"]
        limit = metric.get("target") if metric.get("target") is not None else primary.get("limit")
        rows.append(" | ".join([
            f"| {metric['label']}",
            cell(primary["subject"]),
            f"{cell(primary['reference'])} ({primary['reference']})",
            format_ratio(metric["ratios"].get(name)),
            format_spread(metric.get("spreads", {}).get(name, [])),
            f"≤ {format_ratio(limit)}" if limit is not None else "",
            cell("kernel") + " |",
        ]))
    return rows


def host_info() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` atomically (temp file + rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def show(report: Report, title: str, json_path: Path) -> None:
    """Print the table and the flags, and write the JSON."""
    report.finished = datetime.now(UTC)
    report.load_finished = load_average()
    busy = busy_note(report)
    if busy is not None and busy not in report.notes:
        report.notes.append(busy)
    # Piped into a file or CI log, rich would wrap at 80 columns: keep rows whole.
    probe = Console()
    out = probe if probe.is_terminal else Console(width=160)
    table, footnotes = report.table(title)
    out.print(table)
    for footnote in footnotes:
        out.print(footnote, markup=False, highlight=False)
    for note in report.notes:
        out.print(f"note: {note}")
    for flag in report.flags():
        out.print(f"[bold red]flag[/bold red]: {flag}")
    write_json(json_path, report.to_json())
    out.print(f"JSON written to {json_path}")


# ------------------------------------------------------------------ command line
def argument_parser(prog: str, description: str, systems: Sequence[str], json_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--quick", action="store_true", help="smaller data and one repeat: a smoke run")
    p.add_argument("--repeat", type=int, default=None, metavar="N", help="runs per metric (default 3; 1 with --quick)")
    p.add_argument(
        "--systems",
        default=",".join(systems),
        help=f"comma-separated subset of {','.join(systems)} (default: all)",
    )
    p.add_argument(
        "--json", type=Path, default=RESULTS_DIR / json_name, metavar="PATH",
        help=f"where to write the JSON results (default bench/results/{json_name})",
    )
    p.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS",
        help="give up on one timed operation after this long (default 120; 60 with --quick)",
    )
    return p


def cshare_options_argument(p: argparse.ArgumentParser) -> None:
    """--cshare-options, for the modules that mount cshare-overlay beside other overlays."""
    p.add_argument(
        "--cshare-options", default="", metavar="OPTS",
        help="extra -o options for cshare-overlay only (to compare a tuning), e.g. 'timeout=0'",
    )


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace, systems: Sequence[str]) -> None:
    """Apply --quick defaults and check values, exiting with argparse's usage error if bad."""
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.timeout is None:
        args.timeout = 60.0 if args.quick else 120.0
    try:
        args.systems = parse_systems(args.systems, systems)
    except ValueError as exc:
        p.error(str(exc))


def require_root(prog: str, why: str) -> None:
    if os.geteuid() != 0:
        print(f"{prog}: must run as root ({why})", file=sys.stderr)
        raise SystemExit(2)


def precompile_cshare() -> None:
    """Give the timed programs their bytecode, as an installation does.

    pip compiles a regular install; an editable one (a development checkout),
    run where PYTHONDONTWRITEBYTECODE is set, would recompile cshare's modules
    at every start and add that to every start-up measured here.
    """
    import compileall
    import importlib.util

    for package in ("cshare", "cshare_fuse", "plugins"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(location, quiet=2)


def begin(
    prog: str,
    description: str,
    systems: Sequence[str],
    json_name: str,
    argv: list[str] | None,
    *,
    root_because: str,
    more_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """What a module's `collect` does first: its command line, parsed and checked, then root and bytecode.

    `more_arguments` adds the module's own options to the common ones;
    `root_because` says, for the refusal, why the module must run as root.
    """
    parser = argument_parser(prog, description, systems, json_name)
    if more_arguments is not None:
        more_arguments(parser)
    args = parser.parse_args(argv)
    finish_args(parser, args, systems)
    require_root(prog, root_because)
    precompile_cshare()
    return args


def timed_report(run: Callable[[], Report], title: str, json_path: Path) -> Report:
    """What a module's `collect` does last: `run` the benchmark, note how long the whole run took
    (params.duration_s), print the table, write the JSON, and return the report."""
    start = time.perf_counter()
    report = run()
    report.params["duration_s"] = round(time.perf_counter() - start, 1)
    show(report, title, json_path)
    return report


def run_collect(prog: str, collect: Callable[[list[str] | None], Report]) -> None:
    """A module run as a program (`python -m bench.NAME`): `collect` on sys.argv, then exit 0.

    The report is printed and written by `collect` itself; only failures to
    start (argparse, root) exit otherwise.
    """

    def body() -> int:
        collect(None)
        return 0

    run_main(prog, body)


def run_main(prog: str, body: Callable[[], int]) -> None:
    """Run `body` so that Ctrl-C and SIGTERM unwind through every finally (cleanup), then exit."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        code = body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; mounts and temporary data were cleaned up", file=sys.stderr)
        code = 130
    raise SystemExit(code)


# ------------------------------------------------------------------ measuring
class DataShape:
    """Mixed into a benchmark's frozen dataclass of data sizes: its fields are the data's stamp and params."""

    def as_params(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def rotated(systems: Sequence[str], run: int) -> list[str]:
    """The systems of run number `run`, starting one further each run: no system always goes first
    (into the coldest or the warmest machine)."""
    k = run % len(systems)
    return [*systems[k:], *systems[:k]]


class Mounted(Protocol):
    """A system under test that mounts (an overlay): how it starts, its version, its clean-up."""

    def command(self) -> list[str]: ...

    def version(self) -> str: ...

    def cleanup(self) -> None: ...


def describe_systems(report: Report, systems: Mapping[str, Mounted]) -> None:
    """Each system's command line and version into the report's system_info (its JSON)."""
    for name, system in systems.items():
        try:
            cmd = " ".join(system.command())
        except BenchFailure as exc:
            cmd = f"unavailable: {exc}"
        report.system_info[name] = {"command": cmd, "version": system.version()}


def run_rounds(report: Report, systems: Mapping[str, Mounted], repeat: int,
               one_run: Callable[[int, str], None], work_root: Path) -> Report:
    """`one_run(run, system)` for every run and system (rotated), after describing the systems;
    whatever happens, every system is cleaned up and `work_root` removed."""
    describe_systems(report, systems)
    names = list(systems)
    try:
        for r in range(repeat):
            for s in rotated(names, r):
                one_run(r, s)
    finally:
        for system in systems.values():
            system.cleanup()
        remove_tree(work_root)
    return report


def measure(report: Report, metric: str, system: str, action: Callable[[], float]) -> bool:
    """Record one value of `action` or the reason it failed; False when the mount is suspect (a hang).

    A cell that failed in an earlier run is not measured again (it has no median anyway).
    """
    if report.failed(metric, system):
        return True
    try:
        seconds = action()
    except BenchFailure as exc:
        report.fail(metric, system, str(exc))
        console.print(f"[red]{system} {metric}: {exc}[/red]")
        return "timed out" not in str(exc)
    report.record(metric, system, seconds)
    return True


# ------------------------------------------------------------------ the machine
def drop_caches() -> None:
    """Write back dirty data, then drop page cache, dentries and inodes (cold start)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_timed(
    cmd: Sequence[str],
    timeout: float,
    *,
    what: str | None = None,
    capture_stdout: bool = False,
    on_hang: Callable[[], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[float, bytes, bytes]:
    """Run `cmd` (in environment `env`, else ours), return (seconds from start to
    exit, stdout if captured, stderr).

    A non-zero exit, a missing program or a timeout raises BenchFailure with
    one line naming the command and the last line of its error output.

    Output goes to temporary files, not pipes: a daemon that keeps an
    inherited pipe open would otherwise make a mount command look endless.
    On a timeout the command is killed; a process stuck in a FUSE request
    survives SIGKILL, so `on_hang` (e.g. abort the FUSE connection) is called
    when it has not exited 2 s later.

    The clock stops when the command exits, not when we next look:
    `Popen.wait(timeout=...)` polls with sleeps that grow to 50 ms, which
    rounded every time measured through it up to the next step of 13.5,
    63.5, 113.5, 163.5 ... ms.  A pidfd becomes readable at the exit itself.
    """
    name = what or Path(cmd[0]).name
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out if capture_stdout else subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        except FileNotFoundError:
            raise BenchFailure(f"{name}: command not found") from None
        try:
            exited = wait_for_exit(proc, timeout)
        except BaseException:  # Ctrl-C: never leave the command running behind us
            stop(proc, on_hang)
            raise
        elapsed = time.perf_counter() - start
        if not exited:
            stop(proc, on_hang)
            raise BenchFailure(f"{name}: timed out after {timeout:.0f} s")
        proc.wait()  # it has exited: this only reaps it
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise BenchFailure(f"{name} exited {proc.returncode}: {last_line(stderr)}")
    return elapsed, stdout, stderr


def wait_for_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Block until `proc` exits (True) or `timeout` seconds pass (False), without reaping it."""
    pidfd = os.pidfd_open(proc.pid)  # a zombie not yet reaped still has its pid: no race
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller.poll(left * 1000):  # an interrupting signal retries with what is left
                return True
    finally:
        os.close(pidfd)


def stop(proc: subprocess.Popen[bytes], on_hang: Callable[[], None] | None) -> None:
    """Kill `proc` and reap it; if it hangs in the kernel, call `on_hang` and wait a little more."""
    proc.kill()
    try:
        proc.wait(timeout=2)
        return
    except subprocess.TimeoutExpired:
        pass
    if on_hang is not None:
        on_hang()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        console.print(f"[red]pid {proc.pid} ({proc.args!r}) cannot be stopped; left behind[/red]")


def last_line(output: bytes | str | None) -> str:
    """The last non-empty line of a command's error output (usually the reason)."""
    if not output:
        return "no error output"
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return one_line(lines[-1]) if lines else "no error output"


def stamp_matches(stamp: Path, params: dict[str, Any]) -> bool:
    """True when `stamp` records exactly these generation parameters (the data is complete)."""
    try:
        return bool(json.loads(stamp.read_text()) == params)
    except (OSError, ValueError):
        return False


def prepared_data(name: str, params: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """DATA_ROOT/name, generated by `build` unless a stamp says it is already there and complete.

    `build` fills a fresh directory; the stamp (the parameters as JSON) is written
    last, so an interrupted generation is never mistaken for a complete one.
    """
    target = DATA_ROOT / name
    stamp = DATA_ROOT / f"{name}.stamp"
    if target.is_dir() and stamp_matches(stamp, params):
        console.print(f"[dim]reusing generated data in {target}[/dim]")
        return target
    stamp.unlink(missing_ok=True)
    if target.exists():
        remove_tree(target)
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    target.mkdir()
    start = time.perf_counter()
    try:
        with console.status(f"generating {target} …"):
            build(target)
    except BaseException:  # interrupted or failed: leave no half-made data behind
        remove_tree(target)
        raise
    os.sync()
    stamp.write_text(json.dumps(params, sort_keys=True))
    console.print(f"[dim]generated {target} in {time.perf_counter() - start:.1f} s[/dim]")
    return target


def remove_tree(path: Path) -> None:
    """rm -rf that tolerates a missing path and never crosses into a mount below it."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        # rm is several times faster than shutil.rmtree on 100k entries, and
        # --one-file-system leaves alone anything still mounted underneath.
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True)
