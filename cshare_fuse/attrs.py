"""From a layer entry's attributes to what the kernel is told.

Overrides were already applied by the layer (datasource/layers); here come the
mount-wide rules: uid/gid mappings, squashing, static nlink, merged-directory
nlink, the node's stable number and the cache timeouts.
"""

from __future__ import annotations

import stat as statmod
from dataclasses import dataclass

import pyfuse3

from .datasource import Stat
from .options import IdMapping, MountConfig

OVERFLOW_ID = 65534


@dataclass(frozen=True)
class AttrPolicy:
    uidmap: IdMapping
    gidmap: IdMapping
    squash_uid: int | None
    squash_gid: int | None
    static_nlink: bool
    timeout: float

    @classmethod
    def from_config(cls, config: MountConfig) -> AttrPolicy:
        return cls(config.uidmapping, config.gidmapping, config.squash_to_uid,
                   config.squash_to_gid, config.static_nlink, config.timeout)

    def shown_uid(self, file_uid: int) -> int:
        if self.squash_uid is not None:
            return self.squash_uid
        return self.uidmap.to_fuse(file_uid, OVERFLOW_ID)

    def shown_gid(self, file_gid: int) -> int:
        if self.squash_gid is not None:
            return self.squash_gid
        return self.gidmap.to_fuse(file_gid, OVERFLOW_ID)

    def stored_uid(self, fuse_uid: int) -> int:
        mapped = self.uidmap.to_file(fuse_uid)
        return OVERFLOW_ID if mapped is None else mapped

    def stored_gid(self, fuse_gid: int) -> int:
        mapped = self.gidmap.to_file(fuse_gid)
        return OVERFLOW_ID if mapped is None else mapped


def negative_entry(policy: AttrPolicy) -> pyfuse3.EntryAttributes:
    """The reply to a lookup of a missing name: the kernel keeps it for the entry timeout.

    Lower layers do not change under a mount and the upper layer changes only
    through it (the kernel then drops the cached miss), so a miss stays true,
    as the kernel's overlayfs assumes for its negative dentries too.
    """
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0  # pyfuse3: a negative entry
    entry.entry_timeout = policy.timeout
    return entry


def entry_attributes(ino: int, st: Stat, policy: AttrPolicy, *, merged_dir: bool) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = ino
    entry.generation = 0
    entry.entry_timeout = policy.timeout
    entry.attr_timeout = policy.timeout
    entry.st_mode = st.mode
    if statmod.S_ISDIR(st.mode) and (merged_dir or policy.static_nlink):
        # The kernel's overlayfs reports 1 for merged directories: counting
        # subdirectories across layers is not worth it, and find(1) accepts 1.
        entry.st_nlink = 1
    else:
        entry.st_nlink = st.nlink
    entry.st_uid = policy.shown_uid(st.uid)
    entry.st_gid = policy.shown_gid(st.gid)
    entry.st_rdev = st.rdev
    entry.st_size = st.size
    entry.st_blksize = st.blksize
    entry.st_blocks = st.blocks
    entry.st_atime_ns = st.atime_ns
    entry.st_mtime_ns = st.mtime_ns
    entry.st_ctime_ns = st.ctime_ns
    return entry
