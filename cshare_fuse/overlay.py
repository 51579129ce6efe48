"""The overlay's operations as plain methods: names, files, directories, xattrs.

`Overlay` owns the layers, the node table and the open handles, and implements
each filesystem operation by node number and name, raising OverlayError or
OSError on failure.  It knows nothing of pyfuse3's request objects: the thin
handlers in `operations` call it, and tests can drive it without FUSE.  Methods
that may copy a large file up are async (the copy runs in a worker thread, under
a per-node lock); everything else runs inline on the trio loop, because small
syscalls cost less than a thread hop.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat as statmod
from collections.abc import Sequence

import pyfuse3
import trio

from . import merge, whiteout
from .attrs import AttrPolicy, entry_attributes
from .copyup import CopyPolicy, copy_up
from .datasource import DataSource, Stat
from .errors import OverlayError
from .formats.overrides import FUSE_OVERLAYFS_XATTR, OVERRIDE_XATTR, Override
from .handles import DirHandle, FileHandle, HandleTable
from .inodes import Node, NodeTable
from .layers import Layer, LowerLayer, UpperLayer
from .options import MountConfig

log = logging.getLogger("cshare_fuse")

#: Copies larger than this go to a worker thread so other requests keep flowing.
_THREAD_COPY_BYTES = 1 << 20
_CREATE_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC


class Overlay:
    def __init__(self, config: MountConfig, lowers: Sequence[DataSource],
                 upperdir: str | None, workdir: str | None) -> None:
        self.config = config
        honour = any(src.honour_overrides for src in lowers) or config.xattr_permissions > 0
        self.layers: list[Layer] = []
        self.upper: UpperLayer | None = None
        if upperdir is not None:
            self.upper = UpperLayer(0, upperdir, honour_overrides=honour)
            self.layers.append(self.upper)
        for source in lowers:
            self.layers.append(LowerLayer(len(self.layers), source))
        #: Index of the upper layer in self.layers; -1 (matching no node) without one.
        self.upper_index = 0 if self.upper is not None else -1
        self.workdir = os.fsencode(workdir) if workdir else None
        primary = self.upper.root if self.upper else os.fsencode(lowers[0].root)
        self.table = NodeTable(os.stat(primary).st_dev)
        self.root = self.table.make_root(0)
        self.root.dir_layers = self._root_layers()
        if self.upper is None:
            self.root.lower_stat = self.layers[0].stat(b"")
        self.policy = AttrPolicy.from_config(config)
        override_name = {0: None, 1: FUSE_OVERLAYFS_XATTR, 2: OVERRIDE_XATTR}[config.xattr_permissions]
        self.copy_policy = CopyPolicy(override_name, can_chown=os.geteuid() == 0)
        self.handles = HandleTable()
        self.read_only = self.upper is None or config.read_only
        # Writeback caching: the kernel merges writes and may read pages of a file
        # opened write-only; it also implements O_APPEND itself.
        self.writeback = config.writeback and not self.read_only

    def _root_layers(self) -> tuple[int, ...]:
        result: list[int] = []
        for layer in self.layers:
            result.append(layer.index)
            if not layer.is_upper and layer.is_opaque(b""):
                break
        return tuple(result)

    # ------------------------------------------------------------------ nodes
    def node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            raise OverlayError(errno.ESTALE, f"unknown node {ino}")
        return node

    def child(self, parent: Node, name: bytes) -> Node | None:
        """The node for `name` in the merged directory `parent`, or None."""
        node = parent.children.get(name)
        if node is not None:
            return node
        if whiteout.is_reserved_name(name):
            return None
        resolved = merge.resolve(self.layers, parent.dir_layers, parent.path(), name)
        if resolved is None:
            return None
        node = self._make_node(parent, name, resolved)
        parent.children[name] = node
        return node

    def _make_node(self, parent: Node, name: bytes, res: merge.Resolved) -> Node:
        st = res.stat
        key = (st.dev, st.ino)
        # Names of one upper file share a node: they are one file.  Names of a lower
        # hardlink do not: a write copies up only the name it came through (as the
        # kernel's overlay does with index=off), and the kernel tells us only the
        # node, never the name, on open.  pyfuse3 reports the node number as
        # st_ino, so such names show distinct inode numbers (with the lower nlink).
        hardlinked = (not statmod.S_ISDIR(st.mode) and st.nlink > 1
                      and self.layers[res.layer].is_upper)
        if hardlinked:
            existing = self.table.by_backing.get(key)
            if existing is not None and not existing.unlinked and existing.layer == res.layer:
                existing.aliases.add((parent, name))
                return existing
        node = Node(self.table.number_for(st), parent, name, res.layer, statmod.S_IFMT(st.mode))
        node.dir_layers = res.dir_layers
        node.has_lower = res.has_lower
        node.backing_key = key
        if not self.layers[res.layer].is_upper:
            node.lower_stat = st
        self.table.add(node)
        if hardlinked:
            self.table.by_backing[key] = node
        return node

    def lookup(self, parent_ino: int, name: bytes) -> Node | None:
        """The node of `name` in directory `parent_ino`, or None when it does not exist."""
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise OverlayError(errno.ENOTDIR)
        return self.child(parent, name)

    def stat_of(self, node: Node) -> Stat:
        if node.lower_stat is not None and node.layer != self.upper_index:
            return node.lower_stat
        st: Stat | None = None
        if not node.unlinked and self.upper is not None:
            st = self.upper.stat(node.path())
        if st is None:
            for fd in node.open_fds:
                return Stat.from_os(os.fstat(fd))
            if node.unlinked and node.removed_stat is not None:
                return node.removed_stat
            raise OverlayError(errno.ENOENT, f"{node!r} vanished from the upper layer")
        return st

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.entry is not None:
            return node.entry
        st = self.stat_of(node)
        merged = node.is_dir and len(node.dir_layers) > 1
        entry = entry_attributes(node.ino, st, self.policy, merged_dir=merged)
        if node.lower_stat is not None and node.layer != self.upper_index:
            node.entry = entry
        return entry

    def listing(self, node: Node) -> list[tuple[bytes, Node]]:
        if node.listing is None:
            entries: list[tuple[bytes, Node]] = []
            for name in merge.merged_names(self.layers, node.dir_layers, node.path()):
                child = self.child(node, name)
                if child is not None:
                    entries.append((name, child))
            node.listing = entries
        return node.listing

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.file_type != statmod.S_IFLNK:
            raise OverlayError(errno.EINVAL)
        return self.layers[node.layer].readlink(node.path())

    # ------------------------------------------------------------------ copy-up
    def _writable(self) -> UpperLayer:
        if self.read_only or self.upper is None:
            raise OverlayError(errno.EROFS)
        return self.upper

    async def ensure_upper(self, node: Node) -> None:
        """Make sure `node`'s entry exists in the upper layer (parents first)."""
        upper = self._writable()
        if node.layer == self.upper_index:
            return
        if node.unlinked:
            # Its name is gone: a copy would bring a deleted file back.
            raise OverlayError(errno.ENOENT, f"{node!r} was removed")
        if node.parent is not None:
            await self.ensure_upper(node.parent)
        running = node.lock
        if isinstance(running, trio.Lock) and running.locked():
            # A copy of this node is running in a thread: wait for it to finish.
            async with running:
                pass
            if node.layer == self.upper_index:
                return
        assert self.workdir is not None
        source = self.layers[node.layer]
        assert isinstance(source, LowerLayer)
        path = node.path()
        real = source.raw_stat(path)
        want = node.lower_stat or source.stat(path)
        assert want is not None
        args = (source, path, real, want, upper, self.workdir, self.copy_policy)
        if statmod.S_ISREG(real.mode) and real.size > _THREAD_COPY_BYTES:
            # Large: copied in a thread so that other requests go on meanwhile;
            # the lock makes requests for this same node wait for the copy.
            if node.lock is None:
                node.lock = trio.Lock()
            assert isinstance(node.lock, trio.Lock)
            async with node.lock:
                if node.layer == self.upper_index:
                    return
                await trio.to_thread.run_sync(copy_up, *args)
                self._now_in_upper(node)
        else:
            # Small: copied synchronously, so no other task runs until it is
            # done and no lock (a trio checkpoint per copy-up) is needed.
            copy_up(*args)
            self._now_in_upper(node)
        copied = upper.stat(path)
        node.backing_key = (copied.dev, copied.ino) if copied is not None else None

    def _now_in_upper(self, node: Node) -> None:
        node.layer = self.upper_index
        node.lower_stat = None
        node.entry = None
        node.has_lower = True
        if node.is_dir:
            node.dir_layers = (self.upper_index, *node.dir_layers)
        if node.backing_key is not None and self.table.by_backing.get(node.backing_key) is node:
            del self.table.by_backing[node.backing_key]
        # Other names of a lower hardlink still show the lower file: copy-up breaks
        # the link (as the kernel's overlay does without index=on).
        for parent, name in list(node.aliases):
            node.aliases.discard((parent, name))
            if parent.children.get(name) is node:
                del parent.children[name]
                parent.listing = None
                _invalidate_entry(parent.ino, name)

    # ------------------------------------------------------------------ helpers for writes
    def _prepare_new_name(self, parent: Node, name: bytes) -> bool:
        """Check `name` may be created in `parent`; clear an upper whiteout there.

        Returns True if a whiteout was removed (the new entry replaces something
        deleted, so a new directory there must be opaque).
        """
        if whiteout.is_reserved_name(name):
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
            if whiteout.is_whiteout_stat(st.st_mode, st.st_rdev):
                os.unlink(real)
                removed = True
        aufs = parent_real + b"/" + whiteout.aufs_whiteout_name(name)
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

    def _added(self, parent: Node, name: bytes, whiteout_removed: bool) -> Node:
        parent.children.pop(name, None)
        parent.listing = None
        node = self.child(parent, name)
        if node is None:
            raise OverlayError(errno.EIO, f"{name!r} vanished right after creation")
        if whiteout_removed:
            node.has_lower = True
        node.lookups += 1
        return node

    def _added_upper(self, parent: Node, name: bytes, whiteout_removed: bool, st: Stat) -> Node:
        """`_added` for a regular file just created in upper, its stat taken from its fd.

        Saves resolving the name again (small-file creation is request-bound).
        What resolve would find: the upper file; a lower shows the name only if
        the whiteout that hid it was just removed; a fresh file has no override
        record, so its raw stat is its stat.
        """
        assert self.upper_index is not None
        parent.children.pop(name, None)
        parent.listing = None
        node = self._make_node(parent, name, merge.Resolved(self.upper_index, st, (), whiteout_removed))
        parent.children[name] = node
        node.lookups += 1
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
        return self._added(parent, name, removed)

    async def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int,
                    gid: int) -> Node:
        self._writable()
        if statmod.S_ISCHR(mode) and rdev == 0:
            raise OverlayError(errno.EPERM, "a 0/0 character device would read as a whiteout")
        parent, real, removed, owner_uid, owner_gid, _ = await self._new_entry(
            parent_ino, name, uid, gid)
        os.mknod(real, mode, rdev)
        self._give(real, owner_uid, owner_gid, mode)
        return self._added(parent, name, removed)

    async def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int,
                      gid: int) -> Node:
        parent, real, removed, owner_uid, owner_gid, _ = await self._new_entry(
            parent_ino, name, uid, gid)
        os.symlink(target, real)
        self._give(real, owner_uid, owner_gid)
        return self._added(parent, name, removed)

    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[int, Node, pyfuse3.EntryAttributes]:
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
        return self._register_fd(fd, node, writable=True), node, attributes

    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Node:
        self._writable()
        node = self.node(ino)
        if node.is_dir:
            raise OverlayError(errno.EPERM)
        new_parent = self.node(new_parent_ino)
        removed = self._prepare_new_name(new_parent, new_name)
        await self.ensure_upper(node)
        await self.ensure_upper(new_parent)
        assert self.upper is not None
        os.link(self.upper.real(node.path()),
                self.upper.real(merge.child_path(new_parent.path(), new_name)),
                follow_symlinks=False)
        node.aliases.add((new_parent, new_name))
        new_parent.children[new_name] = node
        new_parent.listing = None
        if node.backing_key is not None:
            self.table.by_backing.setdefault(node.backing_key, node)
        if removed:
            node.has_lower = True  # the alias name hides a lower entry too
        node.lookups += 1
        return node

    def _detach_name(self, parent: Node, name: bytes, node: Node,
                     before: Stat | None = None) -> None:
        """Forget that `node` is called `name` in `parent` (after unlink/rename away)."""
        if parent.children.get(name) is node:
            del parent.children[name]
        parent.listing = None
        if node.parent is parent and node.name == name:
            if node.aliases:
                node.parent, node.name = node.aliases.pop()
            else:
                if before is not None:
                    node.removed_stat = before.replace(nlink=max(before.nlink - 1, 0))
                node.unlinked = True
                if node.lookups == 0 and not node.open_fds:
                    self.table.drop(node)
        else:
            node.aliases.discard((parent, name))

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

    @staticmethod
    def _move_name(node: Node, parent: Node, name: bytes, new_parent: Node,
                   new_name: bytes) -> None:
        """`node`, called `name` in `parent`, is now `new_name` in `new_parent`."""
        if node.parent is parent and node.name == name:
            node.parent, node.name = new_parent, new_name
        else:  # one alias of a hardlinked file
            node.aliases.discard((parent, name))
            node.aliases.add((new_parent, new_name))

    def _stat_or_none(self, node: Node) -> Stat | None:
        try:
            return self.stat_of(node)
        except (OSError, OverlayError):
            return None

    async def _remove_entry(self, parent: Node, name: bytes, node: Node) -> None:
        before = self._stat_or_none(node)
        await self.ensure_upper(parent)
        assert self.upper is not None
        parent_real = self.upper.real(parent.path())
        real = parent_real + b"/" + name
        in_upper = node.layer == self.upper_index and (node.parent is parent and node.name == name
                                            or (parent, name) in node.aliases)
        if in_upper:
            if node.is_dir:
                _clear_markers(real)
                os.rmdir(real)
            else:
                os.unlink(real)
        if node.has_lower or not in_upper:
            self._write_whiteout(parent, name)
        self._detach_name(parent, name, node, before)

    async def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
                     new_name: bytes, flags: int) -> None:
        self._writable()
        old_parent = self.node(old_parent_ino)
        new_parent = self.node(new_parent_ino)
        if flags & pyfuse3.RENAME_EXCHANGE:
            await self._exchange(old_parent, old_name, new_parent, new_name)
            return
        if whiteout.is_reserved_name(new_name):
            raise OverlayError(errno.EINVAL)
        src = self.child(old_parent, old_name)
        if src is None:
            raise OverlayError(errno.ENOENT)
        dst = self.child(new_parent, new_name)
        if dst is src:
            return  # two names of one file: rename(2) does nothing
        if dst is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise OverlayError(errno.EEXIST)
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
        dst_before = self._stat_or_none(dst) if dst is not None else None
        await self.ensure_upper(src)
        await self.ensure_upper(new_parent)
        assert self.upper is not None
        old_real = self.upper.real(merge.child_path(old_parent.path(), old_name))
        new_real = self.upper.real(merge.child_path(new_parent.path(), new_name))
        new_has_lower = self._remove_upper_whiteout(new_parent, new_name)
        if dst is not None:
            new_has_lower = new_has_lower or dst.has_lower
            if dst.layer == self.upper_index and dst.is_dir:
                _clear_markers(new_real)
        os.rename(old_real, new_real)
        if src.has_lower:
            self._write_whiteout(old_parent, old_name)
        if src.is_dir and new_has_lower:
            whiteout.mark_opaque(new_real)
        if dst is not None:
            self._detach_name(new_parent, new_name, dst, dst_before)
        if old_parent.children.get(old_name) is src:
            del old_parent.children[old_name]
        old_parent.listing = None
        self._move_name(src, old_parent, old_name, new_parent, new_name)
        src.has_lower = new_has_lower
        new_parent.children[new_name] = src
        new_parent.listing = None

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
        # Each name keeps hiding what it hid below; a directory arriving where a
        # lower entry is hidden must not merge with it.
        first_hides, second_hides = first.has_lower, second.has_lower
        if first.is_dir and second_hides:
            whiteout.mark_opaque(new_real)
        if second.is_dir and first_hides:
            whiteout.mark_opaque(old_real)
        self._move_name(first, old_parent, old_name, new_parent, new_name)
        self._move_name(second, new_parent, new_name, old_parent, old_name)
        first.has_lower, second.has_lower = second_hides, first_hides
        old_parent.children[old_name] = second
        new_parent.children[new_name] = first
        old_parent.listing = None
        new_parent.listing = None

    # ------------------------------------------------------------------ attributes
    async def setattr(self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None) -> pyfuse3.EntryAttributes:
        node = self.node(ino)
        # Even a setattr that changes nothing visible (chown(f, -1, -1): ctime only)
        # copies up, as with the kernel's overlay: the file was "changed".
        changing = (fields.update_mode or fields.update_uid or fields.update_gid
                    or fields.update_size or fields.update_atime or fields.update_mtime
                    or fields.update_ctime)
        if not changing:
            return self.attributes(node)
        if node.unlinked:
            return self._setattr_unlinked(node, attr, fields, fh)
        await self.ensure_upper(node)
        assert self.upper is not None
        handle = self.handles.file(fh) if fh is not None and fh else None
        real = self.upper.real(node.path())
        target: bytes | int = handle.fd if handle is not None and node.unlinked else real
        is_link = node.file_type == statmod.S_IFLNK
        record = self._upper_override(node) if self.copy_policy.override_xattr else None
        if fields.update_uid or fields.update_gid:
            uid = self.policy.stored_uid(attr.st_uid) if fields.update_uid else -1
            gid = self.policy.stored_gid(attr.st_gid) if fields.update_gid else -1
            if record is not None:
                record = Override(uid if uid != -1 else record.uid,
                                  gid if gid != -1 else record.gid,
                                  record.mode & ~(statmod.S_ISUID | statmod.S_ISGID)
                                  if not node.is_dir else record.mode,
                                  record.file_type, record.rdev_major, record.rdev_minor)
            elif isinstance(target, int):
                os.fchown(target, uid, gid)
            else:
                os.chown(target, uid, gid, follow_symlinks=False)
        if fields.update_mode and not is_link:
            mode = statmod.S_IMODE(attr.st_mode)
            if record is not None:
                record = Override(record.uid, record.gid, mode, record.file_type,
                                  record.rdev_major, record.rdev_minor)
            elif isinstance(target, int):
                os.fchmod(target, mode)
            else:
                os.chmod(target, mode)
        if record is not None:
            name = self.copy_policy.override_xattr
            assert name is not None
            os.setxattr(real, name, record.format(), follow_symlinks=False)
        if fields.update_size:
            if handle is not None:
                os.ftruncate(handle.fd, attr.st_size)
            else:
                os.truncate(real, attr.st_size)
        if fields.update_atime or fields.update_mtime:
            current = self.stat_of(node)
            atime = attr.st_atime_ns if fields.update_atime else current.atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.mtime_ns
            if isinstance(target, int):
                os.utime(target, ns=(atime, mtime))
            else:
                os.utime(target, ns=(atime, mtime), follow_symlinks=False)
        return self.attributes(node)

    def _setattr_unlinked(self, node: Node, attr: pyfuse3.EntryAttributes,
                          fields: pyfuse3.SetattrFields, fh: int | None) -> pyfuse3.EntryAttributes:
        """A removed but still open file: change it through its descriptor, if it has one."""
        fds = [self.handles.file(fh).fd] if fh else list(node.open_fds)
        if node.layer != self.upper_index or not fds:
            return self.attributes(node)  # nothing of it is left to change
        fd = fds[0]
        if fields.update_mode:
            os.fchmod(fd, statmod.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.fchown(fd, self.policy.stored_uid(attr.st_uid) if fields.update_uid else -1,
                      self.policy.stored_gid(attr.st_gid) if fields.update_gid else -1)
        if fields.update_size:
            os.ftruncate(fd, attr.st_size)
        if fields.update_atime or fields.update_mtime:
            current = os.fstat(fd)
            os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                             attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns))
        return self.attributes(node)

    def _upper_override(self, node: Node) -> Override | None:
        """The override record of an upper entry under xattr_permissions (made if missing)."""
        assert self.upper is not None
        if node.file_type == statmod.S_IFLNK:
            return None
        existing = self.upper.override(node.path())
        if existing is not None:
            return existing
        st = self.stat_of(node)
        return Override.from_stat(st.mode, st.uid, st.gid, st.rdev)

    # ------------------------------------------------------------------ files
    def _open_flags(self, flags: int) -> int:
        flags &= ~_CREATE_STRIP
        if self.writeback:
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def _register_fd(self, fd: int, node: Node, writable: bool) -> int:
        node.open_fds.add(fd)
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
            node.open_fds.discard(handle.fd)
            os.close(handle.fd)
            handle.fd, handle.layer = fd, node.layer
            node.open_fds.add(fd)
        return handle.fd

    async def open(self, ino: int, flags: int) -> int:
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
            fd = self.layers[node.layer].open(node.path(), os.O_RDONLY | (flags & os.O_NOATIME))
        return self._register_fd(fd, node, writing)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self._current_fd(fh), size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return os.pwrite(self.handles.file(fh).fd, data, offset)

    def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if not isinstance(handle, FileHandle):
            return
        node = handle.node
        node.open_fds.discard(handle.fd)
        os.close(handle.fd)
        if node.unlinked and node.lookups == 0 and not node.open_fds:
            self.table.drop(node)

    def fsync(self, fh: int, datasync: bool) -> None:
        if not self.config.fsync:
            return
        fd = self.handles.file(fh).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    # ------------------------------------------------------------------ directories
    def opendir(self, ino: int) -> int:
        node = self.node(ino)
        if not node.is_dir:
            raise OverlayError(errno.ENOTDIR)
        return self.handles.add(DirHandle(node))

    def dir_entries(self, fh: int, start: int) -> list[tuple[bytes, Node]]:
        handle = self.handles.directory(fh)
        if handle.entries is None or start == 0:
            handle.entries = list(self.listing(handle.node))
        return handle.entries

    def releasedir(self, fh: int) -> None:
        self.handles.pop(fh)

    def statfs(self) -> pyfuse3.StatvfsData:
        top = self.layers[0]
        root = top.root if isinstance(top, UpperLayer) else os.fsencode(top.source.root) if isinstance(top, LowerLayer) else b"/"
        vfs = os.statvfs(root)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail"):
            setattr(data, name, getattr(vfs, name))
        data.f_namemax = vfs.f_namemax
        return data

    # ------------------------------------------------------------------ xattrs
    def _xattr_layer(self, node: Node) -> Layer:
        if self.config.noxattrs:
            raise OverlayError(errno.ENOTSUP)
        return self.layers[node.layer]

    def getxattr(self, ino: int, name: str) -> bytes:
        node = self.node(ino)
        layer = self._xattr_layer(node)
        if whiteout.is_internal_xattr(name):
            raise OverlayError(pyfuse3.ENOATTR)
        return layer.getxattr(node.path(), name)

    def listxattr(self, ino: int) -> list[str]:
        node = self.node(ino)
        layer = self._xattr_layer(node)
        return [n for n in layer.listxattr(node.path()) if not whiteout.is_internal_xattr(n)]

    async def setxattr(self, ino: int, name: str, value: bytes) -> None:
        node = self.node(ino)
        self._xattr_layer(node)
        if whiteout.is_internal_xattr(name):
            raise OverlayError(errno.EPERM, f"{name} belongs to the overlay")
        await self.ensure_upper(node)
        assert self.upper is not None
        os.setxattr(self.upper.real(node.path()), name, value, follow_symlinks=False)

    async def removexattr(self, ino: int, name: str) -> None:
        node = self.node(ino)
        self._xattr_layer(node)
        if whiteout.is_internal_xattr(name):
            raise OverlayError(errno.EPERM, f"{name} belongs to the overlay")
        if node.layer != self.upper_index:
            # Nothing to remove is no reason to copy up (the kernel checks first too).
            self.layers[node.layer].getxattr(node.path(), name)
        await self.ensure_upper(node)
        assert self.upper is not None
        os.removexattr(self.upper.real(node.path()), name, follow_symlinks=False)


RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    """renameat2(2), which the os module does not offer."""
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


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
        if entry.name.startswith(whiteout.WHITEOUT_PREFIX) or whiteout.is_whiteout_stat(
                st.st_mode, st.st_rdev):
            os.unlink(entry.path)
        else:
            raise OverlayError(errno.ENOTEMPTY)


def _invalidate_entry(parent_ino: int, name: bytes) -> None:
    try:
        pyfuse3.invalidate_entry_async(parent_ino, name)
    except Exception:  # not mounted (unit tests) or the queue is gone: nothing cached then
        pass
