"""The merged tree: layers, node table, names and lookup, attributes read, copy-up.

`OverlayBase` owns the layers, the node table and the open handles.  It
resolves names to nodes, reports their attributes and listings, and copies a
lower entry up before anything changes it.  The operation families build on
it (entries, files, dirs, attributes, xattrs); `Overlay` joins them.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as statmod
from collections.abc import Sequence

import pyfuse3
import trio

from .. import merge
from ..attrs import AttrPolicy, entry_attributes
from ..copyup import CopyPolicy, copy_up
from ..datasource import Stat
from ..deferral import NeedsFetch, gather, run_in_pool
from ..errors import OverlayError, PluginFault
from ..formats import markers
from ..formats.overrides import FUSE_OVERLAYFS_XATTR, OVERRIDE_XATTR
from ..handles import HandleTable
from ..inodes import Node, NodeTable
from ..layers import Layer, LowerLayer, UpperLayer
from ..options import MountConfig

log = logging.getLogger("cshare_fuse")

#: Copies larger than this go to a worker thread so other requests keep flowing.
_THREAD_COPY_BYTES = 1 << 20


class OverlayBase:
    def __init__(self, config: MountConfig, lowers: Sequence[LowerLayer],
                 upperdir: str | None, workdir: str | None) -> None:
        self.config = config
        honour = (any(layer.source.honour_overrides for layer in lowers)
                  or config.xattr_permissions > 0)
        self.layers: list[Layer] = []
        self.upper: UpperLayer | None = None
        if upperdir is not None:
            self.upper = UpperLayer(0, upperdir, honour_overrides=honour)
            self.layers.append(self.upper)
        for layer in lowers:
            # Built (their roots asked) before the mount was ready: main.check_layout.
            assert layer.index == len(self.layers), (layer.index, len(self.layers))
            self.layers.append(layer)
        #: Index of the upper layer in self.layers; -1 (matching no node) without one.
        self.upper_index = 0 if self.upper is not None else -1
        self.workdir = os.fsencode(workdir) if workdir else None
        primary = self.upper.root if self.upper else os.fsencode(lowers[0].source.root)
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

    def child(self, parent: Node, name: bytes, parent_path: bytes | None = None) -> Node | None:
        """The node for `name` in the merged directory `parent`, or None.

        `parent_path`, `parent.path()` when the caller has it already (a listing
        resolves every name of one directory: the walk up to the root is taken once).
        """
        node = parent.children.get(name)
        if node is not None:
            return node
        if markers.is_reserved_name(name):
            return None
        if parent_path is None:
            parent_path = parent.path()
        resolved = merge.resolve(self.layers, parent.dir_layers, parent_path, name)
        if resolved is None:
            return None
        node = self._make_node(parent, name, resolved)
        if node.lower_stat is not None:
            # Every new node is answered right away (a lookup or readdirplus reply).
            self._settle_lower(node, merge.child_path(parent_path, name))
        parent.cache_child(name, node)
        return node

    def _make_node(self, parent: Node, name: bytes, res: merge.Resolved) -> Node:
        st = res.stat
        # Names of one upper file share a node: they are one file.  Names of a lower
        # hardlink do not: a write copies up only the name it came through (as the
        # kernel's overlay does with index=off), and the kernel tells us only the
        # node, never the name, on open.  pyfuse3 reports the node number as
        # st_ino, so such names show distinct inode numbers (with the lower nlink).
        in_upper = self.layers[res.layer].is_upper
        hardlinked = in_upper and st.nlink > 1 and not statmod.S_ISDIR(st.mode)
        if hardlinked:
            existing = self.table.by_backing.get((st.dev, st.ino))
            if existing is not None and not existing.unlinked and existing.layer == res.layer:
                existing.add_alias(parent, name)
                return existing
        node = Node(self.table.number_for(st), parent, name, res.layer, statmod.S_IFMT(st.mode))
        node.dir_layers = res.dir_layers
        if in_upper:
            node.backing_key = (st.dev, st.ino)
        else:
            # A lower node needs no backing key (56 bytes a node): only upper
            # names share a node, and a link copies the file up first, which
            # gives the node the key of its copy.
            node.lower_stat = st
        if hardlinked:
            return self.table.add_hardlinked(node)
        return self.table.add(node)

    def lookup(self, parent_ino: int, name: bytes) -> Node | None:
        """The node of `name` in directory `parent_ino`, or None when it does not exist."""
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise OverlayError(errno.ENOTDIR)
        return self.child(parent, name)

    def lower_holds(self, parent: Node, name: bytes) -> bool:
        """Whether a lower layer shows `name` in `parent`.

        Removing or replacing such a name needs a whiteout, and a directory
        arriving there must be opaque.  A question about the name, never about
        the node that holds it now: a node may have got the name by create,
        link or rename, and names of one file differ.  The lower layers are
        immutable, so the answer is asked of them each time.
        """
        lowers = [index for index in parent.dir_layers if index != self.upper_index]
        return bool(lowers) and merge.resolve(self.layers, lowers, parent.path(), name) is not None

    def stat_of(self, node: Node) -> Stat:
        if node.layer != self.upper_index:  # a lower node
            if node.lower_stat is not None:
                return node.lower_stat
            # Its entry answers getattr and lookup; the rare operation that
            # needs the Stat reads it from the (immutable) layer again.
            lower = self.layers[node.layer].stat(node.path())
            if lower is None:
                raise OverlayError(errno.ENOENT, f"{node!r} vanished from its lower layer")
            return lower
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

    def _stat_or_none(self, node: Node) -> Stat | None:
        try:
            return self.stat_of(node)
        except (OSError, OverlayError):
            return None

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.entry is not None:
            return node.entry
        if node.lower_stat is not None and node.layer != self.upper_index:
            return self._settle_lower(node, node.path())
        return entry_attributes(node.ino, self.stat_of(node), self.policy,
                                merged_dir=node.is_dir and len(node.dir_layers) > 1)

    def _settle_lower(self, node: Node, path: bytes) -> pyfuse3.EntryAttributes:
        """Build a lower node's kernel-facing attributes once (they cannot change).

        From then on the entry answers getattr and lookup: the Stat goes, from
        the node and from the layer's cache (~330 bytes a node).
        """
        assert node.lower_stat is not None
        entry = node.entry = entry_attributes(
            node.ino, node.lower_stat, self.policy,
            merged_dir=node.is_dir and len(node.dir_layers) > 1)
        node.lower_stat = None
        layer = self.layers[node.layer]
        if isinstance(layer, LowerLayer):
            layer.forget_stat(path)
        return entry

    def listing(self, node: Node) -> list[tuple[bytes, Node | None]]:
        """The merged directory's entries; None for one that failed to resolve.

        One entry that fails (a plugin's error, a malformed override) must not
        fail its directory: it is listed without a node, so that only looking
        it up fails, as with the kernel's overlayfs.  Such a listing is not
        kept: the entry may resolve next time (a plugin may fail for a while).
        A complete listing is kept as names only (8 bytes an entry instead of a
        56-byte pair): while the node has it, every name in it is one of its
        cached children (Node.drop_child and set_child drop the listing).
        """
        names = node.listing
        if names is not None:
            children = node.children
            pairs = [(name, children.get(name)) for name in names]
            if all(child is not None for _, child in pairs):
                return pairs
        entries: list[tuple[bytes, Node | None]] = []
        complete: list[tuple[bytes, Node]] = []
        waiting: list[NeedsFetch] = []
        path = node.path()
        for name in merge.merged_names(self.layers, node.dir_layers, path):
            try:
                child = self.child(node, name, path)
            except NeedsFetch as need:
                waiting.append(need)  # the other entries are asked meanwhile
                continue
            except (OSError, OverlayError) as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone since it was listed (an upper entry)
                log.warning("%r of %r cannot be looked up (%s): listed, answering "
                            "its lookups with that error", name, node.path(), exc)
                entries.append((name, None))
                continue
            except Exception as exc:
                log.error("%r of %r cannot be looked up: %s; listed, answering its "
                          "lookups EIO", name, node.path(), exc,
                          exc_info=not isinstance(exc, PluginFault))
                entries.append((name, None))
                continue
            if child is not None:
                entries.append((name, child))
                complete.append((name, child))
        if waiting:
            raise gather(waiting)
        if len(complete) == len(entries):
            node.set_listing(tuple(name for name, _ in complete))
        return entries

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.file_type != statmod.S_IFLNK:
            raise OverlayError(errno.EINVAL)
        return self.layers[node.layer].readlink(node.path())

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
        if source.blocks:
            # A plugin whose calls may wait: the whole copy in a worker thread.
            await self._copy_up_in_pool(node, source, path, upper)
            return
        real = source.raw_stat(path)
        # A plain directory that records no overrides reports what lstat says:
        # one lstat less a copy-up (its node's Stat went once its entry was built).
        want = node.lower_stat or (real if source.reports_raw else source.stat(path))
        assert want is not None
        linked = real.nlink > 1
        args = (source, path, real, want, upper, self.workdir, self.copy_policy)
        if statmod.S_ISREG(real.mode) and real.size > _THREAD_COPY_BYTES:
            # Large: copied in a thread so that other requests go on meanwhile;
            # the lock makes requests for this same node wait for the copy.
            async with _node_lock(node):
                if node.layer == self.upper_index:
                    return
                identity = await trio.to_thread.run_sync(copy_up, *args)
                self._now_in_upper(node, linked)
        else:
            # Small: copied synchronously, so no other task runs until it is
            # done and no lock (a trio checkpoint per copy-up) is needed.
            identity = copy_up(*args)
            self._now_in_upper(node, linked)
        node.backing_key = identity or _upper_identity(upper, path)

    async def _copy_up_in_pool(self, node: Node, source: LowerLayer, path: bytes,
                               upper: UpperLayer) -> None:
        """Copy-up from a layer whose plugin may block: in the plugin pool, under the
        node's lock (requests for this same node wait for the copy)."""
        assert self.workdir is not None
        workdir, policy, want = self.workdir, self.copy_policy, node.lower_stat

        def copy() -> tuple[int, int] | None:
            real = source.raw_stat(path)
            wanted = want or source.stat(path)
            assert wanted is not None
            return copy_up(source, path, real, wanted, upper, workdir, policy)

        async with _node_lock(node):
            if node.layer == self.upper_index:
                return
            identity = await run_in_pool(copy)
            self._now_in_upper(node)
        node.backing_key = identity or _upper_identity(upper, path)

    def _now_in_upper(self, node: Node, was_linked: bool | None = None) -> None:
        """`node` was copied up; `was_linked`: its lower entry had other names
        (None: read from the layer)."""
        # A copied-up name of a lower hardlink is a file of its own (link count
        # 1): the attributes the kernel cached from the lower file are wrong now.
        if was_linked is None:
            was_linked = node.layer != self.upper_index and self.stat_of(node).nlink > 1
        for parent, name in self.table.copied_up(node, self.upper_index):
            invalidate_entry(parent.ino, name)
        if was_linked:
            invalidate_attributes(node.ino)


def _node_lock(node: Node) -> trio.Lock:
    """The node's lock, made on first use (requests for a node wait for its copy-up)."""
    if node.lock is None:
        node.lock = trio.Lock()
    assert isinstance(node.lock, trio.Lock)
    return node.lock


def _upper_identity(upper: UpperLayer, path: bytes) -> tuple[int, int] | None:
    """The (dev, ino) of the upper copy at `path`, when copy-up did not report it."""
    copied = upper.stat(path)
    return (copied.dev, copied.ino) if copied is not None else None


def invalidate_attributes(ino: int) -> None:
    """Tell the kernel to forget the attributes it cached for `ino` (never its data)."""
    try:
        # Attributes only: no page is touched, so this cannot wait for writeback.
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except Exception:  # not mounted (unit tests), or the kernel does not know it
        pass


def invalidate_entry(parent_ino: int, name: bytes) -> None:
    """Tell the kernel to forget its cached entry `name` in `parent_ino`."""
    try:
        pyfuse3.invalidate_entry_async(parent_ino, name)
    except Exception:  # not mounted (unit tests) or the queue is gone: nothing cached then
        pass
