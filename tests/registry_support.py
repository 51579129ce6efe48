"""Test support for the registry plugin: a real registry on loopback and images pushed to it.

- `LoopbackRegistry`: Debian's `docker-registry` (distribution 2.8) serving a
  temporary storage directory on 127.0.0.1 at a free port.  Its log records
  the bytes of every answer (`http.response.written`), which is how tests
  count what a mount fetched; `blob_file` is a blob's file in its storage, which
  a test may damage.
- `build_test_image(store, base)`: a two-layer image in a private podman store
  with chosen owners and modes, setuid/setgid, devices, a fifo, hardlinks,
  symlinks, an xattr, a sticky directory, a 2 MiB random file; its second
  layer (a container's changes, `podman commit`) holds a whiteout and an
  opaque directory.
- `push(store, image, registry, repo)`: `podman push --compression-format
  zstd:chunked` (or another format) to the registry; returns the manifest digest.
- `write_spec(...)`: the registry plugin's image description file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from conftest import require
from podman_support import PodmanStore

CHANGE_SCRIPT = ("rm /f; rm -rf /d; mkdir /d; touch /d/new; echo two > /etc/added; "
                 "chown 5:6 /etc/added; chmod 0604 /etc/added")
_WRITTEN = re.compile(r'msg="response completed".* http\.response\.written=(\d+)')


def require_registry() -> None:
    require(shutil.which("docker-registry") is not None,
            "docker-registry (Debian package docker-registry)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LoopbackRegistry:
    """docker-registry on 127.0.0.1 with its storage and log below `base`."""

    base: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.base / "storage"

    @property
    def log(self) -> Path:
        return self.base / "registry.log"

    def start(self) -> LoopbackRegistry:
        require_registry()
        self.base.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a free port can be taken between the probe and the bind
            self.port = self.port or free_port()
            config = self.base / "config.yml"
            config.write_text(f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
                              f"    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
                              f"http:\n  addr: {self.address}\n")
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                             stdout=log, stderr=log)
            if self._wait_ready():
                return self
            self.stop()
            self.port = 0
        raise RuntimeError(f"docker-registry did not start; see {self.log}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as answer:
                    if answer.status == 200:
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def mark(self) -> int:
        """A position in the log: `written_since(mark)` counts answers after it."""
        return self.log.stat().st_size if self.log.exists() else 0

    def written_since(self, mark: int, settle: float = 0.3) -> int:
        """Bytes the registry sent since `mark` (its own per-answer log lines)."""
        time.sleep(settle)  # the log line follows the answer
        with open(self.log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return sum(int(m.group(1)) for m in _WRITTEN.finditer(text))

    def manifest(self, repo: str, ref: str) -> tuple[dict[str, object], str]:
        req = urllib.request.Request(
            f"http://{self.address}/v2/{repo}/manifests/{ref}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                               "application/vnd.docker.distribution.manifest.v2+json"})
        with urllib.request.urlopen(req, timeout=10) as answer:
            body = answer.read()
        return json.loads(body), "sha256:" + hashlib.sha256(body).hexdigest()

    def blob_file(self, digest: str) -> Path:
        hexpart = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def push(store: PodmanStore, image: str, registry: LoopbackRegistry, repo: str,
         compression: str = "zstd:chunked") -> str:
    """Push `image` as REPO:1; the manifest's digest."""
    store.podman("push", "--tls-verify=false", "--compression-format", compression,
                 image, f"{registry.address}/{repo}:1")
    return registry.manifest(repo, "1")[1]


def _node(path: Path, kind: int, mode: int, rdev: int = 0, owner: tuple[int, int] = (0, 0)) -> None:
    os.mknod(path, kind | mode, rdev)
    os.chown(path, *owner, follow_symlinks=False)
    os.chmod(path, mode)


def _file(path: Path, data: bytes, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)


def build_rootfs(root: Path, seed: int = 16) -> None:
    """The first layer's tree (root only: mknod, chown)."""
    (root / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "ls", "rm", "mkdir", "touch", "cat", "chown", "chmod", "stat", "id",
                   "sha256sum", "find"):
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("dev", "proc", "sys", "etc", "run", "usr/share", "d"):
        (root / d).mkdir(parents=True)
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    _file(root / "etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o600)
    _file(root / "var/www/index.html", b"<p>www-data's page</p>\n", 0o640, (33, 33))
    (root / "root").mkdir(mode=0o700)
    _file(root / "root/secret", b"only root\n", 0o600)
    _file(root / "usr/bin/setuid-tool", b"#!/bin/sh\nid\n", 0o4755)
    _file(root / "usr/bin/setgid-tool", b"#!/bin/sh\nid\n", 0o2755, (0, 42))
    _file(root / "usr/share/a", b"one inode, two names\n", 0o444, (7, 7))
    os.link(root / "usr/share/a", root / "usr/share/b")
    _node(root / "dev/null", stat.S_IFCHR, 0o666, os.makedev(1, 3))
    _node(root / "dev/sda", stat.S_IFBLK, 0o660, os.makedev(8, 0), (0, 6))
    _node(root / "run/fifo", stat.S_IFIFO, 0o620, 0, (1000, 100))
    (root / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
    (root / "lib").symlink_to("usr/lib")
    _file(root / "etc/tagged", b"with an xattr\n", 0o644)
    os.setxattr(root / "etc/tagged", "user.test", b"registry")
    _file(root / "f", b"deleted in the top layer\n", 0o644)
    _file(root / "d/old", b"hidden by the opaque directory\n", 0o644)
    _file(root / "data/small.txt", b"a small file\n", 0o644)
    _file(root / "data/random.bin", random.Random(seed).randbytes(2 << 20), 0o644)


@dataclass
class TestImage:
    __test__ = False

    name: str
    store: PodmanStore


def build_test_image(store: PodmanStore, base: Path, name: str, seed: int = 16) -> TestImage:
    """Two layers: build_rootfs, then CHANGE_SCRIPT run in a container and committed."""
    rootfs = base / f"rootfs-{seed}"
    build_rootfs(rootfs, seed)
    lower = f"{name}-base"
    store.import_rootfs(rootfs, lower, ['CMD ["/bin/sh"]'])
    container = f"registry-changer-{seed}"
    store.podman("run", "--name", container, "--network", "none", lower, "sh", "-c", CHANGE_SCRIPT)
    store.podman("commit", "-q", container, name)
    store.podman("rm", container)
    shutil.rmtree(rootfs)
    return TestImage(name, store)


def write_spec(path: Path, registry: LoopbackRegistry, repo: str, manifest: str, cache: Path,
               **extra: object) -> Path:
    doc = {"registry": registry.address, "repository": repo, "manifest": manifest,
           "tls_verify": False, "cache": str(cache), **extra}
    path.write_text(json.dumps(doc))
    path.chmod(0o644)
    return path


def lowerdir_for(spec: Path, layers: int) -> str:
    """lowerdir= for every layer of the image, the top one first."""
    return ":".join(f"//registry/{i}/{spec}" for i in reversed(range(layers)))
