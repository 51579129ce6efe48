"""Files and their handles: create, open, read, write, release, fsync.

A handle remembers the layer its descriptor is open on, so a reader that
opened a lower file follows it to the upper copy once a writer copied it up.
"""

from __future__ import annotations

import errno
import os
import stat as statmod

import pyfuse3

from ..attrs import entry_attributes
from ..caller import Caller
from ..datasource import Stat
from ..deferral import run_deferred
from ..errors import OverlayError
from ..handles import FileHandle
from ..inodes import Node
from .attributes import AttributeOps
from .entries import EntryOps

_CREATE_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC
#: How much of a lower file an open asks the kernel to read ahead at once: the
#: first READs of `cat` (256 KiB) or of a small file's whole contents.
_PREFETCH_BYTES = 256 << 10


class FileOps(EntryOps, AttributeOps):
    def _open_flags(self, flags: int) -> int:
        flags &= ~_CREATE_STRIP
        if self.writeback:
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def _register_fd(self, fd: int, node: Node, writable: bool) -> int:
        self.table.fd_opened(node, fd)
        return self.handles.add(FileHandle(fd, node, writable, node.layer))

    def _current_fd(self, fh: int) -> int:
        """The handle's fd, moved to the upper copy if the file was copied up since.

        A file opened read-only on a lower layer and then copied up by a writer
        must show the new data, as the kernel's overlay does (since Linux 4.19).
        """
        handle = self.handles.file(fh)
        node = handle.node
        if handle.layer != node.layer and node.layer == self.upper_index and not node.unlinked:
            assert self.upper is not None
            fd = self.upper.open(node.path(), os.O_RDONLY)
            self.table.fd_opened(node, fd)
            old, handle.fd, handle.layer = handle.fd, fd, node.layer
            self.table.fd_closed(node, old)
            os.close(old)
        return handle.fd

    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int, uid: int,
                     gid: int, pid: int = 0) -> tuple[int, Node, pyfuse3.EntryAttributes]:
        """Create and open a regular file; returns its handle, node and attributes."""
        parent, real, removed, owner_uid, owner_gid, _ = await self._new_entry(
            parent_ino, name, uid, gid)
        fd = os.open(real, self._open_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                     | os.O_NOFOLLOW, statmod.S_IMODE(mode))
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (owner_uid, owner_gid):
                self._give(fd, owner_uid, owner_gid, mode)
                st = os.fstat(fd)
            new = Stat.from_os(st)
            node = self._added_upper(parent, name, removed, new)
        except BaseException:
            os.close(fd)
            raise
        attributes = entry_attributes(node.ino, new, self.policy, merged_dir=False)
        fh = self._register_fd(fd, node, writable=True)
        # A setgid bit without group-execute, in a group from a setgid directory:
        # the first write by a caller outside that group takes it, as in the kernel.
        if new.mode & (statmod.S_ISUID | statmod.S_ISGID):
            self.handles.file(fh).drops = self.dropped_privileges(node, Caller(uid, gid, pid))
        return fh, node, attributes

    async def open(self, ino: int, flags: int, caller: Caller | None = None) -> int:
        node = self.node(ino)
        if node.is_dir:
            raise OverlayError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if writing:
            await self.ensure_upper(node)
        if node.layer == self.upper_index:
            assert self.upper is not None
            fd = self.upper.open(node.path(), self._open_flags(flags)
                                 | (flags & os.O_TRUNC if writing else 0))
        else:
            # A plugin's open may wait (a network): in the pool, unless it is inline.
            fd = await run_deferred(self._open_lower, node, flags)
        fh = self._register_fd(fd, node, writing)
        if writing and caller is not None:
            handle = self.handles.file(fh)
            handle.drops = self.dropped_privileges(node, caller)
            if handle.drops and flags & os.O_TRUNC:
                self._drop_privileges(handle)  # the truncation was a change
        return fh

    def _open_lower(self, node: Node, flags: int) -> int:
        if node.layer == self.upper_index:  # copied up while the open waited
            assert self.upper is not None
            return self.upper.open(node.path(), os.O_RDONLY)
        fd = self.layers[node.layer].open(node.path(), os.O_RDONLY | (flags & os.O_NOATIME))
        # Start reading the file's beginning now: the disk works while this
        # reply and the kernel's first READ travel, instead of after them.
        try:
            os.posix_fadvise(fd, 0, _PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # an advice; a plugin's descriptor (a pipe?) may not take it
        return fd

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self._current_fd(fh), size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handles.file(fh)
        if handle.drops:
            self._drop_privileges(handle)
        return os.pwrite(handle.fd, data, offset)

    def _drop_privileges(self, handle: FileHandle) -> None:
        """A change through `handle` takes the setuid/setgid bits its opener may not keep."""
        node = handle.node
        mode = statmod.S_IMODE(self.attributes(node).st_mode)
        if mode & handle.drops and not node.unlinked:
            record = self._upper_override(node) if self.copy_policy.override_xattr else None
            record = self._change_mode(handle.fd, record, mode & ~handle.drops)
            if record is not None:
                assert self.upper is not None and self.copy_policy.override_xattr is not None
                os.setxattr(self.upper.real(node.path()), self.copy_policy.override_xattr,
                            record.format(), follow_symlinks=False)

    def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if not isinstance(handle, FileHandle):
            return
        os.close(handle.fd)
        self.table.fd_closed(handle.node, handle.fd)

    def fsync(self, fh: int, datasync: bool) -> None:
        if not self.config.fsync:
            return
        fd = self.handles.file(fh).fd
        (os.fdatasync if datasync else os.fsync)(fd)
