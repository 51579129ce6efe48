"""The overlay benchmark: cshare-overlay, fuse-overlayfs and the kernel overlay on the same layers.

Two lower layers are generated once under /var/tmp/cshare-bench (and reused
while their stamp matches): the bottom one holds a ~20k-file tree, a large
file, 2,000 files to copy up and a 1,000-file directory to delete; the top one
shadows, adds and whites out a few files in every directory of the tree, so
every walk really merges two layers.  Each system mounts those same lowers
with its own fresh upper and work directories.

Per run, for each system (the order rotates between runs):
  cold group   drop caches, mount (timed: mount ready and first answer, cold), find cold,
               find warm, unmount
  read group   drop caches, mount, read the large file cold, then warm, unmount
  write group  mount on an empty upper (timed: mount ready and first answer, warm), copy-up,
               create, rm -rf, unmount
"Mount ready" is what the mount command promises (it has returned and the mount
is in the mount table; the kernel holds requests until the daemon serves);
"first answer" is when a stat inside the mount has come back, from the same start.
Medians of the runs are compared: cshare/fuse-overlayfs (flagged above 2x) and
cshare/kernel.  A system that cannot mount or fails an operation shows
`failed: reason` in its column instead of stopping the benchmark.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cshare.system import mountinfo

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
    one_line,
    prepared_data,
    remove_tree,
    run_collect,
    run_rounds,
    run_timed,
    timed_report,
)

PROG = "overlay_bench"
SYSTEMS = ("cshare", "fuse-overlayfs", "kernel")
WORK_ROOT = DATA_ROOT / "overlay-work"
MiB = 1 << 20

# Kernel overlay options that match what cshare-overlay implements (the
# reference configuration of the differential tests, design.md).
KERNEL_EXTRA = "index=off,redirect_dir=off,metacopy=off"


@dataclass(frozen=True)
class Sizes(DataShape):
    """Everything that shapes the generated layers and the write workloads."""

    tree_top: int  # tree/aNN
    tree_sub: int  # tree/aNN/bNN
    tree_files: int  # files per leaf directory
    big_mib: int
    copyup_dirs: int
    copyup_per_dir: int
    create_dirs: int
    create_per_dir: int
    rm_dirs: int
    rm_per_dir: int

    @property
    def tree_total(self) -> int:
        return self.tree_top * self.tree_sub * self.tree_files

    @property
    def merged_entries(self) -> int:
        """What `find MNT` lists: the top layer adds two files per leaf and whites out one."""
        leaves = self.tree_top * self.tree_sub
        tree = leaves * (self.tree_files + 1) + 1 + self.tree_top + leaves
        copyup = 1 + self.copyup_dirs * (1 + self.copyup_per_dir)
        rm = 1 + self.rm_dirs * (1 + self.rm_per_dir)
        return 1 + tree + 1 + copyup + rm  # the root and big.bin too


FULL = Sizes(20, 10, 100, 512, 20, 100, 10, 500, 10, 100)
QUICK = Sizes(5, 4, 100, 64, 2, 100, 2, 250, 1, 100)

METRICS = [
    ("mount", "mount ready (cold)"),
    ("first", "first answer (cold)"),
    ("mount_warm", "mount ready (warm)"),
    ("first_warm", "first answer (warm)"),
    ("walk_cold", "find+stat {entries} entries, cold"),
    ("walk_warm", "find+stat {entries} entries, warm"),
    ("read_cold", "read {big} MiB, cold"),
    ("read_warm", "read {big} MiB, warm"),
    ("copyup", "copy-up {copyup} files (append)"),
    ("create", "create {create} small files"),
    ("rm", "rm -rf dir of {rm} lower files"),
]
COLD_GROUP = ("mount", "first", "walk_cold", "walk_warm")
READ_GROUP = ("read_cold", "read_warm")
WRITE_GROUP = ("mount_warm", "first_warm", "copyup", "create", "rm")

# The copy-up and create workloads run in a child process that times itself,
# so the interpreter's start-up is not measured and a hung FUSE request can be
# ended by the parent's timeout.  Paths are computed, never listed, so no
# untimed directory read warms the caches first.
COPYUP_SCRIPT = """
import sys, time
root, dirs, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paths = [f"{root}/d{i:03d}/f{j:04d}" for i in range(dirs) for j in range(per)]
start = time.perf_counter()
for p in paths:
    with open(p, "ab") as f:
        f.write(b"+")
print(time.perf_counter() - start)
"""
CREATE_SCRIPT = """
import os, sys, time
root, dirs, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = b"cshare bench small file\\n" * 8
start = time.perf_counter()
os.mkdir(root)
for i in range(dirs):
    d = f"{root}/d{i:03d}"
    os.mkdir(d)
    for j in range(per):
        with open(f"{d}/f{j:04d}", "wb") as f:
            f.write(payload)
print(time.perf_counter() - start)
"""


# ------------------------------------------------------------------ data
def build_layers(root: Path, sizes: Sizes) -> None:
    """Generate lower0 (bottom) and lower1 (top); deterministic for given sizes."""
    import random

    rng = random.Random(20261128)
    noise = rng.randbytes(64 * 1024)
    lower0, lower1 = root / "lower0", root / "lower1"

    def write(path: Path, size: int, mode: int = 0o644, owner: int = 0) -> None:
        with open(path, "wb") as f:
            off = rng.randrange(len(noise) // 2)
            f.write(noise[off : off + size] if size <= len(noise) - off else os.urandom(size))
        os.chmod(path, mode)
        if owner:
            os.chown(path, owner, owner)

    # Owners and modes vary as in a real root filesystem; `find -printf %u`
    # then looks up several users, on every system alike.
    modes = (0o644, 0o644, 0o644, 0o755, 0o600, 0o444)
    owners = (0, 0, 0, 33, 1000, 65534)
    for top in range(sizes.tree_top):
        for sub in range(sizes.tree_sub):
            leaf = lower0 / "tree" / f"a{top:02d}" / f"b{sub:02d}"
            leaf.mkdir(parents=True)
            for n in range(sizes.tree_files):
                write(leaf / f"f{n:03d}", rng.randrange(4096), modes[n % 6], owners[(n + sub) % 6])
            upper_leaf = lower1 / "tree" / f"a{top:02d}" / f"b{sub:02d}"
            upper_leaf.mkdir(parents=True)
            for n in range(3):  # shadow three files of the bottom layer
                write(upper_leaf / f"f{n:03d}", rng.randrange(4096))
            for n in range(2):  # and add two of its own
                write(upper_leaf / f"n{n:03d}", rng.randrange(4096))
            # A whiteout (char 0/0) hides the last file of the bottom layer.
            os.mknod(upper_leaf / f"f{sizes.tree_files - 1:03d}", 0o600 | stat.S_IFCHR, os.makedev(0, 0))

    with open(lower0 / "big.bin", "wb") as f:
        for _ in range(sizes.big_mib):
            f.write(os.urandom(MiB))

    for i in range(sizes.copyup_dirs):
        d = lower0 / "copyup" / f"d{i:03d}"
        d.mkdir(parents=True)
        for j in range(sizes.copyup_per_dir):
            write(d / f"f{j:04d}", rng.randrange(4096, 64 * 1024), 0o644, owners[j % 6])
    for i in range(sizes.rm_dirs):
        d = lower0 / "rmtree" / f"d{i:03d}"
        d.mkdir(parents=True)
        for j in range(sizes.rm_per_dir):
            write(d / f"f{j:04d}", rng.randrange(1024))


# ------------------------------------------------------------------ mounts
def cshare_overlay_command() -> str | None:
    candidate = Path(sys.executable).parent / "cshare-overlay"
    if candidate.exists():
        return str(candidate)
    return shutil.which("cshare-overlay")


def mountinfo_entry(mnt: Path) -> tuple[str, str] | None:
    """(major:minor, fstype) of the mount at `mnt`, read without touching the mount itself."""
    try:
        entry = mountinfo.find(mnt)
    except OSError:
        return None
    return (entry.device, entry.fstype) if entry is not None else None


def daemon_pids(mnt: Path) -> list[int]:
    """Processes that have `mnt` as an argument: the FUSE daemon serving it."""
    target = os.fsencode(str(mnt))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if target in args:
            pids.append(int(entry))
    return pids


def abort_fuse_connection(mnt: Path) -> None:
    """Abort a (possibly hung) FUSE connection so the unmount cannot block forever."""
    entry = mountinfo_entry(mnt)
    if entry is None or not entry[1].startswith("fuse"):
        return
    minor = entry[0].split(":")[1]
    conn = Path("/sys/fs/fuse/connections")
    if conn.is_dir() and not any(conn.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(conn)], capture_output=True)
    try:
        (conn / minor / "abort").write_text("1")
    except OSError:
        pass


class Overlay:
    """One system's mount of the shared lowers, with its own upper, work and mountpoint."""

    def __init__(self, system: str, lowers: Sequence[Path], timeout: float, extra: str = "",
                 work_root: Path = WORK_ROOT) -> None:
        self.system = system
        self.extra = extra  # more -o options, for trying a tuning of one system
        self.lowers = list(lowers)
        self.timeout = timeout
        self.base = work_root / system
        self.upper = self.base / "upper"
        self.work = self.base / "work"
        self.mnt = self.base / "mnt"

    def options(self) -> str:
        lower = ":".join(str(p) for p in self.lowers)
        opts = f"lowerdir={lower},upperdir={self.upper},workdir={self.work}"
        if self.system == "kernel":
            opts = f"{opts},{KERNEL_EXTRA}"
        return f"{opts},{self.extra}" if self.extra else opts

    def command(self) -> list[str]:
        if self.system == "kernel":
            return ["mount", "-t", "overlay", "overlay", "-o", self.options(), str(self.mnt)]
        if self.system == "fuse-overlayfs":
            return ["fuse-overlayfs", "-o", self.options(), str(self.mnt)]
        cmd = cshare_overlay_command()
        if cmd is None:
            raise BenchFailure("cshare-overlay is not installed (run scripts/install)")
        return [cmd, "-o", self.options(), str(self.mnt)]

    def version(self) -> str:
        if self.system == "kernel":
            return f"Linux {os.uname().release}"
        try:
            cmd = self.command()[0]
            out = subprocess.run([cmd, "--version"], capture_output=True, timeout=20)
        except (BenchFailure, OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({one_line(str(exc))})"
        if out.returncode != 0:
            return f"unknown ({Path(cmd).name} --version exited {out.returncode})"
        text = (out.stdout + out.stderr).decode(errors="replace")
        name = Path(cmd).name
        lines = [ln for ln in text.splitlines() if name in ln] or text.splitlines() or ["unknown"]
        return one_line(lines[0])

    def fresh(self) -> None:
        """Empty upper and work directories and an empty mountpoint: every mount starts equal."""
        self.unmount()
        for d in (self.upper, self.work):
            remove_tree(d)
            d.mkdir(parents=True)
        self.mnt.mkdir(parents=True, exist_ok=True)

    def mount(self) -> tuple[float, float]:
        """Mount; return seconds from starting the command to the mount being ready,
        and to the first answer from inside it (a stat of the tree's top)."""
        cmd = self.command()
        start = time.perf_counter()
        run_timed(cmd, self.timeout, what=f"{self.system} mount", on_hang=self.abort)
        # The FUSE commands return once the mount is ready; if one returns
        # early, the wait until the mount appears is part of its start time.
        deadline = start + min(self.timeout, 30.0)
        while mountinfo_entry(self.mnt) is None:
            if time.perf_counter() > deadline:
                raise BenchFailure(f"{self.system}: the mount command returned but nothing is mounted")
            time.sleep(0.005)
        ready = time.perf_counter() - start
        if not stat.S_ISDIR(os.stat(self.mnt / "tree").st_mode):
            raise BenchFailure(f"{self.system}: the mount shows no directory tree/")
        return ready, time.perf_counter() - start

    def abort(self) -> None:
        abort_fuse_connection(self.mnt)

    def unmount(self) -> None:
        """Unmount and wait for the FUSE daemon to exit, whatever state the mount is in."""
        if mountinfo_entry(self.mnt) is None:
            return
        pids = daemon_pids(self.mnt) if self.system != "kernel" else []
        for _ in range(5):
            try:
                subprocess.run(["umount", str(self.mnt)], capture_output=True, timeout=30)
            except subprocess.TimeoutExpired:
                break  # a hung daemon: abort it below
            if mountinfo_entry(self.mnt) is None:
                break
            time.sleep(0.2)
        if mountinfo_entry(self.mnt) is not None:
            abort_fuse_connection(self.mnt)
            try:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=30)
            except subprocess.TimeoutExpired:
                console.print(f"[red]could not unmount {self.mnt}[/red]")
        # Wait for our daemon to finish (it may still be flushing), so it
        # does not compete with the next measurement; end it if it lingers.
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.02)
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        try:
            self.unmount()
        finally:
            if mountinfo_entry(self.mnt) is None:
                remove_tree(self.base)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------ workloads
def walk(mnt: Path, timeout: float) -> tuple[float, int]:
    elapsed, out, _ = run_timed(
        ["find", str(mnt), "-printf", "%s %m %u\\n"], timeout, what="find", capture_stdout=True,
        on_hang=lambda: abort_fuse_connection(mnt),
    )
    return elapsed, out.count(b"\n")


def read_big(mnt: Path, sizes: Sizes, timeout: float) -> float:
    elapsed, _, err = run_timed(
        ["dd", f"if={mnt / 'big.bin'}", "of=/dev/null", "bs=1M"], timeout, what="dd",
        on_hang=lambda: abort_fuse_connection(mnt),
    )
    match = re.search(rb"^(\d+) bytes", err, re.M)
    got = int(match.group(1)) if match else -1
    if got != sizes.big_mib * MiB:
        raise BenchFailure(f"dd read {got} bytes, expected {sizes.big_mib * MiB}")
    return elapsed


def child_timed(script: str, args: Sequence[str], mnt: Path, timeout: float, what: str) -> float:
    _, out, _ = run_timed(
        [sys.executable, "-c", script, *args], timeout, what=what, capture_stdout=True,
        on_hang=lambda: abort_fuse_connection(mnt),
    )
    try:
        return float(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchFailure(f"{what}: no timing printed") from None


# ------------------------------------------------------------------ the run
class OverlayBench:
    def __init__(
        self, sizes: Sizes, systems: Sequence[str], repeat: int, timeout: float, lowers: list[Path],
        cshare_options: str = "",
    ) -> None:
        self.sizes = sizes
        self.repeat = repeat
        self.timeout = timeout
        self.overlays = {
            s: Overlay(s, lowers, timeout, cshare_options if s == "cshare" else "") for s in systems
        }
        self.broken: dict[str, str] = {}
        labels = [
            (key, label.format(
                entries=f"{sizes.merged_entries:,}", big=sizes.big_mib,
                copyup=f"{sizes.copyup_dirs * sizes.copyup_per_dir:,}",
                create=f"{sizes.create_dirs * sizes.create_per_dir:,}",
                rm=f"{sizes.rm_dirs * sizes.rm_per_dir:,}",
            ))
            for key, label in METRICS
        ]
        self.report = Report(
            "overlay",
            systems,
            labels,
            [Comparison("cshare", "fuse-overlayfs", limit=2.0), Comparison("cshare", "kernel")],
            params={**sizes.as_params(), "repeat": repeat, "timeout_s": timeout,
                    "lowers": [str(p) for p in lowers]},
        )

    def run(self) -> Report:
        return run_rounds(self.report, self.overlays, self.repeat, self.one_system, WORK_ROOT)

    def one_system(self, run: int, s: str) -> None:
        if s in self.broken:
            return
        for group, body in ((COLD_GROUP, self.cold), (READ_GROUP, self.read), (WRITE_GROUP, self.write)):
            if all(self.report.failed(m, s) for m in group):
                continue
            ov = self.overlays[s]
            console.print(f"[dim]run {run + 1}/{self.repeat} {s}: {', '.join(group)}[/dim]")
            try:
                ov.fresh()
                if group == WRITE_GROUP:
                    os.sync()  # removing the last upper left dirty metadata: not this mount's cost
                else:
                    drop_caches()
                ready, first = ov.mount()
            except BenchFailure as exc:
                self.broken[s] = str(exc)
                for m, _ in METRICS:
                    self.report.fail(m, s, str(exc))
                console.print(f"[red]{s}: {exc}[/red]")
                ov.unmount()
                return
            try:
                if group == COLD_GROUP:
                    self.report.record("mount", s, ready)
                    self.report.record("first", s, first)
                elif group == WRITE_GROUP:
                    self.report.record("mount_warm", s, ready)
                    self.report.record("first_warm", s, first)
                body(s, ov)
            finally:
                ov.unmount()
            if group == WRITE_GROUP and not self.report.failed("copyup", s):
                self.check_copyup(s, ov)  # after unmount: every write has reached upper

    def cold(self, s: str, ov: Overlay) -> None:
        def walk_once() -> float:
            seconds, n = walk(ov.mnt, self.timeout)
            if n != self.sizes.merged_entries:  # a fast wrong answer is no result
                raise BenchFailure(f"find listed {n} entries, expected {self.sizes.merged_entries}")
            return seconds

        if measure(self.report, "walk_cold", s, walk_once):
            measure(self.report, "walk_warm", s, walk_once)
        else:
            self.report.fail("walk_warm", s, "not measured: the cold walk hung first")

    def read(self, s: str, ov: Overlay) -> None:
        if measure(self.report, "read_cold", s, lambda: read_big(ov.mnt, self.sizes, self.timeout)):
            measure(self.report, "read_warm", s, lambda: read_big(ov.mnt, self.sizes, self.timeout))
        else:
            self.report.fail("read_warm", s, "not measured: the cold read hung first")

    def write(self, s: str, ov: Overlay) -> None:
        z = self.sizes

        def copyup() -> float:
            return child_timed(
                COPYUP_SCRIPT, [str(ov.mnt / "copyup"), str(z.copyup_dirs), str(z.copyup_per_dir)],
                ov.mnt, self.timeout, "copy-up",
            )

        def create() -> float:
            return child_timed(
                CREATE_SCRIPT, [str(ov.mnt / "created"), str(z.create_dirs), str(z.create_per_dir)],
                ov.mnt, self.timeout, "create",
            )

        def rm() -> float:
            target = ov.mnt / "rmtree"
            seconds, _, _ = run_timed(["rm", "-rf", str(target)], self.timeout, what="rm -rf",
                                      on_hang=ov.abort)
            if os.path.lexists(target):
                raise BenchFailure("rm -rf returned but the directory is still there")
            return seconds

        steps = (("copyup", copyup), ("create", create), ("rm", rm))
        for n, (metric, action) in enumerate(steps):
            os.sync()  # the previous step's dirty data must not be written back during this one
            if not measure(self.report, metric, s, action):
                for rest, _ in steps[n + 1 :]:
                    self.report.fail(rest, s, f"not measured: {metric} hung first")
                return

    def check_copyup(self, s: str, ov: Overlay) -> None:
        """The copied-up files must be whole: one sample compared with its lower original."""
        z = self.sizes
        rel = Path("copyup") / f"d{z.copyup_dirs - 1:03d}" / f"f{z.copyup_per_dir - 1:04d}"
        lower = ov.lowers[-1] / rel
        upper = ov.upper / rel
        try:
            ok = upper.read_bytes() == lower.read_bytes() + b"+"
        except OSError as exc:
            ok, why = False, str(exc)
        else:
            why = "its content differs from the lower file plus the appended byte"
        if not ok:
            self.report.fail("copyup", s, f"copy-up result wrong in upper: {why}")


def collect(argv: list[str] | None = None) -> Report:
    """Run the benchmark, print its table and JSON, and return the report (for `make bench`)."""
    args = begin(PROG, "Compare cshare-overlay with fuse-overlayfs and the kernel overlay.", SYSTEMS,
                 "overlay.json", argv, root_because="it mounts overlays and drops the page cache",
                 more_arguments=cshare_options_argument)
    sizes = QUICK if args.quick else FULL
    if "fuse-overlayfs" in args.systems and shutil.which("fuse-overlayfs") is None:
        console.print("[yellow]fuse-overlayfs is not installed (Debian package fuse-overlayfs)[/yellow]")
    name = "overlay-quick" if args.quick else "overlay"
    data = prepared_data(name, {"version": 1, **sizes.as_params()}, lambda root: build_layers(root, sizes))
    lowers = [data / "lower1", data / "lower0"]  # leftmost is the top layer
    return timed_report(
        lambda: OverlayBench(sizes, args.systems, args.repeat, args.timeout, lowers, args.cshare_options).run(),
        f"overlay benchmark: medians of {args.repeat} run(s), {'quick' if args.quick else 'full'} data",
        args.json)


if __name__ == "__main__":
    run_collect(PROG, collect)
