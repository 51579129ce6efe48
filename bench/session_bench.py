"""The user-session benchmark: issue 14's workloads, exactly as a user meets them.

The overlay benchmark (overlay_bench) times each operation on its own mount
with `dd bs=1M` and copies up files no walk has seen; users do something else,
and that is what this module measures, side by side for cshare-overlay,
fuse-overlayfs and the kernel overlay on one generated lower layer:

    lower/tree/dNNN/fNN   400 directories of 50 files (20,000, 0-4 KiB, six modes, six owners)
    lower/big.bin         512 MiB

Per run, for each system (the order rotates between runs):

  start sequence    drop caches, start the mount command, and as soon as it
                    has returned `cat MNT/big.bin > /dev/null`: the read then
                    also waits for a daemon that is still loading its code
                    from a cold cache (what the issue's "cold read" saw)
  session sequence  on a new mount whose daemon has answered once: drop
                    caches; `cat MNT/big.bin` cold, then warm; `find MNT
                    -printf '%m %u %s\\n'` cold, then warm (the entry count is
                    checked); sync; then the copy-up workload: open each of
                    2,000 lower files (tree/d000-d039, 50 each) with
                    O_WRONLY|O_APPEND, write one byte, close (timed inside a
                    child, without its interpreter's start-up), on this mount
                    where find has walked the tree and the big file was read.
                    After unmounting, sample files in upper must be the lower
                    file plus the byte.

Ratios are cshare/fuse-overlayfs with issue 14's targets (cold read and
copy-up 1.2x, warm read parity, find 1.1x) and cshare/kernel; the per-run
range is the lowest and highest ratio of runs taken side by side.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import (
    DATA_ROOT,
    BenchFailure,
    Comparison,
    DataShape,
    Report,
    begin,
    console,
    cshare_options_argument,
    drop_caches,
    measure,
    prepared_data,
    run_collect,
    run_rounds,
    run_timed,
    timed_report,
)
from .overlay_bench import Overlay, abort_fuse_connection

PROG = "session_bench"
SYSTEMS = ("cshare", "fuse-overlayfs", "kernel")
WORK_ROOT = DATA_ROOT / "session-work"
MiB = 1 << 20


@dataclass(frozen=True)
class Shape(DataShape):
    """The generated lower layer and the copy-up workload's share of it."""

    dirs: int
    per_dir: int
    big_mib: int
    copyup_dirs: int  # the first this many directories of the tree are copied up

    @property
    def files(self) -> int:
        return self.dirs * self.per_dir

    @property
    def find_entries(self) -> int:
        return 1 + 1 + self.dirs + self.files + 1  # root, tree/, its directories and files, big.bin

    @property
    def copyup_files(self) -> int:
        return self.copyup_dirs * self.per_dir


FULL = Shape(400, 50, 512, 40)
QUICK = Shape(40, 50, 64, 8)

# (key, label, target of cshare/fuse-overlayfs); labels take the shape's numbers.
METRICS = (
    ("cat_start", "cat {big} MiB right after a cold mount", None),
    ("cat_cold", "cat {big} MiB, cold", 1.2),
    ("cat_warm", "cat {big} MiB, warm", 1.1),
    ("find_cold", "find -printf {entries} entries, cold", 1.1),
    ("find_warm", "find -printf {entries} entries, warm", 1.1),
    ("copyup", "copy-up append to {copyup} files after find", 1.2),
)
SESSION = ("cat_cold", "cat_warm", "find_cold", "find_warm", "copyup")

# Paths are computed, never listed: the workload itself does no directory read.
COPYUP_SCRIPT = """
import os, sys, time
root, dirs, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paths = [f"{root}/d{i:03d}/f{j:02d}" for i in range(dirs) for j in range(per)]
start = time.perf_counter()
for p in paths:
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"+")
    os.close(fd)
print(time.perf_counter() - start)
"""


def build_lower(root: Path, shape: Shape) -> None:
    """Generate root/lower; deterministic for a given shape."""
    import random

    rng = random.Random(14)
    noise = rng.randbytes(64 * 1024)
    modes = (0o644, 0o644, 0o644, 0o755, 0o600, 0o444)
    owners = (0, 0, 0, 33, 1000, 65534)  # find -printf %u looks several users up
    lower = root / "lower"
    for d in range(shape.dirs):
        leaf = lower / "tree" / f"d{d:03d}"
        leaf.mkdir(parents=True)
        for n in range(shape.per_dir):
            path = leaf / f"f{n:02d}"
            size = rng.randrange(4096)
            off = rng.randrange(len(noise) - size)
            path.write_bytes(noise[off : off + size])
            owner = owners[(n + d) % len(owners)]
            os.chown(path, owner, owner)
            os.chmod(path, modes[n % len(modes)])
    with open(lower / "big.bin", "wb") as f:
        for _ in range(shape.big_mib):
            f.write(os.urandom(MiB))


def cat(path: Path, size: int, timeout: float, mnt: Path) -> float:
    seconds, _, _ = run_timed(["cat", str(path)], timeout, what="cat",
                              on_hang=lambda: abort_fuse_connection(mnt))
    if os.stat(path).st_size != size:
        raise BenchFailure(f"{path} has {os.stat(path).st_size} bytes, expected {size}")
    return seconds


def find(mnt: Path, entries: int, timeout: float) -> float:
    seconds, out, _ = run_timed(["find", str(mnt), "-printf", "%m %u %s\\n"], timeout, what="find",
                                capture_stdout=True, on_hang=lambda: abort_fuse_connection(mnt))
    got = out.count(b"\n")
    if got != entries:  # a fast wrong answer is no result
        raise BenchFailure(f"find listed {got} entries, expected {entries}")
    return seconds


class SessionBench:
    def __init__(self, shape: Shape, systems: Sequence[str], repeat: int, timeout: float,
                 lower: Path, cshare_options: str = "") -> None:
        self.shape = shape
        self.repeat = repeat
        self.timeout = timeout
        self.lower = lower
        self.overlays = {
            s: Overlay(s, [lower], timeout, cshare_options if s == "cshare" else "", WORK_ROOT)
            for s in systems
        }
        self.broken: dict[str, str] = {}
        self.report = Report(
            "session", systems, [],
            [Comparison("cshare", "fuse-overlayfs", limit=2.0), Comparison("cshare", "kernel")],
            params={**shape.as_params(), "repeat": repeat, "timeout_s": timeout, "lower": str(lower)},
        )
        for key, label, target in METRICS:
            self.report.add_metric(key, label.format(
                big=shape.big_mib, entries=f"{shape.find_entries:,}", copyup=f"{shape.copyup_files:,}"),
                target=target)

    def run(self) -> Report:
        return run_rounds(self.report, self.overlays, self.repeat, self.one_system, WORK_ROOT)

    def one_system(self, run: int, s: str) -> None:
        if s not in self.broken:
            console.print(f"[dim]run {run + 1}/{self.repeat} {s}[/dim]")
            self.start_sequence(s, self.overlays[s])
        if s not in self.broken:
            self.session_sequence(s, self.overlays[s])

    def mounted(self, s: str, ov: Overlay, cold: bool) -> bool:
        """A fresh mount (after dropping caches when `cold`); False, and the column failed, if not."""
        try:
            ov.fresh()
            if cold:
                drop_caches()
            else:
                os.sync()
            if cold:
                run_timed(ov.command(), self.timeout, what=f"{s} mount", on_hang=ov.abort)
            else:
                ov.mount()
            return True
        except BenchFailure as exc:
            self.broken[s] = str(exc)
            self.report.fail_all(self.report.metrics, s, str(exc))
            console.print(f"[red]{s}: {exc}[/red]")
            ov.unmount()
            return False

    def start_sequence(self, s: str, ov: Overlay) -> None:
        if not self.mounted(s, ov, cold=True):
            return
        try:
            measure(self.report, "cat_start", s, lambda: cat(ov.mnt / "big.bin", self.shape.big_mib * MiB,
                                                     self.timeout, ov.mnt))
        finally:
            ov.unmount()

    def session_sequence(self, s: str, ov: Overlay) -> None:
        if not self.mounted(s, ov, cold=False):
            return
        z = self.shape
        big = ov.mnt / "big.bin"
        steps: list[tuple[str, Callable[[], float]]] = [
            ("cat_cold", lambda: cat(big, z.big_mib * MiB, self.timeout, ov.mnt)),
            ("cat_warm", lambda: cat(big, z.big_mib * MiB, self.timeout, ov.mnt)),
            ("find_cold", lambda: find(ov.mnt, z.find_entries, self.timeout)),
            ("find_warm", lambda: find(ov.mnt, z.find_entries, self.timeout)),
            ("copyup", lambda: self.copyup(ov)),
        ]
        try:
            drop_caches()  # the daemon has answered: what is cold now is the data only
            for n, (metric, action) in enumerate(steps):
                if metric == "copyup":
                    os.sync()  # nothing left to write back from before
                if not measure(self.report, metric, s, action):
                    for rest, _ in steps[n + 1:]:
                        self.report.fail(rest, s, f"not measured: {metric} hung first")
                    return
        finally:
            ov.unmount()
        if not self.report.failed("copyup", s):
            self.check_copyup(s, ov)

    def copyup(self, ov: Overlay) -> float:
        z = self.shape
        _, out, _ = run_timed(
            [sys.executable, "-c", COPYUP_SCRIPT, str(ov.mnt / "tree"), str(z.copyup_dirs), str(z.per_dir)],
            self.timeout, what="copy-up", capture_stdout=True, on_hang=ov.abort,
        )
        try:
            return float(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchFailure("copy-up: no timing printed") from None

    def check_copyup(self, s: str, ov: Overlay) -> None:
        """Whole copies in upper, with the lower file's mode: a first, middle and last sample."""
        z = self.shape
        for d, n in ((0, 0), (z.copyup_dirs // 2, z.per_dir // 2), (z.copyup_dirs - 1, z.per_dir - 1)):
            rel = Path("tree") / f"d{d:03d}" / f"f{n:02d}"
            try:
                up, low = ov.upper / rel, self.lower / rel
                ok = up.read_bytes() == low.read_bytes() + b"+" and (
                    stat.S_IMODE(os.lstat(up).st_mode) == stat.S_IMODE(os.lstat(low).st_mode))
            except OSError as exc:
                self.report.fail("copyup", s, f"copy-up result missing in upper: {exc}")
                return
            if not ok:
                self.report.fail("copyup", s, f"copy-up of {rel} wrong in upper (data or mode)")
                return


def collect(argv: list[str] | None = None) -> Report:
    """Run the benchmark, print its table and JSON, and return the report (for `make bench`)."""
    args = begin(PROG, "Issue 14's workloads on cshare-overlay, fuse-overlayfs and the kernel overlay.",
                 SYSTEMS, "session.json", argv, root_because="it mounts overlays and drops the page cache",
                 more_arguments=cshare_options_argument)
    shape = QUICK if args.quick else FULL
    name = "session-quick" if args.quick else "session"
    data = prepared_data(name, {"version": 1, **shape.as_params()}, lambda root: build_lower(root, shape))
    return timed_report(
        lambda: SessionBench(shape, args.systems, args.repeat, args.timeout, data / "lower",
                             args.cshare_options).run(),
        f"user-session benchmark: medians of {args.repeat} run(s), {'quick' if args.quick else 'full'} data",
        args.json)


if __name__ == "__main__":
    run_collect(PROG, collect)
