"""The memory benchmark: what each mount costs a user who runs 20 containers.

Issue 14, point 5.  Memory is counted as PSS (/proc/PID/smaps_rollup), so a
page shared by several processes counts once in their sum: the interpreter,
the libraries, and, for cshare-overlay with its mount server
(cshare_fuse.server), whatever the forked daemons still share with the
server and with each other.  The sum covers every process serving the
mounts: the daemons and, for cshare, the server that forked them and its
spare (the process already forked for the next mount).

One lower layer, `lower/tree/dNNN/fNN` (400 directories of 50 files: the
issue's 20,000-file walk).  Per run and system (the order rotates):

  1. 10 mounts (each its own upper and work directory), each answered once:
     the sum A0;
  2. `find MNT -printf '%m %u %s\\n'` on each of them (the count is checked): A;
  3. 10 more mounts: B;
  4. the same find on those: C.

Rows: A0/10 (a mount, idle), (B - A)/10 (one more mount, idle: issue
target 5 MB), C/20 (a mount after the walk) and (C - A)/10 (one more mount
after the walk: target 3x fuse-overlayfs).  Systems: `cshare` (with the
server), `cshare-direct` (CSHARE_OVERLAY_SERVER=0: a fresh interpreter per
mount) and `fuse-overlayfs`.  Memory hardly varies between runs, so at most
two runs are taken.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .common import (
    DATA_ROOT,
    BenchFailure,
    Comparison,
    Report,
    begin,
    console,
    prepared_data,
    remove_tree,
    rotated,
    run_collect,
    run_timed,
    timed_report,
)
from .overlay_bench import Overlay, abort_fuse_connection, daemon_pids

PROG = "memory_bench"
SYSTEMS = ("cshare", "cshare-direct", "fuse-overlayfs")
WORK_ROOT = DATA_ROOT / "memory-work"
MiB = 1 << 20
IDLE_TARGET_MB = 5.0  # the "within 5 MB" (10^6 bytes; the rows are in MiB)

METRICS = (
    ("pss_idle", "memory a mount, {half} idle mounts (PSS)", None),
    ("pss_next_idle", "memory of one more mount, idle (PSS)", None),
    ("pss_walked", "memory a mount, {n} mounts after find (PSS)", None),
    ("pss_next_walked", "memory of one more mount after find over {files:,} files (PSS)", 3.0),
)


def build_lower(root: Path, dirs: int, per_dir: int) -> None:
    for d in range(dirs):
        leaf = root / "lower" / "tree" / f"d{d:03d}"
        leaf.mkdir(parents=True)
        for n in range(per_dir):
            (leaf / f"f{n:02d}").write_bytes(b"x" * (n % 7))


def pss_bytes(pid: int) -> int:
    """The PSS of `pid` in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def is_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(b"cshare-overlay: mount server")
    except OSError:
        return False


class MemoryBench:
    def __init__(self, systems: list[str], repeat: int, timeout: float, lower: Path, mounts: int,
                 files: int) -> None:
        self.systems = systems
        self.repeat = repeat
        self.timeout = timeout
        self.lower = lower
        self.mounts = mounts
        self.files = files
        self.report = Report(
            "memory", systems, [],
            [Comparison("cshare", "fuse-overlayfs"), Comparison("cshare-direct", "fuse-overlayfs")],
            params={"repeat": repeat, "mounts": mounts, "files": files, "lower": str(lower)},
        )
        for key, label, target in METRICS:
            self.report.add_metric(key, label.format(half=mounts // 2, n=mounts, files=files),
                                   unit="MiB", target=target)

    def run(self) -> Report:
        for r in range(self.repeat):
            for s in rotated(self.systems, r):
                console.print(f"[dim]run {r + 1}/{self.repeat} {s}: {self.mounts} mounts[/dim]")
                try:
                    self.one(s)
                except BenchFailure as exc:
                    self.report.fail_all([k for k, _, _ in METRICS], s, str(exc))
        self.report.notes.append(self.idle_verdict())
        return self.report

    def idle_verdict(self) -> str:
        cell = self.report.metrics["pss_next_idle"].cells.get("cshare")
        value = cell.median if cell else None
        if value is None:
            return f"one more idle mount: no cshare value (target {IDLE_TARGET_MB:g} MB)"
        mb = value * MiB / 1e6
        verdict = "met" if mb <= IDLE_TARGET_MB else "not met"
        return (f"one more idle cshare mount costs {value:.2f} MiB ({mb:.2f} MB): "
                f"target {IDLE_TARGET_MB:g} MB {verdict}")

    def one(self, system: str) -> None:
        program = "fuse-overlayfs" if system == "fuse-overlayfs" else "cshare"
        overlays = [Overlay(program, [self.lower], self.timeout, "", WORK_ROOT / f"{system}-{i:02d}")
                    for i in range(self.mounts)]
        half = self.mounts // 2
        saved = os.environ.get("CSHARE_OVERLAY_SERVER")
        os.environ["CSHARE_OVERLAY_SERVER"] = "0" if system == "cshare-direct" else "1"
        try:
            self.mount(overlays[:half])
            a0 = self.total(overlays)
            self.walk(overlays[:half])
            a = self.total(overlays)
            self.mount(overlays[half:])
            b = self.total(overlays)
            self.walk(overlays[half:])
            c = self.total(overlays)
        finally:
            if saved is None:
                os.environ.pop("CSHARE_OVERLAY_SERVER", None)
            else:
                os.environ["CSHARE_OVERLAY_SERVER"] = saved
            for ov in overlays:
                ov.cleanup()
            remove_tree(WORK_ROOT)
        rest = self.mounts - half
        self.report.record("pss_idle", system, a0 / half / MiB)
        self.report.record("pss_next_idle", system, (b - a) / rest / MiB)
        self.report.record("pss_walked", system, c / self.mounts / MiB)
        self.report.record("pss_next_walked", system, (c - a) / rest / MiB)

    def mount(self, overlays: list[Overlay]) -> None:
        for ov in overlays:
            ov.fresh()
            ov.mount()

    def walk(self, overlays: list[Overlay]) -> None:
        for ov in overlays:
            _, out, _ = run_timed(["find", str(ov.mnt), "-printf", "%m %u %s\\n"], self.timeout,
                                  what="find", capture_stdout=True,
                                  on_hang=lambda mnt=ov.mnt: abort_fuse_connection(mnt))
            expected = self.files + self.files // 50 + 2  # files, their directories, tree/, the root
            got = out.count(b"\n")
            if got != expected:
                raise BenchFailure(f"find listed {got} entries, expected {expected}")

    def total(self, overlays: list[Overlay]) -> int:
        """PSS of every process serving these mounts, the mount server that
        forked them and the server's spare (the next mount's process)."""
        time.sleep(0.5)  # let the daemons settle (a mount just made has answered once)
        pids: set[int] = set()
        for ov in overlays:
            for pid in daemon_pids(ov.mnt):
                pids.add(pid)
                if is_server(parent(pid)):
                    pids.add(parent(pid))
        servers = {p for p in pids if is_server(p)}
        pids |= {p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if parent(p) in servers and is_server(p)}
        return sum(pss_bytes(p) for p in pids)


def collect(argv: list[str] | None = None) -> Report:
    """Run the benchmark, print its table and JSON, and return the report (for `make bench`)."""
    args = begin(PROG, "The PSS each mount costs with 20 mounts, idle and after a walk: cshare-overlay "
                 "(with and without its mount server) and fuse-overlayfs.", SYSTEMS, "memory.json", argv,
                 root_because="it mounts overlays")
    args.repeat = min(args.repeat, 2)
    dirs, per_dir, mounts = (40, 50, 6) if args.quick else (400, 50, 20)
    data = prepared_data("memory-quick" if args.quick else "memory",
                         {"version": 1, "dirs": dirs, "per_dir": per_dir},
                         lambda root: build_lower(root, dirs, per_dir))
    return timed_report(
        lambda: MemoryBench(args.systems, args.repeat, args.timeout, data / "lower", mounts, dirs * per_dir).run(),
        f"memory per mount: {mounts} mounts, medians of {args.repeat} run(s)", args.json)


if __name__ == "__main__":
    run_collect(PROG, collect)
