"""The convert benchmark: `cshare convert` and `cshare restore` against `chmod -R 0755` on the same tree.

A varied tree of about 100k entries (files of many modes and owners,
directories, symlinks, hardlinks, device nodes, fifos, sockets, user xattrs)
is generated once under /var/tmp/cshare-bench and reused while its stamp
matches.  Each run copies it (`cp -a`) into two fresh identical trees A and B:

    cshare convert A --quiet      vs   chmod -R 0755 B
    cshare restore A --quiet      vs   chmod -R 0755 B   (again: the baseline for both)

The target (issue 3) is at most 2x chmod for both; a ratio above is flagged.
A few sentinel entries are checked after each command, so a convert that
returns quickly without converting is reported as failed, not as fast.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import time
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
    drop_caches,
    format_seconds,
    last_line,
    median,
    prepared_data,
    remove_tree,
    run_collect,
    run_timed,
    timed_report,
)

PROG = "convert_bench"
SYSTEMS = ("cshare", "chmod")
WORK_ROOT = DATA_ROOT / "convert-work"
OVERRIDE = "user.containers.override_stat"
PER_LEAF = 19  # entries in every leaf directory


@dataclass(frozen=True)
class Shape(DataShape):
    top: int  # d00 .. under the root
    leaves: int  # e000 .. under each top directory

    @property
    def entries(self) -> int:
        return 1 + self.top + self.top * self.leaves * (1 + PER_LEAF)


FULL = (Shape(25, 100), Shape(50, 100))  # 50,026 and 100,051 entries
QUICK = (Shape(10, 50),)  # 10,011 entries
TARGET = 1.5  # issue 14: convert and restore within 1.5x of chmod -R 0755

FILE_MODES = (0o644, 0o644, 0o644, 0o755, 0o600, 0o640, 0o444, 0o4755, 0o2755, 0o000, 0o777, 0o700)
DIR_MODES = (0o755, 0o755, 0o755, 0o700, 0o1777, 0o2775, 0o555)
OWNERS = (0, 0, 0, 1, 33, 100, 1000, 65534)

# Sentinels checked after each command: a 0600 file (leaf 1, file 4) and a char device.
SENTINEL_FILE = "d00/e001/f004"
SENTINEL_CHAR = "d00/e002/x"


def build_tree(root: Path, shape: Shape) -> None:
    """Generate the tree in `root` itself (it is the converted root); deterministic per shape."""
    rng = random.Random(3)
    noise = rng.randbytes(1024)
    leaf_no = 0
    for t in range(shape.top):
        top = root / f"d{t:02d}"
        top.mkdir()
        for e in range(shape.leaves):
            leaf = top / f"e{e:03d}"
            leaf.mkdir()
            for i in range(PER_LEAF - 2):
                path = leaf / f"f{i:03d}"
                with open(path, "wb") as f:
                    # Mostly empty: convert never reads data, and on this
                    # machine's ext4 (mounted with `discard`) every freed block
                    # makes deleting the per-run copies slow.
                    if i == 0:
                        f.write(noise[: rng.randrange(1, 1024)])
                owner = OWNERS[(i + leaf_no) % len(OWNERS)]
                os.chown(path, owner, owner)
                os.chmod(path, FILE_MODES[i % len(FILE_MODES)])  # after chown: it clears setuid
            special(leaf, e, leaf_no)
            last = leaf / "z"
            last.write_bytes(b"")
            if e % 7 == 0:  # existing user xattrs must survive convert and restore
                os.setxattr(last, "user.bench", b"kept")
            os.chown(leaf, OWNERS[e % len(OWNERS)], OWNERS[e % len(OWNERS)])
            os.chmod(leaf, DIR_MODES[e % len(DIR_MODES)])
            leaf_no += 1
        os.chmod(top, 0o755)
    os.chmod(root, 0o755)


def special(leaf: Path, e: int, n: int) -> None:
    """The one entry per leaf that is not a plain file: every type appears across the tree."""
    x = leaf / "x"
    kind = e % 10
    if e == 2 or (kind == 2 and n % 5 == 0):
        os.mknod(x, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == 0:
        os.symlink("f000", x)
    elif kind == 1:
        os.symlink("/etc/passwd", x)  # points out of the tree: must never be followed
    elif kind == 3 and n % 5 == 0:
        os.mknod(x, 0o660 | stat.S_IFBLK, os.makedev(8, 0))
        os.chown(x, 0, 6)
    elif kind == 4:
        os.mkfifo(x, 0o644)
    elif kind == 5 and n % 5 == 0:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(x))
    elif kind == 6:
        os.link(leaf / "f001", x)  # a hardlink group
    elif kind == 7:
        x.mkdir(0o755)  # an empty directory
    else:
        x.write_bytes(b"")


def check_converted(tree: Path) -> None:
    for path in (tree, tree / SENTINEL_FILE, tree / SENTINEL_CHAR):
        st = os.lstat(path)
        if stat.S_IMODE(st.st_mode) != 0o755:
            raise BenchFailure(f"after convert {path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0755")
        try:
            value = os.getxattr(path, OVERRIDE, follow_symlinks=False).decode()
        except OSError:
            raise BenchFailure(f"after convert {path} has no {OVERRIDE}") from None
        if path == tree / SENTINEL_CHAR and not value.endswith(":char-1-3"):
            raise BenchFailure(f"after convert {path} records {value!r}, not a char-1-3 device")
        if path == tree / SENTINEL_FILE and not value.endswith(":0600:file"):
            raise BenchFailure(f"after convert {path} records {value!r}, expected mode 0600")


def check_restored(tree: Path, golden: Path) -> None:
    for rel in ("", SENTINEL_FILE, SENTINEL_CHAR):
        now, then = os.lstat(tree / rel), os.lstat(golden / rel)
        if (now.st_mode, now.st_uid, now.st_gid, now.st_rdev) != (then.st_mode, then.st_uid, then.st_gid, then.st_rdev):
            raise BenchFailure(f"after restore {tree / rel} differs from the original")
        try:
            os.getxattr(tree / rel, OVERRIDE, follow_symlinks=False)
        except OSError:
            continue
        raise BenchFailure(f"after restore {tree / rel} still has {OVERRIDE}")


def copy_trees(golden: Path, targets: tuple[Path, ...], timeout: float) -> None:
    """`cp -a` the golden tree to each target, in parallel (file creation dominates, not CPU)."""
    procs = [
        subprocess.Popen(["cp", "-a", str(golden), str(t)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for t in targets
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise BenchFailure(f"cp -a exited {proc.returncode}: {last_line(err)}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def cshare_command() -> str:
    candidate = Path(sys.executable).parent / "cshare"
    return str(candidate) if candidate.exists() else (shutil.which("cshare") or "cshare")


def size_key(shape: Shape) -> str:
    """`50k`, `100k`: the metric keys' suffix for a tree of that many entries."""
    return f"{round(shape.entries / 1000)}k"


class ConvertBench:
    def __init__(self, trees: list[tuple[Shape, Path]], systems: list[str], repeat: int, timeout: float,
                 cold: bool) -> None:
        self.trees = trees
        self.systems = systems
        self.repeat = repeat
        self.timeout = timeout
        self.cold = cold
        self.report = Report(
            "convert", systems, [], [Comparison("cshare", "chmod", limit=2.0)],
            params={"shapes": [{**shape.as_params(), "entries": shape.entries} for shape, _ in trees],
                    "repeat": repeat, "timeout_s": timeout, "cold": cold,
                    "trees": [str(golden) for _, golden in trees]},
        )
        for shape, _ in trees:
            for verb in ("convert", "restore"):
                self.report.add_metric(f"{verb}_{size_key(shape)}", f"{verb} {shape.entries:,} entries",
                                       target=TARGET)
        self.report.system_info = {
            "cshare": {"command": f"{cshare_command()} convert|restore TREE --quiet"},
            "chmod": {"command": "chmod -R 0755 TREE (once per metric, on the second tree)"},
        }
        self.report.system_info = {s: self.report.system_info[s] for s in systems}
        self.report.notes.append(
            "each command runs on a tree fresh from cp -a, after sync"
            + (" and drop_caches (cold)" if cold else " (metadata cached: warm)")
        )

    def settle(self) -> None:
        os.sync()  # the copy's dirty inodes are written back outside the timing
        if self.cold:
            drop_caches()

    def run(self) -> Report:
        if "cshare" in self.systems:
            self.startup()
        try:
            for r in range(self.repeat):
                for shape, golden in self.trees:
                    self.one_run(r, shape, golden)
        finally:
            remove_tree(WORK_ROOT)
        return self.report

    def startup(self) -> None:
        """How much of cshare's time is its fixed start-up: `cshare convert --quiet` of an empty directory."""
        times = []
        for _ in range(3):
            empty = WORK_ROOT / "startup"
            remove_tree(empty)
            empty.mkdir(parents=True)
            try:
                seconds, _, _ = run_timed([cshare_command(), "convert", str(empty), "--quiet"], 60,
                                          what="cshare convert of an empty directory")
            except BenchFailure:
                return
            finally:
                remove_tree(empty)
            times.append(seconds)
        self.report.system_info["cshare"]["startup_s"] = median(times)
        self.report.notes.append(
            "cshare's times include its start-up: `cshare convert` of an empty directory takes "
            f"{format_seconds(median(times))}"
        )

    def one_run(self, r: int, shape: Shape, golden: Path) -> None:
        run_dir = WORK_ROOT / f"run{r}"
        remove_tree(run_dir)
        run_dir.mkdir(parents=True)
        a, b = run_dir / "a", run_dir / "b"
        start = time.perf_counter()
        copy_trees(golden, (a, b), max(self.timeout, 900))
        console.print(f"[dim]run {r + 1}/{self.repeat}: two copies of the {shape.entries:,}-entry tree "
                      f"made in {time.perf_counter() - start:.1f} s[/dim]")
        size = size_key(shape)
        # Which of the pair goes first alternates between runs, so that neither
        # always meets the other's writeback.
        first_cshare = r % 2 == 0
        try:
            for verb in ("convert", "restore"):
                metric = f"{verb}_{size}"
                for system in (("cshare", "chmod") if first_cshare else ("chmod", "cshare")):
                    if system not in self.systems:
                        continue
                    if system == "chmod":
                        self.chmod_step(b, metric)
                    elif verb == "restore" and self.report.failed(f"convert_{size}", "cshare"):
                        self.report.fail(metric, "cshare", "not measured: convert failed")
                    else:
                        self.cshare_step(a, verb, metric, golden)
        finally:
            remove_tree(run_dir)

    def cshare_step(self, tree: Path, verb: str, metric: str, golden: Path) -> None:
        if self.report.failed(metric, "cshare"):
            return
        console.print(f"[dim]  cshare {verb}[/dim]")
        self.settle()
        try:
            seconds, _, _ = run_timed([cshare_command(), verb, str(tree), "--quiet"], self.timeout,
                                      what=f"cshare {verb}")
            if verb == "convert":
                check_converted(tree)
            else:
                check_restored(tree, golden)
        except BenchFailure as exc:
            self.report.fail(metric, "cshare", str(exc))
            console.print(f"[red]cshare {verb}: {exc}[/red]")
            return
        self.report.record(metric, "cshare", seconds)

    def chmod_step(self, tree: Path, metric: str) -> None:
        console.print(f"[dim]  chmod -R 0755 (baseline for {metric})[/dim]")
        self.settle()
        try:
            seconds, _, _ = run_timed(["chmod", "-R", "0755", str(tree)], self.timeout, what="chmod -R")
        except BenchFailure as exc:
            self.report.fail(metric, "chmod", str(exc))
            return
        self.report.record(metric, "chmod", seconds)


def collect(argv: list[str] | None = None) -> Report:
    """Run the benchmark, print its table and JSON, and return the report (for `make bench`)."""
    args = begin(PROG, "Time cshare convert and restore against chmod -R 0755.", SYSTEMS, "convert.json",
                 argv, root_because="cshare convert changes owners and modes; trees hold devices",
                 more_arguments=lambda p: p.add_argument(
                     "--cold", action="store_true", help="drop caches before each timed command"))
    trees = []
    for shape in QUICK if args.quick else FULL:
        name = f"convert-{size_key(shape)}"
        golden = prepared_data(name, {"version": 2, **shape.as_params()},
                               lambda root, shape=shape: build_tree(root, shape))
        trees.append((shape, golden))
    sizes = " and ".join(f"{shape.entries:,}" for shape, _ in trees)
    return timed_report(lambda: ConvertBench(trees, args.systems, args.repeat, args.timeout, args.cold).run(),
                        f"convert benchmark: medians of {args.repeat} run(s), {sizes} entries", args.json)


if __name__ == "__main__":
    run_collect(PROG, collect)
