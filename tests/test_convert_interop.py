"""A tree converted by cshare, mounted as a lower layer by the C fuse-overlayfs,
shows the original owners and modes: both tools read the same record.

What fuse-overlayfs 1.10 (Debian 12) was seen to do with such a layer, since
its root directory carries user.containers.override_stat:
- regular files and directories: uid, gid and the full mode (setuid, setgid,
  sticky, 0000) come from the record;
- placeholders of devices, fifos and sockets: uid, gid and permission bits come
  from the record, but the TYPE field is ignored: they show as empty regular
  files (cshare-overlay shows the real type; that difference is recorded here);
- whiteouts of both styles (char 0/0, `.wh.NAME`, `.wh..wh..opq`) stay hidden;
- the mount's root directory shows the record's mode only without an upper
  layer (with one, the upper layer's root decides).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fuse_usable, is_root, require, unmount_all_below
from tree_support import build_varied_tree, listing

from cshare.tree.convert import convert_tree

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(120)]

HIDDEN = {b"layer/deleted", b"layer/.wh.gone", b"layer/aufs-opaque/.wh..wh..opq"}


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    require(is_root(), "root")
    require(fuse_usable(), "/dev/fuse and fusermount3 (Debian package fuse3)")
    require(shutil.which("fuse-overlayfs") is not None, "fuse-overlayfs (Debian package fuse-overlayfs)")
    yield tmp_path
    unmount_all_below(tmp_path)


def mount(*args: str) -> None:
    subprocess.run(["fuse-overlayfs", *args], check=True, capture_output=True)


def test_fuse_overlayfs_shows_original_owners_and_modes(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "lower", scratch)
    os.chmod(tree.root, 0o710)  # so that the root's record is visibly not the 0755 of conversion
    original = listing(tree.root)
    assert convert_tree(tree.root).errors == []
    assert {m.mode for rel, m in listing(tree.root).items() if m.type in ("file", "dir")} == {0o755}

    upper, work, merged = scratch / "upper", scratch / "work", scratch / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    mount("-o", f"lowerdir={tree.root},upperdir={upper},workdir={work}", str(merged))
    try:
        seen = listing(merged)
    finally:
        subprocess.run(["umount", str(merged)], check=True)

    expected_names = set(original) - HIDDEN
    assert set(seen) == expected_names
    checked = 0
    for rel in expected_names - {b"."}:
        was, now = original[rel], seen[rel]
        if was.type == "symlink":
            assert now.target == was.target
            continue
        assert (now.uid, now.gid) == (was.uid, was.gid), rel
        assert now.mode == was.mode, f"{rel!r}: {now.mode:o} != {was.mode:o}"
        if was.type in ("file", "dir"):
            assert now.type == was.type
            checked += 1
        else:
            # fuse-overlayfs 1.10 ignores TYPE: the placeholder stays a regular file.
            assert now.type in (was.type, "file"), rel
    assert checked > 80
    # Spot checks that make the point of the whole exercise.
    assert (seen[b"etc/shadow"].mode, seen[b"etc/shadow"].uid) == (0o600, 0)
    assert seen[b"usr/bin/su"].mode == 0o4755
    assert (seen[b"etc/www"].uid, seen[b"etc/www"].gid, seen[b"etc/www"].mode) == (33, 33, 0o640)
    assert seen[b"locked"].mode == 0o000 and seen[b"tmp"].mode == 0o1777

    # Without an upper layer, the root directory shows its record too.
    mount("-o", f"lowerdir={tree.root}", str(merged))
    try:
        root_st = os.stat(merged)
        assert stat.S_IMODE(root_st.st_mode) == original[b"."].mode == 0o710
        assert stat.S_IMODE(os.stat(merged / "root").st_mode) == 0o700
    finally:
        subprocess.run(["umount", str(merged)], check=True)
