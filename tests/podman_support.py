"""Test support for podman: a private containers/storage store and test images in it.

Tests never touch the machine's real podman store: `PodmanStore` runs
`podman --root DIR --runroot DIR2 --storage-driver overlay` with a
containers.conf that works on this machine (runc, ulimits: machine-notes.md),
and cshare's `--storage-root` points at DIR.

Images, all built from local root filesystems (no registry):

- `localhost/cshare-demo:latest`: the built-in demo image (cshare.demo.image);
- `localhost/tinybb:latest`: busybox, a file /f and a directory /d (with /d/old);
- `localhost/tinybb-changed:latest`: tinybb plus one layer made by a container
  that ran `rm /f; rm -rf /d; mkdir /d; touch /d/new` (podman commit): its top
  layer holds a whiteout for /f and /d marked opaque.

Building them takes about two seconds, so they are made once per test session.
Fixtures defined here can be imported by several test modules; the work is
memoised in this module so that it still happens only once.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import is_root, require, unmount_all_below

CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""

DEMO = "localhost/cshare-demo:latest"
BASE = "localhost/tinybb:latest"
CHANGED = "localhost/tinybb-changed:latest"
CHANGE_SCRIPT = "rm /f; rm -rf /d; mkdir /d; touch /d/new"


def podman_usable() -> bool:
    return shutil.which("podman") is not None and shutil.which("runc") is not None


def require_podman() -> None:
    require(is_root(), "root (to run podman with a private root store)")
    require(podman_usable(), "podman and runc (Debian packages podman runc)")
    require(shutil.which("busybox") is not None, "busybox (Debian package busybox-static)")


@dataclass
class PodmanStore:
    """A private podman store below `base`."""

    base: Path

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def runroot(self) -> Path:
        return self.base / "runroot"

    @property
    def conf(self) -> Path:
        return self.base / "containers.conf"

    @property
    def args(self) -> list[str]:
        """Global podman options that select this store."""
        return [
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "overlay",
        ]

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, CONTAINERS_CONF=str(self.conf))

    def setup(self) -> PodmanStore:
        self.base.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONTAINERS_CONF)
        return self

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["podman", *self.args, *args], capture_output=True, text=True, env=self.env, timeout=120
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
        return proc

    def import_rootfs(self, rootfs: Path, name: str, changes: Sequence[str] = ()) -> str:
        """Tar `rootfs` with numeric owners and import it; return the image id."""
        with tempfile.TemporaryDirectory(dir=self.base) as tmp:
            tarball = Path(tmp) / "rootfs.tar"
            subprocess.run(
                ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(tarball), "."],
                check=True,
            )
            opts = [x for c in changes for x in ("--change", c)]
            out = self.podman("import", *opts, str(tarball), name).stdout
        return out.strip().splitlines()[-1].removeprefix("sha256:")

    def image_id(self, name: str) -> str:
        return self.podman("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()

    def inspect(self, name: str, fmt: str) -> str:
        return self.podman("image", "inspect", "--format", fmt, name).stdout.strip()

    def cleanup(self) -> None:
        self.podman("rm", "-af", check=False)
        unmount_all_below(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


def build_busybox_rootfs(root: Path) -> Path:
    """busybox-static with a few applets, /f and /d/old: the base of the whiteout test."""
    (root / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "ls", "rm", "mkdir", "touch", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("etc", "dev", "proc", "sys", "tmp", "d"):
        (root / d).mkdir()
    (root / "f").write_text("deleted in the top layer\n")
    (root / "d" / "old").write_text("hidden by the opaque dir\n")
    return root


@dataclass
class PodmanImages:
    store: PodmanStore
    demo_id: str
    base_id: str
    changed_id: str


_memo: dict[str, PodmanImages] = {}


def _make_images() -> PodmanImages:
    base = Path(tempfile.mkdtemp(prefix="cshare-podman-", dir="/var/tmp"))
    store = PodmanStore(base).setup()
    atexit.register(store.cleanup)  # also if a test run is interrupted
    from cshare.demo.image import import_demo_image

    demo_id = import_demo_image(DEMO, store.args, env=store.env)
    rootfs = build_busybox_rootfs(base / "tinybb-rootfs")
    base_id = store.import_rootfs(rootfs, BASE, ['CMD ["/bin/sh"]'])
    store.podman("run", "--name", "changer", "--network", "none", BASE, "sh", "-c", CHANGE_SCRIPT)
    store.podman("commit", "-q", "changer", CHANGED)
    store.podman("rm", "changer")
    return PodmanImages(store, demo_id, base_id, store.image_id(CHANGED))


@pytest.fixture(scope="session")
def podman_images() -> Iterator[PodmanImages]:
    """The private podman store with the demo, base and changed images (made once)."""
    require_podman()
    if "images" not in _memo:
        _memo["images"] = _make_images()
    yield _memo["images"]


@pytest.fixture(scope="session")
def podman_store(podman_images: PodmanImages) -> PodmanStore:
    return podman_images.store
