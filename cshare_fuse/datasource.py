"""How the overlay reads a lower layer: the data-source protocol and its direct form.

Every access the overlay makes to a lower layer goes through a `DataSource`:
stat, existence, open, readdir, readlink and xattrs, all by layer-relative
byte paths (b"" is the layer root).  The base class passes straight through to
a directory, so a plugin overrides only what it needs.  Lower layers are
read-only here: nothing in this protocol writes.

When `honour_overrides` is set, `stat` reports the original owner, mode and type
recorded by `cshare convert` (override xattr, see formats/overrides.py) instead of the
converted inode's own, a symlink as root's, and a file's capabilities that
make-shared set aside (`user.cshare.capability`) as `security.capability`.  The overlay sets it for a plain directory layer whose
root carries the xattr, as fuse-overlayfs does; the `test` plugin always sets it.
"""

from __future__ import annotations

import os
import stat as statmod
from typing import NamedTuple

from .formats import overrides

#: Values of the low-variety stat fields seen, for Stat.from_os to share (bounded).
_common: dict[int, int] = {}
_COMMON_MAX = 4096
_new_tuple = tuple.__new__


class Stat(NamedTuple):
    """The attributes of one layer entry, as the overlay will report them.

    A named tuple, not a frozen dataclass: one is built for every entry a walk
    meets, and a frozen dataclass's __init__ sets each of its 13 fields
    through object.__setattr__ (1.2 us a Stat here, against 0.25 us).
    """

    mode: int
    ino: int
    dev: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_os(cls, st: os.stat_result) -> Stat:
        common = _common
        if len(common) > _COMMON_MAX:
            common.clear()
        # Fields with few distinct values share one int object (a new one is
        # 28-32 bytes, and a plugin's layer keeps a Stat for every entry it has seen).
        return _new_tuple(cls, (
            common.setdefault(st.st_mode, st.st_mode), st.st_ino,
            common.setdefault(st.st_dev, st.st_dev), st.st_nlink,
            common.setdefault(st.st_uid, st.st_uid), common.setdefault(st.st_gid, st.st_gid),
            st.st_rdev, st.st_size, st.st_blocks, common.setdefault(st.st_blksize, st.st_blksize),
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns))

    def replace(self, **changes: int) -> Stat:
        return self._replace(**changes)

    @property
    def file_type(self) -> int:
        return statmod.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return statmod.S_ISDIR(self.mode)

    def with_override(self, record: overrides.Override) -> Stat:
        """These attributes as the override record says they really are."""
        mode = record.st_mode(self.mode)
        rdev = record.rdev if record.is_device else self.rdev
        size = self.size
        if record.file_type is not None and record.file_type != self.file_type:
            size = 0  # a converted device/fifo/socket is an empty stand-in file
        return self._replace(mode=mode, uid=record.uid, gid=record.gid, rdev=rdev, size=size)


#: The methods the overlay calls, for `DataSource.inline`.
ALL_METHODS: frozenset[str] = frozenset({
    "on_lookup", "stat", "raw_stat", "readdir", "readlink", "open", "getxattr", "listxattr"})


def join(root: bytes, path: bytes) -> bytes:
    return root + b"/" + path if path else root


class DataSource:
    """A lower layer read straight from the directory `root`.

    Methods raise OSError (FileNotFoundError for a missing entry) like the os
    functions they wrap; the overlay turns those into the same errno for the
    caller.  Implementations must never follow a symlink in the final component.
    """

    honour_overrides: bool = False

    #: The methods the overlay may call on the loop that serves every request,
    #: because they never wait long (memory, local syscalls).  Every other
    #: method of a plugin's source runs in a bounded pool of worker threads
    #: (see deferral.py), so one that waits (a network) holds up only the
    #: request that asked.  Nothing is inline unless declared; the overlay's
    #: own directory layers are all inline.
    inline: frozenset[str] = frozenset()

    def may_block(self, method: str, path: bytes) -> bool:
        """Whether calling `method` (one not in `inline`) for `path` may wait long.

        Asked on the request loop before such a call; False lets the overlay
        make the call there, saving the thread switch (for instance: the file's
        data is already at hand).  The default says yes.  Must answer at once.
        """
        return True

    def __init__(self, root: str | bytes) -> None:
        self.root: bytes = os.fsencode(root).rstrip(b"/") or b"/"

    def describe(self) -> str:
        """How this layer is named in log lines and errors."""
        return os.fsdecode(self.root)

    # -- notification ------------------------------------------------------------
    def on_lookup(self, path: bytes) -> None:
        """Called before the overlay first touches `path` in this layer.

        A plugin that loads data on demand materializes `path` here.  The overlay
        calls it once per path and mount (results are cached: layers are immutable).
        """

    # -- metadata ----------------------------------------------------------------
    def raw_stat(self, path: bytes) -> Stat:
        """lstat of the entry itself, with no override applied."""
        return Stat.from_os(os.lstat(join(self.root, path)))

    def stat(self, path: bytes) -> Stat:
        """The entry's attributes as the overlay should report them."""
        st = self.raw_stat(path)
        if self.honour_overrides:
            if statmod.S_ISLNK(st.mode):
                # No user xattr fits on a symlink, and make-shared leaves it with
                # the image's owner, which a user namespace shows as 65534: in a
                # converted layer a symlink is root's (its mode never matters).
                return st.replace(uid=0, gid=0)
            record = self.override(path, st)
            if record is not None:
                return st.with_override(record)
        return st

    def override(self, path: bytes, st: Stat | None = None) -> overrides.Override | None:
        """The entry's override record, or None.  Symlinks and devices carry none.

        A malformed record raises OverrideError: the overlay reports EIO for it
        rather than showing made-up attributes.
        """
        if st is not None and not (statmod.S_ISREG(st.mode) or statmod.S_ISDIR(st.mode)):
            return None
        found = overrides.read_override_from(lambda name: self.getxattr(path, name))
        return found[1] if found else None

    def exists(self, path: bytes) -> bool:
        try:
            self.raw_stat(path)
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return False
        return True

    def readlink(self, path: bytes) -> bytes:
        return os.readlink(join(self.root, path))

    def readdir(self, path: bytes) -> list[bytes]:
        """Names in the directory, without "." and ".."."""
        return os.listdir(join(self.root, path))

    # -- data --------------------------------------------------------------------
    def open(self, path: bytes, flags: int) -> int:
        """An fd open on the entry for reading (flags are O_RDONLY plus modifiers)."""
        return os.open(join(self.root, path), flags | os.O_NOFOLLOW | os.O_CLOEXEC)

    # -- xattrs ------------------------------------------------------------------
    def getxattr(self, path: bytes, name: str) -> bytes:
        real = join(self.root, path)
        if name == overrides.CAPABILITY_XATTR and self.honour_overrides:
            # make-shared set the file's capabilities aside (on the host anyone
            # could run it with them); in the user's mount they are the file's again.
            try:
                return os.getxattr(real, overrides.STASHED_CAPABILITY_XATTR, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in overrides.ABSENT_XATTR_ERRNOS:
                    raise
        return os.getxattr(real, name, follow_symlinks=False)

    def listxattr(self, path: bytes) -> list[str]:
        names = os.listxattr(join(self.root, path), follow_symlinks=False)
        if (self.honour_overrides and overrides.STASHED_CAPABILITY_XATTR in names
                and overrides.CAPABILITY_XATTR not in names):
            names.append(overrides.CAPABILITY_XATTR)
        return names
