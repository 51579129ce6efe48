"""A/B timing of the bundled plugins' paths: one cshare_fuse tree against another.

    python -m bench.plugin_ab --base /path/to/old/checkout [--runs 7]

Mounts the same generated tree as a plain directory layer, through `//test//`,
and packed as `//tar//`, with cshare-overlay, once with the code of this checkout (B) and
once with `--base` first on PYTHONPATH (A), alternating A and B run by run
(the machine is shared, so only interleaved ratios mean anything).  Each run
is a fresh mount: walk with lstat of every entry (first and second time), then
open and read every small file (first and second time).  Prints per metric
the median B/A ratio and the range of the per-run ratios, and the same for
the daemon's CPU time over the four steps (robust against other load).  Needs root (it
mounts).  Not part of `make bench`: it compares two versions of cshare, not
cshare with its peers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

DIRS, FILES = 40, 100  # 4,000 small files


def build(root: Path) -> None:
    for d in range(DIRS):
        sub = root / f"d{d:02}"
        sub.mkdir(parents=True)
        for f in range(FILES):
            (sub / f"f{f:03}").write_bytes(os.urandom(200 + f))
        os.symlink("f000", sub / "link")


def walk(mnt: Path) -> float:
    start = time.perf_counter()
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
    return time.perf_counter() - start


def read_all(mnt: Path) -> float:
    start = time.perf_counter()
    for d in range(DIRS):
        for f in range(FILES):
            with open(mnt / f"d{d:02}" / f"f{f:03}", "rb") as fh:
                fh.read()
    return time.perf_counter() - start


def daemon_pid(mnt: Path) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"cshare-overlay") for a in argv) and os.fsencode(mnt) in argv:
            return int(entry)
    raise RuntimeError(f"no cshare-overlay daemon for {mnt}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(overlay: str, lower: str, base: Path, pythonpath: str | None) -> dict[str, float]:
    mnt = base / "mnt"
    for d in ("up", "work", "mnt"):
        shutil.rmtree(base / d, ignore_errors=True)
        (base / d).mkdir()
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the --base checkout as it is
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    opts = f"lowerdir={lower},upperdir={base / 'up'},workdir={base / 'work'}"
    subprocess.run([overlay, "-o", opts, str(mnt)], check=True, env=env)
    try:
        os.stat(mnt)
        daemon = daemon_pid(mnt)
        before = cpu_seconds(daemon)
        out = {"walk, first": walk(mnt), "walk, again": walk(mnt),
               "read 4,000 files, first": read_all(mnt),
               "read 4,000 files, again": read_all(mnt)}
        # The daemon's own CPU time for all of the above: what the code costs,
        # much less disturbed by other load on the machine than wall time.
        out["daemon CPU, all four"] = cpu_seconds(daemon) - before
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="plugin_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="checkout whose cshare_fuse is A")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    overlay = str(Path(sys.executable).parent / "cshare-overlay")
    work = Path(tempfile.mkdtemp(prefix="plugin-ab-", dir="/var/tmp"))
    try:
        tree = work / "tree"
        build(tree)
        cache = work / "cache"
        cache.mkdir()
        with tarfile.open(cache / "layer.tar", "w") as tar:
            tar.add(tree, arcname=".")
        lowers = {"direct": str(tree), "test": f"//test//{tree}", "tar": f"//tar//{cache}"}
        results: dict[str, dict[str, list[float]]] = {}
        for lower in lowers.values():
            one_run(overlay, lower, work, None)  # warm-up: the tar cache is extracted once
        for run in range(args.runs):
            for plugin, lower in lowers.items():
                order = [("A", args.base), ("B", None)]
                if run % 2:
                    order.reverse()
                timings = {label: one_run(overlay, lower, work, path) for label, path in order}
                for metric in timings["A"]:
                    ratio = timings["B"][metric] / timings["A"][metric]
                    results.setdefault(f"{plugin}: {metric}", {}).setdefault("ratio", []).append(ratio)
                    results[f"{plugin}: {metric}"].setdefault("A", []).append(timings["A"][metric])
                    results[f"{plugin}: {metric}"].setdefault("B", []).append(timings["B"][metric])
        print(f"{'metric':34} {'A ms':>8} {'B ms':>8} {'B/A':>6}  range of {args.runs} runs")
        for metric, series in results.items():
            ratios = series["ratio"]
            print(f"{metric:34} {statistics.median(series['A']) * 1e3:8.1f} "
                  f"{statistics.median(series['B']) * 1e3:8.1f} {statistics.median(ratios):6.2f}"
                  f"  {min(ratios):.2f}-{max(ratios):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
