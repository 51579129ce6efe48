"""New names: checks, owners and the mkdir, mknod, symlink and link operations.

Creating an entry clears a whiteout the upper layer holds under its name (the
new entry then hides a lower one) and hands it to its creator.  `create` of a
regular file lives with the other file operations (files.py) and uses the
helpers here.
"""

from __future__ import annotations

import errno
import os
import stat as statmod

from .. import merge, whiteout
from ..datasource import Stat
from ..errors import OverlayError
from ..formats import markers
from ..inodes import Node
from .base import OverlayBase


class EntryOps(OverlayBase):
    # ------------------------------------------------------------------ helpers for writes
    def _prepare_new_name(self, parent: Node, name: bytes) -> bool:
        """Check `name` may be created in `parent`; clear an upper whiteout there.

        Returns True if a whiteout was removed (the new entry replaces something
        deleted, so a new directory there must be opaque).
        """
        if markers.is_reserved_name(name):
            raise OverlayError(errno.EINVAL, f"{name!r}: names starting .wh. are reserved")
        if len(name) > merge.NAME_MAX:
            raise OverlayError(errno.ENAMETOOLONG)
        if self.child(parent, name) is not None:
            raise OverlayError(errno.EEXIST)
        assert self.upper is not None
        return self._remove_upper_whiteout(parent, name)

    def _remove_upper_whiteout(self, parent: Node, name: bytes) -> bool:
        assert self.upper is not None
        parent_real = self.upper.real(parent.path())
        removed = False
        real = parent_real + b"/" + name
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            pass
        else:
            if markers.is_whiteout_stat(st.st_mode, st.st_rdev):
                os.unlink(real)
                removed = True
        aufs = parent_real + b"/" + markers.aufs_whiteout_name(name)
        if os.path.lexists(aufs):
            os.unlink(aufs)
            removed = True
        return removed

    def _owner_for_new(self, parent: Node, ctx_uid: int, ctx_gid: int) -> tuple[int, int, bool]:
        """Owner of a new entry, and whether it inherits a setgid directory's group."""
        uid = self.policy.stored_uid(ctx_uid)
        gid = self.policy.stored_gid(ctx_gid)
        parent_st = self.stat_of(parent)
        inherit = bool(parent_st.mode & statmod.S_ISGID)
        if inherit:
            gid = parent_st.gid
        return uid, gid, inherit

    def _give(self, target: bytes | int, uid: int, gid: int, mode: int | None = None) -> None:
        """Hand a new entry to its creator; `mode` is set again when chown cleared bits."""
        if not self.copy_policy.can_chown:
            return
        try:
            if isinstance(target, int):
                os.fchown(target, uid, gid)
            else:
                os.chown(target, uid, gid, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM):
                raise
        if mode is not None and mode & (statmod.S_ISUID | statmod.S_ISGID):
            # chown(2) drops setuid/setgid; the creator asked for them.
            if isinstance(target, int):
                os.fchmod(target, statmod.S_IMODE(mode))
            else:
                os.chmod(target, statmod.S_IMODE(mode))

    def _added(self, parent: Node, name: bytes) -> Node:
        parent.drop_child(name)
        node = self.child(parent, name)
        if node is None:
            raise OverlayError(errno.EIO, f"{name!r} vanished right after creation")
        return node

    def _added_upper(self, parent: Node, name: bytes, whiteout_removed: bool, st: Stat) -> Node:
        """`_added` for a regular file just created in upper, its stat taken from its fd.

        Saves resolving the name again (small-file creation is request-bound).
        What resolve would find: the upper file; a lower shows the name only if
        the whiteout that hid it was just removed; a fresh file has no override
        record, so its raw stat is its stat.
        """
        assert self.upper_index is not None
        parent.drop_child(name)
        node = self._make_node(parent, name, merge.Resolved(self.upper_index, st, (), whiteout_removed))
        parent.set_child(name, node)
        return node

    async def _new_entry(self, parent_ino: int, name: bytes, uid: int, gid: int
                         ) -> tuple[Node, bytes, bool, int, int, bool]:
        """Prepare creating `name` in `parent_ino`: checks, copy-up of the parent.

        Returns the parent node, the real path in the upper layer, whether a
        whiteout was removed there, and the new entry's owner (uid, gid, and
        whether the group was inherited from a setgid directory).
        """
        self._writable()
        parent = self.node(parent_ino)
        removed = self._prepare_new_name(parent, name)
        await self.ensure_upper(parent)
        assert self.upper is not None
        real = self.upper.real(merge.child_path(parent.path(), name))
        owner_uid, owner_gid, inherit = self._owner_for_new(parent, uid, gid)
        return parent, real, removed, owner_uid, owner_gid, inherit

    # ------------------------------------------------------------------ names
    async def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        parent, real, removed, owner_uid, owner_gid, inherit = await self._new_entry(
            parent_ino, name, uid, gid)
        dir_mode = statmod.S_IMODE(mode) | (statmod.S_ISGID if inherit else 0)
        os.mkdir(real, dir_mode)
        self._give(real, owner_uid, owner_gid, dir_mode)
        if inherit or dir_mode & statmod.S_ISVTX:
            os.chmod(real, dir_mode)  # mkdir(2) may drop bits; set exactly what was asked
        if removed:
            whiteout.mark_opaque(real)
        return self._added(parent, name)

    async def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int,
                    gid: int) -> Node:
        self._writable()
        if statmod.S_ISCHR(mode) and rdev == 0:
            raise OverlayError(errno.EPERM, "a 0/0 character device would read as a whiteout")
        parent, real, removed, owner_uid, owner_gid, _ = await self._new_entry(
            parent_ino, name, uid, gid)
        os.mknod(real, mode, rdev)
        self._give(real, owner_uid, owner_gid, mode)
        return self._added(parent, name)

    async def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int,
                      gid: int) -> Node:
        parent, real, removed, owner_uid, owner_gid, _ = await self._new_entry(
            parent_ino, name, uid, gid)
        os.symlink(target, real)
        self._give(real, owner_uid, owner_gid)
        return self._added(parent, name)

    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Node:
        self._writable()
        node = self.node(ino)
        if node.is_dir:
            raise OverlayError(errno.EPERM)
        new_parent = self.node(new_parent_ino)
        self._prepare_new_name(new_parent, new_name)
        await self.ensure_upper(node)
        await self.ensure_upper(new_parent)
        assert self.upper is not None
        os.link(self.upper.real(node.path()),
                self.upper.real(merge.child_path(new_parent.path(), new_name)),
                follow_symlinks=False)
        node.add_alias(new_parent, new_name)
        new_parent.set_child(new_name, node)
        self.table.share_backing(node)
        return node
