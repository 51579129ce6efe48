"""The floor of a pyfuse3 filesystem for walks: the least a Python daemon can do.

A read-only passthrough of one directory that answers only what `find
-printf '%m %u %s'` needs (lookup, getattr, opendir, readdir, releasedir,
forget, statfs) with the least Python: a directory's entries are read once
with os.scandir and lstat relative to the directory (no overlay logic, no
layers, no whiteouts, no overrides), each entry's EntryAttributes built once
and kept.  What cshare-overlay costs above this is its own code; what this
costs above fuse-overlayfs is pyfuse3's (docs/design-notes.md, issue 14).

    python -m bench.pyfuse3_floor LOWER MNT     # serves in the foreground until unmounted

Not part of `make bench`: a measuring aid, run by hand beside the others.
It waits for requests as cshare-overlay does (cshare_fuse.session).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

TIMEOUT = 1e9  # the tree does not change while mounted


def attributes(ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = ino
    entry.entry_timeout = entry.attr_timeout = TIMEOUT
    for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                 "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
        setattr(entry, name, getattr(st, name))
    return entry


class Floor(pyfuse3.Operations):
    def __init__(self, root: str) -> None:
        super().__init__()
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: os.fsencode(root)}
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {
            pyfuse3.ROOT_INODE: attributes(pyfuse3.ROOT_INODE, os.lstat(root))}
        self.children: dict[int, list[tuple[bytes, int]]] = {}
        self.by_name: dict[tuple[int, bytes], int] = {}

    def _list(self, ino: int) -> list[tuple[bytes, int]]:
        listing = self.children.get(ino)
        if listing is None:
            listing = []
            with os.scandir(self.paths[ino]) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    child = st.st_ino
                    self.paths[child] = entry.path
                    self.attrs[child] = attributes(child, st)
                    self.by_name[ino, entry.name] = child
                    listing.append((entry.name, child))
            self.children[ino] = listing
        return listing

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        self._list(parent_inode)
        child = self.by_name.get((parent_inode, name))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[child]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs[inode]

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._list(fh)
        attrs = self.attrs
        for index in range(start_id, len(listing)):
            name, child = listing[index]
            if not pyfuse3.readdir_reply(token, name, attrs[child], index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        return data


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(os.path.isdir(a) for a in argv):
        print("usage: python -m bench.pyfuse3_floor LOWER MNT (two directories)", file=sys.stderr)
        return 2
    lower, mnt = argv
    if not stat.S_ISDIR(os.lstat(lower).st_mode):
        print(f"{lower}: not a directory", file=sys.stderr)
        return 2
    pyfuse3.init(Floor(lower), mnt, {"fsname=pyfuse3-floor", "ro", "default_permissions", "allow_other"})
    # cshare-overlay's own wait for requests (cshare_fuse.session): the floor is
    # pyfuse3 at its best, not pyfuse3's slower default loop.
    from cshare_fuse import session

    session.install()
    try:
        trio.run(pyfuse3.main, 2, 8)
    finally:
        pyfuse3.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
