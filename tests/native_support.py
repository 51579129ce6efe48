"""Test support for the podman-native path: a multi-layer image, a shared store, users with their own podman.

- `native_image` (session fixture): root builds, in a private podman store,
  `localhost/cshare-e2e:latest`, two layers:
  1. imported from a tree holding a root 0600 file, a root 0700 directory, a
     uid-33 0640 file, a setuid-root probe program, a probe program with a
     file capability (cap_dac_override, effective), a device node, a fifo,
     a symlink, a file and a directory the next layer removes;
  2. made by a container (`podman commit`) that deletes the file (a
     whiteout) and replaces the directory (opaque), with the run config
     (entrypoint, cmd, env, workdir, user, a label) set by `--change`;
  and `localhost/cshare-e2e-second:latest`, another layer on the same base.
  The probe is a tiny static C program: it prints its euid and whether it
  could open the file it is given (busybox drops setuid privileges itself).
- `PodmanUser`: alice or bob with a podman of their own below the test's
  scratch directory (XDG_RUNTIME_DIR, XDG_CONFIG_HOME, graph root), so the
  test starts its own rootless podman namespace (seeing the test's mounts)
  and ends it (`stop`), and touches nothing of the user's real podman.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import VENV_BIN, ensure_user, make_fuse_usable_for_users, require
from podman_support import PodmanStore, require_podman

IMAGE = "localhost/cshare-e2e:latest"
SECOND = "localhost/cshare-e2e-second:latest"
PROBE_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    printf("euid=%d\n", (int)geteuid());
    if (argc > 1) printf("open=%s\n", open(argv[1], O_RDONLY) >= 0 ? "ok" : "denied");
    return 0;
}
"""
#: In podman's default bounding set (a file capability outside it makes exec fail).
CAP_DAC_OVERRIDE = 1
#: struct vfs_cap_data, revision 2, effective flag set: permitted = {cap_dac_override}.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << CAP_DAC_OVERRIDE, 0, 0, 0)
CHANGE_SCRIPT = "rm /etc/gone; rm -rf /opt/d; mkdir /opt/d; touch /opt/d/new"
CHANGES = [
    'ENTRYPOINT ["/bin/sh", "-c"]',
    'CMD ["echo cmd-ran; id -u; pwd; echo greeting=$GREETING"]',
    "ENV GREETING=hello",
    "WORKDIR /var/www",
    "USER 33",
    "LABEL org.example.e2e=yes",
]
USER_CONTAINERS_CONF = """[containers]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def _probe(path: Path) -> None:
    require(shutil.which("gcc") is not None, "gcc (to build the probe program)")
    src = path.with_suffix(".c")
    src.write_text(PROBE_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(path), str(src)], check=True)
    src.unlink()


def build_rootfs(root: Path) -> Path:
    """The base layer's tree (needs root: owners, a device node, a capability)."""
    from cshare.demo.image import build_demo_rootfs

    build_demo_rootfs(root)
    for applet in ("sleep", "id", "stat", "ls", "cat", "pwd"):
        if not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    suid = root / "usr/bin/suid-probe"
    _probe(suid)
    os.chmod(suid, 0o4755)
    cap = root / "usr/bin/cap-probe"
    shutil.copyfile(suid, cap)
    os.chmod(cap, 0o755)
    os.setxattr(cap, "security.capability", CAPABILITY)
    (root / "opt").mkdir(exist_ok=True)
    os.mkfifo(root / "run/fifo", 0o640)
    os.mknod(root / "opt/null", 0o020666, os.makedev(1, 3))  # podman hides the image's /dev
    os.chmod(root / "opt/null", 0o666)
    (root / "etc/gone").write_text("deleted by the top layer\n")
    (root / "opt/d").mkdir(parents=True, exist_ok=True)
    (root / "opt/d/old").write_text("hidden by the opaque directory\n")
    (root / "etc/secret-link").symlink_to("secret")
    return root


@dataclass
class NativeImages:
    store: PodmanStore
    image_id: str
    second_id: str


_memo: dict[str, NativeImages] = {}


def _make() -> NativeImages:
    import atexit

    base = Path(tempfile.mkdtemp(prefix="cshare-e2e-podman-", dir="/var/tmp"))
    store = PodmanStore(base).setup()
    atexit.register(store.cleanup)
    rootfs = build_rootfs(base / "rootfs")
    store.import_rootfs(rootfs, "localhost/cshare-e2e-base:latest")
    store.podman("run", "--name", "changer", "--network", "none", "--entrypoint", "/bin/sh",
                 "localhost/cshare-e2e-base:latest", "-c", CHANGE_SCRIPT)
    store.podman("commit", "-q", *[x for c in CHANGES for x in ("--change", c)], "changer", IMAGE)
    store.podman("run", "--name", "second", "--network", "none", "--entrypoint", "/bin/sh",
                 "localhost/cshare-e2e-base:latest", "-c", "echo second > /second")
    store.podman("commit", "-q", "second", SECOND)
    store.podman("rm", "changer", "second")
    return NativeImages(store, store.image_id(IMAGE), store.image_id(SECOND))


@pytest.fixture(scope="session")
def native_images() -> Iterator[NativeImages]:
    require_podman()
    if "images" not in _memo:
        _memo["images"] = _make()
    yield _memo["images"]


@dataclass
class PodmanUser:
    """A real user with a private podman below `base` (config, runtime dir, graph root)."""

    name: str
    uid: int
    gid: int
    base: Path

    @property
    def config_home(self) -> Path:
        return self.base / "config"

    @property
    def storage_conf(self) -> Path:
        return self.config_home / "containers" / "storage.conf"

    @property
    def runtime_dir(self) -> Path:
        return self.base / "run"

    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.base / "home"),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.config_home),
            "LANG": "C.UTF-8",
        }

    def run(self, argv: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              user=self.uid, group=self.gid, extra_groups=[], env=self.env(),
                              cwd=str(self.base / "home"))

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                user=self.uid, group=self.gid, extra_groups=[], env=self.env(),
                                cwd=str(self.base / "home"))

    def sh(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], timeout=timeout)

    def stop(self) -> None:
        """Remove the user's containers and end the podman namespace this test started."""
        self.run(["podman", "rm", "-af", "-t", "0"], timeout=60)
        pidfile = self.runtime_dir / "libpod" / "tmp" / "pause.pid"
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def podman_user(name: str, scratch: Path) -> PodmanUser:
    """`name` with a podman of its own below `scratch`, a storage.conf naming a private graph root."""
    entry = ensure_user(name)
    require(shutil.which("newuidmap") is not None, "newuidmap (Debian package uidmap)")
    make_fuse_usable_for_users()
    base = scratch / f"user-{name}"
    user = PodmanUser(name, entry.pw_uid, entry.pw_gid, base)
    for d in (base, base / "home", user.runtime_dir, user.config_home, user.config_home / "containers"):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, entry.pw_uid, entry.pw_gid)
    user.runtime_dir.chmod(0o700)
    (user.config_home / "containers" / "containers.conf").write_text(USER_CONTAINERS_CONF)
    # The user's own settings, which cshare setup must keep.
    user.storage_conf.write_text(
        "# alice's own storage settings\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{base}/graph"\n'
        f'runroot = "{user.runtime_dir}/containers"\n'
    )
    for f in (user.storage_conf, user.config_home / "containers" / "containers.conf"):
        os.chown(f, entry.pw_uid, entry.pw_gid)
    return user
