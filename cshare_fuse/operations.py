"""The pyfuse3 handlers: thin wrappers from kernel requests to `Overlay` methods.

Each handler goes through `fuse_boundary` (errors.py), so no exception can end
the mount: expected failures become their errno, anything else EIO and a log
line.  Lookup counts are taken here and only here (through
`NodeTable.looked_up`), for replies the kernel accepts: one per
lookup/create/mkdir/mknod/symlink/link reply, one per readdirplus entry that
fit in the buffer.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence

import pyfuse3

from .attrs import negative_entry
from .caller import Caller
from .deferral import run_deferred
from .errors import OverlayError, fuse_boundary
from .inodes import Node
from .overlay import Overlay

log = logging.getLogger("cshare_fuse")


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid)


def _name(name: bytes | str) -> str:
    return name if isinstance(name, str) else os.fsdecode(name)


class OverlayOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_acl = False

    def __init__(self, overlay: Overlay) -> None:
        super().__init__()
        self.overlay = overlay
        self.enable_writeback_cache = overlay.writeback

    def _entry(self, node_ino: int) -> pyfuse3.EntryAttributes:
        return self.overlay.attributes(self.overlay.node(node_ino))

    def _reply(self, node: Node) -> pyfuse3.EntryAttributes:
        """The entry reply for a node just looked up or made; the kernel will hold it."""
        attributes = self.overlay.attributes(node)
        self.overlay.table.looked_up(node)
        return attributes

    @fuse_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        # Plugin calls that may block run in the pool (deferral.py); the lookup
        # count is taken once the answer is complete.
        found = await run_deferred(self._lookup, parent_inode, name)
        if found is None:
            return negative_entry(self.overlay.policy)
        node, attributes = found
        self.overlay.table.looked_up(node)
        return attributes

    def _lookup(self, parent_inode: int, name: bytes
                ) -> tuple[Node, pyfuse3.EntryAttributes] | None:
        node = self.overlay.lookup(parent_inode, name)
        return None if node is None else (node, self.overlay.attributes(node))

    @fuse_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.overlay.table.forget(ino, count)

    @fuse_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(inode)

    @fuse_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self.overlay.setattr(inode, attr, fields, fh, _caller(ctx))

    @fuse_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await run_deferred(self.overlay.readlink, inode)

    @fuse_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.overlay.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid)
        return self._reply(node)

    @fuse_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.overlay.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid)
        return self._reply(node)

    @fuse_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.overlay.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return self._reply(node)

    @fuse_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.overlay.link(inode, new_parent_inode, new_name)
        return self._reply(node)

    @fuse_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.overlay.unlink(parent_inode, name)

    @fuse_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.overlay.rmdir(parent_inode, name)

    @fuse_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.overlay.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @fuse_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = await self.overlay.open(inode, flags, _caller(ctx))
        # Nothing changes a file behind the mount's back (lowers are immutable,
        # upper writes come through here): the kernel may keep its page cache.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, node, attributes = await self.overlay.create(parent_inode, name, mode, flags,
                                                             ctx.uid, ctx.gid, ctx.pid)
        self.overlay.table.looked_up(node)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), attributes

    @fuse_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.overlay.read(fh, off, size)

    @fuse_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.overlay.write(fh, off, buf)

    # No flush handler: there is nothing to do at close(2) (data goes to the
    # upper file at each write), and pyfuse3's default answers ENOSYS, after
    # which the kernel stops sending FLUSH at all: one request less per
    # open/close, as with fuse-overlayfs.

    @fuse_boundary
    async def release(self, fh: int) -> None:
        self.overlay.release(fh)

    @fuse_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.overlay.fsync(fh, datasync)

    @fuse_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.overlay.opendir(inode)

    @fuse_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        overlay = self.overlay
        entries = await run_deferred(overlay.dir_entries, fh, start_id)
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            if node is None:
                # Listed under a number no node has, valid for no time: the kernel
                # looks the name up at its first use, and that lookup fails.
                # (Node id 0, "no entry", would hide the name: glibc skips d_ino 0.)
                placeholder = _unresolved_entry(overlay.table.unused_number())
                if not pyfuse3.readdir_reply(token, name, placeholder, index + 1):
                    break
                continue
            try:
                attributes = overlay.attributes(node)
            except (OSError, OverlayError):
                continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, name, attributes, index + 1):
                break
            overlay.table.looked_up(node)

    @fuse_boundary
    async def releasedir(self, fh: int) -> None:
        self.overlay.releasedir(fh)

    @fuse_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @fuse_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return self.overlay.statfs()

    @fuse_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await run_deferred(self.overlay.getxattr, inode, _name(name))

    @fuse_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in await run_deferred(self.overlay.listxattr, inode)]

    @fuse_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self.overlay.setxattr(inode, _name(name), value)

    @fuse_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.overlay.removexattr(inode, _name(name))

    @fuse_boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # default_permissions: the kernel checks modes itself before asking us.
        return True


def _unresolved_entry(number: int) -> pyfuse3.EntryAttributes:
    """A listing entry for a name that failed to resolve (Overlay.listing)."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = number
    entry.st_mode = stat.S_IFREG  # the d_type a listing shows; nothing else is known
    entry.st_nlink = 1
    entry.entry_timeout = 0
    entry.attr_timeout = 0
    return entry
