"""Test support for the overlay filesystem: layers, mounts, snapshots, operations.

The kernel's overlayfs is the reference for cshare-overlay.  This module builds
identical copies of a set of layers, mounts one copy with the kernel overlay
(redirect_dir=off, index=off, metacopy=off) and another with the FUSE overlay
command under test, runs the same operations on both recording each result or
errno, and compares the merged trees and the upper layers.

The FUSE command is `cshare-overlay` unless CSHARE_OVERLAY_CMD names another
(e.g. `fuse-overlayfs`, to check this harness against the C implementation).

Times: the layer builders stamp every entry with fixed times far in the past,
and `utime` operations use such times too.  Any mtime from before 2017 is
therefore deterministic and compared; a later one means "set by the clock
during the test" and is compared only as "recent".
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import require, tool

from cshare.system.mountinfo import mount_table
from cshare_fuse.formats import optsyntax

# --------------------------------------------------------------------------
# Times

#: Every builder-made entry gets this mtime (plus a per-entry offset).
FIXED_TIME = 1_000_000_000
#: mtimes before this are test-chosen, so they must match exactly.
DETERMINISTIC_BEFORE = 1_500_000_000


# --------------------------------------------------------------------------
# Layer description and builder


@dataclass(frozen=True)
class Node:
    """One entry of a layer: what `build_layer` creates at `path` (relative)."""

    kind: str  # file dir symlink hardlink fifo whiteout aufs_whiteout opaque
    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""  # symlink target, or hardlink source path
    xattrs: tuple[tuple[str, bytes], ...] = ()
    style: str = "trusted"  # opaque marker: trusted, user, fuseoverlayfs, aufs


def file(path: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
         xattrs: dict[str, bytes] | None = None) -> Node:
    if isinstance(data, str):
        data = data.encode()
    return Node("file", path, data, mode, uid, gid, xattrs=tuple(sorted((xattrs or {}).items())))


def dir_(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
         xattrs: dict[str, bytes] | None = None) -> Node:
    return Node("dir", path, mode=mode, uid=uid, gid=gid,
                xattrs=tuple(sorted((xattrs or {}).items())))


def symlink(path: str, target: str, uid: int = 0, gid: int = 0) -> Node:
    return Node("symlink", path, target=target, uid=uid, gid=gid)


def hardlink(path: str, existing: str) -> Node:
    return Node("hardlink", path, target=existing)


def fifo(path: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Node:
    return Node("fifo", path, mode=mode, uid=uid, gid=gid)


def chardev(path: str, major: int, minor: int, mode: int = 0o666) -> Node:
    """A character device (not 0/0, which would be a whiteout); `data` holds the numbers."""
    return Node("chardev", path, data=f"{major}:{minor}".encode(), mode=mode)


def whiteout(path: str) -> Node:
    """Kernel style: a character device 0/0 named like the deleted entry."""
    return Node("whiteout", path)


def aufs_whiteout(path: str) -> Node:
    """AUFS/tar style: an empty file `.wh.NAME` beside where NAME was."""
    return Node("aufs_whiteout", path)


def opaque(path: str, style: str = "trusted", mode: int = 0o755) -> Node:
    """A directory that hides everything below it in lower layers."""
    return Node("opaque", path, mode=mode, style=style)


OPAQUE_XATTRS = {
    "trusted": "trusted.overlay.opaque",
    "user": "user.overlay.opaque",
    "fuseoverlayfs": "user.fuseoverlayfs.opaque",
}
AUFS_PREFIX = ".wh."
AUFS_OPAQUE = ".wh..wh..opq"


def build_layer(root: Path, nodes: Sequence[Node]) -> None:
    """Create `nodes` under `root`, then stamp fixed times bottom-up.

    Parent directories that are not listed are made 0755 root-owned.  Times are
    set last (deepest first) so that creating children does not disturb them.
    """
    root.mkdir(parents=True, exist_ok=True)
    made: list[Path] = [root]
    for node in nodes:
        p = root / node.path
        p.parent.mkdir(parents=True, exist_ok=True)
        for parent in reversed(p.relative_to(root).parents):
            made.append(root / parent)
        if node.kind == "file":
            p.write_bytes(node.data)
        elif node.kind in ("dir", "opaque"):
            p.mkdir(exist_ok=True)
            if node.kind == "opaque":
                if node.style == "aufs":
                    # Not stamped: entries get the same times in either marker style.
                    (p / AUFS_OPAQUE).write_bytes(b"")
                else:
                    os.setxattr(p, OPAQUE_XATTRS[node.style], b"y")
        elif node.kind == "symlink":
            os.symlink(node.target, p)
        elif node.kind == "hardlink":
            os.link(root / node.target, p)
        elif node.kind == "fifo":
            os.mkfifo(p)
        elif node.kind == "chardev":
            major, minor = (int(x) for x in node.data.split(b":"))
            os.mknod(p, stat.S_IFCHR | node.mode, os.makedev(major, minor))
        elif node.kind == "whiteout":
            os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif node.kind == "aufs_whiteout":
            p = p.parent / (AUFS_PREFIX + p.name)
            p.write_bytes(b"")
            p.chmod(0o644)
        else:
            raise ValueError(f"unknown node kind {node.kind}")
        # Owner first: chown(2) clears setuid/setgid, which the mode may ask for.
        if node.kind in ("file", "dir", "opaque", "fifo", "symlink", "chardev"):
            os.lchown(p, node.uid, node.gid)
        if node.kind in ("file", "dir", "opaque", "fifo", "chardev"):
            os.chmod(p, node.mode)
        for name, value in node.xattrs:
            os.setxattr(p, name, value, follow_symlinks=False)
        made.append(p)
    ordered = list(dict.fromkeys(made))  # first appearance order, no duplicates
    for i, p in sorted(enumerate(ordered), key=lambda ip: -len(ip[1].parts)):
        t = FIXED_TIME + 1000 * (i + 1)
        os.utime(p, ns=(t * 10**9, t * 10**9), follow_symlinks=False)


@dataclass
class LayerDirs:
    """One copy of a layer set, with its own upper, work and mount directories."""

    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path


def make_copy(base: Path, layers: Sequence[Sequence[Node]], names: Sequence[str] | None = None,
              upper_nodes: Sequence[Node] = ()) -> LayerDirs:
    """Build `layers` (topmost first) below `base`; `names` can give layer dir names."""
    base.mkdir(parents=True, exist_ok=True)
    lowers = []
    for i, nodes in enumerate(layers):
        name = names[i] if names else f"lower{i}"
        d = base / name
        build_layer(d, nodes)
        lowers.append(d)
    upper = base / "upper"
    build_layer(upper, upper_nodes)
    work = base / "work"
    mnt = base / "mnt"
    work.mkdir()
    mnt.mkdir()
    return LayerDirs(lowers, upper, work, mnt)


# --------------------------------------------------------------------------
# Mounts


def overlay_command() -> list[str]:
    """The FUSE overlay under test as an argv prefix."""
    cmd = os.environ.get("CSHARE_OVERLAY_CMD")
    if not cmd:
        return [tool("cshare-overlay")]
    argv = shlex.split(cmd)
    found = shutil.which(argv[0])
    require(found is not None, f"the {argv[0]} command named by CSHARE_OVERLAY_CMD")
    assert found is not None
    return [found, *argv[1:]]


def overlay_program_name() -> str:
    """The name `mount -t fuse.NAME` uses for the command under test."""
    return os.path.basename(overlay_command()[0])


def lowerdir_value(lowers: Sequence[Path]) -> str:
    return optsyntax.lowerdir_value(lowers)


def mount_points() -> set[str]:
    return set(mount_table())


def is_mounted(path: Path) -> bool:
    return str(Path(path).resolve()) in mount_points()


def mount_type(path: Path) -> str | None:
    """The type of the filesystem mounted at `path` (the visible, last mount there)."""
    return mount_table().get(str(Path(path).resolve()))


def kernel_mount(dirs: LayerDirs, *, upper: bool = True) -> None:
    opts = [f"lowerdir={lowerdir_value(dirs.lowers)}"]
    if upper:
        opts += [f"upperdir={dirs.upper}", f"workdir={dirs.work}"]
    opts += ["redirect_dir=off", "index=off", "metacopy=off"]
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(dirs.mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"kernel overlay mount failed: {r.stderr.strip()}")


def fuse_options(dirs: LayerDirs, *, upper: bool = True, extra: Sequence[str] = ()) -> str:
    opts = [f"lowerdir={lowerdir_value(dirs.lowers)}"]
    if upper:
        opts += [f"upperdir={dirs.upper}", f"workdir={dirs.work}"]
    opts += list(extra)
    return ",".join(opts)


def reference_command() -> list[str]:
    """fuse-overlayfs, the C implementation: a reference where the kernel is none."""
    found = shutil.which("fuse-overlayfs")
    require(found is not None, "fuse-overlayfs (Debian package fuse-overlayfs)")
    assert found is not None
    return [found]


def fuse_mount(dirs: LayerDirs, *, upper: bool = True, extra: Sequence[str] = (),
               log: Path | None = None, env: dict[str, str] | None = None,
               command: Sequence[str] | None = None) -> None:
    """Run the command under test; it daemonizes and must return once mounted.

    stdout/stderr go to a file, never a pipe: a daemon that keeps a pipe open
    would make us wait forever.
    """
    log = log or dirs.mnt.parent / "fuse.log"
    argv = [*(command or overlay_command()), "-o", fuse_options(dirs, upper=upper, extra=extra),
            str(dirs.mnt)]
    with open(log, "ab") as out:
        r = subprocess.run(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, timeout=60,
                           env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {r.returncode}: {log.read_text()[-2000:]}")
    if not is_mounted(dirs.mnt):
        raise RuntimeError(f"{argv[0]} returned 0 but {dirs.mnt} is not mounted yet")


def unmount(mnt: Path, fuse: bool) -> None:
    if not is_mounted(mnt):
        return
    if fuse:
        r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if r.returncode == 0:
            return
    r = subprocess.run(["umount", str(mnt)], capture_output=True)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@contextmanager
def mounted(dirs: LayerDirs, kind: str, *, upper: bool = True,
            extra: Sequence[str] = ()) -> Iterator[Path]:
    """Mount `dirs` with the kernel ("kernel"), the command under test ("fuse") or
    fuse-overlayfs ("fuse-overlayfs")."""
    if kind == "kernel":
        kernel_mount(dirs, upper=upper)
    elif kind == "fuse-overlayfs":
        fuse_mount(dirs, upper=upper, extra=extra, command=reference_command())
    else:
        fuse_mount(dirs, upper=upper, extra=extra)
    try:
        yield dirs.mnt
    finally:
        unmount(dirs.mnt, fuse=kind != "kernel")


@dataclass
class Pair:
    """The same layers mounted twice: by the kernel (reference) and the FUSE overlay."""

    kernel: LayerDirs
    fuse: LayerDirs

    @property
    def roots(self) -> tuple[Path, Path]:
        return self.kernel.mnt, self.fuse.mnt


@contextmanager
def overlay_pair(base: Path, layers: Sequence[Sequence[Node]], *, upper: bool = True,
                 names: Sequence[str] | None = None,
                 upper_nodes: Sequence[Node] = ()) -> Iterator[Pair]:
    """Identical copies of `layers` under base/kernel and base/fuse, both mounted."""
    kdirs = make_copy(base / "kernel", layers, names, upper_nodes)
    fdirs = make_copy(base / "fuse", layers, names, upper_nodes)
    with mounted(kdirs, "kernel", upper=upper), mounted(fdirs, "fuse", upper=upper):
        yield Pair(kdirs, fdirs)


# --------------------------------------------------------------------------
# Snapshots


def file_type(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"),
                       (stat.S_ISSOCK, "sock")):
        if test(mode):
            return name
    return "?"


def mtime_view(st: os.stat_result) -> int | str:
    """The mtime as compared: exact when test-chosen, else only "recent".

    Directories are special: the kernel keeps a parent's times when it copies a
    child up, a detail this suite does not hold implementations to, so a
    directory's mtime counts only when a `utime` operation chose it (those use
    sub-second values; the builders use whole seconds).
    """
    if st.st_mtime >= DETERMINISTIC_BEFORE:
        return "recent"
    if stat.S_ISDIR(st.st_mode) and st.st_mtime_ns % 10**9 == 0:
        return "recent"
    return st.st_mtime_ns


def is_internal_xattr(name: str) -> bool:
    """Overlay bookkeeping a merged view must never show."""
    return name.startswith(("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.",
                            "security.fuseoverlayfs."))


def xattrs_of(path: Path | str, hide_internal: bool = False) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        return {"<listxattr error>": errno.errorcode.get(exc.errno or 0, "?").encode()}
    out = {}
    for name in sorted(names):
        if hide_internal and is_internal_xattr(name):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            out[name] = b"<error " + errno.errorcode.get(exc.errno or 0, "?").encode() + b">"
    return out


def digest(path: Path | str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()[:16]


def describe(path: Path | str, hide_internal: bool = False) -> dict[str, Any]:
    """What is compared about one entry (never inode numbers, never ctime/atime)."""
    st = os.lstat(path)
    kind = file_type(st.st_mode)
    entry: dict[str, Any] = {
        "type": kind,
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": mtime_view(st),
    }
    if kind != "dir":
        # A merged directory's nlink and size are not defined by overlayfs
        # (the kernel reports nlink 1); everything else's are.
        entry["nlink"] = st.st_nlink
        entry["size"] = st.st_size
    if kind == "file":
        entry["content"] = digest(path)
    elif kind == "symlink":
        entry["target"] = os.readlink(path)
    elif kind in ("chr", "blk"):
        entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if kind in ("file", "dir"):
        entry["xattrs"] = xattrs_of(path, hide_internal)
    return entry


def snapshot(root: Path, below: str = "") -> dict[str, dict[str, Any]]:
    """Every entry under root/below (root itself as "."), keyed by relative path."""
    top = root / below if below else root
    out: dict[str, dict[str, Any]] = {}

    def failed(exc: OSError) -> None:
        # A directory that cannot be listed is a difference to report, not to skip.
        rel = os.path.relpath(exc.filename or top, top)
        out[f"{rel} <readdir>"] = {"error": errno.errorcode.get(exc.errno or 0, str(exc))}

    if not os.path.isdir(top):
        try:
            os.lstat(top)
        except OSError as exc:
            return {".": {"error": errno.errorcode.get(exc.errno or 0, str(exc))}}
    for dirpath, dirnames, filenames in os.walk(top, onerror=failed):
        dirnames.sort()
        for name in [".", *sorted(dirnames), *sorted(filenames)]:
            p = Path(dirpath) if name == "." else Path(dirpath) / name
            if name == "." and Path(dirpath) != top:
                continue
            rel = os.path.relpath(p, top)
            try:
                out[rel] = describe(p)
            except FileNotFoundError:
                continue  # a listed whiteout (see _listed_entry): no entry
            except OSError as exc:
                out[rel] = {"error": errno.errorcode.get(exc.errno or 0, str(exc))}
    return out


def inode_groups(root: Path, below: str = "") -> list[list[str]]:
    """Paths grouped by inode number: which names are one file, never the numbers.

    Equal partitions on two mounts mean the same names share an inode (hard
    links) and every other name has one of its own.
    """
    top = root / below if below else root
    groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            try:
                ino = os.lstat(p).st_ino
            except OSError:
                continue  # a listed whiteout, or an error the snapshot reports
            groups.setdefault(ino, []).append(os.path.relpath(p, top))
    return sorted(sorted(g) for g in groups.values())


def diff_trees(expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]],
               expected_name: str = "kernel", actual_name: str = "fuse") -> list[str]:
    """Human-readable differences, one line each; empty when the trees agree."""
    lines = []
    for path in sorted(set(expected) | set(actual)):
        a, b = expected.get(path), actual.get(path)
        if a is None:
            lines.append(f"{path}: only in {actual_name}: {b}")
        elif b is None:
            lines.append(f"{path}: only in {expected_name}: {a}")
        elif a != b:
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    lines.append(f"{path}: {key}: {expected_name}={a.get(key)!r} "
                                 f"{actual_name}={b.get(key)!r}")
    return lines


def merged_expectation(lowers: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """The merged tree of read-only `lowers` (topmost first), computed here.

    Understands both whiteout styles and every opaque marker, so it is the
    reference for layers the kernel cannot read (AUFS style, user.* markers).
    """
    out: dict[str, dict[str, Any]] = {}

    def visible(rel: str) -> list[Path]:
        """Layer paths that make up `rel`, topmost first (several if it is a merged dir)."""
        parts: list[Path] = []
        for lower in lowers:
            p = lower / rel if rel != "." else lower
            if not os.path.lexists(p):
                name = os.path.basename(rel)
                if rel != "." and os.path.lexists(p.parent / (AUFS_PREFIX + name)):
                    break
                continue
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                break
            if not stat.S_ISDIR(st.st_mode):
                if not parts:
                    parts.append(p)
                break
            parts.append(p)
            if _is_opaque(p):
                break
        return parts

    def walk(rel: str) -> None:
        parts = visible(rel)
        if not parts:
            return
        entry = describe(parts[0], hide_internal=True)
        out[rel] = entry
        if entry["type"] != "dir":
            return
        names: set[str] = set()
        for p in parts:
            for name in os.listdir(p):
                if not name.startswith(AUFS_PREFIX):
                    names.add(name)
        for name in sorted(names):
            walk(name if rel == "." else f"{rel}/{name}")

    walk(".")
    return out


def _is_opaque(p: Path) -> bool:
    if os.path.lexists(p / AUFS_OPAQUE):
        return True
    for name in OPAQUE_XATTRS.values():
        try:
            if os.getxattr(p, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def upper_view(upper: Path, lowers: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """The upper layer with the whiteout and opaque styles normalized away.

    Whiteouts (char 0/0 or `.wh.NAME`) become {"type": "whiteout"}; any opaque
    marker becomes "opaque": True.  Only what changes the merged view is kept:
    a whiteout or opaque marker over a name the merged lower layers do not show
    is dropped, and overlay bookkeeping xattrs are hidden.
    """
    raw = snapshot(upper)
    out: dict[str, dict[str, Any]] = {}
    below = merged_expectation(lowers) if lowers else {}

    def in_lower(rel: str, want_dir: bool = False) -> bool:
        """Is `rel` visible (as a directory, if asked) in the merged lower layers?"""
        entry = below.get(os.path.normpath(rel))
        return entry is not None and (not want_dir or entry["type"] == "dir")

    for rel, entry in raw.items():
        name = os.path.basename(rel)
        parent = os.path.dirname(rel)
        if name == AUFS_OPAQUE:
            continue
        if name.startswith(AUFS_PREFIX):
            real = os.path.join(parent, name[len(AUFS_PREFIX):])
            if in_lower(real):
                out[real] = {"type": "whiteout"}
            continue
        if entry["type"] == "chr" and entry.get("rdev") == (0, 0):
            if in_lower(rel):
                out[rel] = {"type": "whiteout"}
            continue
        entry = dict(entry)
        if entry["type"] == "dir":
            entry["opaque"] = rel != "." and in_lower(rel, want_dir=True) and \
                _is_opaque(upper / rel)
        if "xattrs" in entry:
            entry["xattrs"] = {k: v for k, v in entry["xattrs"].items()
                               if not is_internal_xattr(k)}
        out[rel] = entry
    return out


# --------------------------------------------------------------------------
# Operations

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: Path | str, dst: Path | str, flags: int) -> None:
    r = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst),
                        ctypes.c_uint(flags))
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


Op = tuple[Any, ...]


def stat_view(st: os.stat_result) -> tuple[Any, ...]:
    kind = file_type(st.st_mode)
    nlink = st.st_nlink if kind != "dir" else None
    size = st.st_size if kind != "dir" else None
    return (kind, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid, size, nlink,
            mtime_view(st))


def _open(p: Path, flags: int, mode: int = 0o644) -> int:
    # O_NONBLOCK: a fifo must never hang the runner; no effect on regular files.
    return os.open(p, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)


def _listed_entry(p: Path) -> bool:
    """Is a name readdir showed an entry?  The kernel overlay lists the whiteouts of a
    lower directory that merges with nothing, yet finds no such name (ENOENT)."""
    try:
        os.lstat(p)
    except FileNotFoundError:
        return False
    return True


def _do(root: Path, op: Op) -> Any:
    name, *args = op

    def P(rel: str) -> Path:
        return root / rel

    if name == "read":
        fd = _open(P(args[0]), os.O_RDONLY)
        try:
            return hashlib.sha256(os.read(fd, 1 << 20)).hexdigest()[:16]
        finally:
            os.close(fd)
    if name in ("write", "append", "create", "trunc_write"):
        flags = {"write": os.O_WRONLY, "append": os.O_WRONLY | os.O_APPEND,
                 "create": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                 "trunc_write": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}[name]
        mode = args[2] if name == "create" or len(args) > 2 and name == "trunc_write" else 0o644
        fd = _open(P(args[0]), flags, mode)
        try:
            data = args[1]
            if name == "write":
                return os.pwrite(fd, data, args[2])
            return os.write(fd, data)
        finally:
            os.close(fd)
    if name == "mkdir":
        return os.mkdir(P(args[0]), args[1])
    if name == "mkfifo":
        return os.mkfifo(P(args[0]), args[1])
    if name == "symlink":
        return os.symlink(args[0], P(args[1]))
    if name == "link":
        return os.link(P(args[0]), P(args[1]), follow_symlinks=False)
    if name == "unlink":
        return os.unlink(P(args[0]))
    if name == "rmdir":
        return os.rmdir(P(args[0]))
    if name == "rename":
        return os.rename(P(args[0]), P(args[1]))
    if name == "rename_noreplace":
        return renameat2(P(args[0]), P(args[1]), RENAME_NOREPLACE)
    if name == "rename_exchange":
        return renameat2(P(args[0]), P(args[1]), RENAME_EXCHANGE)
    if name == "chmod":
        return os.chmod(P(args[0]), args[1])
    if name == "chown":
        return os.lchown(P(args[0]), args[1], args[2])
    if name == "truncate":
        return os.truncate(P(args[0]), args[1])
    if name == "utime":
        return os.utime(P(args[0]), ns=(args[1], args[2]), follow_symlinks=False)
    if name == "setxattr":
        return os.setxattr(P(args[0]), args[1], args[2], follow_symlinks=False)
    if name == "getxattr":
        return os.getxattr(P(args[0]), args[1], follow_symlinks=False)
    if name == "listxattr":
        return sorted(os.listxattr(P(args[0]), follow_symlinks=False))
    if name == "removexattr":
        return os.removexattr(P(args[0]), args[1], follow_symlinks=False)
    if name == "stat":
        return stat_view(os.lstat(P(args[0])))
    if name == "listdir":
        return sorted(n for n in os.listdir(P(args[0])) if _listed_entry(P(args[0]) / n))
    if name == "readlink":
        return os.readlink(P(args[0]))
    if name == "statfs":
        sv = os.statvfs(P(args[0]))
        return (sv.f_bsize > 0, sv.f_blocks > 0, sv.f_namemax > 0)
    if name == "unlinked_fd":
        # Open, unlink, then write and read through the fd: must keep working.
        fd = _open(P(args[0]), os.O_RDWR)
        try:
            os.unlink(P(args[0]))
            os.pwrite(fd, args[1], 0)
            return (hashlib.sha256(os.pread(fd, 1 << 16, 0)).hexdigest()[:16],
                    os.fstat(fd).st_nlink)
        finally:
            os.close(fd)
    if name == "fsync":
        fd = _open(P(args[0]), os.O_RDONLY)
        try:
            os.fsync(fd)
            return None
        finally:
            os.close(fd)
    raise ValueError(f"unknown operation {name}")


def run_op(root: Path, op: Op) -> tuple[str, Any]:
    """("ok", value) or ("err", "ENOENT"); anything but OSError is a harness bug.

    ("as_user", UID, GID, OP) runs OP with those ids in a child process.
    """
    if op[0] == "as_user":
        return run_ops_as(op[1], op[2], root, [op[3]])[0]
    try:
        return ("ok", _do(root, op))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


def run_ops_as(uid: int, gid: int, root: Path, ops: Sequence[Op]) -> list[tuple[str, Any]]:
    """`run_op` for each op in a forked child with the given ids (no supplementary groups).

    A fork rather than a new interpreter: the test modules may sit where the
    other user cannot read them.
    """
    import pickle

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            payload = pickle.dumps([run_op(root, op) for op in ops])
            with os.fdopen(wfd, "wb") as out:
                out.write(payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError(f"operations as uid {uid} failed in the child (status {status})")
    result: list[tuple[str, Any]] = pickle.loads(data)
    return result


def format_ops(ops: Sequence[Op]) -> str:
    return "\n".join(f"  {i:3d}. {op!r}" for i, op in enumerate(ops))


@dataclass
class Divergence:
    step: int
    op: Op
    kernel: tuple[str, Any]
    fuse: tuple[str, Any]

    def __str__(self) -> str:
        return f"step {self.step} {self.op!r}: kernel={self.kernel!r} fuse={self.fuse!r}"


@dataclass
class Lockstep:
    """Runs operations on two roots at once and records where they disagree."""

    kernel_root: Path
    fuse_root: Path
    ops: list[Op] = field(default_factory=list)
    divergences: list[Divergence] = field(default_factory=list)

    def run(self, op: Op) -> tuple[tuple[str, Any], tuple[str, Any]]:
        k = run_op(self.kernel_root, op)
        f = run_op(self.fuse_root, op)
        self.ops.append(op)
        if k != f:
            self.divergences.append(Divergence(len(self.ops) - 1, op, k, f))
        return k, f

    def run_all(self, ops: Sequence[Op]) -> None:
        for op in ops:
            self.run(op)

    def report(self) -> str:
        return ("operations (a reproduction):\n" + format_ops(self.ops) + "\ndivergences:\n"
                + "\n".join(f"  {d}" for d in self.divergences))


def expected_fuse_groups(pair: Pair, kernel_groups: list[list[str]],
                         below: str) -> list[list[str]]:
    """The inode partition cshare-overlay may show instead of the kernel's.

    One tolerated divergence: names of a lower hardlink that none of them has
    copied up share one inode on the kernel's overlay; cshare-overlay gives each
    name its own node, because pyfuse3 reports the node number as st_ino and a
    write must copy up only the name it came through (index=off).  Such names
    may then each stand alone; every other group must be exactly the kernel's.
    """
    upper = pair.kernel.upper / below if below else pair.kernel.upper
    expected: list[list[str]] = []
    for group in kernel_groups:
        untouched_lower = len(group) > 1 and not any(
            os.path.lexists(upper / name) for name in group)
        if untouched_lower:
            expected.extend([name] for name in group)
        else:
            expected.append(group)
    return sorted(expected)


def check_pair(pair: Pair, ops: Sequence[Op], *, below: str = "", compare_upper: bool = True,
               lockstep: Lockstep | None = None) -> list[str]:
    """Run `ops` on both mounts; return every disagreement (results, trees, uppers)."""
    ls = lockstep or Lockstep(pair.kernel.mnt, pair.fuse.mnt)
    ls.run_all(ops)
    problems = [f"result: {d}" for d in ls.divergences]
    problems += ["merged: " + line for line in diff_trees(
        snapshot(pair.kernel.mnt, below), snapshot(pair.fuse.mnt, below))]
    kernel_groups = inode_groups(pair.kernel.mnt, below)
    fuse_groups = inode_groups(pair.fuse.mnt, below)
    # The kernel's partition is always right; the split one is tolerated.
    if fuse_groups not in (kernel_groups, expected_fuse_groups(pair, kernel_groups, below)):
        k_shared = [g for g in kernel_groups if g not in fuse_groups]
        f_shared = [g for g in fuse_groups if g not in kernel_groups]
        problems.append(f"inodes: names sharing an inode differ: kernel={k_shared} "
                        f"fuse={f_shared}")
    if compare_upper:
        kernel_upper = _upper_below(pair.kernel, below)
        fuse_upper = _upper_below(pair.fuse, below)
        # An entry copied up without need (identical to what the lower layers
        # show) changes nothing anyone can see, so one side may have it and the
        # other not; every other difference in what was written to upper counts.
        lower = merged_expectation([p / below for p in pair.kernel.lowers] if below
                                   else pair.kernel.lowers)
        for mine, theirs in ((kernel_upper, fuse_upper), (fuse_upper, kernel_upper)):
            for rel in [r for r in mine if r not in theirs]:
                if _same_as_lower(mine[rel], lower.get(rel)):
                    del mine[rel]
        problems += ["upper: " + line for line in diff_trees(kernel_upper, fuse_upper)]
    if problems:
        problems.insert(0, "operations (a reproduction):\n" + format_ops(ls.ops))
    return problems


def _same_as_lower(entry: dict[str, Any], lower: dict[str, Any] | None) -> bool:
    """Is this upper entry a plain copy of the merged lower entry (times aside)?"""
    if lower is None or entry.get("opaque"):
        return False
    ignore = {"mtime", "nlink", "opaque"}
    return ({k: v for k, v in entry.items() if k not in ignore}
            == {k: v for k, v in lower.items() if k not in ignore})


def _upper_below(dirs: LayerDirs, below: str) -> dict[str, dict[str, Any]]:
    """The normalized upper layer under `below` (keys relative to it)."""
    if not below:
        return upper_view(dirs.upper, dirs.lowers)
    top = dirs.upper / below
    if not top.is_dir():
        return {}
    return upper_view(top, [lower / below for lower in dirs.lowers])


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def serving_processes(mnt: Path) -> list[int]:
    """Processes whose command line names `mnt` (an overlay daemon serving it)."""
    needle = os.fsencode(str(mnt))
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found

