"""Differential tests: the FUSE overlay against the kernel's overlayfs.

Each test mounts identical copies of the same layers twice, once with the
kernel overlay (redirect_dir=off, index=off, metacopy=off: the reference) and
once with the command under test (cshare-overlay, or CSHARE_OVERLAY_CMD), runs
the same operations on both and compares every result or errno, the merged
trees and the upper layers (whiteout and opaque styles normalized).

Where the kernel is no reference (AUFS-style whiteouts, user.* opaque markers,
`.wh.` names, a lower directory rename done fully), the expectation is
computed here from the layers, taken from fuse-overlayfs (which reads both
whiteout styles), or stated by the test.  One test runs the operations as an
ordinary user (alice) to compare permission checks.

Not compared: inode numbers themselves (only which names share one), atime
and ctime, and a directory's size, nlink and builder-set mtime (see
overlay_support.mtime_view).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import threading
from pathlib import Path

import pytest
from conftest import require
from overlay_support import (
    FIXED_TIME,
    Lockstep,
    Pair,
    aufs_whiteout,
    chardev,
    check_pair,
    describe,
    diff_trees,
    dir_,
    fifo,
    file,
    format_ops,
    hardlink,
    make_copy,
    merged_expectation,
    mounted,
    opaque,
    overlay_pair,
    run_op,
    run_ops_as,
    snapshot,
    symlink,
    whiteout,
)

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(120)]

T = FIXED_TIME * 10**9  # nanoseconds; utime ops use old, deterministic times

#: Bottom layer: the base everything else covers.
BOTTOM = [
    dir_("d"),
    file("d/a", "bottom a\n"),
    file("d/b", "bottom b\n"),
    file("d/sub/x", "deep x\n"),
    file("f", "bottom f\n"),
    file("owned", "owned by 1000\n", mode=0o640, uid=1000, gid=1001,
         xattrs={"user.color": b"blue", "user.empty": b""}),
    file("exe", "#!/bin/sh\n", mode=0o4755, uid=0, gid=50),
    file("hl1", "linked\n"),
    hardlink("hl2", "hl1"),
    symlink("s", "f"),
    symlink("dangling", "nowhere"),
    fifo("p", mode=0o600),
    chardev("null", 1, 3, mode=0o666),
    dir_("e"),
    file("e/old", "hidden by opaque e\n"),
    file("gone", "whited out above\n"),
    dir_("gone_dir"),
    file("gone_dir/inner", "whited out with its dir\n"),
    file("revived", "old revived\n"),
    dir_("mv", mode=0o750, uid=7, gid=7, xattrs={"user.dir": b"1"}),
    file("mv/one", "one\n"),
    file("mv/deeper/two", "two\n"),
    dir_("empty_lower"),
    dir_("merged_empty"),
    file("merged_empty/only", "x"),
]
#: Middle layer: kernel-style whiteouts and an opaque directory.
MIDDLE = [
    file("d/c", "middle c\n"),
    whiteout("d/a"),
    opaque("e"),
    file("e/new", "middle e/new\n"),
    whiteout("gone"),
    whiteout("gone_dir"),
    whiteout("revived"),
    file("f", "middle f\n", mode=0o600),
    dir_("x", mode=0o700),
    file("x/y", "y\n", uid=33, gid=33),
]
#: Top layer.
TOP = [
    file("d/b", "top b\n", mode=0o664),
    dir_("d/sub2"),
    file("top_only", "top only\n"),
    file("revived", "new revived\n", mode=0o600),
    dir_("merged_empty"),
]
LAYERS = [TOP, MIDDLE, BOTTOM]


@pytest.fixture
def pair(root_fuse: None, world_tmp: Path):
    with overlay_pair(world_tmp, LAYERS) as p:
        yield p


def assert_same(pair, ops, **kw) -> None:
    problems = check_pair(pair, ops, **kw)
    assert not problems, "\n".join(problems)


def test_reference_matches_own_merge(root_fuse: None, world_tmp: Path) -> None:
    """The harness's merge of the layers agrees with the kernel (validates the harness)."""
    dirs = make_copy(world_tmp / "k", LAYERS)
    with mounted(dirs, "kernel", upper=False):
        kernel = snapshot(dirs.mnt)
    expected = merged_expectation(dirs.lowers)
    assert kernel, "kernel overlay shows nothing"
    assert not diff_trees(kernel, expected, "kernel", "harness")


def test_merged_tree_and_readdir(pair) -> None:
    dirs = [".", "d", "d/sub", "d/sub2", "e", "x", "mv", "mv/deeper", "empty_lower",
            "merged_empty", "gone_dir", "nonexistent"]
    ops = [("listdir", d) for d in dirs]
    ops += [("stat", p) for p in ["f", "d/a", "d/b", "d/c", "gone", "revived", "s", "p", "hl1",
                                  "owned", "exe", "e/old", "e/new", "x/y", "dangling"]]
    ops += [("read", p) for p in ["f", "d/b", "d/c", "revived", "s", "x/y", "dangling", "p"]]
    ops += [("readlink", "s"), ("readlink", "dangling"), ("readlink", "f")]
    assert_same(pair, ops)
    # And what the merged view must contain, stated independently of the kernel.
    k = run_op(pair.fuse.mnt, ("listdir", "d"))
    assert k == ("ok", ["b", "c", "sub", "sub2"])
    assert run_op(pair.fuse.mnt, ("listdir", "e")) == ("ok", ["new"])


def test_several_lower_layers_with_colon(root_fuse: None, world_tmp: Path) -> None:
    """Four lower layers, two of whose paths contain a colon (escaped as `\\:`)."""
    layers = [TOP, [file("colon_file", "from a:b\n")], MIDDLE, BOTTOM]
    names = ["top", "with:colon", "mid:dle", "bottom"]
    with overlay_pair(world_tmp, layers, names=names) as p:
        assert_same(p, [("read", "colon_file"), ("listdir", "."), ("read", "f"),
                        ("append", "colon_file", b"more\n"), ("unlink", "d/c")])
        assert (p.fuse.upper / "colon_file").read_bytes() == b"from a:b\nmore\n"


def test_create_family(pair) -> None:
    ops = [
        ("create", "new", b"new file\n", 0o640),
        ("create", "new", b"again\n", 0o640),  # EEXIST
        ("create", "f", b"x", 0o644),  # EEXIST over a lower file
        ("create", "gone", b"back\n", 0o600),  # over a whiteout
        ("create", "d/sub/made", b"copy-up parents\n", 0o644),
        ("create", "e/old", b"under opaque\n", 0o644),
        ("create", "nodir/file", b"", 0o644),  # ENOENT
        ("create", "f/child", b"", 0o644),  # ENOTDIR
        ("trunc_write", "d/b", b"truncated\n"),
        ("mkdir", "newdir", 0o755),
        ("mkdir", "d", 0o755),  # EEXIST
        ("mkdir", "gone_dir", 0o711),  # over a whiteout: opaque
        ("listdir", "gone_dir"),
        ("mkdir", "d/sub/nested", 0o700),
        ("mkdir", "newdir/inner", 0o755),
        ("mkfifo", "newfifo", 0o640),
        ("mkfifo", "d/sub/fifo", 0o600),
        ("mkfifo", "p", 0o600),  # EEXIST
        ("symlink", "d/b", "newlink"),
        ("symlink", "../f", "d/sub/uplink"),
        ("symlink", "x", "s"),  # EEXIST
        ("read", "newlink"),
        ("readlink", "d/sub/uplink"),
        ("link", "new", "new_hard"),
        ("link", "f", "f_hard"),  # link to a lower file: copy-up first
        ("link", "d", "d_hard"),  # EPERM: directories
        ("link", "new", "f"),  # EEXIST
        ("link", "nonexistent", "z"),  # ENOENT
        ("stat", "new"),
        ("stat", "new_hard"),
        ("stat", "f_hard"),
        ("listdir", "."),
        ("listdir", "d/sub"),
    ]
    assert_same(pair, ops)


def test_unlink_and_rmdir(pair) -> None:
    ops = [
        ("unlink", "f"),
        ("unlink", "f"),  # ENOENT now
        ("stat", "f"),
        ("unlink", "d/b"),  # top layer file over a bottom one: whiteout
        ("unlink", "d/c"),
        ("unlink", "s"),
        ("unlink", "p"),
        ("unlink", "d"),  # EISDIR
        ("rmdir", "d"),  # ENOTEMPTY
        ("rmdir", "f"),  # ENOENT (gone) ...
        ("rmdir", "top_only"),  # ENOTDIR
        ("rmdir", "empty_lower"),
        ("rmdir", "gone_dir"),  # ENOENT: whited out
        ("unlink", "d/sub/x"),
        ("rmdir", "d/sub"),
        ("rmdir", "d/sub2"),
        ("listdir", "d"),
        ("rmdir", "d"),
        ("rmdir", "merged_empty"),  # ENOTEMPTY: lower content
        ("unlink", "merged_empty/only"),
        ("rmdir", "merged_empty"),
        ("listdir", "."),
        ("create", "d", b"a file where a directory was\n", 0o644),
        ("mkdir", "merged_empty", 0o755),  # opaque now
        ("listdir", "merged_empty"),
        ("rmdir", "."),  # EBUSY/EINVAL: whatever the kernel says
    ]
    assert_same(pair, ops)


def test_rename_files(pair) -> None:
    ops = [
        ("rename", "f", "f_moved"),  # lower file to a new name
        ("rename", "d/c", "top_only"),  # across layers, onto an existing file
        ("rename", "hl1", "d/sub/hl1"),  # into a lower directory
        ("rename", "owned", "gone"),  # onto a whited-out name
        ("rename", "revived", "e/revived"),
        ("rename_noreplace", "d/b", "exe"),  # EEXIST
        ("rename_noreplace", "d/b", "d/b2"),
        ("rename", "nonexistent", "x1"),  # ENOENT
        ("rename", "top_only", "d"),  # EISDIR
        ("rename", "d/sub2", "f_moved"),  # ENOTDIR
        ("create", "u1", b"upper only\n", 0o644),
        ("rename", "u1", "u2"),
        ("rename", "u2", "u2"),
        ("mkdir", "newdir", 0o755),
        ("create", "newdir/inside", b"inside\n", 0o644),
        ("rename", "newdir", "newdir2"),  # an upper-only directory renames fine
        ("rename", "s", "s2"),  # symlink
        ("rename", "p", "p2"),  # fifo
        ("readlink", "s2"),
        ("listdir", "."),
        ("listdir", "d"),
        ("listdir", "newdir2"),
        ("read", "top_only"),
        ("read", "gone"),
        ("stat", "gone"),
    ]
    assert_same(pair, ops)


def test_rename_exchange(pair) -> None:
    ops = [
        ("create", "u1", b"one\n", 0o644),
        ("create", "u2", b"two\n", 0o600),
        ("rename_exchange", "u1", "u2"),
        ("rename_exchange", "u1", "missing"),  # ENOENT
        ("rename_exchange", "f", "top_only"),
        ("read", "u1"), ("read", "f"), ("read", "top_only"),
    ]
    assert_same(pair, ops)


def test_rename_lower_directory(pair) -> None:
    """The kernel answers EXDEV (redirect_dir=off); a full rename is accepted too."""
    k = run_op(pair.kernel.mnt, ("rename", "mv", "moved"))
    assert k == ("err", "EXDEV"), f"kernel reference changed: {k}"
    before = snapshot(pair.kernel.mnt, "mv")
    f = run_op(pair.fuse.mnt, ("rename", "mv", "moved"))
    if f == ("err", "EXDEV"):
        assert_same(pair, [("listdir", "."), ("listdir", "mv")])
        return
    assert f == ("ok", None), f"rename of a lower directory: {f}"
    assert not (pair.fuse.mnt / "mv").exists()
    after = snapshot(pair.fuse.mnt, "moved")
    # The moved directory itself may get a new mtime (".." changed); nothing else may.
    before["."].pop("mtime")
    after["."].pop("mtime")
    assert not diff_trees(before, after, "before", "after")
    # A new entry with the old name must not show the old content.
    assert run_op(pair.fuse.mnt, ("mkdir", "mv", 0o755)) == ("ok", None)
    assert run_op(pair.fuse.mnt, ("listdir", "mv")) == ("ok", [])


def test_device_node(pair) -> None:
    ops = [("stat", "null"), ("read", "null"), ("write", "null", b"discarded", 0),
           ("chmod", "null", 0o600), ("chown", "null", 5, 5), ("stat", "null"),
           ("rename", "null", "d/null2"), ("stat", "d/null2"), ("link", "d/null2", "null3"),
           ("stat", "null3"), ("unlink", "d/null2"), ("stat", "null3")]
    assert_same(pair, ops)


def test_fd_opened_before_copy_up(pair) -> None:
    """A read-only fd opened on the lower file, then the file is copied up by a write."""
    results = []
    for root in pair.roots:
        ro = os.open(root / "f", os.O_RDONLY)
        try:
            first = os.pread(ro, 100, 0)
            with open(root / "f", "r+b") as fh:
                fh.write(b"CHANGED")
            after = os.pread(ro, 100, 0)
            st = os.fstat(ro)
            same_ino = st.st_ino == os.stat(root / "f").st_ino
            results.append((first, after, st.st_size, same_ino))
        finally:
            os.close(ro)
    assert results[0] == results[1], f"kernel={results[0]} fuse={results[1]}"


def test_attributes(pair) -> None:
    t1, t2 = T + 123_456_789, T + 987_000_000_001
    ops = [
        ("chmod", "f", 0o751),
        ("chmod", "d", 0o700),  # a merged directory
        ("chmod", "x/y", 0o4711),
        ("chmod", "nonexistent", 0o644),
        ("chown", "f", 1234, 5678),
        ("chown", "d/sub", 42, 43),
        ("chown", "s", 99, 98),  # lchown: the link itself
        ("chown", "owned", -1, 0),
        ("truncate", "d/c", 3),
        ("truncate", "top_only", 0),
        ("truncate", "exe", 100_000),  # grows with zeros
        ("truncate", "d", 0),  # EISDIR
        ("utime", "owned", t1, t2),
        ("utime", "d/sub", t2, t1),
        ("utime", "s", t1, t1),  # the link itself
        ("utime", "hl2", t1, t2),
        ("stat", "f"), ("stat", "d"), ("stat", "exe"), ("stat", "owned"), ("stat", "s"),
        ("stat", "hl1"), ("stat", "hl2"),
        ("read", "d/c"), ("read", "exe"),
    ]
    assert_same(pair, ops)


def test_truncate_to_same_size_updates_mtime(pair) -> None:
    """truncate(2) marks mtime even when the size does not change (lower and upper files)."""
    ops = [("truncate", "f", len(b"middle f\n")), ("stat", "f"),
           ("create", "u", b"1234", 0o644), ("utime", "u", T + 1, T + 1),
           ("truncate", "u", 4), ("stat", "u")]
    assert_same(pair, ops)


def test_user_xattrs(pair) -> None:
    ops = [
        ("listxattr", "owned"),
        ("getxattr", "owned", "user.color"),
        ("getxattr", "owned", "user.empty"),
        ("getxattr", "owned", "user.missing"),  # ENODATA
        ("setxattr", "owned", "user.color", b"red"),  # copy-up keeps the others
        ("setxattr", "f", "user.new", b"\x00binary\xff"),
        ("setxattr", "d", "user.on_dir", b"merged dir"),
        ("setxattr", "e", "user.on_opaque", b"v"),
        ("listxattr", "owned"),
        ("listxattr", "e"),  # the opaque marker is hidden
        ("getxattr", "e", "trusted.overlay.opaque"),  # hidden: ENODATA
        ("listxattr", "d"),
        ("removexattr", "owned", "user.empty"),
        ("removexattr", "owned", "user.empty"),  # ENODATA
        ("removexattr", "mv", "user.dir"),
        ("listxattr", "owned"),
        ("listxattr", "mv"),
        ("getxattr", "f", "user.new"),
        ("getxattr", "nonexistent", "user.x"),  # ENOENT
        ("setxattr", "gone", "user.x", b"1"),  # ENOENT
    ]
    assert_same(pair, ops)


def test_statfs_and_fsync(pair) -> None:
    ops = [("statfs", "."), ("statfs", "d"), ("fsync", "f"), ("fsync", "d"),
           ("create", "new", b"data", 0o644), ("fsync", "new"), ("fsync", "."),
           ("statfs", "new")]
    assert_same(pair, ops)
    st = os.statvfs(pair.fuse.mnt)
    assert st.f_bsize > 0 and st.f_blocks > 0 and st.f_namemax > 0


def test_hardlinks_nlink(pair) -> None:
    ops = [
        ("stat", "hl1"), ("stat", "hl2"),
        ("create", "n", b"n\n", 0o644),
        ("link", "n", "n2"),
        ("link", "n", "d/n3"),
        ("stat", "n"), ("stat", "n2"), ("stat", "d/n3"),
        ("unlink", "n2"),
        ("stat", "n"),
        ("append", "d/n3", b"through the other name\n"),
        ("read", "n"),
        ("link", "top_only", "top_link"),
        ("stat", "top_only"), ("stat", "top_link"),
        ("unlink", "top_only"),
        ("stat", "top_link"),
    ]
    assert_same(pair, ops)
    # Independently of the kernel: a new hard link counts.
    st = os.lstat(pair.fuse.mnt / "n")
    assert st.st_nlink == 2 and os.lstat(pair.fuse.mnt / "d/n3").st_ino == st.st_ino


def test_lower_hardlink_copied_up_by_the_name_used(pair) -> None:
    """Copy-up through one name of a lower hard link (index=off) breaks the link there."""
    ops = [
        ("stat", "hl1"), ("stat", "hl2"), ("read", "hl1"),  # both names known first
        ("append", "hl2", b"via hl2\n"),
        ("read", "hl1"), ("read", "hl2"), ("stat", "hl1"), ("stat", "hl2"),
        ("truncate", "hl1", 0),
        ("read", "hl1"), ("read", "hl2"),
    ]
    assert_same(pair, ops)


def test_unlinked_fd_of_lower_hardlink(pair) -> None:
    assert_same(pair, [("stat", "hl2"), ("unlinked_fd", "hl1", b"x"), ("stat", "hl2"),
                       ("read", "hl2")])


@pytest.mark.parametrize("kind", ["kernel", "fuse"])
def test_inode_numbers_stable_and_unique(root_fuse: None, world_tmp: Path, kind: str) -> None:
    """Checked on both mounts: the kernel run proves the test, the fuse run the overlay."""
    dirs = make_copy(world_tmp / kind, LAYERS)
    with mounted(dirs, kind) as mnt:
        def ino(rel: str) -> int:
            return os.lstat(mnt / rel).st_ino

        names = ["f", "d", "d/b", "d/c", "d/sub/x", "owned", "exe", "s", "p", "e/new", "x/y",
                 "top_only", "mv", "mv/one", ".", "revived"]
        first = {n: ino(n) for n in names}
        assert {n: ino(n) for n in names} == first, "inode numbers changed between stats"
        assert len(set(first.values())) == len(first), f"inode numbers not unique: {first}"
        # Copy-up (chmod, write, xattr) keeps the inode number within the mount.
        os.chmod(mnt / "f", 0o600)
        with open(mnt / "d/sub/x", "ab") as fh:
            fh.write(b"more")
        os.setxattr(mnt / "owned", "user.k", b"v")
        os.chmod(mnt / "d", 0o711)
        after = {n: ino(n) for n in names}
        assert after == first, "copy-up changed inode numbers"
        # New files get numbers of their own.
        (mnt / "fresh").write_bytes(b"")
        os.mkdir(mnt / "fresh_dir")
        fresh = {ino("fresh"), ino("fresh_dir")}
        assert len(fresh) == 2 and not fresh & set(first.values())
        # readdir and stat agree.
        with os.scandir(mnt / "d") as it:
            for entry in it:
                assert entry.inode() == ino(f"d/{entry.name}"), entry.name


@pytest.mark.parametrize("target", ["f", "top_only", "new"])
def test_open_file_survives_unlink(pair, target: str) -> None:
    results = []
    for root in pair.roots:
        if target == "new":
            (root / "new").write_bytes(b"new file\n")
        fd = os.open(root / target, os.O_RDWR)
        try:
            os.unlink(root / target)
            gone = not os.path.lexists(root / target)
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, b"written after unlink\n")
            os.fsync(fd)
            data = os.pread(fd, 1 << 16, 0)
            nlink = os.fstat(fd).st_nlink
        finally:
            os.close(fd)
        results.append((gone, data, nlink))
    assert results[0][:2] == results[1][:2], f"kernel={results[0]} fuse={results[1]}"
    gone, data, nlink = results[1]
    assert gone and data.endswith(b"written after unlink\n")
    # fstat of the unlinked file: the kernel says nlink 0.
    assert results[0][2] == nlink, f"nlink after unlink: kernel={results[0][2]} fuse={nlink}"


def test_whiteout_names_refused(pair) -> None:
    """`.wh.` names are reserved (formats.md §2); the kernel has no such rule."""
    root = pair.fuse.mnt
    attempts = [
        ("create", ".wh.f", b"", 0o644),
        ("create", "d/.wh.new", b"", 0o644),
        ("mkdir", ".wh.dir", 0o755),
        ("mkfifo", ".wh.fifo", 0o644),
        ("symlink", "f", ".wh.link"),
        ("link", "f", ".wh.hard"),
        ("rename", "top_only", ".wh.top_only"),
        ("create", ".wh..wh..opq", b"", 0o644),
    ]
    for op in attempts:
        result = run_op(root, op)
        assert result[0] == "err", f"{op} was allowed: {result}"
    names = os.listdir(root) + os.listdir(root / "d")
    assert not [n for n in names if n.startswith(".wh.")]
    assert (root / "top_only").read_bytes() == b"top only\n"
    assert run_op(root, ("stat", ".wh.f"))[0] == "err"
    upper_names = [p.name for p in pair.fuse.upper.rglob("*")]
    assert ".wh.f" not in upper_names and ".wh.dir" not in upper_names


def test_read_only_without_upper(root_fuse: None, world_tmp: Path) -> None:
    with overlay_pair(world_tmp, LAYERS, upper=False) as p:
        ops = [
            ("read", "f"), ("listdir", "d"), ("stat", "owned"), ("getxattr", "owned", "user.color"),
            ("create", "new", b"", 0o644), ("write", "f", b"x", 0), ("trunc_write", "f", b""),
            ("mkdir", "nd", 0o755), ("mkfifo", "nf", 0o644), ("symlink", "f", "nl"),
            ("link", "f", "fl"), ("unlink", "f"), ("rmdir", "empty_lower"),
            ("rename", "f", "g"), ("chmod", "f", 0o600), ("chown", "f", 1, 1),
            ("truncate", "f", 0), ("utime", "f", T, T), ("setxattr", "f", "user.x", b"1"),
            ("removexattr", "owned", "user.color"), ("statfs", "."), ("read", "f"),
        ]
        ls = Lockstep(*p.roots)
        ls.run_all(ops)
        assert not ls.divergences, ls.report()
        assert run_op(p.fuse.mnt, ("create", "new", b"", 0o644)) == ("err", "EROFS")
        assert run_op(p.fuse.mnt, ("unlink", "f")) == ("err", "EROFS")
        assert not diff_trees(snapshot(p.kernel.mnt), snapshot(p.fuse.mnt))


def test_copy_up_keeps_metadata(pair) -> None:
    """Against the lower layer itself, not only against the kernel."""
    lower_atime = os.lstat(pair.fuse.lowers[2] / "owned").st_atime_ns
    ops = [("setxattr", "owned", "user.added", b"1"), ("chmod", "exe", 0o4755),
           ("append", "x/y", b"")]
    Lockstep(*pair.roots).run_all(ops[:1])
    # Right after the copy-up, before anything reads the file through a mount:
    # the kernel keeps the access time too.
    atimes = [os.lstat(d.upper / "owned").st_atime_ns for d in (pair.kernel, pair.fuse)]
    assert atimes[0] == lower_atime, "kernel reference changed"
    lower_now = os.lstat(pair.fuse.lowers[2] / "owned").st_atime_ns
    assert atimes[1] == lower_atime, (
        f"copy-up lost the access time: upper {atimes[1]} != {lower_atime} "
        f"(the lower file's atime is now {lower_now}: a copy-up read without O_NOATIME "
        f"moves it under relatime)")
    assert_same(pair, ops[1:])
    # Described only now: reading the lower file's content moves its atime.
    lower = describe(pair.fuse.lowers[2] / "owned")
    merged = describe(pair.fuse.mnt / "owned")
    upper = describe(pair.fuse.upper / "owned")
    for view in (merged, upper):
        assert view["content"] == lower["content"]
        assert (view["mode"], view["uid"], view["gid"]) == ("0o640", 1000, 1001)
        assert view["mtime"] == lower["mtime"]
        assert view["xattrs"]["user.color"] == b"blue" and view["xattrs"]["user.empty"] == b""
    exe = os.lstat(pair.fuse.mnt / "exe")
    assert stat.S_IMODE(exe.st_mode) == 0o4755 and exe.st_gid == 50
    # Parents were copied up with their own metadata.
    xdir = os.lstat(pair.fuse.upper / "x")
    assert stat.S_IMODE(xdir.st_mode) == 0o700
    assert (pair.fuse.upper / "x/y").stat().st_uid == 33


def _watch_sizes(target: Path, stop: threading.Event, seen: set[int]) -> None:
    while not stop.is_set():
        try:
            seen.add(os.stat(target).st_size)
        except FileNotFoundError:
            pass


def test_large_file_copy_up(root_fuse: None, world_tmp: Path) -> None:
    size = 64 << 20
    data = random.Random(64).randbytes(size)
    want = hashlib.sha256(data + b"tail").hexdigest()
    layers = [TOP, [file("big", data, mode=0o640, uid=5, gid=6)]]
    with overlay_pair(world_tmp, layers) as p:
        for root, dirs in ((p.kernel.mnt, p.kernel), (p.fuse.mnt, p.fuse)):
            # Watch the upper layer during the copy-up: the file must appear
            # there whole (staged in workdir, then renamed), never partial.
            seen: set[int] = set()
            stop = threading.Event()

            watcher = threading.Thread(target=_watch_sizes, args=(dirs.upper / "big", stop, seen))
            watcher.start()
            try:
                with open(root / "big", "ab") as fh:
                    fh.write(b"tail")
            finally:
                stop.set()
                watcher.join()
            partial = {n for n in seen if n not in (size, size + 4)}
            assert not partial, f"{root}: a partial copy-up was visible in upper: sizes {partial}"
        for root in p.roots:
            h = hashlib.sha256()
            with open(root / "big", "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            assert h.hexdigest() == want, f"content differs under {root}"
        st = os.lstat(p.fuse.upper / "big")
        assert (st.st_size, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == \
            (size + 4, 5, 6, 0o640)
        # No partial copy is left behind in the work directory.
        leftovers = [q for q in p.fuse.work.rglob("*") if q.is_file()]
        assert not leftovers, leftovers


# ---------------------------------------------------------------------------
# Layers the kernel cannot read: AUFS whiteouts and user.* opaque markers.

AUFS_BOTTOM = BOTTOM + [dir_("o1"), file("o1/hidden", "h"), dir_("o2"), file("o2/hidden", "h"),
                        dir_("o3"), file("o3/hidden", "h")]
AUFS_MIDDLE = [
    aufs_whiteout("d/a"),
    aufs_whiteout("gone"),
    aufs_whiteout("gone_dir"),
    opaque("e", style="aufs"),
    file("e/new", "middle e/new\n"),
    opaque("o1", style="user"),
    file("o1/visible", "v"),
    opaque("o2", style="fuseoverlayfs"),
    opaque("o3", style="trusted"),
    file("d/c", "middle c\n"),
]
AUFS_TOP = [file("d/b", "top b\n"), aufs_whiteout("f"), whiteout("x_kernel_style_unused"),
            file("revived", "new\n")]


@pytest.fixture
def aufs_mount(root_fuse: None, world_tmp: Path):
    dirs = make_copy(world_tmp / "fuse", [AUFS_TOP, AUFS_MIDDLE, AUFS_BOTTOM])
    with mounted(dirs, "fuse"):
        yield dirs


def test_aufs_and_user_markers_merge(aufs_mount) -> None:
    dirs = aufs_mount
    expected = merged_expectation(dirs.lowers)
    # Sanity of the expectation itself: the markers did hide things.
    assert "d/a" not in expected and "gone" not in expected and "f" not in expected
    assert "e/old" not in expected and "o1/hidden" not in expected
    assert "o1/visible" in expected and "d/b" in expected
    actual = snapshot(dirs.mnt)
    assert not diff_trees(expected, actual, "expected", "fuse")
    assert not [n for n in os.listdir(dirs.mnt / "e") if n.startswith(".wh.")]


def test_aufs_layers_then_writes(aufs_mount) -> None:
    dirs = aufs_mount
    m = dirs.mnt
    assert run_op(m, ("create", "f", b"recreated\n", 0o644)) == ("ok", 10)
    assert run_op(m, ("mkdir", "gone_dir", 0o755)) == ("ok", None)
    assert run_op(m, ("listdir", "gone_dir")) == ("ok", [])
    assert run_op(m, ("unlink", "d/c")) == ("ok", None)
    assert run_op(m, ("listdir", "d")) == ("ok", ["b", "sub"])
    assert run_op(m, ("rmdir", "o1")) == ("err", "ENOTEMPTY")
    assert run_op(m, ("unlink", "o1/visible")) == ("ok", None)
    assert run_op(m, ("rmdir", "o1")) == ("ok", None)
    assert run_op(m, ("mkdir", "o1", 0o755)) == ("ok", None)
    assert run_op(m, ("listdir", "o1")) == ("ok", [])
    assert run_op(m, ("read", "f")) == run_op(dirs.upper, ("read", "f"))
    assert (dirs.upper / "f").read_bytes() == b"recreated\n"
    assert not [n for n in os.listdir(m) if n.startswith(".wh.")]
    assert errno.ENOENT == _errno_of(lambda: os.lstat(m / "d/a"))


def _errno_of(fn) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_aufs_layers_against_fuse_overlayfs(root_fuse: None, world_tmp: Path) -> None:
    """The same writes on AUFS-style layers, with fuse-overlayfs as the reference.

    In the report below "kernel" names the reference side (fuse-overlayfs).
    """
    layers = [AUFS_TOP, AUFS_MIDDLE, AUFS_BOTTOM]
    ref = make_copy(world_tmp / "reference", layers)
    tested = make_copy(world_tmp / "tested", layers)
    with mounted(ref, "fuse-overlayfs"), mounted(tested, "fuse"):
        pair = Pair(ref, tested)
        ops = [
            ("listdir", "."), ("listdir", "d"), ("listdir", "e"), ("listdir", "o1"),
            ("listdir", "o2"), ("listdir", "o3"), ("stat", "f"), ("stat", "gone"),
            ("create", "f", b"recreated\n", 0o644),
            ("create", "d/a", b"back\n", 0o600),
            ("mkdir", "gone_dir", 0o750),
            ("listdir", "gone_dir"),
            ("create", "gone_dir/inner2", b"", 0o644),
            ("unlink", "d/c"),
            ("unlink", "e/new"),
            ("rmdir", "e"),
            ("mkdir", "e", 0o755),
            ("listdir", "e"),
            ("rename", "o1/visible", "o2/moved"),
            ("rmdir", "o1"),
            ("rmdir", "o3"),
            ("listdir", "."),
            ("create", ".wh.sneaky", b"", 0o644),
            ("listdir", "."),
        ]
        assert_same(pair, ops)


PERMS = [
    file("root_secret", "secret\n", mode=0o600),
    file("public", "public\n", mode=0o644),
    file("alice_file", "alice's\n", mode=0o644, uid=1001, gid=1001),
    dir_("alice_dir", mode=0o755, uid=1001, gid=1001),
    file("alice_dir/mine", "mine\n", uid=1001, gid=1001),
    dir_("shared", mode=0o777),
    file("shared/root_in_shared", "r\n"),
    dir_("sticky", mode=0o1777),
    file("sticky/root_file", "r\n"),
    dir_("root_dir", mode=0o755),
    file("root_dir/f", "f\n"),
    dir_("private_dir", mode=0o700),
    file("private_dir/f", "f\n"),
    dir_("exec_only", mode=0o711),
    file("exec_only/f", "f\n"),
    file("group_rw", "g\n", mode=0o660, gid=1001),
]


def test_permissions_as_another_user(root_fuse: None, world_tmp: Path) -> None:
    """The caller's permissions, checked the kernel overlay's way (alice, uid 1001)."""
    from conftest import ensure_user

    alice = ensure_user("alice")
    uid, gid = alice.pw_uid, alice.pw_gid
    require(uid == 1001 and gid == 1001, "alice as uid/gid 1001 (the layer fixture assumes it)")
    ops = [
        ("read", "root_secret"), ("read", "public"), ("read", "group_rw"),
        ("listdir", "private_dir"), ("stat", "private_dir/f"), ("listdir", "exec_only"),
        ("read", "exec_only/f"),
        ("create", "root_dir/new", b"x", 0o644), ("create", "shared/new", b"x", 0o640),
        ("stat", "shared/new"), ("create", "alice_dir/new", b"x", 0o600), ("stat", "alice_dir/new"),
        ("mkdir", "shared/d", 0o755), ("stat", "shared/d"), ("symlink", "x", "shared/l"),
        ("stat", "shared/l"), ("mkfifo", "shared/fifo", 0o600), ("stat", "shared/fifo"),
        ("unlink", "shared/root_in_shared"), ("unlink", "sticky/root_file"),
        ("unlink", "root_dir/f"), ("rmdir", "exec_only"),
        ("chmod", "public", 0o666), ("chmod", "alice_file", 0o600), ("stat", "alice_file"),
        ("chown", "alice_file", 0, -1), ("chown", "alice_file", -1, 1001),
        ("utime", "public", T, T), ("utime", "alice_file", T + 5, T + 5), ("stat", "alice_file"),
        ("setxattr", "public", "user.x", b"1"), ("setxattr", "alice_file", "user.x", b"1"),
        ("getxattr", "alice_file", "user.x"), ("getxattr", "root_secret", "user.x"),
        ("write", "public", b"no", 0), ("append", "alice_file", b"more\n"),
        ("append", "group_rw", b"group\n"), ("truncate", "public", 0),
        ("rename", "public", "shared/public"), ("rename", "alice_file", "shared/alice_file"),
        ("link", "public", "shared/public_link"), ("link", "alice_dir/mine", "shared/mine_link"),
        ("read", "shared/alice_file"),
    ]
    with overlay_pair(world_tmp, [PERMS]) as p:
        k = run_ops_as(uid, gid, p.kernel.mnt, ops)
        f = run_ops_as(uid, gid, p.fuse.mnt, ops)
        problems = [f"step {i} {op!r}: kernel={a!r} fuse={b!r}"
                    for i, (op, a, b) in enumerate(zip(ops, k, f, strict=True)) if a != b]
        assert k[0] == ("err", "EACCES") and k[1][0] == "ok", f"the kernel reference changed: {k}"
        problems += check_pair(p, [])[1:]
        assert not problems, "operations as alice:\n" + format_ops(ops) + "\n" + "\n".join(problems)


def test_large_merged_directory(root_fuse: None, world_tmp: Path) -> None:
    """Readdir of a big merged directory (no entry lost or doubled), then rm -rf of it."""
    bottom = [file(f"big/f{i:04d}", str(i)) for i in range(2000)]
    middle = [whiteout(f"big/f{i:04d}") for i in range(0, 2000, 7)] + [file("big/mid", "m")]
    top = [file(f"big/t{i:03d}", "t") for i in range(300)]
    with overlay_pair(world_tmp, [top, middle, bottom]) as p:
        names = os.listdir(p.fuse.mnt / "big")
        assert len(names) == len(set(names)) == 2000 - len(range(0, 2000, 7)) + 1 + 300
        assert_same(p, [("listdir", "big")])
        for root in p.roots:
            shutil.rmtree(root / "big")
        assert_same(p, [("listdir", "."), ("stat", "big"), ("mkdir", "big", 0o755),
                        ("listdir", "big")])


def test_names_at_the_length_limit(root_fuse: None, world_tmp: Path) -> None:
    """255-byte names (the kernel's and ext4's limit) in a lower layer and created anew."""
    long_name = "L" * 255
    with overlay_pair(world_tmp, [[file("x", "x")], [file(long_name, "long"),
                                                     file(f"d/{long_name}", "in d")]]) as p:
        ops = [("listdir", "."), ("listdir", "d"), ("stat", long_name), ("read", long_name),
               ("create", "N" * 255, b"x", 0o644), ("create", "N" * 256, b"x", 0o644),
               ("mkdir", "D" * 255, 0o755), ("unlink", long_name), ("stat", long_name),
               ("create", long_name, b"again", 0o644), ("read", long_name),
               ("rename", f"d/{long_name}", "d/short"), ("listdir", "d")]
        assert_same(p, ops)
