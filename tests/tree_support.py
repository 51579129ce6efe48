"""Test trees with every kind of entry, and a full metadata listing to compare them.

Reusable by any test that changes a tree's metadata and must show what changed:

- `build_varied_tree(root)` (root only: mknod, chown): every file type,
  setuid/setgid/sticky, 0000 and 0777, several owners, names with spaces,
  newlines and non-UTF-8 bytes, deep nesting, a sparse file, existing user
  xattrs, hardlinks (regular files and a fifo), overlay whiteouts of both
  styles and a `trusted.overlay.opaque` directory.  Times are fixed, so two
  builds give equal listings.  Returns a `VariedTree` naming notable entries.
- `build_large_tree(root, entries)`: many entries (for crash and speed
  tests), with devices, fifos and hardlinks sprinkled in; deterministic too.
- `listing(root)`: {relative path (bytes): Meta} for every entry, root
  included: type, mode, uid, gid, rdev, size, data extents (sparseness), mtime, every xattr
  (trusted.* too when root), symlink target and hardlink group.
- `diff_listings(a, b)`: human-readable differences, for assertion messages.

Directory sizes are left out of the listing: ext4 may grow a directory when a
temporary entry is created in it and never shrinks it, which says nothing about
the tree.  ctime is left out (any metadata change sets it).
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

FIXED_TIME_NS = 1_600_000_000_123_456_789  # a fixed mtime for every built entry

OWNERS = [(0, 0), (33, 33), (1000, 100), (65534, 65534), (0, 6)]


class Meta(NamedTuple):
    type: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    rdev: tuple[int, int]
    size: int | None  # None for directories
    extents: tuple[tuple[int, int], ...] | None  # regular files: data extents (holes show)
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]
    target: bytes | None  # symlinks
    links: tuple[bytes, ...]  # other names of the same inode (hardlinks), sorted


@dataclass
class VariedTree:
    root: Path
    outside: Path  # a file outside the tree a symlink in the tree points at
    secret: Path  # root:root 0600 file
    setuid: Path
    char_dev: Path  # char 1/3, 0666
    block_dev: Path  # block 8/0, 0660, 0:6
    fifo: Path
    fifo_link: Path  # a hardlink to fifo
    socket: Path
    whiteout: Path  # char 0/0
    wh_file: Path  # .wh.gone
    opaque_dir: Path  # trusted.overlay.opaque=y
    hardlinks: tuple[Path, ...]
    nonutf8: Path
    deep: Path


def _type(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "pipe"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"


def _extents(path: bytes) -> tuple[tuple[int, int], ...]:
    """Where a file has data (SEEK_DATA/SEEK_HOLE): equal for equal sparseness.
    (st_blocks would not do: it counts an external xattr block too.)"""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        size = os.fstat(fd).st_size
        extents = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            pos = end
        return tuple(extents)
    finally:
        os.close(fd)


def listing(root: Path) -> dict[bytes, Meta]:
    """The full metadata of every entry below `root` (root itself is b'.')."""
    raw: dict[bytes, tuple[os.stat_result, tuple[tuple[str, bytes], ...], bytes | None]] = {}
    base = os.fsencode(root)

    def add(rel: bytes, full: bytes) -> os.stat_result:
        st = os.lstat(full)
        names = sorted(os.listxattr(full, follow_symlinks=False))
        xattrs = tuple((n, os.getxattr(full, n, follow_symlinks=False)) for n in names)
        target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
        raw[rel] = (st, xattrs, target)
        return st

    add(b".", base)
    for dirpath, dirnames, filenames in os.walk(base):
        assert isinstance(dirpath, bytes)
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            add(os.path.relpath(full, base), full)
    groups: dict[tuple[int, int], list[bytes]] = {}
    for rel, (st, _, _) in raw.items():
        if not stat.S_ISDIR(st.st_mode):
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    result: dict[bytes, Meta] = {}
    for rel, (st, xattrs, target) in raw.items():
        mode = st.st_mode
        is_dir = stat.S_ISDIR(mode)
        others = () if is_dir else tuple(sorted(p for p in groups[(st.st_dev, st.st_ino)] if p != rel))
        is_dev = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        result[rel] = Meta(
            type=_type(mode),
            mode=stat.S_IMODE(mode),
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if is_dev else (0, 0),
            size=None if is_dir else st.st_size,
            extents=_extents(os.path.join(base, rel)) if stat.S_ISREG(mode) else None,
            mtime_ns=st.st_mtime_ns,
            xattrs=xattrs,
            target=target,
            links=others,
        )
    return result


def diff_listings(before: dict[bytes, Meta], after: dict[bytes, Meta], limit: int = 20) -> str:
    """Up to `limit` lines saying how two listings differ ('' when equal)."""
    lines = []
    for rel in sorted(set(before) | set(after)):
        a, b = before.get(rel), after.get(rel)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{rel!r}: {'only after' if a is None else 'only before'}")
            continue
        fields = [f"{f}: {getattr(a, f)!r} -> {getattr(b, f)!r}" for f in Meta._fields if getattr(a, f) != getattr(b, f)]
        lines.append(f"{rel!r}: " + "; ".join(fields))
        if len(lines) >= limit:
            lines.append("...")
            break
    return "\n".join(lines)


# --------------------------------------------------------------------- builders
def _file(path: Path | bytes, mode: int, owner: tuple[int, int] = (0, 0), data: bytes = b"") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if data:
            os.write(fd, data)
        os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _dir(path: Path | bytes, mode: int = 0o755, owner: tuple[int, int] = (0, 0)) -> None:
    os.mkdir(path)
    os.chown(path, *owner)
    os.chmod(path, mode)


def _node(path: Path, kind: int, mode: int, rdev: int = 0, owner: tuple[int, int] = (0, 0)) -> None:
    os.mknod(path, kind | mode, rdev)
    os.chown(path, *owner, follow_symlinks=False)
    os.chmod(path, mode)


def fix_times(root: Path, time_ns: int = FIXED_TIME_NS) -> None:
    """Give every entry (symlinks too) the same atime and mtime, children before parents."""
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(time_ns, time_ns), follow_symlinks=False)
    os.utime(base, ns=(time_ns, time_ns))


def build_varied_tree(root: Path, outside_dir: Path) -> VariedTree:
    """Build the varied tree in the new directory `root`; `outside_dir` gets a file
    the tree's outward symlink points at.  Needs root."""
    _dir(root, 0o755)
    outside = outside_dir / "outside-target"
    _file(outside, 0o600, (0, 0), b"not part of the tree\n")

    _dir(root / "etc", 0o755)
    _file(root / "etc/shadow", 0o600, (0, 0), b"root:!:1::::::\n")
    _file(root / "etc/world", 0o777, (0, 0), b"anyone\n")
    _file(root / "etc/nothing", 0o000, (0, 0), b"nobody reads this\n")
    _file(root / "etc/www", 0o640, (33, 33), b"www-data's\n")
    _file(root / "etc/user file with spaces", 0o644, (1000, 100), b"spaces\n")
    _file(root / "etc/new\nline", 0o664, (65534, 65534), b"newline\n")
    nonutf8 = os.fsencode(root / "etc") + b"/bad-\xff\xfe-name"
    _file(nonutf8, 0o604, (0, 6), b"latin\n")
    _file(root / "etc/empty", 0o644)
    os.setxattr(root / "etc/www", "user.mime_type", b"text/plain")
    os.setxattr(root / "etc/www", "user.empty", b"")
    os.setxattr(root / "etc", "user.comment", b"a directory with its own user xattr")

    _dir(root / "usr", 0o755)
    _dir(root / "usr/bin", 0o755)
    _file(root / "usr/bin/su", 0o4755, (0, 0), b"#!/bin/true\n")
    _file(root / "usr/bin/wall", 0o2755, (0, 5), b"#!/bin/true\n")
    _file(root / "usr/bin/both", 0o6711, (0, 0), b"#!/bin/true\n")
    _file(root / "usr/bin/sticky", 0o1755, (0, 0), b"#!/bin/true\n")
    # Hardlinks across directories.
    os.link(root / "usr/bin/su", root / "usr/su-again")
    os.link(root / "usr/bin/su", root / "etc/su-third")

    _dir(root / "tmp", 0o1777)
    _dir(root / "srv", 0o2775, (0, 50))
    _dir(root / "root", 0o700)
    _dir(root / "locked", 0o000)
    _file(root / "locked/inside", 0o644, (0, 0), b"behind a 0000 directory\n")
    _dir(root / "open", 0o777, (1000, 100))

    _dir(root / "dev", 0o755)
    _node(root / "dev/null", stat.S_IFCHR, 0o666, os.makedev(1, 3))
    _node(root / "dev/sda", stat.S_IFBLK, 0o660, os.makedev(8, 0), (0, 6))
    _node(root / "dev/fifo", stat.S_IFIFO, 0o644, 0, (33, 33))
    os.link(root / "dev/fifo", root / "dev/fifo-link")
    _node(root / "dev/sock", stat.S_IFSOCK, 0o755)
    _node(root / "dev/suid-char", stat.S_IFCHR, 0o4640, os.makedev(4, 64), (1000, 100))

    # Overlay markers of both styles.
    _dir(root / "layer", 0o755)
    _node(root / "layer/deleted", stat.S_IFCHR, 0o000, 0)  # kernel-style whiteout
    _file(root / "layer/.wh.gone", 0o000)
    _dir(root / "layer/opaque", 0o750, (0, 0))
    os.setxattr(root / "layer/opaque", "trusted.overlay.opaque", b"y")
    _file(root / "layer/opaque/kept", 0o644)
    _dir(root / "layer/aufs-opaque", 0o755)
    _file(root / "layer/aufs-opaque/.wh..wh..opq", 0o000)

    # Symlinks: relative, absolute, dangling, to a directory, out of the tree, owned by 33.
    os.symlink("../etc/shadow", root / "usr/shadow-link")
    os.symlink("/etc/passwd", root / "usr/abs-link")
    os.symlink("does/not/exist", root / "usr/dangling")
    os.symlink("bin", root / "usr/bin-link")
    os.symlink(str(outside), root / "usr/outside-link")
    os.lchown(root / "usr/dangling", 33, 33)

    # Sparse: 8 MiB with one block of data in the middle.
    fd = os.open(root / "usr/sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"middle", 4 << 20)
    os.ftruncate(fd, 8 << 20)
    os.close(fd)

    deep = root / "deep"
    _dir(deep, 0o755)
    for level in range(60):
        deep = deep / f"level {level}"
        _dir(deep, 0o700 if level % 7 == 0 else 0o755, OWNERS[level % len(OWNERS)])
    _file(deep / "bottom", 0o400, (33, 33), b"deep down\n")

    fix_times(root)
    return VariedTree(
        root=root,
        outside=outside,
        secret=root / "etc/shadow",
        setuid=root / "usr/bin/su",
        char_dev=root / "dev/null",
        block_dev=root / "dev/sda",
        fifo=root / "dev/fifo",
        fifo_link=root / "dev/fifo-link",
        socket=root / "dev/sock",
        whiteout=root / "layer/deleted",
        wh_file=root / "layer/.wh.gone",
        opaque_dir=root / "layer/opaque",
        hardlinks=(root / "usr/bin/su", root / "usr/su-again", root / "etc/su-third"),
        nonutf8=Path(os.fsdecode(nonutf8)),
        deep=deep,
    )


def build_large_tree(root: Path, entries: int, per_dir: int = 100) -> int:
    """A deterministic tree of about `entries` entries with varied modes and owners,
    a device/fifo every 50 entries and a hardlink every 97.  Needs root.
    Returns the number of entries made (root included)."""
    _dir(root, 0o755)
    made = 1
    d = 0
    modes = (0o644, 0o600, 0o755, 0o700, 0o4755, 0o000, 0o777)
    last_file: Path | None = None
    while made < entries:
        sub = root / f"d{d // 10}" / f"s{d}" if d % 10 else root / f"d{d // 10}"
        if d % 10 == 0:
            _dir(sub, 0o755 if d % 20 else 0o750, OWNERS[d % len(OWNERS)])
        else:
            _dir(sub, 0o700 if d % 3 == 0 else 0o755, OWNERS[d % len(OWNERS)])
        made += 1
        for i in range(per_dir):
            if made >= entries:
                break
            path = sub / f"f{i}"
            n = made
            if n % 50 == 0:
                _node(path, stat.S_IFCHR, 0o620, os.makedev(1, n % 256), OWNERS[n % len(OWNERS)])
            elif n % 50 == 25:
                _node(path, stat.S_IFIFO, 0o644, 0, OWNERS[n % len(OWNERS)])
            elif n % 97 == 0 and last_file is not None:
                os.link(last_file, path)
            else:
                _file(path, modes[n % len(modes)], OWNERS[n % len(OWNERS)])
                last_file = path
            made += 1
        d += 1
    fix_times(root)
    return made


def make_chain(root: Path, depth: int, name: str = "d") -> list[str]:
    """`depth` nested directories `name` under `root`, made through fds (pathlib and
    shutil recurse, and such a chain is deeper than Python's recursion limit)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, 0o755, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    return [name] * depth



@contextmanager
def deep_tree_removed(*roots: Path) -> Iterator[None]:
    """Remove `roots` afterwards, however the test ends: pytest's cleanup of its
    temporary directories recurses and would fail on a deep chain (for every
    later pytest run on this machine).  GNU rm walks iteratively."""
    try:
        yield
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", *map(str, roots)], check=False)
