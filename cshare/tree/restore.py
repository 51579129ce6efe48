"""`cshare restore`: the exact inverse of `cshare convert`.

For every file or directory that carries an override record (any name
cshare_fuse.formats.overrides understands): owner and mode are set back from the
record, then every override xattr is removed; a placeholder file whose TYPE is
a device, fifo or socket is replaced by the real node again (mknod, owner,
mode, times), through a temporary name and one rename (cshare.tree.marks).  The
`user.overlay.opaque` that convert added (and only that one) is removed.
Entries without a record are left alone, so a second run changes nothing and a
killed run is finished by the next one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from cshare_fuse.formats import markers
from cshare_fuse.formats.overrides import ALL_OVERRIDE_XATTRS, Override, OverrideError, parse_named

from . import inplace, marks
from .walk import Dir, WalkReport, display

_OVERRIDE_NAMES = frozenset(ALL_OVERRIDE_XATTRS)
_SPECIAL_TYPES = (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


class RestoreReport(WalkReport):
    """What a restore run did (or, with dry_run, would do)."""

    COUNTERS = ("restored", "devices_recreated", "opaque_removed")
    restored: int
    devices_recreated: int
    opaque_removed: int


class _Shared(inplace.SharedState):
    """What the walk's threads share: hardlinks seen, recreated nodes, parsed values."""

    def __init__(self) -> None:
        super().__init__()
        self.parsed: dict[tuple[str, bytes], Override] = {}  # values repeat: parse each once


class _Restorer(inplace.InPlaceVisitor[RestoreReport, _Shared]):
    """The walk visitor; one per thread, each with its own report."""

    def __init__(self, shared: _Shared, dry_run: bool, on_entry: Callable[[], None] | None) -> None:
        super().__init__(RestoreReport(), shared, dry_run, on_entry)
        self.parsed = shared.parsed  # one attribute lookup less per record

    # ------------------------------------------------------------------ visitor
    def directory(self, d: Dir, names: frozenset[str]) -> None:
        if marks.OPAQUE_ADDED in names:
            self._opaque(d, names)
        self._restore_inode(d, names)

    def regular(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        shared = self.shared
        if st.st_nlink > 1 or st.st_ino in shared.replaced:
            # A hardlinked inode: decide and act under the lock, so that two names
            # of one placeholder seen by two threads end up as one node.
            with shared.lock:
                if st.st_ino in shared.replaced:
                    # Another name of a placeholder already recreated (its link count
                    # has dropped by now, so the inode number is what tells).
                    self._relink(d, name, st)
                    return
                if not shared.first_time_locked(st.st_ino):
                    return  # restored through its first name
                self._restore_file(d, name, fd, st, names)
            return
        self._restore_file(d, name, fd, st, names)

    def _restore_file(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        if not names or names.isdisjoint(_OVERRIDE_NAMES):
            return
        override = self._parse(fd, names, d, name)
        if override is None:
            return
        if override.file_type in _SPECIAL_TYPES:
            self._recreate(d, name, st, override)
        elif override.file_type in (None, stat.S_IFREG):
            self._apply(fd, st, names, override, d, name)
        else:
            self.report.errors.append(
                (d.join(name), f"records type {override.type_name()} but is a regular file; left untouched")
            )

    def other(self, d: Dir, name: str, st: os.stat_result) -> None:
        if marks.is_temporary(name) and not stat.S_ISLNK(st.st_mode):
            self.leftover(d, name, "node")

    # ------------------------------------------------------------------ work
    def _parse(self, fd: int, names: frozenset[str], d: Dir, name: str | None) -> Override | None:
        """The preferred record among `names` (read_override's order), parsed once per value.

        The entry is `name` in `d`, or `d` itself when `name` is None (the path
        is only spelled out for a message: most entries never need it)."""
        for xattr in ALL_OVERRIDE_XATTRS:
            if xattr not in names:
                continue
            value = os.getxattr(fd, xattr)
            key = (xattr, value)
            override = self.parsed.get(key)
            if override is None:
                try:
                    override = parse_named(xattr, value)
                except OverrideError as exc:
                    self.report.errors.append(
                        (_where(d, name), f"unparsable override {xattr}={exc}; left untouched")
                    )
                    return None
                self.parsed[key] = override
            return override
        return None

    def _restore_inode(self, d: Dir, names: frozenset[str]) -> None:
        """The directory `d` itself."""
        if not names or names.isdisjoint(_OVERRIDE_NAMES):
            return
        override = self._parse(d.fd, names, d, None)
        if override is None:
            return
        if override.file_type not in (None, stat.S_IFMT(d.st.st_mode)):
            self.report.errors.append(
                (d.path, f"records type {override.type_name()} but is a directory; left untouched")
            )
            return
        self._apply(d.fd, d.st, names, override, d, None)

    def _apply(
        self, fd: int, st: os.stat_result, names: frozenset[str], override: Override, d: Dir,
        name: str | None,
    ) -> None:
        """Owner and mode back from the record, then the record removed (last: crash safety)."""
        self.report.restored += 1
        if self.dry_run:
            self.report.changes.append(
                f"restore {override.uid}:{override.gid} {override.mode:04o}: {display(_where(d, name))}"
            )
            return
        chowned = (st.st_uid, st.st_gid) != (override.uid, override.gid)
        if chowned:
            os.fchown(fd, override.uid, override.gid)
        # chown clears setuid/setgid, so the mode is set after it.
        if chowned or stat.S_IMODE(st.st_mode) != override.mode:
            os.fchmod(fd, override.mode)
        for xattr in ALL_OVERRIDE_XATTRS:
            if xattr in names:
                os.removexattr(fd, xattr)

    def _opaque(self, d: Dir, names: frozenset[str]) -> None:
        self.report.opaque_removed += 1
        if self.dry_run:
            self.report.changes.append(f"remove user.overlay.opaque added by convert: {display(d.path)}")
            return
        if markers.USER_OPAQUE in names:
            os.removexattr(d.fd, markers.USER_OPAQUE)
        os.removexattr(d.fd, marks.OPAQUE_ADDED)

    def _recreate(self, d: Dir, name: str, st: os.stat_result, override: Override) -> None:
        """Replace a placeholder file by the device, fifo or socket it records."""
        self.report.devices_recreated += 1
        if self.dry_run:
            self.report.changes.append(
                f"recreate {override.type_name()} {override.uid}:{override.gid} "
                f"{override.mode:04o}: {display(d.join(name))}"
            )
            return
        marks.before_namespace_change(d)
        tmp = marks.temporary_name(marks.RESTORE_TMP_PREFIX, st.st_ino)
        marks.clear_temporary(d, tmp)
        assert override.file_type is not None
        os.mknod(tmp, override.file_type | override.mode, override.rdev, dir_fd=d.fd)
        os.chown(tmp, override.uid, override.gid, dir_fd=d.fd, follow_symlinks=False)
        # After chown (which clears setuid/setgid) and whatever the umask was.
        os.chmod(tmp, override.mode, dir_fd=d.fd)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=d.fd, follow_symlinks=False)
        if st.st_nlink > 1:
            self.shared.replaced[st.st_ino] = os.open(
                tmp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd
            )
        os.rename(tmp, name, src_dir_fd=d.fd, dst_dir_fd=d.fd)

    def _relink(self, d: Dir, name: str, st: os.stat_result) -> None:
        """Another name of a placeholder already recreated: link it to the new node."""
        node = self.shared.replaced[st.st_ino]
        marks.before_namespace_change(d)
        tmp = marks.temporary_name(marks.RESTORE_TMP_PREFIX, st.st_ino)
        marks.clear_temporary(d, tmp)
        marks.link_fd(node, d, tmp)
        os.rename(tmp, name, src_dir_fd=d.fd, dst_dir_fd=d.fd)


def _where(d: Dir, name: str | None) -> str:
    """The path of entry `name` of `d`, or of `d` itself when `name` is None."""
    return d.path if name is None else d.join(name)


def restore_tree(
    root: Path,
    *,
    dry_run: bool = False,
    on_entry: Callable[[], None] | None = None,
    workers: int | None = None,
    processes: int | None = None,
) -> RestoreReport:
    """Undo `convert_tree` on the tree at `root` (see the module docstring).

    Per-entry failures are collected in the report's `errors`.  Call
    `cshare.tree.convert.check_can_convert` first.  `processes` and `workers` as
    for convert_tree.
    """
    shared = _Shared()
    try:
        restorers = inplace.walk_in_place(Path(root), lambda: _Restorer(shared, dry_run, on_entry),
                                          dry_run=dry_run, workers=workers, processes=processes)
    finally:
        shared.close()
    return RestoreReport.total(x.report for x in restorers)
