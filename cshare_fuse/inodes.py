"""The node table: one `Node` per inode the kernel knows, numbered stably.

pyfuse3 uses the reported st_ino as the FUSE node id, so a node's number is
both.  Numbers come from the backing inode (hardlinks in a layer share one
node, as they share one st_ino), are kept across copy-up, and are never reused
while the kernel may still hold the old node: a collision gets a synthetic
number instead.

Every change of a node's names, of a directory's cached children and listing,
of its kernel lookup count and of its place in the table goes through the
methods here, so the invariants live in one place: a directory's listing is
dropped whenever its children change; a node's primary name and aliases are
exactly the names it has; a node leaves the table only when it has no name,
no kernel reference and no open descriptor.  No I/O here.
"""

from __future__ import annotations

import stat as statmod
from collections.abc import Mapping
from types import MappingProxyType

import pyfuse3

from .datasource import Stat

_SYNTHETIC_BASE = 1 << 62  # far above anything a filesystem hands out
_DEVICE_SHIFT = 48

# Most nodes never get a second name, a child or an open descriptor of ours:
# they share these empty, immutable stand-ins (an empty set costs 216 bytes,
# an empty dict 64; measured, ~500 bytes a node) and get their own container
# from the methods below on first use.
_NO_NAMES: frozenset[tuple[Node, bytes]] = frozenset()
_NO_FDS: frozenset[int] = frozenset()
_NO_CHILDREN: Mapping[bytes, Node] = MappingProxyType({})
_FILE_TYPES = {t: t for t in (statmod.S_IFREG, statmod.S_IFDIR, statmod.S_IFLNK, statmod.S_IFCHR,
                              statmod.S_IFBLK, statmod.S_IFIFO, statmod.S_IFSOCK)}


class Node:
    """One merged entry: where it lives, how it is named, how often the kernel knows it."""

    __slots__ = ("ino", "parent", "name", "aliases", "layer", "file_type", "dir_layers",
                 "lookups", "children", "listing", "unlinked", "open_fds", "backing_key",
                 "lower_stat", "entry", "removed_stat", "lock", "__weakref__")

    def __init__(self, ino: int, parent: Node | None, name: bytes, layer: int,
                 file_type: int) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        #: Other (parent, name) pairs of a hardlinked file.
        self.aliases: set[tuple[Node, bytes]] | frozenset[tuple[Node, bytes]] = _NO_NAMES
        #: Index of the layer whose entry this node shows (0 is the upper layer if any).
        self.layer = layer
        # One shared int per type (S_IFMT's result is a new 28-byte int each time).
        self.file_type = _FILE_TYPES.get(file_type, file_type)
        #: Directories: the layers merged into this one, top first.
        self.dir_layers: tuple[int, ...] = ()
        self.lookups = 0
        #: Directories: resolved children by name (positive cache, kept coherent by us).
        self.children: Mapping[bytes, Node] = _NO_CHILDREN
        #: Directories: merged listing, rebuilt after any change in the directory.
        self.listing: tuple[bytes, ...] | None = None
        self.unlinked = False
        #: File descriptors open on this node (for fstat after unlink).
        self.open_fds: set[int] | frozenset[int] = _NO_FDS
        self.backing_key: tuple[int, int] | None = None
        #: The attributes from a lower layer (immutable while mounted).
        self.lower_stat: Stat | None = None
        #: The kernel-facing attributes of a lower entry, built once (they cannot change).
        self.entry: pyfuse3.EntryAttributes | None = None
        #: The attributes it had when its last name went, for a removed node that
        #: is still in use without a descriptor of ours (a device opened by the kernel).
        self.removed_stat: Stat | None = None
        self.lock: object | None = None  # a trio.Lock, created on first copy-up

    @property
    def is_dir(self) -> bool:
        return self.file_type == statmod.S_IFDIR

    def has_name(self, parent: Node, name: bytes) -> bool:
        """Whether `name` in `parent` is one of this node's names."""
        return (self.parent is parent and self.name == name) or (parent, name) in self.aliases

    # -- a directory's cached children; the listing follows every change
    def _own_children(self) -> dict[bytes, Node]:
        children = self.children
        if not isinstance(children, dict):
            children = self.children = {}
        return children

    def set_child(self, name: bytes, node: Node) -> None:
        self._own_children()[name] = node
        self.listing = None

    def cache_child(self, name: bytes, node: Node) -> None:
        """Remember a child just resolved (the listing, if any, already shows it)."""
        self._own_children()[name] = node

    def drop_child(self, name: bytes, node: Node | None = None) -> None:
        """Forget the cached child `name` (only if it is `node`, when given)."""
        children = self.children
        if isinstance(children, dict) and (node is None or children.get(name) is node):
            children.pop(name, None)
        self.listing = None

    def set_listing(self, names: tuple[bytes, ...]) -> None:
        """Keep the merged listing's names (their nodes are among the children)."""
        self.listing = names

    # -- a file's names
    def _own_aliases(self) -> set[tuple[Node, bytes]]:
        aliases = self.aliases
        if not isinstance(aliases, set):
            aliases = self.aliases = set()
        return aliases

    def add_alias(self, parent: Node, name: bytes) -> None:
        self._own_aliases().add((parent, name))

    def discard_alias(self, parent: Node, name: bytes) -> None:
        if (parent, name) in self.aliases:
            self._own_aliases().discard((parent, name))

    def move_name(self, parent: Node, name: bytes, new_parent: Node, new_name: bytes) -> None:
        """This node, called `name` in `parent`, is now `new_name` in `new_parent`."""
        if self.parent is parent and self.name == name:
            self.parent, self.name = new_parent, new_name
        else:  # one alias of a hardlinked file
            self.discard_alias(parent, name)
            self.add_alias(new_parent, new_name)

    def path(self) -> bytes:
        """The layer-relative path of the primary name."""
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.path()!r} layer={self.layer}>"


class NodeTable:
    """Maps node numbers to nodes and hands out stable numbers."""

    def __init__(self, primary_dev: int) -> None:
        self.nodes: dict[int, Node] = {}
        self._primary_dev = primary_dev
        self._device_slots: dict[int, int] = {}
        self._next_synthetic = _SYNTHETIC_BASE
        #: (st_dev, st_ino) of hardlinked backing files -> their node.
        self.by_backing: dict[tuple[int, int], Node] = {}

    def make_root(self, layer: int) -> Node:
        root = Node(pyfuse3.ROOT_INODE, None, b"", layer, statmod.S_IFDIR)
        root.lookups = 1  # the kernel never forgets the root
        self.nodes[root.ino] = root
        return root

    def _synthetic(self) -> int:
        self._next_synthetic += 1
        return self._next_synthetic

    def unused_number(self) -> int:
        """A number no node has or will have (an entry listed without a node)."""
        return self._synthetic()

    def number_for(self, st: Stat) -> int:
        """A number derived from the backing inode, or a fresh one on any collision."""
        if st.dev == self._primary_dev:
            candidate = st.ino
        elif st.ino < (1 << _DEVICE_SHIFT):
            slot = self._device_slots.setdefault(st.dev, len(self._device_slots) + 1)
            candidate = (slot << _DEVICE_SHIFT) | st.ino
        else:
            return self._synthetic()
        if candidate <= pyfuse3.ROOT_INODE or candidate in self.nodes:
            return self._synthetic()
        return candidate

    def add(self, node: Node) -> Node:
        self.nodes[node.ino] = node
        return node

    def get(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def add_hardlinked(self, node: Node) -> Node:
        """Add `node`, found by its backing inode when another name of it is resolved."""
        self.add(node)
        if node.backing_key is not None:
            self.by_backing[node.backing_key] = node
        return node

    def share_backing(self, node: Node) -> None:
        """`node` got a second name: resolving another of its names finds it."""
        if node.backing_key is not None:
            self.by_backing.setdefault(node.backing_key, node)

    def unshare_backing(self, node: Node) -> None:
        if node.backing_key is not None and self.by_backing.get(node.backing_key) is node:
            del self.by_backing[node.backing_key]

    # -- the kernel's references: counted here and only here
    def looked_up(self, node: Node) -> None:
        """The kernel accepted a reply naming `node`: it holds one more reference."""
        node.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == pyfuse3.ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups <= 0:
            node.lookups = 0
            # A node still reachable by name stays: its number must not change
            # when the kernel looks it up again.  Only detached nodes go.
            self.drop_if_unused(node)

    # -- open descriptors
    def fd_opened(self, node: Node, fd: int) -> None:
        fds = node.open_fds
        if not isinstance(fds, set):
            fds = node.open_fds = set()
        fds.add(fd)

    def fd_closed(self, node: Node, fd: int) -> None:
        if isinstance(node.open_fds, set):
            node.open_fds.discard(fd)
        self.drop_if_unused(node)

    # -- names going away
    def detach_name(self, parent: Node, name: bytes, node: Node,
                    before: Stat | None = None) -> None:
        """Forget that `node` is called `name` in `parent` (after unlink/rename away).

        `before` is its attributes before the removal, kept for a node that
        lost its last name but is still in use.
        """
        parent.drop_child(name, node)
        if node.parent is parent and node.name == name:
            if node.aliases:
                node.parent, node.name = node._own_aliases().pop()
            else:
                if before is not None:
                    node.removed_stat = before.replace(nlink=max(before.nlink - 1, 0))
                node.unlinked = True
                self.drop_if_unused(node)
        else:
            node.discard_alias(parent, name)

    def drop_if_unused(self, node: Node) -> None:
        if node.unlinked and node.lookups == 0 and not node.open_fds:
            self.drop(node)

    def drop(self, node: Node) -> None:
        if self.nodes.get(node.ino) is node:
            del self.nodes[node.ino]
        self.unshare_backing(node)

    # -- copy-up
    def copied_up(self, node: Node, upper_index: int) -> list[tuple[Node, bytes]]:
        """`node` now lives in the upper layer; returns the names it stopped having.

        Other names of a lower hardlink still show the lower file: copy-up
        breaks the link (as the kernel's overlay does without index=on).  The
        caller tells the kernel to forget those names.
        """
        node.layer = upper_index
        node.lower_stat = None
        node.entry = None
        if node.is_dir:
            node.dir_layers = (upper_index, *node.dir_layers)
        self.unshare_backing(node)
        gone: list[tuple[Node, bytes]] = []
        for parent, name in list(node.aliases):
            node.discard_alias(parent, name)
            if parent.children.get(name) is node:
                parent.drop_child(name, node)
                gone.append((parent, name))
        return gone
