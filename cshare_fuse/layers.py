"""The layers of one mount: the writable upper directory and the read-only lowers.

Both kinds answer the same read questions by layer-relative byte path (b"" is
the layer root): stat, directory names, opaque or not, readlink, xattrs, open.
A lower layer is a `DataSource` (direct or a plugin's) behind a cache: lower
layers cannot change while mounted, so answers are kept for the life of the
mount, and the plugin's `on_lookup` is called once per path before its first use.
`LowerLayer` is also where a plugin's mistakes stop (`PluginFault`) and where
its calls that may block leave the request loop (deferral.py).
The upper layer is read directly every time, since it changes under us.
"""

from __future__ import annotations

import errno
import os
import stat as statmod
import struct
import threading
from collections.abc import Callable
from typing import NoReturn

from .datasource import ALL_METHODS, DataSource, Stat, join
from .deferral import NeedsFetch, deferring
from .errors import PluginFault
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


_FILE_TYPES = frozenset({statmod.S_IFREG, statmod.S_IFDIR, statmod.S_IFLNK, statmod.S_IFCHR,
                         statmod.S_IFBLK, statmod.S_IFIFO, statmod.S_IFSOCK})
_U32 = 1 << 32
_U64 = 1 << 64
_I64 = 1 << 63


#: The Stat fields as the kernel takes them (fuse_attr): packing checks in one C
#: call that each is an integer in range (a negative size fails on "Q").
_KERNEL_ATTR = struct.Struct("=HQQIIIQQQIqqq")


def stat_problem(st: object) -> str | None:
    """What makes `st` unfit to report (the kernel would refuse it), or None."""
    if not isinstance(st, Stat):
        return f"returned {type(st).__name__}, not a Stat"
    try:
        _KERNEL_ATTR.pack(st.mode, st.ino, st.dev, st.nlink, st.uid, st.gid, st.rdev,
                          st.size, st.blocks, st.blksize, st.atime_ns, st.mtime_ns,
                          st.ctime_ns)
    except (struct.error, TypeError):
        return _stat_detail(st) or "returned a Stat with a field out of range"
    if statmod.S_IFMT(st.mode) not in _FILE_TYPES:
        return f"returned mode {st.mode:#o}, which is no file type and permission bits"
    return None


def _stat_detail(st: Stat) -> str | None:
    """Which field of `st` is wrong, for the log line."""
    values = (st.mode, st.ino, st.dev, st.nlink, st.uid, st.gid, st.rdev, st.size, st.blocks,
              st.blksize, st.atime_ns, st.mtime_ns, st.ctime_ns)
    for value in values:
        if type(value) is not int:
            return f"returned a Stat with a field of type {type(value).__name__} ({value!r})"
    if not 0 <= st.mode <= 0o177777 or statmod.S_IFMT(st.mode) not in _FILE_TYPES:
        return f"returned mode {st.mode:#o}, which is no file type and permission bits"
    if not (0 <= st.size < _I64 and 0 <= st.blocks < _I64 and 0 <= st.nlink < _U32
            and 0 <= st.blksize < _U32):
        return (f"returned an impossible size, blocks, nlink or blksize ({st.size}, "
                f"{st.blocks}, {st.nlink}, {st.blksize})")
    if not (0 <= st.uid < _U32 and 0 <= st.gid < _U32):
        return f"returned owner {st.uid}:{st.gid}, outside 0..{_U32 - 1}"
    if not (0 <= st.ino < _U64 and 0 <= st.dev < _U64 and 0 <= st.rdev < _U64):
        return f"returned ino, dev or rdev out of range ({st.ino}, {st.dev}, {st.rdev})"
    if not all(-_I64 <= t < _I64 for t in (st.atime_ns, st.mtime_ns, st.ctime_ns)):
        return "returned a time out of range"
    return None


def _describe(source: DataSource) -> str:
    try:
        name = source.describe()
    except Exception as exc:
        return f"{type(source).__name__} (describe() raised {type(exc).__name__})"
    return name if isinstance(name, str) else repr(name)


def _inline_methods(source: DataSource) -> frozenset[str]:
    declared: object = getattr(source, "inline", frozenset())
    if isinstance(declared, str) or not isinstance(declared, set | frozenset | tuple | list):
        return frozenset()  # not a set of names: run everything in the pool, to be safe
    return frozenset(n for n in declared if isinstance(n, str)) & ALL_METHODS


class LowerLayer(Layer):
    """A read-only layer served by a DataSource, with its answers cached.

    Also the boundary between the overlay and a plugin: an exception other than
    OSError, an answer of the wrong type or impossible attributes become a
    `PluginFault` naming the layer, method and path (that request answers EIO,
    logged), and the methods the source does not declare `inline` are deferred
    to the worker pool (deferral.py) while the overlay is deferring.

    Cached for the life of the mount: stat, raw_stat, readdir and the opaque
    markers of every layer; for a plugin's layer also readlink, getxattr
    (absent attributes too) and listxattr.  `open` is asked every time.
    Failures other than "no such entry" are never cached, so a plugin may
    fail for a while and then answer.
    """

    def __init__(self, index: int, source: DataSource) -> None:
        super().__init__(index)
        self.source = source
        self.name = _describe(source)
        #: The overlay's own directory layers: the data source is this module's base
        #: class, whose answers come straight from the os module.
        self.direct = type(source) is DataSource
        self._has_on_lookup = type(source).on_lookup is not DataSource.on_lookup
        deferred = ALL_METHODS - (ALL_METHODS if self.direct else _inline_methods(source))
        if not self._has_on_lookup:
            deferred -= {"on_lookup"}  # the default does nothing: nothing to wait for
        self._defer_stat = bool(deferred & {"stat", "on_lookup"})
        self._defer_raw_stat = bool(deferred & {"raw_stat", "on_lookup"})
        self._defer_readdir = "readdir" in deferred
        self._defer_opaque = bool(deferred & {"readdir", "getxattr"})
        self._defer_readlink = "readlink" in deferred
        self._defer_getxattr = "getxattr" in deferred
        self._defer_listxattr = "listxattr" in deferred
        self._defer_open = "open" in deferred
        self._deferred = deferred
        #: The source's own may_block, asked per call for the methods not inline.
        self._may_block = (source.may_block if type(source).may_block
                           is not DataSource.may_block else None)
        #: Some method of the source may wait: writes that need it run in the pool.
        self.blocks = bool(deferred)
        #: Whether on_lookup may run in several worker threads at once.
        self._notify_threads = bool(deferred & {"on_lookup", "stat", "raw_stat"})
        self._stats: dict[bytes, Stat | None] = {}
        self._raw_stats: dict[bytes, Stat] = {}
        self._names: dict[bytes, tuple[bytes, ...]] = {}
        self._name_sets: dict[bytes, frozenset[bytes]] = {}
        self._opaque: dict[bytes, bool] = {}
        self._links: dict[bytes, bytes] = {}
        self._xattrs: dict[tuple[bytes, str], bytes | int] = {}
        self._xattr_lists: dict[bytes, list[str]] = {}
        self._notified: set[bytes] = set()
        self._notifying: dict[bytes, threading.Event] = {}
        self._notify_lock = threading.Lock()
        #: One-shot results of deferred calls: exceptions to raise at the next
        #: attempt, descriptors opened for it.
        self._failed: dict[tuple[object, ...], BaseException] = {}
        self._ready: dict[tuple[object, ...], int] = {}

    def describe(self) -> str:
        return self.name

    # -- the plugin boundary -------------------------------------------------------------
    def _fault(self, method: str, path: bytes, what: str) -> PluginFault:
        return PluginFault(f"{self.name}: {method}({os.fsdecode(path)!r}) {what}")

    def _raised(self, method: str, path: bytes, exc: Exception) -> PluginFault:
        text = str(exc).strip().splitlines()
        return self._fault(method, path, f"raised {type(exc).__name__}"
                           + (f": {text[0]}" if text else ""))

    def _wrong_type(self, method: str, path: bytes, value: object, want: str) -> PluginFault:
        return self._fault(method, path, f"returned {type(value).__name__} ({value!r:.80}), "
                           f"not {want}")

    def _defer(self, key: tuple[object, ...], call: Callable[..., object],
               *args: object) -> NoReturn:
        """Raise what the last deferred attempt of `key` raised, or ask for the call."""
        failed = self._failed.pop(key, None)
        if failed is not None:
            raise failed

        def keep(exc: BaseException) -> None:
            self._failed[key] = exc

        raise NeedsFetch(call, args, keep)

    def _blocks(self, path: bytes, *methods: str) -> bool:
        """Whether one of `methods` may block for `path` (it is not inline and the
        source's may_block, if it has its own, does not say otherwise)."""
        ask = self._may_block
        if ask is None:
            return True
        for method in methods:
            if method in self._deferred:
                try:
                    if ask(method, path):
                        return True
                except Exception:
                    return True  # cannot tell: the safe side
        return False

    # -- on_lookup -----------------------------------------------------------------------
    def notified(self, path: bytes) -> bool:
        return not self._has_on_lookup or path in self._notified

    def _notify(self, path: bytes) -> None:
        """on_lookup(path), once; called again only if it raised."""
        if not self._has_on_lookup or path in self._notified:
            return
        if not self._notify_threads:
            self._call_on_lookup(path)
            self._notified.add(path)
            return
        # Two worker threads may want the same path: one calls, the other waits.
        with self._notify_lock:
            if path in self._notified:
                return
            event = self._notifying.get(path)
            mine = event is None
            if mine:
                event = self._notifying[path] = threading.Event()
        assert event is not None
        if not mine:
            event.wait()
            self._notify(path)  # done, or failed there: then it is this call's turn
            return
        try:
            self._call_on_lookup(path)
            self._notified.add(path)
        finally:
            with self._notify_lock:
                del self._notifying[path]
            event.set()

    def _call_on_lookup(self, path: bytes) -> None:
        try:
            self.source.on_lookup(path)
        except OSError:
            raise
        except Exception as exc:
            raise self._raised("on_lookup", path, exc) from exc

    # -- metadata ------------------------------------------------------------------------
    def stat(self, path: bytes) -> Stat | None:
        try:
            return self._stats[path]
        except KeyError:
            pass
        if self._defer_stat and deferring() and self._blocks(path, "on_lookup", "stat"):
            self._defer(("stat", path), self._stat_miss, path)
        return self._stat_miss(path)

    def cached_stat(self, path: bytes) -> bool:
        """Whether `stat(path)` is answered from the cache."""
        return path in self._stats

    def _stat_miss(self, path: bytes) -> Stat | None:
        if self._has_on_lookup:  # tested here too: this runs for every entry a walk meets
            self._notify(path)
        try:
            result: Stat | None = self.source.stat(path)
        except OSError as exc:
            if exc.errno not in _MISSING:
                raise
            result = None
        except Exception as exc:
            raise self._raised("stat", path, exc) from exc
        else:
            if not self.direct:
                problem = stat_problem(result)
                if problem is not None:
                    raise self._fault("stat", path, problem)
        self._stats[path] = result
        return result

    @property
    def reports_raw(self) -> bool:
        """`stat` is `raw_stat`: the overlay's own reading of a directory that
        records no overrides."""
        return self.direct and not self.source.honour_overrides

    def forget_stat(self, path: bytes) -> None:
        """Drop the cached attributes of `path` (its node keeps what it needs);
        a later `stat` reads them again, unchanged: the layer is immutable.
        A plugin whose stat may block keeps its answer: asking again could wait."""
        if not self._defer_stat:
            self._stats.pop(path, None)

    def raw_stat(self, path: bytes) -> Stat:
        """The converted inode's own attributes (what copy-up reads the data by)."""
        try:
            return self._raw_stats[path]
        except KeyError:
            pass
        if self._defer_raw_stat and deferring() and self._blocks(path, "on_lookup", "raw_stat"):
            self._defer(("raw_stat", path), self._raw_stat_miss, path)
        return self._raw_stat_miss(path)

    def _raw_stat_miss(self, path: bytes) -> Stat:
        self._notify(path)
        try:
            result = self.source.raw_stat(path)
        except OSError:
            raise
        except Exception as exc:
            raise self._raised("raw_stat", path, exc) from exc
        if not self.direct:
            problem = stat_problem(result)
            if problem is not None:
                raise self._fault("raw_stat", path, problem)
        self._raw_stats[path] = result
        return result

    def check_root(self) -> Stat:
        """The layer root's attributes, asked before the mount is reported ready.

        So that a plugin layer whose root is missing (or not a directory, or
        whose methods fail there) refuses the mount instead of ending it later;
        the answers stay cached for the mount.
        """
        st = self.stat(b"")
        if st is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        if not st.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self.is_opaque(b"")
        return st

    def names(self, path: bytes) -> tuple[bytes, ...]:
        try:
            return self._names[path]
        except KeyError:
            pass
        if self._defer_readdir and deferring() and self._blocks(path, "readdir"):
            self._defer(("readdir", path), self._names_miss, path)
        return self._names_miss(path)

    def _names_miss(self, path: bytes) -> tuple[bytes, ...]:
        try:
            listed = self.source.readdir(path)
        except OSError as exc:
            if exc.errno not in _MISSING:
                raise
            listed = []
        except Exception as exc:
            raise self._raised("readdir", path, exc) from exc
        result = tuple(listed) if isinstance(listed, list | tuple) else listed
        if not self.direct:
            if not isinstance(result, tuple):
                raise self._wrong_type("readdir", path, listed, "a list of bytes")
            for name in result:
                if type(name) is not bytes:
                    raise self._wrong_type("readdir", path, name, "bytes (a name in the list)")
                if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
                    raise self._fault("readdir", path, f"listed the impossible name {name!r}")
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
        if self._defer_opaque and deferring() and self._blocks(path, "readdir", "getxattr"):
            self._defer(("opaque", path), self._opaque_miss, path)
        return self._opaque_miss(path)

    def _opaque_miss(self, path: bytes) -> bool:
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
            return self.getxattr(path, name) == b"y"
        except OSError as exc:
            if _absent_xattr(exc):
                return False
            raise

    def readlink(self, path: bytes) -> bytes:
        try:
            return self._links[path]
        except KeyError:
            pass
        if self._defer_readlink and deferring() and self._blocks(path, "readlink"):
            self._defer(("readlink", path), self._readlink_miss, path)
        return self._readlink_miss(path)

    def _readlink_miss(self, path: bytes) -> bytes:
        try:
            target = self.source.readlink(path)
        except OSError:
            raise
        except Exception as exc:
            raise self._raised("readlink", path, exc) from exc
        if type(target) is not bytes:
            raise self._wrong_type("readlink", path, target, "bytes")
        if not target or b"\0" in target:
            raise self._fault("readlink", path, f"returned the impossible target {target!r}")
        if not self.direct:
            self._links[path] = target
        return target

    def getxattr(self, path: bytes, name: str) -> bytes:
        if self.direct:
            return self.source.getxattr(path, name)  # not cached: a syscall is cheaper
        cached = self._xattrs.get((path, name))
        if cached is not None:
            if isinstance(cached, int):
                raise OSError(cached, os.strerror(cached), os.fsdecode(path))
            return cached
        if self._defer_getxattr and deferring() and self._blocks(path, "getxattr"):
            self._defer(("getxattr", path, name), self._getxattr_miss, path, name)
        return self._getxattr_miss(path, name)

    def _getxattr_miss(self, path: bytes, name: str) -> bytes:
        try:
            value = self.source.getxattr(path, name)
        except OSError as exc:
            err = exc.errno
            if not self.direct and err in (errno.ENODATA, errno.ENOTSUP):
                assert err is not None
                self._xattrs[(path, name)] = err
            raise
        except Exception as exc:
            raise self._raised("getxattr", path, exc) from exc
        if type(value) is not bytes:
            raise self._wrong_type(f"getxattr[{name}]", path, value, "bytes")
        if not self.direct:
            self._xattrs[(path, name)] = value
        return value

    def listxattr(self, path: bytes) -> list[str]:
        cached = self._xattr_lists.get(path)
        if cached is not None:
            return list(cached)
        if self._defer_listxattr and deferring() and self._blocks(path, "listxattr"):
            self._defer(("listxattr", path), self._listxattr_miss, path)
        return self._listxattr_miss(path)

    def _listxattr_miss(self, path: bytes) -> list[str]:
        try:
            names = self.source.listxattr(path)
        except OSError:
            raise
        except Exception as exc:
            raise self._raised("listxattr", path, exc) from exc
        if not isinstance(names, list | tuple) or not all(type(n) is str for n in names):
            raise self._wrong_type("listxattr", path, names, "a list of str")
        result = list(names)
        if not self.direct:
            self._xattr_lists[path] = result
        return list(result)

    def open(self, path: bytes, flags: int) -> int:
        if self.direct:
            return self.source.open(path, flags)  # the overlay's own: nothing to check
        if self._defer_open and deferring() and self._blocks(path, "open"):
            key = ("open", path, flags)
            fd = self._ready.pop(key, None)
            if fd is not None:
                return fd
            self._defer(key, self._open_for_next_attempt, key, path, flags)
        return self._open_now(path, flags)

    def _open_for_next_attempt(self, key: tuple[object, ...], path: bytes, flags: int) -> None:
        fd = self._open_now(path, flags)
        stale = self._ready.pop(key, None)
        self._ready[key] = fd
        if stale is not None:
            os.close(stale)  # a racing open of the same file left one unclaimed

    def _open_now(self, path: bytes, flags: int) -> int:
        try:
            fd = self.source.open(path, flags)
        except OSError:
            raise
        except Exception as exc:
            raise self._raised("open", path, exc) from exc
        if type(fd) is not int or fd < 0:
            raise self._wrong_type("open", path, fd, "a file descriptor (int)")
        return fd


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
