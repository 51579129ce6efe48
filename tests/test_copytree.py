"""The layer copy (cshare.tree.copy): exact, never following symlinks."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import is_root, require
from tree_support import deep_tree_removed, make_chain

from cshare.errors import CshareError
from cshare.tree.copy import copy_tree

OLD = 1_000_000_000  # fixed mtimes: the copy must keep them


def describe(root: Path) -> dict[str, dict[str, Any]]:
    """Everything the copy must keep, per relative path; hardlinks as groups."""
    out: dict[str, dict[str, Any]] = {}
    inode_group: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (
            [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]
        ):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime": st.st_mtime_ns,
                "size": st.st_size,
                "xattrs": {
                    a: os.getxattr(path, a, follow_symlinks=False)
                    for a in os.listxattr(path, follow_symlinks=False)
                },
            }
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                entry["data"] = Path(path).read_bytes()
                key = (st.st_dev, st.st_ino)
                entry["link_group"] = inode_group.setdefault(key, rel)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = entry
    return out


def stamp(root: Path) -> None:
    """Old fixed mtimes everywhere (deepest first, so parents keep theirs)."""
    paths = sorted(
        (Path(d) / n for d, ds, fs in os.walk(root) for n in ds + fs), key=lambda p: -len(p.parts)
    )
    for i, p in enumerate(paths):
        os.utime(p, ns=((OLD + i) * 10**9, (OLD + i) * 10**9), follow_symlinks=False)
    os.utime(root, ns=(OLD * 10**9, OLD * 10**9))


def build_plain(root: Path, outside: Path) -> None:
    """What any user can create: files, dirs, symlinks (one pointing out), hardlinks, holes, user xattrs."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"content\n")
    os.link(root / "dir" / "file", root / "dir" / "sub" / "hardlink")
    (root / "exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "exec", 0o751)
    (root / "link-out").symlink_to(outside)  # a directory outside the tree
    (root / "dir" / "rel").symlink_to("../exec")
    (root / "dangling").symlink_to("/nonexistent/x")
    with open(root / "sparse", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    (root / ".wh.deleted").write_bytes(b"")
    (root / "dir" / ".wh..wh..opq").write_bytes(b"")
    os.setxattr(root / "dir" / "file", "user.test", b"value")
    os.chmod(root / "dir" / "sub", 0o555)
    stamp(root)


def test_plain_tree_copies_exactly(tmp_path: Path) -> None:
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    outside.mkdir()
    (outside / "must-not-be-copied").write_text("x")
    src.mkdir()
    build_plain(src, outside)
    stats = copy_tree(src, dst)
    assert describe(dst) == describe(src)
    # the symlink to a directory was copied as a symlink, not followed
    assert os.path.islink(dst / "link-out")
    assert not any("must-not-be-copied" in str(p) for p in dst.rglob("*") if not p.is_symlink())
    # hardlink kept as a hardlink
    assert os.stat(dst / "dir" / "file").st_ino == os.stat(dst / "dir" / "sub" / "hardlink").st_ino
    assert stats.hardlinks == 1
    # hole kept: the copy allocates about what the source does, not 8 MiB
    assert os.stat(dst / "sparse").st_blocks <= os.stat(src / "sparse").st_blocks + 16
    assert os.stat(dst / "sparse").st_blocks * 512 < 1 << 20
    assert stats.entries == len(describe(src)) - 1


def test_destination_must_not_exist(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(CshareError, match="dst"):
        copy_tree(tmp_path / "src", tmp_path / "dst")


def test_source_root_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(CshareError, match="link"):
        copy_tree(tmp_path / "link", tmp_path / "dst")


def test_progress_callback_sees_every_entry(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "c").write_text("x")
    seen: list[str] = []
    copy_tree(src, tmp_path / "dst", on_entry=seen.append)
    assert sorted(seen) == ["a", "a/b", "a/b/c"]


def test_special_files_owners_and_privileged_xattrs(tmp_path: Path) -> None:
    require(is_root(), "root (device nodes, owners, trusted.* xattrs)")
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "opaque").mkdir(parents=True)
    (src / "opaque" / "new").write_text("new")
    os.setxattr(src / "opaque", "trusted.overlay.opaque", b"y")
    os.mknod(src / "whiteout", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mkfifo(src / "fifo", 0o640)
    os.mknod(src / "socket", stat.S_IFSOCK | 0o755)
    (src / "setuid").write_bytes(b"\x7fELF")
    os.chown(src / "setuid", 0, 0)
    os.chmod(src / "setuid", 0o4755)
    (src / "www").write_text("www")
    os.chown(src / "www", 33, 33)
    os.chmod(src / "www", 0o640)
    (src / "setgid-dir").mkdir()
    os.chown(src / "setgid-dir", 0, 50)
    os.chmod(src / "setgid-dir", 0o2775)
    (src / "sym").symlink_to("www")
    os.chown(src / "sym", 33, 33, follow_symlinks=False)
    os.setxattr(src / "sym", "trusted.note", b"on a symlink", follow_symlinks=False)
    stamp(src)
    before = describe(src)
    stats = copy_tree(src, dst)
    assert describe(dst) == before
    assert stats.specials == 5
    assert os.getxattr(dst / "opaque", "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE(os.stat(dst / "setuid").st_mode) == 0o4755
    # the source is untouched
    assert describe(src) == before


def test_hardlinked_special_files(tmp_path: Path) -> None:
    require(is_root(), "root (device nodes)")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    os.mknod(src / "wh1", stat.S_IFCHR, os.makedev(0, 0))
    os.link(src / "wh1", src / "wh2")
    stamp(src)
    copy_tree(src, dst)
    assert os.lstat(dst / "wh1").st_ino == os.lstat(dst / "wh2").st_ino
    assert describe(dst) == describe(src)


def test_reflink_when_the_filesystem_can(tmp_path: Path) -> None:
    """On XFS (reflink=1) file data is shared with the source, not copied."""
    require(is_root(), "root (loop mount)")
    require(shutil.which("mkfs.xfs") is not None, "mkfs.xfs (Debian package xfsprogs)")
    image, mnt = tmp_path / "xfs.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(320 << 20)  # XFS's minimum size; sparse, so nearly free
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True
    )
    require(mounted.returncode == 0, f"loop mounts ({mounted.stderr.strip()})")
    try:
        src = mnt / "src"
        (src / "d").mkdir(parents=True)
        payload = os.urandom(16 << 20)
        (src / "d" / "big").write_bytes(payload)
        (src / "small").write_bytes(b"x")
        os.sync()
        free_before = os.statvfs(mnt).f_bfree * os.statvfs(mnt).f_frsize
        stats = copy_tree(src, mnt / "dst")
        os.sync()
        free_after = os.statvfs(mnt).f_bfree * os.statvfs(mnt).f_frsize
        assert stats.reflinked == stats.files == 2
        assert (mnt / "dst" / "d" / "big").read_bytes() == payload
        assert free_before - free_after < 4 << 20  # 16 MiB of data, far less used
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_chain_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    # An image may nest directories deeper than Python's recursion limit (1000);
    # the copy walks iteratively, so it must copy such a chain like any other.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with deep_tree_removed(src, dst):
        chain = Path(*make_chain(src, 1100))
        (src / chain / "leaf").write_text("at the bottom")
        stats = copy_tree(src, dst)
        assert (dst / chain / "leaf").read_text() == "at the bottom"
        assert stats.entries == 1101
