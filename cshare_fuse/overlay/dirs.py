"""Directories and rename: unlink, rmdir, rename, exchange, and reading a directory.

Removing or moving a name that a lower layer also holds leaves a whiteout in
its place; a directory arriving where a lower entry is hidden is made opaque.
With redirect_dir=off a directory with lower parts cannot move (EXDEV), as
with the kernel's overlay.
"""

from __future__ import annotations

import errno
import os

import pyfuse3

from .. import merge, whiteout
from ..errors import OverlayError
from ..formats import markers
from ..handles import DirHandle
from ..inodes import Node
from ..libc import RENAME_EXCHANGE, renameat2
from .entries import EntryOps


class DirOps(EntryOps):
    async def unlink(self, parent_ino: int, name: bytes) -> None:
        self._writable()
        parent = self.node(parent_ino)
        node = self.child(parent, name)
        if node is None:
            raise OverlayError(errno.ENOENT)
        if node.is_dir:
            raise OverlayError(errno.EISDIR)
        await self._remove_entry(parent, name, node)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        self._writable()
        parent = self.node(parent_ino)
        node = self.child(parent, name)
        if node is None:
            raise OverlayError(errno.ENOENT)
        if not node.is_dir:
            raise OverlayError(errno.ENOTDIR)
        if node is self.root:
            raise OverlayError(errno.EBUSY)
        if self.listing(node):
            raise OverlayError(errno.ENOTEMPTY)
        await self._remove_entry(parent, name, node)

    def _write_whiteout(self, parent: Node, name: bytes) -> None:
        """Hide the lower entries of `name` in `parent` (whose upper copy exists)."""
        assert self.upper is not None
        fd = os.open(self.upper.real(parent.path()), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            whiteout.write_whiteout(fd, name)
        finally:
            os.close(fd)

    async def _remove_entry(self, parent: Node, name: bytes, node: Node) -> None:
        before = self._stat_or_none(node)
        await self.ensure_upper(parent)
        assert self.upper is not None
        parent_real = self.upper.real(parent.path())
        real = parent_real + b"/" + name
        in_upper = node.layer == self.upper_index and node.has_name(parent, name)
        if in_upper:
            if node.is_dir:
                _clear_markers(real)
                os.rmdir(real)
            else:
                os.unlink(real)
        if not in_upper or self.lower_holds(parent, name):
            self._write_whiteout(parent, name)
        self.table.detach_name(parent, name, node, before)

    async def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
                     new_name: bytes, flags: int) -> None:
        self._writable()
        old_parent = self.node(old_parent_ino)
        new_parent = self.node(new_parent_ino)
        if flags & pyfuse3.RENAME_EXCHANGE:
            await self._exchange(old_parent, old_name, new_parent, new_name)
            return
        if markers.is_reserved_name(new_name):
            raise OverlayError(errno.EINVAL)
        src = self.child(old_parent, old_name)
        if src is None:
            raise OverlayError(errno.ENOENT)
        dst = self.child(new_parent, new_name)
        if dst is src:
            return  # two names of one file: rename(2) does nothing
        if dst is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise OverlayError(errno.EEXIST)
        self._check_move(src, new_parent, dst)
        dst_before = self._stat_or_none(dst) if dst is not None else None
        await self.ensure_upper(src)
        await self.ensure_upper(new_parent)
        assert self.upper is not None
        old_real = self.upper.real(merge.child_path(old_parent.path(), old_name))
        new_real = self.upper.real(merge.child_path(new_parent.path(), new_name))
        self._remove_upper_whiteout(new_parent, new_name)
        if dst is not None and dst.layer == self.upper_index and dst.is_dir:
            _clear_markers(new_real)
        os.rename(old_real, new_real)
        if self.lower_holds(old_parent, old_name):
            self._write_whiteout(old_parent, old_name)
        if src.is_dir and self.lower_holds(new_parent, new_name):
            whiteout.mark_opaque(new_real)
        if dst is not None:
            self.table.detach_name(new_parent, new_name, dst, dst_before)
        old_parent.drop_child(old_name, src)
        src.move_name(old_parent, old_name, new_parent, new_name)
        new_parent.set_child(new_name, src)

    def _check_move(self, src: Node, new_parent: Node, dst: Node | None) -> None:
        """The checks of rename(2) that need the nodes, before anything changes."""
        if src.is_dir and any(i != self.upper_index for i in src.dir_layers):
            # redirect_dir=off: a directory with lower parts cannot move; tools fall
            # back to copying, exactly as with the kernel's overlay.
            raise OverlayError(errno.EXDEV)
        if src.is_dir and _is_ancestor(src, new_parent):
            raise OverlayError(errno.EINVAL)
        if dst is not None:
            if dst.is_dir and not src.is_dir:
                raise OverlayError(errno.EISDIR)
            if src.is_dir and not dst.is_dir:
                raise OverlayError(errno.ENOTDIR)
            if dst.is_dir and self.listing(dst):
                raise OverlayError(errno.ENOTEMPTY)

    async def _exchange(self, old_parent: Node, old_name: bytes, new_parent: Node,
                        new_name: bytes) -> None:
        """renameat2(RENAME_EXCHANGE): both names exist and swap what they show."""
        first = self.child(old_parent, old_name)
        second = self.child(new_parent, new_name)
        if first is None or second is None:
            raise OverlayError(errno.ENOENT)
        if first is second:
            return
        for node in (first, second):
            if node.is_dir and any(i != self.upper_index for i in node.dir_layers):
                raise OverlayError(errno.EXDEV)
        if (first.is_dir and _is_ancestor(first, new_parent)) or (
                second.is_dir and _is_ancestor(second, old_parent)):
            raise OverlayError(errno.EINVAL)
        await self.ensure_upper(first)
        await self.ensure_upper(second)
        assert self.upper is not None
        old_real = self.upper.real(merge.child_path(old_parent.path(), old_name))
        new_real = self.upper.real(merge.child_path(new_parent.path(), new_name))
        renameat2(old_real, new_real, RENAME_EXCHANGE)
        # A directory arriving where a lower entry is hidden must not merge with it.
        if first.is_dir and self.lower_holds(new_parent, new_name):
            whiteout.mark_opaque(new_real)
        if second.is_dir and self.lower_holds(old_parent, old_name):
            whiteout.mark_opaque(old_real)
        first.move_name(old_parent, old_name, new_parent, new_name)
        second.move_name(new_parent, new_name, old_parent, old_name)
        old_parent.set_child(old_name, second)
        new_parent.set_child(new_name, first)

    # ------------------------------------------------------------------ reading
    def opendir(self, ino: int) -> int:
        node = self.node(ino)
        if not node.is_dir:
            raise OverlayError(errno.ENOTDIR)
        return self.handles.add(DirHandle(node))

    def dir_entries(self, fh: int, start: int) -> list[tuple[bytes, Node | None]]:
        handle = self.handles.directory(fh)
        if handle.entries is None or start == 0:
            handle.entries = self.listing(handle.node)  # a new list: later changes do not move offsets
        return handle.entries

    def releasedir(self, fh: int) -> None:
        self.handles.pop(fh)


def _is_ancestor(node: Node, other: Node) -> bool:
    current: Node | None = other
    while current is not None:
        if current is node:
            return True
        current = current.parent
    return False


def _clear_markers(real_dir: bytes) -> None:
    """Remove the whiteouts and markers an upper directory holds before it goes."""
    for entry in os.scandir(real_dir):
        st = entry.stat(follow_symlinks=False)
        if entry.name.startswith(markers.WHITEOUT_PREFIX) or markers.is_whiteout_stat(
                st.st_mode, st.st_rdev):
            os.unlink(entry.path)
        else:
            raise OverlayError(errno.ENOTEMPTY)
