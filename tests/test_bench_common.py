"""The pure helpers of the benchmarks (bench/common.py): medians, ratios, formatting, report shape.

The benchmarks themselves are never run as tests (timings are not assertions);
this checks the arithmetic and the JSON they write, and that the clock that
times a command stops when the command exits.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

# bench/ is not an installed package: it runs from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BenchFailure,
    Comparison,
    Report,
    busy_note,
    combined_table,
    format_ratio,
    format_seconds,
    format_spread,
    format_value,
    markdown_rows,
    median,
    one_line,
    paired_ratios,
    parse_systems,
    ratio,
    run_timed,
    stamp_matches,
    write_json,
)


def test_median_odd_even_and_empty() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([]) is None


def test_ratio_handles_missing_and_zero() -> None:
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "—"), (0.5, "0.50x"), (1.234, "1.23x"), (12.34, "12.3x"), (123.4, "123x")],
)
def test_format_ratio(value: float | None, text: str) -> None:
    assert format_ratio(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "—"), (0.0000425, "42 µs"), (0.0123, "12.3 ms"), (1.5, "1.50 s"), (250.0, "250 s")],
)
def test_format_seconds(value: float | None, text: str) -> None:
    assert format_seconds(value) == text


def test_one_line_collapses_and_truncates() -> None:
    assert one_line("a\n  b\tc") == "a b c"
    long = one_line("x" * 500, limit=20)
    assert len(long) == 20 and long.endswith("…")


def test_parse_systems_keeps_known_order_and_rejects_unknown() -> None:
    known = ("cshare", "fuse-overlayfs", "kernel")
    assert parse_systems("kernel,cshare", known) == ["cshare", "kernel"]
    with pytest.raises(ValueError, match="nosuch"):
        parse_systems("cshare,nosuch", known)
    with pytest.raises(ValueError):
        parse_systems(" , ", known)


def make_report() -> Report:
    report = Report(
        "overlay",
        ["cshare", "fuse-overlayfs", "kernel"],
        [("walk", "walk"), ("read", "read")],
        [Comparison("cshare", "fuse-overlayfs", limit=2.0), Comparison("cshare", "kernel")],
        params={"repeat": 3},
    )
    for seconds in (3.0, 1.0, 2.0):
        report.record("walk", "cshare", seconds)
    for seconds in (0.5, 0.8, 0.6):
        report.record("walk", "fuse-overlayfs", seconds)
        report.record("walk", "kernel", seconds / 2)
    report.record("read", "fuse-overlayfs", 1.0)
    report.record("read", "kernel", 0.5)
    report.fail("read", "cshare", "cshare mount exited 1:\n boom")
    report.fail("read", "cshare", "a later reason")
    return report


def test_report_json_shape_ratios_and_flags(tmp_path: Path) -> None:
    report = make_report()
    path = tmp_path / "sub" / "out.json"
    write_json(path, report.to_json())
    data = json.loads(path.read_text())

    assert data["benchmark"] == "overlay"
    assert data["params"] == {"repeat": 3}
    assert set(data["metrics"]) == {"walk", "read"}
    walk = data["metrics"]["walk"]
    assert walk["results"]["cshare"] == {"runs": [3.0, 1.0, 2.0], "median": 2.0, "error": None}
    assert walk["ratios"]["cshare/fuse-overlayfs"] == pytest.approx(2.0 / 0.6)
    assert walk["ratios"]["cshare/kernel"] == pytest.approx(2.0 / 0.3)
    read = data["metrics"]["read"]
    # The first reason is kept, on one line; a failed cell has no median and no ratio.
    assert read["results"]["cshare"]["error"] == "cshare mount exited 1: boom"
    assert read["results"]["cshare"]["median"] is None
    assert read["ratios"]["cshare/fuse-overlayfs"] is None
    # Only the limited comparison flags, and only where the ratio exceeds it.
    assert len(data["flags"]) == 1 and data["flags"][0].startswith("walk: cshare takes 3.33x")
    assert [c["name"] for c in data["comparisons"]] == ["cshare/fuse-overlayfs", "cshare/kernel"]


def test_failure_in_any_run_hides_the_median() -> None:
    report = make_report()
    report.fail("walk", "kernel", "timed out")
    assert report.metrics["walk"].cells["kernel"].median is None
    assert report.to_json()["metrics"]["walk"]["ratios"]["cshare/kernel"] is None


def test_comparisons_need_both_systems() -> None:
    report = Report("overlay", ["cshare", "kernel"], [("walk", "walk")],
                    [Comparison("cshare", "fuse-overlayfs", limit=2.0), Comparison("cshare", "kernel")])
    assert [c.name for c in report.comparisons] == ["cshare/kernel"]


def test_table_gives_each_failure_reason_once() -> None:
    report = make_report()
    report.fail("walk", "kernel", "timed out")
    table, footnotes = report.table("t")
    assert len(table.rows) == 2
    assert footnotes == [
        "[1] kernel: failed: timed out",
        "[2] cshare: failed: cshare mount exited 1: boom",
    ]


def test_stamp_must_match_parameters_exactly(tmp_path: Path) -> None:
    stamp = tmp_path / "data.stamp"
    assert not stamp_matches(stamp, {"a": 1})
    stamp.write_text(json.dumps({"a": 1, "b": [1, 2]}))
    assert stamp_matches(stamp, {"b": [1, 2], "a": 1})
    assert not stamp_matches(stamp, {"a": 2, "b": [1, 2]})
    stamp.write_text("{half")
    assert not stamp_matches(stamp, {"a": 1})


def test_added_rows_carry_unit_target_and_paired_spread() -> None:
    report = Report("podman", ["cshare", "fuse-overlayfs"], [], [Comparison("cshare", "fuse-overlayfs", limit=2.0)])
    report.add_metric("start", "podman run", target=1.1)
    report.add_metric("pss", "PSS per mount", unit="MB")
    for mine, theirs in ((0.30, 0.20), (0.24, 0.20), (0.22, 0.25)):
        report.record("start", "cshare", mine)
        report.record("start", "fuse-overlayfs", theirs)
    report.record("pss", "cshare", 12.0)
    report.record("pss", "fuse-overlayfs", 8.0)
    primary = report.comparisons[0]
    # Run i against run i: the range of the ratios, not a ratio of medians.
    assert report.spread("start", primary) == pytest.approx([1.5, 1.2, 0.88])
    assert format_spread(report.spread("start", primary)) == "0.88-1.50x"
    # The row's own target replaces the comparison's limit for the primary comparison only.
    assert report.limit("start", primary) == 1.1
    assert report.limit("pss", primary) == 2.0
    flags = report.flags()
    assert len(flags) == 1
    assert flags[0].startswith("podman run: cshare takes 1.20x") and "limit 1.10x" in flags[0]
    data = report.to_json()["metrics"]
    assert data["pss"]["unit"] == "MB" and data["start"]["target"] == 1.1
    assert data["start"]["spreads"]["cshare/fuse-overlayfs"] == pytest.approx([1.5, 1.2, 0.88])
    with pytest.raises(ValueError, match="already"):
        report.add_metric("start", "again")


def test_spread_of_a_failed_cell_is_empty_and_values_keep_their_unit() -> None:
    report = make_report()
    assert report.spread("read", report.comparisons[0]) == []
    assert format_spread([]) == "—"
    assert format_spread([1.234]) == "1.23x"
    assert format_value(12.34, "MB") == "12.3 MB"
    assert format_value(0.0123, "s") == "12.3 ms"
    assert paired_ratios([2.0, 3.0, 4.0], [1.0, 0.0]) == [2.0]


def test_combined_table_has_one_row_per_metric_of_every_report() -> None:
    overlay = make_report()
    convert = Report("convert", ["cshare", "chmod"], [], [Comparison("cshare", "chmod")])
    convert.add_metric("convert_50k", "convert 50k", target=1.5)
    convert.record("convert_50k", "cshare", 0.3)
    convert.record("convert_50k", "chmod", 0.2)
    table, footnotes = combined_table([overlay, convert], "all")
    assert len(table.rows) == 3
    cells = [list(col._cells) for col in table.columns]
    assert cells[0] == ["walk", "read", "convert 50k"]
    assert cells[2][2] == "200.0 ms (chmod)"
    assert cells[3][2] == "1.50x"  # at its target: not flagged
    assert cells[5][2] == "≤ 1.50x"
    assert cells[6][2] == ""  # no kernel column for convert
    assert footnotes == ["[1] overlay cshare: failed: cshare mount exited 1: boom"]


def test_busy_note_only_when_the_load_exceeds_the_cpus() -> None:
    import os

    report = make_report()
    cpus = os.cpu_count() or 1
    report.load_started, report.load_finished = cpus + 3.5, 0.1
    note = busy_note(report)
    assert note is not None and f"{cpus + 3.5:.1f} on {cpus} CPUs" in note
    report.load_started = report.load_finished = cpus * 0.5
    assert busy_note(report) is None


def test_session_shapes_are_the_issues_workloads() -> None:
    from bench.session_bench import FULL, METRICS, QUICK

    # 20,000 files in 400 directories, a 512 MiB file, 2,000 files in 40 directories of 50.
    assert (FULL.files, FULL.dirs, FULL.big_mib) == (20_000, 400, 512)
    assert (FULL.copyup_files, FULL.copyup_dirs, FULL.per_dir) == (2_000, 40, 50)
    assert FULL.find_entries == 1 + 1 + 400 + 20_000 + 1  # root, tree/, its dirs and files, big.bin
    assert QUICK.copyup_dirs <= QUICK.dirs
    targets = {key: target for key, _, target in METRICS}
    assert targets["copyup"] == targets["cat_cold"] == 1.2
    assert targets["find_cold"] == targets["find_warm"] == 1.1


def test_markdown_rows_match_the_combined_table() -> None:
    rows = markdown_rows(make_report().to_json())
    assert rows == [
        "| walk | 2.00 s | 600.0 ms (fuse-overlayfs) | 3.33x | 1.25-6.00x | ≤ 2.00x | 300.0 ms |",
        "| read | failed | 1.00 s (fuse-overlayfs) | — | — | ≤ 2.00x | 500.0 ms |",
    ]


def test_run_timed_stops_the_clock_at_the_commands_exit() -> None:
    """The command prints the wall clock as its last act; run_timed must return right after.

    Popen.wait(timeout=...) sleeps up to 50 ms between looks: a command ending
    70 ms in was seen at 113.5 ms, ~43 ms late, and every row of the benchmark
    was rounded up to those steps."""
    lags = []
    for _ in range(3):
        elapsed, out, _ = run_timed(["sh", "-c", "sleep 0.07; date +%s.%N"], 10, capture_stdout=True)
        lags.append(time.time() - float(out.decode()))
        assert elapsed >= 0.07
    assert min(lags) < 0.015, f"run_timed returned {min(lags) * 1000:.1f} ms after the command printed"


def test_run_timed_times_out_and_names_the_command() -> None:
    start = time.monotonic()
    with pytest.raises(BenchFailure, match=r"^sleeper: timed out after 0 s$"):
        run_timed(["sleep", "30"], 0.3, what="sleeper")
    assert time.monotonic() - start < 5  # killed, not waited for
