"""`cshare convert`: make a tree readable by every user without losing its metadata.

Every entry (the root directory included) gets `user.containers.override_stat`
= `UID:GID:0MODE:TYPE` (formats.md §1) and then mode 0755; owners on the host
stay as they are.  Devices, fifos and sockets cannot carry a user xattr, so each
becomes an empty 0755 regular file, owned like the original, whose TYPE says
what it was.  Symlinks are not touched.  Overlay markers keep their meaning:
whiteouts (char 0/0, `.wh.*` files) stay whiteouts, and a `trusted.overlay.opaque`
directory also gets `user.overlay.opaque`, which users can read.  A char 0/0
whiteout is left exactly as it is (it cannot carry a user xattr, and only its
name matters).  `.wh.NAME` and `.wh..wh..opq` files are converted like any
file: they keep their name and emptiness, so they stay whiteouts, and the
rule "every file and directory has a record" stays without exceptions.

Order per entry makes the run crash-safe and idempotent: the xattr is written
first and only when no record exists yet (an original, once recorded, is never
overwritten; older forms count as records), then the mode is changed.  Device
replacement and directory times go through cshare.marks.

Speed: a run is a few syscalls per entry (open, fstat, flistxattr,
fsetxattr, fchmod, close), spread over worker processes by
cshare.tree.parallel; hardlinked entries are left to the parent process so that
the names of one inode are handled together.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from cshare_fuse.formats import markers
from cshare_fuse.formats.overrides import (
    ALL_OVERRIDE_XATTRS,
    OVERRIDE_XATTR,
    Override,
    OverrideError,
    read_override,
)

from ..errors import CshareError
from . import inplace, marks
from .walk import Dir, WalkReport, display, open_root, symlink_root_problem

CONVERTED_MODE = 0o755
PROBE_XATTR = "user.cshare.probe"
_OVERRIDE_NAMES = frozenset(ALL_OVERRIDE_XATTRS)


class ConvertReport(WalkReport):
    """What a convert run did (or, with dry_run, would do)."""

    COUNTERS = ("converted", "already_converted", "devices_replaced", "opaque_rewritten")
    converted: int
    already_converted: int
    devices_replaced: int
    opaque_rewritten: int


def check_can_convert(root: Path, *, probe_write: bool = True) -> None:
    """Refuse, before any change, a run that cannot succeed (one-line CshareError)."""
    if os.geteuid() != 0:
        raise CshareError("this command must run as root (it changes files owned by others)")
    if not os.path.lexists(root):
        raise CshareError(f"{root}: no such file or directory")
    problem = symlink_root_problem(root)
    if problem:
        raise CshareError(problem)
    if not os.path.isdir(root):
        raise CshareError(f"{root}: not a directory")
    try:
        fd, _st = open_root(root)
    except OSError as exc:
        raise CshareError(f"{root}: cannot open: {exc.strerror}") from None
    try:
        if probe_write:
            os.setxattr(fd, PROBE_XATTR, b"1")
            os.removexattr(fd, PROBE_XATTR)
        else:
            os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise CshareError(
                f"{root}: this filesystem does not support user xattrs; copy the tree to "
                "one that does (ext4, xfs, btrfs, tmpfs)"
            ) from None
        if exc.errno == errno.EROFS:
            raise CshareError(f"{root}: read-only filesystem") from None
        raise CshareError(f"{root}: cannot set a user xattr: {exc.strerror}") from None
    finally:
        os.close(fd)


class _Shared(inplace.SharedState):
    """What the walk's threads share: hardlinks seen, replaced devices, encoded values."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[int, int, int], bytes] = {}  # (st_mode, uid, gid) -> value


class _Converter(inplace.InPlaceVisitor[ConvertReport, _Shared]):
    """The walk visitor; one per thread, each with its own report."""

    def __init__(self, shared: _Shared, dry_run: bool, on_entry: Callable[[], None] | None) -> None:
        super().__init__(ConvertReport(), shared, dry_run, on_entry)
        self.values = shared.values  # one attribute lookup less per file

    # ------------------------------------------------------------------ visitor
    def directory(self, d: Dir, names: frozenset[str]) -> None:
        if markers.TRUSTED_OPAQUE in names:
            self._opaque(d, names)
        self._record(d.fd, d.st, names, d.path)

    def regular(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        if st.st_nlink > 1 and not self.shared.first_time(st.st_ino):
            return
        if names or self.dry_run:
            self._record(fd, st, names, d.join(name))
            return
        # The common case, kept free of calls: a fresh file gets its record and 0755.
        key = (st.st_mode, st.st_uid, st.st_gid)
        value = self.values.get(key)
        if value is None:
            value = self._value(st)
        self.report.converted += 1
        os.setxattr(fd, OVERRIDE_XATTR, value, os.XATTR_CREATE)
        if st.st_mode & 0o7777 != CONVERTED_MODE:
            os.chmod(fd, CONVERTED_MODE)

    def other(self, d: Dir, name: str, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            return  # symlinks keep no override (the kernel refuses user xattrs on them)
        if markers.is_whiteout_stat(mode, st.st_rdev):
            return  # a kernel-style whiteout stays a whiteout
        self._replace(d, name, st)

    # ------------------------------------------------------------------ work
    def _value(self, st: os.stat_result) -> bytes:
        key = (st.st_mode, st.st_uid, st.st_gid)
        value = self.values.get(key)
        if value is None:
            value = Override.from_stat(st.st_mode, st.st_uid, st.st_gid).format()
            self.values[key] = value
        return value

    def _record(self, fd: int, st: os.stat_result, names: frozenset[str], path: str) -> None:
        """Record the original of a file or directory, then open it up to 0755."""
        if names and not names.isdisjoint(_OVERRIDE_NAMES):
            # Already converted (by us or an older tool): never overwrite the record.
            try:
                read_override(lambda n: os.getxattr(fd, n) if n in names else None)
            except OverrideError as exc:
                self.report.errors.append((path, f"unparsable override {exc}; left untouched"))
                return
            self.report.already_converted += 1
            if stat.S_IMODE(st.st_mode) != CONVERTED_MODE:
                # A run killed between the xattr and the chmod: finish it.
                if self.dry_run:
                    self.report.changes.append(f"chmod 0755 (already recorded): {display(path)}")
                else:
                    os.chmod(fd, CONVERTED_MODE)
            return
        value = self._value(st)
        self.report.converted += 1
        if self.dry_run:
            self.report.changes.append(f"record {value.decode()}: {display(path)}")
            return
        try:
            os.setxattr(fd, OVERRIDE_XATTR, value, os.XATTR_CREATE)
        except FileExistsError:
            pass  # appeared since listxattr: it is a record, keep it
        if stat.S_IMODE(st.st_mode) != CONVERTED_MODE:
            os.chmod(fd, CONVERTED_MODE)

    def _opaque(self, d: Dir, names: frozenset[str]) -> None:
        """Make a trusted.overlay.opaque marker visible to users as user.overlay.opaque."""
        if os.getxattr(d.fd, markers.TRUSTED_OPAQUE) != b"y":
            return
        if markers.USER_OPAQUE in names:
            return  # the layer's own user-visible marker, or one an earlier run added
        self.report.opaque_rewritten += 1
        if self.dry_run:
            self.report.changes.append(f"add user.overlay.opaque=y: {display(d.path)}")
            return
        if marks.OPAQUE_ADDED not in names:
            os.setxattr(d.fd, marks.OPAQUE_ADDED, b"y")
        os.setxattr(d.fd, markers.USER_OPAQUE, b"y")

    def _replace(self, d: Dir, name: str, st: os.stat_result) -> None:
        """Replace a device, fifo or socket by an empty 0755 file that records it."""
        value = Override.from_stat(st.st_mode, st.st_uid, st.st_gid, st.st_rdev).format()
        self.report.devices_replaced += 1
        if self.dry_run:
            self.report.changes.append(f"replace by a file recording {value.decode()}: {display(d.join(name))}")
            return
        marks.before_namespace_change(d)
        with self.shared.lock:  # two names of one device inode must end up linked
            self._replace_locked(d, name, st, value)

    def _replace_locked(self, d: Dir, name: str, st: os.stat_result, value: bytes) -> None:
        tmp = marks.temporary_name(marks.CONVERT_TMP_PREFIX, st.st_ino)
        # Looked up whatever st_nlink says now: replacing the first name lowered it.
        kept = self.shared.replaced.get(st.st_ino)
        if kept is not None:
            # Another name of the same device inode was replaced already: keep them linked.
            marks.clear_temporary(d, tmp)
            marks.link_fd(kept, d, tmp)
        else:
            fd = _create_exclusive(d, tmp)
            try:
                os.setxattr(fd, OVERRIDE_XATTR, value)
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, CONVERTED_MODE)  # after chown, and whatever the umask
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                if st.st_nlink > 1:
                    self.shared.replaced[st.st_ino] = os.open(
                        tmp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd
                    )
            finally:
                os.close(fd)
        os.rename(tmp, name, src_dir_fd=d.fd, dst_dir_fd=d.fd)


def _create_exclusive(d: Dir, name: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, 0o700, dir_fd=d.fd)
    except FileExistsError:
        # Left by a killed run (the listing may show it only later): start afresh.
        os.unlink(name, dir_fd=d.fd)
        return os.open(name, flags, 0o700, dir_fd=d.fd)


def convert_tree(
    root: Path,
    *,
    dry_run: bool = False,
    on_entry: Callable[[], None] | None = None,
    workers: int | None = None,
    processes: int | None = None,
) -> ConvertReport:
    """Convert the tree at `root` in place (see the module docstring).

    Per-entry failures are collected in the report's `errors`; the caller
    decides the exit status.  Call `check_can_convert` first.  The walk runs
    in `processes` processes (default: parallel.default_processes(); a
    small tree never forks) or, with `workers` > 1, in that many threads.  A
    dry run uses one, so that its list of changes comes in walk order.
    """
    shared = _Shared()
    try:
        converters = inplace.walk_in_place(Path(root), lambda: _Converter(shared, dry_run, on_entry),
                                           dry_run=dry_run, workers=workers, processes=processes)
    finally:
        shared.close()
    return ConvertReport.total(c.report for c in converters)
