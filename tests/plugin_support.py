"""Test support for plugins served through a real mount: `Foreground` runs
`cshare-overlay -f` with its log captured, `root_fuse_dirs` gives it up/work/mnt
directories as root, and `write_plugin_file` writes a (deliberately broken)
plugin module for one case."""

from __future__ import annotations

import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fuse_usable, is_root, require, tool, unmount_all_below

from cshare.system.mountinfo import is_mount_point


@pytest.fixture
def root_fuse_dirs(world_tmp: Path) -> Iterator[Path]:
    require(is_root(), "root")
    require(fuse_usable(), "/dev/fuse and fusermount3 (Debian package fuse3)")
    for d in ("up", "work", "mnt"):
        (world_tmp / d).mkdir()
    yield world_tmp
    unmount_all_below(world_tmp)


def is_mounted(path: Path) -> bool:
    return is_mount_point(path)


class Foreground:
    """cshare-overlay -f in the background, its log captured, unmounted at the end."""

    def __init__(self, base: Path, options: str) -> None:
        self.mnt = base / "mnt"
        self.log = base / "overlay.log"
        argv = [tool("cshare-overlay"), "-f", "-o",
                f"{options},upperdir={base / 'up'},workdir={base / 'work'}", str(self.mnt)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"cshare-overlay did not mount: {self.log.read_text()}")
            time.sleep(0.05)

    def close(self) -> str:
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.log.read_text()



PLUGIN_TEMPLATE = """
from cshare_fuse.plugin_api import API_VERSION, DataSource

{body}

class Plugin:
    name = {name!r}
    api_version = API_VERSION
    def load(self, data, path):
        return Source(path)

plugin = Plugin()
"""


def write_plugin_file(directory: Path, name: str, body: str) -> Path:
    """A plugin module `name`.py whose layer is `Source(path)`, defined by `body`."""
    path = directory / f"{name}.py"
    path.write_text(PLUGIN_TEMPLATE.format(body=textwrap.dedent(body), name=name))
    return path
