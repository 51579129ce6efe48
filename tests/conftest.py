"""Shared test policy and fixtures.

Policy: a test that needs root, FUSE, a second user or podman runs in CI and
never skips there (CI sets CI=true and runs as root): `require` fails the test
instead.  Outside CI it skips, naming exactly what is missing.

Helper modules next to this file (`*_support.py`) hold the fixtures of one
area; this file holds only what every area shares.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cshare.system.mountinfo import points_below

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
VENV_BIN = Path(sys.executable).parent


def require(ok: bool, what: str) -> None:
    """Skip (outside CI) or fail (in CI) unless `ok`; `what` names what is missing."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI must provide {what}", pytrace=False)
    pytest.skip(f"needs {what}")


def tool(name: str) -> str:
    """Absolute path of one of our commands, from the running venv or PATH."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    require(found is not None, f"the {name} command (run scripts/install)")
    assert found is not None
    return found


def is_root() -> bool:
    return os.geteuid() == 0


def fuse_usable() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


@pytest.fixture
def as_root() -> None:
    require(is_root(), "root")


@pytest.fixture
def fuse() -> None:
    require(fuse_usable(), "/dev/fuse and fusermount3 (Debian package fuse3)")


@pytest.fixture
def root_fuse(as_root: None, fuse: None) -> None:
    """Root and FUSE: enough for a cshare-overlay mount next to a kernel overlay."""


def ensure_user(name: str) -> pwd.struct_passwd:
    """An ordinary user with a subordinate id range (useradd gives 65536 ids)."""
    require(is_root(), f"root to create the test user {name}")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        return pwd.getpwnam(name)


def make_fuse_usable_for_users() -> None:
    """/dev/fuse is 0600 on this machine; distributions ship it 0666 (machine-notes.md)."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    if mode != 0o666:
        os.chmod("/dev/fuse", 0o666)


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A scratch directory every user can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="cshare-test-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        unmount_all_below(path)
        shutil.rmtree(path, ignore_errors=True)


def unmount_all_below(path: Path) -> None:
    """Lazily unmount anything mounted at or below `path` (teardown after a failure)."""
    try:
        points = points_below(path.resolve())
    except OSError:
        return
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True)
