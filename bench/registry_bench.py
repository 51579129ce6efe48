"""The registry benchmark: an image run lazily through the `registry` plugin vs `podman pull` + run.

Setup (each run of the benchmark, in /var/tmp/cshare-bench/registry-work, removed
at the end): a deterministic root filesystem of about 1 GB in 60,000 files
(busybox plus `data/dNNN/fNNNNN`, sizes 0-64 KiB with a few large files, half
random and half repetitive bytes so that compression has work of both kinds),
built into a private podman store as a base layer plus one layer per data
directory (podman 4.3.1's zstd:chunked compressor fails with "short write" on
some single layers of a few tens of MB), pushed `--compression-format
zstd:chunked` to Debian's docker-registry on 127.0.0.1.

Per run (the systems' order rotates between runs; page caches dropped first):
  first   lazy: empty cache, `cshare-overlay` mounts every layer from the
          registry, then `podman run --rootfs MNT` of a command that reads a
          handful of files and prints; pull: empty store, `podman pull`, then
          `podman run IMAGE` of the same command.  Timed from nothing on disk to
          the command's exit (its output is its last act).
  full    every regular file read once, in readdir order (as find or tar
          would): through a fresh
          lazy mount with an empty cache, and from the pulled image
          (`podman image mount`), page caches dropped.
Bytes fetched from the registry come from its own log (`http.response.written`).
Targets (issue 16): the first run fetches under 2% of the image's bytes and
takes under 10% of pull + run; a full read within 2x of the pulled image's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cshare.system import mountinfo

from .common import (
    DATA_ROOT,
    BenchFailure,
    Comparison,
    Report,
    begin,
    console,
    drop_caches,
    format_ratio,
    remove_tree,
    run_collect,
    run_timed,
    show,
)

PROG = "registry_bench"
SYSTEMS = ("lazy", "pull")
WORK_ROOT = DATA_ROOT / "registry-work"
REPO = "bench/big"
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""
PER_DIR = 1000


def reads(files: int) -> list[str]:
    """What the container reads besides its shell: a config file and three data files."""
    last = (files - 1) // PER_DIR
    return ["/etc/app.conf", "/data/d000/f00000", f"/data/d{last // 2:03d}/f00007",
            f"/data/d{last:03d}/f00011"]


def command(files: int) -> list[str]:
    return ["sh", "-c", f"cat {' '.join(reads(files))} >/dev/null && echo ready"]
_WRITTEN = re.compile(r'msg="response completed".* http\.response\.written=(\d+)')
READER = """
import os, sys
count = total = 0
for dirpath, dirnames, filenames in os.walk(sys.argv[1]):
    for name in filenames:
        path = os.path.join(dirpath, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, 'rb', buffering=0) as f:
                while block := f.read(1 << 20):
                    total += len(block)
            count += 1
print(count, total)
"""


# ------------------------------------------------------------------ the data
def build_rootfs(root: Path, files: int, total: int, seed: int = 16) -> None:
    """busybox, /etc/app.conf and `files` data files of about `total` bytes in all."""
    rng = random.Random(seed)
    (root / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "cat", "ls", "echo"):
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("etc", "dev", "proc", "sys", "tmp", "run"):
        (root / d).mkdir()
    (root / "etc/app.conf").write_text("answer = 42\n")
    per_dir = PER_DIR
    big = {rng.randrange(files) for _ in range(max(1, files // 6000))}  # a few large files
    mean = total / (files + 50 * len(big))
    for n in range(files):
        d = root / "data" / f"d{n // per_dir:03d}"
        if n % per_dir == 0:
            d.mkdir(parents=True)
        size = int(mean * 50) if n in big else int(rng.expovariate(1 / mean)) % (64 << 10)
        half = size // 2
        data = rng.randbytes(half) + (b"line %d of a text file\n" % n) * ((size - half) // 24 + 1)
        (d / f"f{n % per_dir:05d}").write_bytes(data[:size])


class Registry:
    """docker-registry on 127.0.0.1 at a free port, storage and log below `base`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.log = base / "registry.log"
        config = base / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
                          f"    rootdirectory: {base / 'storage'}\nhttp:\n  addr: {self.address}\n")
        if shutil.which("docker-registry") is None:
            raise BenchFailure("docker-registry: command not found (Debian package docker-registry)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                         stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BenchFailure(f"docker-registry did not start; see {self.log}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def mark(self) -> int:
        return self.log.stat().st_size

    def written_since(self, mark: int) -> int:
        time.sleep(0.3)  # the log line follows the answer
        with open(self.log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return sum(int(m.group(1)) for m in _WRITTEN.finditer(text))

    def manifest(self, repo: str, ref: str) -> tuple[dict[str, object], str]:
        req = urllib.request.Request(
            f"http://{self.address}/v2/{repo}/manifests/{ref}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(req, timeout=10) as answer:
            body = answer.read()
        return json.loads(body), "sha256:" + hashlib.sha256(body).hexdigest()


class Podman:
    """A private podman store below `base`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        # podman refuses a runroot path longer than 50 characters.
        self.runroot = Path(tempfile.mkdtemp(prefix="crb-", dir="/run"))
        (base / "containers.conf").write_text(CONTAINERS_CONF)
        self.env = dict(os.environ, CONTAINERS_CONF=str(base / "containers.conf"))

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.base / "root"), "--runroot",
                str(self.runroot), "--storage-driver", "overlay", *args]

    def run(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if proc.returncode != 0:
            raise BenchFailure(f"podman {args[0]}: {proc.stderr.strip().splitlines()[-1:]}")
        return proc.stdout

    def timed(self, *args: str, timeout: float) -> float:
        old = os.environ.get("CONTAINERS_CONF")
        os.environ["CONTAINERS_CONF"] = self.env["CONTAINERS_CONF"]
        try:
            return run_timed(self.argv(*args), timeout, what=f"podman {args[0]}")[0]
        finally:
            if old is None:
                os.environ.pop("CONTAINERS_CONF", None)
            else:
                os.environ["CONTAINERS_CONF"] = old

    def cleanup(self) -> None:
        subprocess.run(self.argv("rm", "-af"), capture_output=True, env=self.env)
        subprocess.run(self.argv("image", "unmount", "-a"), capture_output=True, env=self.env)
        subprocess.run(self.argv("rmi", "-af"), capture_output=True, env=self.env)
        unmount_below(self.base)
        unmount_below(self.runroot)
        remove_tree(self.base)
        remove_tree(self.runroot)


def unmount_below(path: Path) -> None:
    """Unmount whatever is still mounted at or below `path` (deepest first)."""
    for point in sorted(mountinfo.points_below(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


# ------------------------------------------------------------------ the benchmark
class RegistryBench:
    def __init__(self, args: object) -> None:
        self.args = args
        self.files = 6000 if args.quick else args.files  # type: ignore[attr-defined]
        self.total = (100 << 20) if args.quick else args.bytes  # type: ignore[attr-defined]
        self.timeout: float = max(args.timeout, 600.0)  # type: ignore[attr-defined]
        self.report = Report(
            "registry", SYSTEMS,
            [("first", "nothing on disk -> output of a container reading 5 files"),
             ("full", "cold full read of every file")],
            [Comparison("lazy", "pull")],
            params={"files": self.files, "bytes": self.total, "repeat": args.repeat,  # type: ignore[attr-defined]
                    "reads": reads(self.files)})
        self.fetched: dict[str, dict[str, list[int]]] = {m: {s: [] for s in SYSTEMS}
                                                         for m in ("first", "full")}
        self.read_counts: dict[str, set[tuple[int, int]]] = {s: set() for s in SYSTEMS}

    # -- setup
    def setup(self) -> None:
        remove_tree(WORK_ROOT)
        WORK_ROOT.mkdir(parents=True)
        rootfs = WORK_ROOT / "rootfs"
        self.registry = Registry(WORK_ROOT / "registry")
        self.source = Podman(WORK_ROOT / "source")
        with console.status(f"generating {self.files} files, {self.total >> 20} MiB, and "
                            "building the image …"):
            build_rootfs(rootfs, self.files, self.total)
            tarball = WORK_ROOT / "base.tar"
            subprocess.run(["tar", "--numeric-owner", "--exclude=./data", "-C", str(rootfs),
                            "-cf", str(tarball), "."], check=True)
            self.source.run("import", "--change", 'CMD ["/bin/sh"]', str(tarball),
                            "localhost/registry-bench-base:1")
            tarball.unlink()
            # One layer per data directory: podman 4.3.1's zstd:chunked compressor
            # fails ("short write") on some layers of a few tens of MB and more.
            dirs = sorted(p.name for p in (rootfs / "data").iterdir())
            (rootfs / "Containerfile").write_text(
                "FROM localhost/registry-bench-base:1\n"
                + "".join(f"COPY data/{d} /data/{d}\n" for d in dirs))
            self.source.run("build", "-q", "-t", "localhost/registry-bench:1", "-f",
                            str(rootfs / "Containerfile"), str(rootfs))
            remove_tree(rootfs)
        with console.status("podman push --compression-format zstd:chunked …"):
            self.image = f"{self.registry.address}/{REPO}:1"
            self.source.run("push", "--tls-verify=false", "--compression-format", "zstd:chunked",
                            "localhost/registry-bench:1", self.image)
        manifest, self.digest = self.registry.manifest(REPO, "1")
        layers = manifest["layers"]
        assert isinstance(layers, list)
        self.layers = len(layers)
        self.blob_bytes = sum(int(layer["size"]) for layer in layers)
        self.report.params.update(blob_bytes=self.blob_bytes, layers=self.layers)
        console.print(f"[dim]pushed {self.image}: {self.layers} layers, "
                      f"{self.blob_bytes / 1e6:.0f} MB compressed[/dim]")

    # -- the lazy side
    def _lazy_mount(self, base: Path) -> Path:
        for d in ("mnt", "upper", "work", "cache"):
            (base / d).mkdir(parents=True)
        (base / "cache").chmod(0o700)
        spec = base / "image.json"
        spec.write_text(json.dumps({"registry": self.registry.address, "repository": REPO,
                                    "manifest": self.digest, "tls_verify": False,
                                    "cache": str(base / "cache")}))
        lowers = ":".join(f"//registry/{i}/{spec}" for i in reversed(range(self.layers)))
        opts = (f"plugins=registry,lowerdir={lowers},upperdir={base / 'upper'},"
                f"workdir={base / 'work'}")
        run_timed([str(Path(sys.executable).parent / "cshare-overlay"), "-o", opts,
                   str(base / "mnt")], self.timeout, what="cshare-overlay")
        if mountinfo.find(base / "mnt") is None:
            raise BenchFailure(f"cshare-overlay exited 0 but {base / 'mnt'} is not mounted")
        return base / "mnt"

    def lazy_first(self, run: int) -> None:
        base = WORK_ROOT / f"lazy-first-{run}"
        pod = Podman(base / "podman")
        drop_caches()
        mark = self.registry.mark()
        start = time.perf_counter()
        try:
            mnt = self._lazy_mount(base)
            pod.timed("run", "--rm", "--network", "none", "--rootfs", str(mnt), *command(self.files),
                      timeout=self.timeout)
            self.report.record("first", "lazy", time.perf_counter() - start)
            self.fetched["first"]["lazy"].append(self.registry.written_since(mark))
        finally:
            pod.cleanup()
            unmount_below(base)
            remove_tree(base)

    def lazy_full(self, run: int) -> None:
        base = WORK_ROOT / f"lazy-full-{run}"
        try:
            mnt = self._lazy_mount(base)
            drop_caches()
            mark = self.registry.mark()
            self.report.record("full", "lazy", self._read_all(mnt, "lazy"))
            self.fetched["full"]["lazy"].append(self.registry.written_since(mark))
        finally:
            unmount_below(base)
            remove_tree(base)

    # -- the pull side
    def pull(self, run: int) -> None:
        base = WORK_ROOT / f"pull-{run}"
        pod = Podman(base)
        drop_caches()
        mark = self.registry.mark()
        try:
            took = pod.timed("pull", "-q", "--tls-verify=false", self.image, timeout=self.timeout)
            took += pod.timed("run", "--rm", "--network", "none", self.image, *command(self.files),
                              timeout=self.timeout)
            self.report.record("first", "pull", took)
            self.fetched["first"]["pull"].append(self.registry.written_since(mark))
            mounted = Path(pod.run("image", "mount", self.image).strip())
            drop_caches()
            self.report.record("full", "pull", self._read_all(mounted, "pull"))
            self.fetched["full"]["pull"].append(0)  # already on disk
        finally:
            pod.cleanup()

    def _read_all(self, root: Path, system: str) -> float:
        took, out, _ = run_timed([sys.executable, "-c", READER, str(root)], self.timeout,
                                 what="full read", capture_stdout=True)
        count, total = (int(x) for x in out.split())
        if count != self.files + 2:  # busybox and /etc/app.conf besides the data
            raise BenchFailure(f"full read of {root} found {count} files, not {self.files + 2}")
        self.read_counts[system].add((count, total))
        return took

    # -- the whole
    def run(self) -> Report:
        try:
            self.setup()
            steps = [(s, f) for s, f in (("lazy", self.lazy_first), ("pull", self.pull),
                                         ("lazy", self.lazy_full))
                     if s in self.args.systems]  # type: ignore[attr-defined]
            for run in range(self.args.repeat):  # type: ignore[attr-defined]
                order = steps[run % len(steps):] + steps[:run % len(steps)]
                for system, step in order:
                    console.print(f"[dim]run {run + 1}: {step.__name__}[/dim]")
                    try:
                        step(run)
                    except BenchFailure as exc:
                        metrics = ["first"] if step == self.lazy_first else (
                            ["full"] if step == self.lazy_full else ["first", "full"])
                        self.report.fail_all(metrics, system, str(exc))
        finally:
            if hasattr(self, "registry"):
                self.registry.stop()
            if hasattr(self, "source"):
                self.source.cleanup()
            unmount_below(WORK_ROOT)
            remove_tree(WORK_ROOT)
        self._conclude()
        return self.report

    def _conclude(self) -> None:
        r = self.report
        r.params["fetched_bytes"] = self.fetched
        if len({c for counts in self.read_counts.values() for c in counts}) > 1:
            r.notes.append(f"the full reads disagree on (files, bytes): {self.read_counts}")
        lazy_bytes = max(self.fetched["first"]["lazy"], default=None)
        pull_bytes = max(self.fetched["first"]["pull"], default=None)
        if lazy_bytes is not None:
            r.notes.append(f"first run fetched {lazy_bytes / 1e6:.1f} MB lazily "
                           f"({100 * lazy_bytes / self.blob_bytes:.2f}% of the image's "
                           f"{self.blob_bytes / 1e6:.0f} MB; target < 2%)"
                           + (f", {pull_bytes / 1e6:.0f} MB by podman pull" if pull_bytes else ""))
        first = r.ratio("first", r.comparisons[0])
        full = r.ratio("full", r.comparisons[0])
        for label, value, limit in (("first run", first, 0.10), ("full read", full, 2.0)):
            if value is not None:
                verdict = "met" if value <= limit else "NOT met"
                r.notes.append(f"{label}: lazy/pull {format_ratio(value)} "
                               f"(target <= {format_ratio(limit)}: {verdict})")


def collect(argv: list[str] | None = None) -> Report:
    """Run the benchmark, print its table and JSON, and return the report (for `make bench`)."""
    def more_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--files", type=int, default=60_000, help="data files (default 60000)")
        p.add_argument("--bytes", type=int, default=1 << 30, help="their total size (1 GiB)")

    args = begin(PROG, "Run an image lazily from a registry vs podman pull + run.", SYSTEMS, "registry.json",
                 argv, root_because="podman's root store, drop_caches, FUSE mounts",
                 more_arguments=more_arguments)
    report = RegistryBench(args).run()
    show(report, f"registry: {report.params['files']} files, "
                 f"{report.params['bytes'] >> 20} MiB, {args.repeat} run(s)", args.json)
    return report


if __name__ == "__main__":
    run_collect(PROG, collect)
