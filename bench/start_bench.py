"""The container-start benchmark: `podman run --rm IMAGE true` as an ordinary user.

What a user waits for when a container starts with cshare-overlay as
containers/storage's mount program (issue 14, point 1): podman runs the
mount program, waits for it to exit, and then runc's first lookups in the
rootfs wait for the daemon's first answers.  Measured, as user `alice` in a
home of the benchmark's own (HOME, XDG_RUNTIME_DIR, XDG_CONFIG_HOME below
DATA_ROOT/start-home, so her real podman state is never touched), with one
busybox image in her own rootless store and two storage.conf files that
differ only in `mount_program` (the same graph root, the same image):

  podman run        `podman run --rm localhost/cshare-bench-bb true`, timed
                    inside alice's session; runc, cgroupfs, the file events
                    logger and netns none, as in tests/podman_support.py
  mount ready /     inside `unshare --map-root-user --mount` (the namespace
  first answer      podman gives the mount program): from starting the
                    mount command until it has returned, and until a stat
                    inside the mount has come back

Systems: `cshare` (cshare-overlay with its mount server, cshare_fuse.server;
the warm-up run starts it), `cshare-direct` (CSHARE_OVERLAY_SERVER=0: every
mount starts its own interpreter and imports, as before the server) and
`fuse-overlayfs`.  Runs are interleaved, the order rotating; the first run of
each system is a warm-up and is not counted.  The podman pause process and
mount servers this benchmark started are stopped at the end.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cshare.system.runtime_dir import prepare_runtime_dir

from .common import (
    DATA_ROOT,
    BenchFailure,
    Comparison,
    Report,
    begin,
    console,
    remove_tree,
    run_collect,
    timed_report,
)
from .overlay_bench import cshare_overlay_command

PROG = "start_bench"
SYSTEMS = ("cshare", "cshare-direct", "fuse-overlayfs")
USER = "alice"
IMAGE = "localhost/cshare-bench-bb:latest"
HOME = DATA_ROOT / "start-home"

METRICS = (
    ("podman_run", "podman run --rm IMAGE true, rootless", 1.1),
    ("userns_ready", "mount ready, in a user namespace", None),
    ("userns_first", "first answer, in a user namespace", None),
)

CONTAINERS_CONF = """[containers]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

#: Both drivers time each command with bench.common.run_timed (to its exit,
#: through a pidfd), imported from this checkout, which is readable to the user.
TIMED_RUN = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from bench.common import BenchFailure, run_timed
"""

#: Runs as the user: every podman run, timed without runuser's own start.
PODMAN_DRIVER = TIMED_RUN + r"""
import json
spec = json.loads(sys.argv[1])
times = {s: [] for s in spec["systems"]}
for r in range(spec["runs"]):
    order = spec["systems"][r % len(spec["systems"]):] + spec["systems"][:r % len(spec["systems"])]
    for s in order:
        env = dict(os.environ, CONTAINERS_STORAGE_CONF=spec["conf"][s],
                   CSHARE_OVERLAY_SERVER="0" if s == "cshare-direct" else "1")
        try:
            took, _, _ = run_timed(["podman", "run", "--rm", spec["image"], "true"], spec["timeout"], env=env)
        except BenchFailure as exc:
            print(json.dumps({"error": f"{s}: {exc}"}))
            sys.exit(0)
        times[s].append(took)
print(json.dumps(times))
"""

#: Runs as the user inside `unshare --map-root-user --mount`: mount, stat, unmount.
MOUNT_DRIVER = TIMED_RUN + r"""
import json, subprocess
spec = json.loads(sys.argv[1])
base = spec["base"]
out = {s: {"ready": [], "first": []} for s in spec["systems"]}
for r in range(spec["runs"]):
    order = spec["systems"][r % len(spec["systems"]):] + spec["systems"][:r % len(spec["systems"])]
    for s in order:
        d = f"{base}/{s}-{r}"
        for sub in ("upper", "work", "mnt"):
            os.makedirs(f"{d}/{sub}")
        env = dict(os.environ, CSHARE_OVERLAY_SERVER="0" if s == "cshare-direct" else "1")
        cmd = [spec["program"][s], "-o", f"lowerdir={spec['lower']},upperdir={d}/upper,workdir={d}/work",
               f"{d}/mnt"]
        start = time.perf_counter()
        try:
            ready, _, _ = run_timed(cmd, spec["timeout"], env=env)
        except BenchFailure as exc:
            print(json.dumps({"error": f"{s}: {exc}"}))
            sys.exit(0)
        os.stat(f"{d}/mnt/bin")
        first = time.perf_counter() - start
        subprocess.run(["fusermount3", "-u", f"{d}/mnt"], check=True)
        if r > 0:  # run 0 is the warm-up (it also starts cshare's mount server)
            out[s]["ready"].append(ready)
            out[s]["first"].append(first)
        if r == 0:
            time.sleep(1.0)  # let a server started just now finish loading
print(json.dumps(out))
"""


class StartBench:
    def __init__(self, systems: list[str], repeat: int, timeout: float) -> None:
        self.systems = systems
        self.repeat = repeat
        self.timeout = timeout
        self.user = pwd.getpwnam(USER)
        self.report = Report(
            "start", systems, [],
            [Comparison("cshare", "fuse-overlayfs"), Comparison("cshare-direct", "fuse-overlayfs")],
            params={"repeat": repeat, "timeout_s": timeout, "user": USER, "image": IMAGE},
        )
        for key, label, target in METRICS:
            self.report.add_metric(key, label, target=target)
        self.program = {"cshare": cshare_overlay_command() or "cshare-overlay",
                        "cshare-direct": cshare_overlay_command() or "cshare-overlay",
                        "fuse-overlayfs": shutil.which("fuse-overlayfs") or "fuse-overlayfs"}

    # -- the user's environment
    def env(self) -> dict[str, str]:
        return {"HOME": str(HOME), "XDG_RUNTIME_DIR": str(HOME / "run"),
                "XDG_CONFIG_HOME": str(HOME / "config"), "XDG_DATA_HOME": str(HOME / "data"),
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                # Every podman call names a storage.conf: one without would set up
                # the store with another driver (vfs), and podman remembers it.
                "CONTAINERS_STORAGE_CONF": str(self.conf("fuse-overlayfs"))}

    def as_user(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        env_args = [f"{k}={v}" for k, v in self.env().items()]
        return subprocess.run(["runuser", "-u", USER, "--", "env", "-i", *env_args, *argv],
                              capture_output=True, text=True, timeout=timeout, cwd="/")

    def conf(self, system: str) -> Path:
        return HOME / f"storage-{system}.conf"

    def prepare(self) -> None:
        """alice's benchmark home: configuration, and the image once."""
        for d in ("run", "config/containers", "data"):
            (HOME / d).mkdir(parents=True, exist_ok=True)
        (HOME / "config/containers/containers.conf").write_text(CONTAINERS_CONF)
        for system in SYSTEMS:
            self.conf(system).write_text(
                f'[storage]\ndriver = "overlay"\n'
                f'graphroot = "{HOME}/data/containers/storage"\nrunroot = "{HOME}/run/containers"\n'
                f'[storage.options.overlay]\nmount_program = "{self.program[system]}"\n')
        os.chmod(HOME, 0o700)
        subprocess.run(["chown", "-R", f"{self.user.pw_uid}:{self.user.pw_gid}", str(HOME)], check=True)
        # HOME lives on across reboots (the image is kept), and so would its pause.pid.
        prepare_runtime_dir(self.user.pw_uid, self.user.pw_gid, HOME / "run")
        probe = self.as_user(["podman", "image", "exists", IMAGE], 120)
        if probe.returncode != 0:
            self.import_image()

    def import_image(self) -> None:
        busybox = shutil.which("busybox")
        if busybox is None:
            raise BenchFailure("busybox is not installed (Debian package busybox-static)")
        rootfs = HOME / "rootfs"
        remove_tree(rootfs)
        for d in ("bin", "etc", "dev", "proc", "sys", "tmp"):
            (rootfs / d).mkdir(parents=True)
        shutil.copy(busybox, rootfs / "bin" / "busybox")
        for applet in ("sh", "true", "ls", "cat"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        tarball = HOME / "rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        subprocess.run(["chown", "-R", f"{self.user.pw_uid}:{self.user.pw_gid}", str(rootfs), str(tarball)],
                       check=True)
        p = self.as_user(["podman", "import", str(tarball), IMAGE], 300)
        if p.returncode != 0:
            raise BenchFailure(f"podman import as {USER}: {p.stderr.strip()[-300:]}")

    # -- the measurements
    def run(self) -> Report:
        for s in self.systems:
            self.report.system_info[s] = {"mount_program": self.program[s]}
        try:
            self.prepare()
            self.podman_runs()
            self.mount_runs()
        except (BenchFailure, subprocess.SubprocessError, OSError) as exc:
            for s in self.systems:
                self.report.fail_all([k for k, _, _ in METRICS], s, str(exc))
        finally:
            self.stop_leftovers()
        return self.report

    def podman_runs(self) -> None:
        console.print(f"[dim]podman run as {USER}: {self.repeat} interleaved runs + 1 warm-up each[/dim]")
        spec = {"systems": self.systems, "runs": self.repeat + 1, "image": IMAGE, "timeout": self.timeout,
                "conf": {s: str(self.conf(s)) for s in self.systems}}
        data = self.driver(PODMAN_DRIVER, spec, [])
        if "error" in data:
            for s in self.systems:
                self.report.fail("podman_run", s, data["error"])
            return
        for r in range(1, self.repeat + 1):  # run 0 of each system is the warm-up
            for s in self.systems:
                self.report.record("podman_run", s, data[s][r])

    def mount_runs(self) -> None:
        console.print(f"[dim]mounts in {USER}'s user namespace: {self.repeat} interleaved runs[/dim]")
        base = Path(tempfile.mkdtemp(prefix="mounts-", dir=HOME))
        os.chown(base, self.user.pw_uid, self.user.pw_gid)
        lower = HOME / "rootfs"
        if not (lower / "bin").is_dir():
            self.import_image()
        spec = {"systems": self.systems, "runs": self.repeat + 1, "base": str(base), "lower": str(lower),
                "timeout": self.timeout, "program": self.program}
        try:
            data = self.driver(MOUNT_DRIVER, spec, ["unshare", "--map-root-user", "--mount"])
        finally:
            remove_tree(base)
        if "error" in data:
            for s in self.systems:
                self.report.fail_all(["userns_ready", "userns_first"], s, data["error"])
            return
        for r in range(self.repeat):
            for s in self.systems:
                self.report.record("userns_ready", s, data[s]["ready"][r])
                self.report.record("userns_first", s, data[s]["first"][r])

    def driver(self, script: str, spec: dict[str, object], prefix: list[str]) -> dict[str, object]:
        budget = self.timeout * (self.repeat + 1) * len(self.systems) + 60
        p = self.as_user([*prefix, sys.executable, "-c", script, json.dumps(spec)], budget)
        lines = p.stdout.strip().splitlines()
        if p.returncode != 0 or not lines:
            raise BenchFailure(f"driver as {USER} exited {p.returncode}: {p.stderr.strip()[-300:]}")
        result: dict[str, object] = json.loads(lines[-1])
        return result

    def stop_leftovers(self) -> None:
        """The podman pause process of the benchmark's home, and mount servers in its namespaces."""
        pause = HOME / "run" / "libpod" / "tmp" / "pause.pid"
        try:
            pid = int(pause.read_text())
            userns = os.stat(f"/proc/{pid}/ns/user").st_ino
        except (OSError, ValueError):
            return
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                same = os.stat(f"/proc/{entry}/ns/user").st_ino == userns
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    server = f.read().startswith(b"cshare-overlay: mount server")
            except OSError:
                continue
            if same and server:
                os.kill(int(entry), 15)
        try:
            os.kill(pid, 15)
        except OSError:
            pass
        time.sleep(0.2)


def collect(argv: list[str] | None = None) -> Report:
    """Run the benchmark, print its table and JSON, and return the report (for `make bench`)."""
    args = begin(PROG, "podman run and mount start as an ordinary user: cshare-overlay (with and without "
                 "its mount server) and fuse-overlayfs.", SYSTEMS, "start.json", argv,
                 root_because=f"it runs podman as {USER} in a home of its own")
    if args.quick:
        args.repeat = max(args.repeat, 3)
    else:
        args.repeat = max(args.repeat, 10)  # the issue asks for medians of at least 10
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True)
    if os.stat("/dev/fuse").st_mode & 0o777 != 0o666:
        os.chmod("/dev/fuse", 0o666)  # as tests/conftest.py: distributions ship it 0666
    # alice runs the checkout's code (an editable install points into it).
    subprocess.run(["chmod", "-R", "a+rX", str(Path(__file__).resolve().parent.parent)], capture_output=True)
    return timed_report(lambda: StartBench(args.systems, args.repeat, args.timeout).run(),
                        f"container start as {USER}: medians of {args.repeat} interleaved runs", args.json)


if __name__ == "__main__":
    run_collect(PROG, collect)
