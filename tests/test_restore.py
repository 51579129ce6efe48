"""`cshare restore`: the exact inverse of convert, shown on full metadata listings."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import is_root, require, tool
from test_convert import kill_part_way, tmpfs_scratch  # noqa: F401  (fixture)
from tree_support import build_large_tree, build_varied_tree, diff_listings, fix_times, listing

from cshare.tree import parallel as parallelwalk
from cshare.tree.convert import convert_tree
from cshare.tree.restore import restore_tree
from cshare_fuse.formats.overrides import FUSE_OVERLAYFS_XATTR, OVERRIDE_XATTR, PROTOTYPE_XATTR

pytestmark = pytest.mark.root


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    require(is_root(), "root (restore recreates devices and owners)")
    return tmp_path


def test_convert_then_restore_gives_back_the_exact_tree(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    before = listing(tree.root)
    assert {m.type for m in before.values()} == {"file", "dir", "symlink", "char", "block", "pipe", "socket"}
    assert convert_tree(tree.root).errors == []
    converted = listing(tree.root)
    assert diff_listings(before, converted) != ""  # convert really changed things
    report = restore_tree(tree.root)
    assert report.errors == []
    assert report.devices_recreated == 5  # nodes: the fifo and its hardlink are one
    assert report.opaque_removed == 1
    assert diff_listings(before, listing(tree.root)) == ""


def test_second_restore_changes_nothing(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    before = listing(tree.root)
    convert_tree(tree.root)
    restore_tree(tree.root)
    again = restore_tree(tree.root)
    assert (again.restored, again.devices_recreated, again.opaque_removed) == (0, 0, 0)
    assert diff_listings(before, listing(tree.root)) == ""


def test_restore_keeps_a_layers_own_user_opaque_marker(scratch: Path) -> None:
    root = scratch / "tree"
    (root / "own").mkdir(parents=True)
    (root / "added").mkdir()
    for d in ("own", "added"):
        os.setxattr(root / d, "trusted.overlay.opaque", b"y")
    os.setxattr(root / "own", "user.overlay.opaque", b"y")  # the layer had it already
    before = listing(root)
    convert_tree(root)
    assert os.getxattr(root / "added", "user.overlay.opaque") == b"y"
    restore_tree(root)
    assert diff_listings(before, listing(root)) == ""


def test_restore_understands_older_forms(scratch: Path) -> None:
    root = scratch / "tree"
    root.mkdir()
    proto, fuse = root / "proto", root / "fuse"
    for path, attr, value in (
        (proto, PROTOTYPE_XATTR, b"4750:33:34\0"),
        (fuse, FUSE_OVERLAYFS_XATTR, b"12:13:100640"),
    ):
        path.write_bytes(b"x")
        os.chmod(path, 0o755)
        os.setxattr(path, attr, value)
    assert restore_tree(root).errors == []
    st = os.stat(proto)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4750, 33, 34)
    st = os.stat(fuse)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 12, 13)
    assert os.listxattr(proto) == [] and os.listxattr(fuse) == []


def test_unparsable_record_is_reported_and_left_untouched(scratch: Path) -> None:
    root = scratch / "tree"
    root.mkdir()
    bad = root / "bad"
    bad.write_bytes(b"x")
    os.chmod(bad, 0o755)
    os.setxattr(bad, OVERRIDE_XATTR, b"0:0:0644:blob")
    run = subprocess.run([tool("cshare"), "restore", "-q", str(root)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "bad" in run.stderr and "blob" in run.stderr
    assert os.getxattr(bad, OVERRIDE_XATTR) == b"0:0:0644:blob"
    assert stat.S_IMODE(os.stat(bad).st_mode) == 0o755


def test_dry_run_lists_and_changes_nothing(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    convert_tree(tree.root)
    converted = listing(tree.root)
    run = subprocess.run([tool("cshare"), "restore", "--dry-run", str(tree.root)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "restore 0:0 0600: etc/shadow" in run.stdout
    assert "recreate char-1-3 0:0 0666: dev/null" in run.stdout
    assert diff_listings(converted, listing(tree.root)) == ""


@pytest.mark.slow
def test_killed_restore_then_rerun_gives_back_the_original(tmpfs_scratch: Path) -> None:  # noqa: F811
    root = tmpfs_scratch / "tree"
    build_large_tree(root, 12000)
    before = listing(root)
    convert_tree(root)
    outcomes = kill_part_way("tree.restore", "restore_tree", root, (2000, 7000))
    assert "reached" in outcomes
    assert diff_listings(before, listing(root)) != ""  # the kills left it half-restored
    assert restore_tree(root).errors == []
    assert diff_listings(before, listing(root)) == ""


@pytest.mark.slow
def test_several_walk_threads_give_the_same_result(tmpfs_scratch: Path) -> None:  # noqa: F811
    # Threads are not the default (see treewalk.default_workers) but must be correct:
    # hardlinked devices and files spread over directories handled concurrently.
    one, three = tmpfs_scratch / "one", tmpfs_scratch / "three"
    build_large_tree(one, 6000, per_dir=20)
    build_large_tree(three, 6000, per_dir=20)
    for d in (one, three):
        entries = [e for sub in sorted((d / "d0").iterdir()) if sub.is_dir() for e in os.scandir(sub)]
        device = next(e for e in entries if stat.S_ISCHR(e.stat(follow_symlinks=False).st_mode))
        regular = next(e for e in entries if e.is_file(follow_symlinks=False))
        # Hardlinks across directories far apart, likely handled by different threads.
        os.link(regular.path, d / "d2" / "cross-link")
        os.link(device.path, d / "d2" / "device-link")
        fix_times(d)
    original = listing(one)
    assert convert_tree(one, workers=1).errors == []
    report = convert_tree(three, workers=3)
    assert report.errors == []
    assert diff_listings(listing(one), listing(three)) == ""
    assert restore_tree(three, workers=3).errors == []
    assert diff_listings(original, listing(three)) == ""


def test_worker_processes_give_the_exact_round_trip(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hand out directories from the first level on, so that the varied tree (hardlinks
    # across directories, a hardlinked fifo, devices, odd names) really goes through
    # worker processes and the parent's handling of deferred hardlinked entries.
    monkeypatch.setattr(parallelwalk, "SPREAD", 1)
    tree = build_varied_tree(scratch / "tree", scratch)
    (scratch / "elsewhere").mkdir()
    twin = build_varied_tree(scratch / "twin", scratch / "elsewhere")
    before = listing(tree.root)
    forks = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())
    report = convert_tree(tree.root, processes=3)
    assert len(forks) == 3
    assert report.errors == []
    assert convert_tree(twin.root, processes=1).entries == report.entries
    single, parallel = listing(twin.root), listing(tree.root)
    for entries in (single, parallel):
        del entries[b"usr/outside-link"]  # its target names a different outside file
    assert diff_listings(single, parallel) == ""
    assert restore_tree(tree.root, processes=3).errors == []
    assert diff_listings(before, listing(tree.root)) == ""
