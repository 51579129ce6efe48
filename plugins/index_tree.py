"""The index tree of a layer that a plugin reads from a list of names, and the lookups it answers.

The tar plugin (an archive's headers) and the registry plugin (a zstd:chunked
table of contents) both serve a layer from a flat list of names, not from a
directory: each builds the same tree from it.  This module is that tree:

- `Node`, one name with the attributes both report (a plugin subclasses it to
  add its own: the tar member, the TOC's inode number and data range);
- `IndexBuilder`, which takes the names in list order: it implies missing
  parent directories, refuses a name below a non-directory, a root that is not
  a directory, a file that replaces a non-empty directory and a hardlink to
  anything but an earlier non-directory, and counts links at the end;
- `IndexedSource`, the DataSource methods answered from the index alone
  (exists, readdir, readlink, getxattr, listxattr), with the errno a directory
  would give.

Written only against cshare_fuse.plugin_api, like the plugins that use it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cshare_fuse.plugin_api import DataSource

_ENODATA = getattr(errno, "ENODATA", 61)


@dataclass
class Node:
    """One name of the layer, as the plugin reports it."""

    mode: int  # type bits | permission bits
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    symlink: bytes = b""  # target, for a symlink
    link_to: bytes | None = None  # for a hardlink: the first name of the inode
    xattrs: dict[str, bytes] = field(default_factory=dict)
    children: dict[bytes, None] = field(default_factory=dict)  # ordered set of names
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


N = TypeVar("N", bound=Node)


def parent(path: bytes) -> bytes:
    """The layer path of the directory holding `path` (b"" is the root)."""
    return path.rpartition(b"/")[0]


def basename(path: bytes) -> bytes:
    return path.rpartition(b"/")[2]


def layer_path(raw: bytes, name: object, what: str, error: type[ValueError]) -> bytes:
    """The encoded name `raw` as a layer-relative path; b"" is the root.  Refuses escapes.

    `name` is the name as the list spells it, for the message; each plugin
    encodes it as its format says (tar: the file system encoding, TOC: UTF-8).
    """
    if raw.startswith(b"/"):
        raise error(f"{what} {name!r} is an absolute path")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise error(f"{what} {name!r} contains '..'")
    return b"/".join(parts)


class IndexBuilder(Generic[N]):
    """The index of a layer, built from its names in list order (a later name replaces an earlier one)."""

    def __init__(self, root: N, implied_dir: Callable[[], N], error: type[ValueError],
                 noun: str) -> None:
        #: Every name so far, by layer path; b"" is the root.
        self.index: dict[bytes, N] = {b"": root}
        self._implied_dir = implied_dir  # a directory the list implies but has not named
        self._error = error  # the plugin's own "this layer is refused" exception
        self._noun = noun  # what the list calls a name ("member", "entry"), for messages

    def _directory(self, path: bytes, name: object) -> N:
        """The directory `path`, created (implied) if the list has not named it yet."""
        found = self.index.get(path)
        if found is None:
            above = self._directory(parent(path), name)
            found = self._implied_dir()
            self.index[path] = found
            above.children[basename(path)] = None
        elif not found.is_dir:
            raise self._error(f"{self._noun} {name!r} is below {os.fsdecode(path)!r}, "
                              "which is not a directory")
        return found

    def hardlink(self, path: bytes, target: bytes, name: object, linkname: object) -> N | None:
        """A copy of the first name's node for hardlink `path` (None: a link to itself).

        Checked before `add`: the target must be an earlier non-directory.
        """
        first = self.index.get(target)
        if first is None or first.is_dir:
            raise self._error(f"hardlink {name!r} points to {linkname!r}, which is not an "
                              f"earlier non-directory {self._noun}")
        canonical = first.link_to if first.link_to is not None else target
        if canonical == path:
            return None
        # Every attribute is the inode's; the names and link count are the link's own.
        return dataclasses.replace(self.index[canonical], link_to=canonical, children={},
                                   nlink=1)

    def add(self, path: bytes, node: N, name: object) -> None:
        """Put `node` at `path`, replacing what an earlier name put there."""
        if path == b"":
            if not node.is_dir:
                raise self._error(f"{self._noun} {name!r} names the root but is not a "
                                  "directory")
            node.children = self.index[b""].children
            self.index[b""] = node
            return
        above = self._directory(parent(path), name)
        old = self.index.get(path)
        if old is not None and old.is_dir:
            if not node.is_dir:
                if old.children:
                    raise self._error(f"{self._noun} {name!r} replaces a directory that "
                                      "is not empty")
            else:
                node.children = old.children  # a directory named twice keeps its children
        self.index[path] = node
        above.children[basename(path)] = None

    def finish(self) -> dict[bytes, N]:
        """The index, with link counts: a directory has "." and each subdirectory's "..",
        a file one per name."""
        index = self.index
        for node in index.values():
            if node.is_dir:
                node.nlink = 2
        for path, node in index.items():
            if node.is_dir and path:
                index[parent(path)].nlink += 1
            elif node.link_to is not None:
                index[node.link_to].nlink += 1
        for node in index.values():
            if node.link_to is not None:
                node.nlink = index[node.link_to].nlink
        return index


class IndexedSource(DataSource, Generic[N]):
    """A data source whose names, listings, symlinks and xattrs come from `index`, not the disk."""

    #: Set by the subclass before the overlay asks anything.
    index: dict[bytes, N]

    def entry(self, path: bytes) -> N:
        """The node at `path`; ENOTDIR below a non-directory, else ENOENT, as a directory says."""
        node = self.index.get(path)
        if node is None:
            above = self.index.get(parent(path)) if path else None
            err = errno.ENOTDIR if above is not None and not above.is_dir else errno.ENOENT
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return node

    def exists(self, path: bytes) -> bool:
        return path in self.index

    def readdir(self, path: bytes) -> list[bytes]:
        node = self.entry(path)
        if not node.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fsdecode(path))
        return list(node.children)

    def readlink(self, path: bytes) -> bytes:
        node = self.entry(path)
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), os.fsdecode(path))
        return node.symlink

    def getxattr(self, path: bytes, name: str) -> bytes:
        try:
            return self.entry(path).xattrs[name]
        except KeyError:
            raise OSError(_ENODATA, os.strerror(_ENODATA), os.fsdecode(path)) from None

    def listxattr(self, path: bytes) -> list[str]:
        return list(self.entry(path).xattrs)
