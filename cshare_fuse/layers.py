"""The layers of one mount: the writable upper directory and the read-only lowers.

Both kinds answer the same read questions by layer-relative byte path (b"" is
the layer root): stat, directory names, opaque or not, readlink, xattrs, open.
A lower layer is a `DataSource` (direct or a plugin's) behind a cache: lower
layers cannot change while mounted, so every answer is kept for the life of the
mount, and the plugin's `on_lookup` is called once per path before its first use.
The upper layer is read directly every time, since it changes under us.
"""

from __future__ import annotations

import errno
import os
import stat as statmod

from .datasource import DataSource, Stat, join
from .formats import overrides
from .formats.markers import OPAQUE_MARKER, OPAQUE_XATTRS

_MISSING = (errno.ENOENT, errno.ENOTDIR)


def _absent_xattr(exc: OSError) -> bool:
    return exc.errno in overrides.ABSENT_XATTR_ERRNOS


class Layer:
    """Read access common to the upper and the lower layers."""

    is_upper = False

    def __init__(self, index: int) -> None:
        self.index = index

    def stat(self, path: bytes) -> Stat | None:
        raise NotImplementedError

    def names(self, path: bytes) -> tuple[bytes, ...]:
        raise NotImplementedError

    def is_opaque(self, path: bytes) -> bool:
        raise NotImplementedError

    def readlink(self, path: bytes) -> bytes:
        raise NotImplementedError

    def getxattr(self, path: bytes, name: str) -> bytes:
        raise NotImplementedError

    def listxattr(self, path: bytes) -> list[str]:
        raise NotImplementedError

    def open(self, path: bytes, flags: int) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class LowerLayer(Layer):
    """A read-only layer served by a DataSource, with everything cached."""

    def __init__(self, index: int, source: DataSource) -> None:
        super().__init__(index)
        self.source = source
        self._stats: dict[bytes, Stat | None] = {}
        self._raw_stats: dict[bytes, Stat] = {}
        self._names: dict[bytes, tuple[bytes, ...]] = {}
        self._name_sets: dict[bytes, frozenset[bytes]] = {}
        self._opaque: dict[bytes, bool] = {}
        self._notified: set[bytes] = set()

    def describe(self) -> str:
        return self.source.describe()

    def _notify(self, path: bytes) -> None:
        if path not in self._notified:
            self._notified.add(path)
            self.source.on_lookup(path)

    def stat(self, path: bytes) -> Stat | None:
        try:
            return self._stats[path]
        except KeyError:
            pass
        self._notify(path)
        try:
            result: Stat | None = self.source.stat(path)
        except OSError as exc:
            if exc.errno not in _MISSING:
                raise
            result = None
        self._stats[path] = result
        return result

    def raw_stat(self, path: bytes) -> Stat:
        """The converted inode's own attributes (what copy-up reads the data by)."""
        try:
            return self._raw_stats[path]
        except KeyError:
            result = self._raw_stats[path] = self.source.raw_stat(path)
            return result

    def names(self, path: bytes) -> tuple[bytes, ...]:
        try:
            return self._names[path]
        except KeyError:
            pass
        try:
            result = tuple(self.source.readdir(path))
        except OSError as exc:
            if exc.errno not in _MISSING:
                raise
            result = ()
        self._names[path] = result
        return result

    def has(self, parent: bytes, name: bytes) -> bool:
        """Whether the directory `parent` lists `name`: answers misses with no syscall."""
        try:
            names = self._name_sets[parent]
        except KeyError:
            names = self._name_sets[parent] = frozenset(self.names(parent))
        return name in names

    def is_opaque(self, path: bytes) -> bool:
        try:
            return self._opaque[path]
        except KeyError:
            pass
        try:
            listed = OPAQUE_MARKER in self.names(path)
        except PermissionError:
            # A directory the daemon may not list cannot show it a marker; reading
            # it will fail on its own, its parent's listing must not.
            listed = False
        result = listed or any(self._xattr_is_yes(path, name) for name in OPAQUE_XATTRS)
        self._opaque[path] = result
        return result

    def _xattr_is_yes(self, path: bytes, name: str) -> bool:
        try:
            return self.source.getxattr(path, name) == b"y"
        except OSError as exc:
            if _absent_xattr(exc):
                return False
            raise

    def readlink(self, path: bytes) -> bytes:
        return self.source.readlink(path)

    def getxattr(self, path: bytes, name: str) -> bytes:
        return self.source.getxattr(path, name)

    def listxattr(self, path: bytes) -> list[str]:
        return self.source.listxattr(path)

    def open(self, path: bytes, flags: int) -> int:
        return self.source.open(path, flags)


class UpperLayer(Layer):
    """The writable layer: a plain directory, read fresh on every call."""

    is_upper = True

    def __init__(self, index: int, root: str, *, honour_overrides: bool) -> None:
        super().__init__(index)
        self.root = os.fsencode(root).rstrip(b"/") or b"/"
        #: Upper files carry an override xattr only where cshare wrote one (copy-up of
        #: a converted entry, xattr_permissions); checking costs a syscall, so only
        #: when such records can exist.
        self.honour_overrides = honour_overrides

    def describe(self) -> str:
        return os.fsdecode(self.root)

    def real(self, path: bytes) -> bytes:
        return join(self.root, path)

    def stat(self, path: bytes) -> Stat | None:
        try:
            st = Stat.from_os(os.lstat(self.real(path)))
        except OSError as exc:
            if exc.errno in _MISSING:
                return None
            raise
        if self.honour_overrides and (statmod.S_ISREG(st.mode) or statmod.S_ISDIR(st.mode)):
            record = self.override(path)
            if record is not None:
                return st.with_override(record)
        return st

    def override(self, path: bytes) -> overrides.Override | None:
        real = self.real(path)
        found = overrides.read_override_from(
            lambda name: os.getxattr(real, name, follow_symlinks=False))
        return found[1] if found else None

    def names(self, path: bytes) -> tuple[bytes, ...]:
        try:
            return tuple(os.listdir(self.real(path)))
        except OSError as exc:
            if exc.errno in _MISSING:
                return ()
            raise

    def is_opaque(self, path: bytes) -> bool:
        real = self.real(path)
        for name in OPAQUE_XATTRS:
            try:
                if os.getxattr(real, name, follow_symlinks=False) == b"y":
                    return True
            except OSError as exc:
                if not _absent_xattr(exc):
                    raise
        return os.path.lexists(real + b"/" + OPAQUE_MARKER)

    def readlink(self, path: bytes) -> bytes:
        return os.readlink(self.real(path))

    def getxattr(self, path: bytes, name: str) -> bytes:
        return os.getxattr(self.real(path), name, follow_symlinks=False)

    def listxattr(self, path: bytes) -> list[str]:
        return os.listxattr(self.real(path), follow_symlinks=False)

    def open(self, path: bytes, flags: int) -> int:
        return os.open(self.real(path), flags | os.O_NOFOLLOW | os.O_CLOEXEC)
