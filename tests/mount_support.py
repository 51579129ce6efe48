"""Test support for `cshare mount` as ordinary users: a shared store, users, and runs as them.

- `shared_demo` (session fixture): the demo image (podman_support's private
  podman store) made shared into a store under /var/tmp that alice and bob can
  read.  Made once per session.
- `RootlessUser`: alice or bob, ready for rootless podman (subordinate ids,
  /run/user/UID, a containers.conf with runc: machine-notes.md), with `run` and
  `popen` that start a command as that user with a clean environment.
- `store_checksum`: a digest of every file's content and metadata under a
  tree, written independently of cshare's own code so it can judge it.
- `kill_overlays_below`: the teardown for mounts that live in a user's
  podman namespace, which root's `umount` cannot reach.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import VENV_BIN, ensure_user, make_fuse_usable_for_users, require
from podman_support import DEMO, PodmanImages

from cshare.system.procfs import runs_overlay_program
from cshare.system.runtime_dir import prepare_runtime_dir

USER_CONTAINERS_CONF = """[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@dataclass
class SharedDemo:
    store: Path
    image: str
    image_id: str
    layers: list[Path]


_memo: dict[str, SharedDemo] = {}


@pytest.fixture(scope="session")
def shared_demo(podman_images: PodmanImages) -> Iterator[SharedDemo]:
    """The demo image, make-shared into a store every user can read (made once)."""
    if "demo" not in _memo:
        from cshare.store.make_shared import make_shared
        from cshare.store.shared import SharedStore

        base = Path(tempfile.mkdtemp(prefix="cshare-mountstore-", dir="/var/tmp"))
        base.chmod(0o755)
        import atexit

        atexit.register(shutil.rmtree, base, True)
        store = base / "store"
        make_shared(DEMO, storage_root=podman_images.store.root, store_root=store)
        shared = SharedStore(store)
        with shared.read_lock():
            record = shared.resolve(DEMO)
            layers = shared.lower_dirs(record)
        _memo["demo"] = SharedDemo(store, DEMO, record.id, layers)
    yield _memo["demo"]


@dataclass
class RootlessUser:
    name: str
    uid: int
    gid: int
    home: Path
    conf: Path
    data_home: Path | None  # None: cshare's default, ~/.local/share

    def env(self) -> dict[str, str]:
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "XDG_RUNTIME_DIR": f"/run/user/{self.uid}",
            "CONTAINERS_CONF": str(self.conf),
            "LANG": "C.UTF-8",
        }
        if self.data_home is not None:
            env["XDG_DATA_HOME"] = str(self.data_home)
        # Lets the whole suite be pointed at another overlay program (brief: fuse-overlayfs).
        if os.environ.get("CSHARE_OVERLAY_CMD"):
            env["CSHARE_OVERLAY_CMD"] = os.environ["CSHARE_OVERLAY_CMD"]
        return env

    def _kwargs(self) -> dict[str, object]:
        return dict(
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            env=self.env(),
            cwd=str(self.home),
            text=True,
        )

    def run(self, argv: Sequence[str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, timeout=timeout, check=False, **self._kwargs()  # type: ignore[call-overload]
        )

    def popen(self, argv: Sequence[str], stdin: int | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            list(argv), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            **self._kwargs(),  # type: ignore[call-overload]
        )

    def sh(self, script: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], timeout=timeout)


def rootless_user(name: str, scratch: Path, data_home: bool = True) -> RootlessUser:
    """`name` ready for rootless podman and FUSE; its cshare data under `scratch` if data_home."""
    entry = ensure_user(name)
    require(shutil.which("newuidmap") is not None, "newuidmap (Debian package uidmap)")
    make_fuse_usable_for_users()
    prepare_runtime_dir(entry.pw_uid, entry.pw_gid)  # without a stale pause.pid podman would trust
    conf = scratch / f"containers-{name}.conf"
    conf.write_text(USER_CONTAINERS_CONF)
    conf.chmod(0o644)
    data = None
    if data_home:
        data = scratch / f"data-{name}"
        data.mkdir(mode=0o700)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    return RootlessUser(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), conf, data)


def user_dir(user: RootlessUser, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.uid, user.gid)
    return path


def cshare_cmd() -> str:
    return str(VENV_BIN / "cshare") if (VENV_BIN / "cshare").exists() else "cshare"


def _entry_digest(path: str) -> str:
    st = os.lstat(path)
    h = hashlib.sha256(
        f"{st.st_mode:o}|{st.st_uid}|{st.st_gid}|{st.st_size}|{st.st_rdev}|"
        f"{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_nlink}".encode()
    )
    if stat.S_ISLNK(st.st_mode):
        h.update(os.readlink(path).encode())
        return h.hexdigest()
    for key in sorted(os.listxattr(path, follow_symlinks=False)):
        h.update(key.encode() + b"=" + os.getxattr(path, key, follow_symlinks=False))
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def store_checksum(root: Path) -> dict[str, str]:
    """Relative path -> digest of type, mode, owner, size, times, links, xattrs, content."""
    out = {".": _entry_digest(str(root))}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = _entry_digest(path)
    return out


def overlay_pids_below(scratch: Path) -> list[int]:
    """Pids of overlay daemons whose mountpoint is below `scratch` (argv's last word)."""
    prefix = str(scratch) + "/"
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if len(argv) >= 2 and argv[-1].decode(errors="replace").startswith(prefix) and (
            runs_overlay_program(int(entry.name), argv)
        ):
            pids.append(int(entry.name))
    return pids


def kill_overlays_below(users: Sequence[RootlessUser], scratch: Path, mounts: Sequence[Path]) -> None:
    """Teardown: unmount in each user's podman namespace, then stop any overlay left."""
    for user in users:
        for mnt in mounts:
            user.run(["podman", "unshare", "umount", "-l", str(mnt)], timeout=30)
    for pid in overlay_pids_below(scratch):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
