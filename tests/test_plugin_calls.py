"""The call pattern a plugin sees, as cshare-plugins(7), CALL PATTERN, states it.

A recording plugin (every method notes its call, then does what the inherited
one does) serves `file`, `link -> file` and `dir/inner`; `ls`, `ls -l`, `cat`
and `find` run on the mount, and each step's calls are compared with what the
page says.  The page's list was made from this recording.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from plugin_support import Foreground, root_fuse_dirs, write_plugin_file

__all__ = ["root_fuse_dirs"]  # a fixture used here, defined in plugin_support

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(60)]

RECORDER = '''
import threading
from cshare_fuse.plugin_api import ALL_METHODS

LOG = {log!r}
_lock = threading.Lock()


def note(*words):
    with _lock, open(LOG, "a") as f:
        f.write(" ".join(w.decode() if isinstance(w, bytes) else w for w in words) + "\\n")


class Source(DataSource):
    inline = ALL_METHODS

    def on_lookup(self, path):
        note("on_lookup", path)

    def stat(self, path):
        note("stat", path)
        return super().stat(path)

    def raw_stat(self, path):
        note("raw_stat", path)
        return super().raw_stat(path)

    def readdir(self, path):
        note("readdir", path)
        return super().readdir(path)

    def readlink(self, path):
        note("readlink", path)
        return super().readlink(path)

    def open(self, path, flags):
        note("open", path)
        return super().open(path, flags)

    def getxattr(self, path, name):
        note("getxattr", path, name)
        return super().getxattr(path, name)

    def listxattr(self, path):
        note("listxattr", path)
        return super().listxattr(path)
'''

OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")


def looked_up(path: str) -> list[str]:
    """What looking an entry up asks: on_lookup, then the inherited stat (raw_stat)."""
    return [f"on_lookup {path}", f"stat {path}", f"raw_stat {path}"]


def listed(path: str) -> list[str]:
    """What looking a directory up asks besides: its names and opaque markers."""
    return [f"readdir {path}"] + [f"getxattr {path} {name}" for name in OPAQUE]


class Recording:
    def __init__(self, log: Path) -> None:
        self.log = log
        self.seen = 0

    def step(self) -> list[str]:
        """The calls since the last step."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        new, self.seen = lines[self.seen:], len(lines)
        return new


def test_the_call_pattern_of_ls_ls_l_cat_and_find(root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    layer = base / "layer"
    (layer / "dir").mkdir(parents=True)
    (layer / "file").write_text("a\n")
    (layer / "dir" / "inner").write_text("b\n")
    (layer / "link").symlink_to("file")
    calls = Recording(base / "calls")
    plugin = write_plugin_file(base, "recorder", RECORDER.format(log=str(calls.log)))
    overlay = Foreground(base, f"plugins={plugin},lowerdir=//recorder//{layer}")
    mnt = overlay.mnt
    try:
        mounting = calls.step()
        assert mounting == [*looked_up(""), *listed("")], mounting

        subprocess.run(["ls", str(mnt)], check=True, capture_output=True)
        ls = calls.step()
        assert Counter(ls) == Counter([*looked_up("file"), *looked_up("dir"), *listed("dir"),
                                       *looked_up("link")]), ls
        assert ls.index("on_lookup dir") < ls.index("readdir dir")

        subprocess.run(["ls", "-l", str(mnt)], check=True, capture_output=True)
        ls_l = calls.step()
        assert {c.split()[0] for c in ls_l} <= {"getxattr", "readlink"}, ls_l
        assert ls_l.count("readlink link") == 1, ls_l
        assert len(ls_l) == len(set(ls_l)), ls_l  # nothing asked twice
        subprocess.run(["ls", "-l", str(mnt)], check=True, capture_output=True)
        assert calls.step() == []  # every answer is kept

        subprocess.run(["cat", str(mnt / "file"), str(mnt / "dir" / "inner")], check=True,
                       capture_output=True)
        assert calls.step() == ["open file", *looked_up("dir/inner"), "open dir/inner"]
        subprocess.run(["cat", str(mnt / "file")], check=True, capture_output=True)
        assert calls.step() == ["open file"]  # open: asked at every open

        subprocess.run(["find", str(mnt)], check=True, capture_output=True)
        assert calls.step() == []
    finally:
        overlay.close()


def test_find_on_a_fresh_mount_asks_what_ls_asks_for_every_directory(
        root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    layer = base / "layer"
    (layer / "a" / "b").mkdir(parents=True)
    (layer / "a" / "b" / "f").write_text("f")
    (layer / "g").write_text("g")
    calls = Recording(base / "calls")
    plugin = write_plugin_file(base, "recorder", RECORDER.format(log=str(calls.log)))
    overlay = Foreground(base, f"plugins={plugin},lowerdir=//recorder//{layer}")
    try:
        calls.step()
        subprocess.run(["find", str(overlay.mnt)], check=True, capture_output=True)
        found = calls.step()
        # a/b's opaque markers are not asked: its parent lives in this layer only
        # (not in upper), so nothing lies below a/b for a marker to hide.
        expected = [*looked_up("a"), *listed("a"), *looked_up("g"), *looked_up("a/b"),
                    "readdir a/b", *looked_up("a/b/f")]
        assert Counter(found) == Counter(expected), found
        assert os.listdir(overlay.mnt / "a" / "b") == ["f"] and calls.step() == []
    finally:
        overlay.close()
