"""A tree walk through directory file descriptors, never through path names.

`cshare convert`, `restore` and `verify` run as root over trees that other
people built.  Walking by path name would let a rename or a symlink planted
during the walk redirect root's changes out of the tree.  Here every directory
is opened relative to its parent's fd with O_NOFOLLOW|O_DIRECTORY, every
regular file the visitor touches is opened the same way (`open_file`), and the
identity of what was opened is taken from the fd itself (fstat).  Entries on
another filesystem (mount points) are reported and not entered.

The walk is iterative (a tree may be deeper than Python's recursion limit) and
holds one fd per directory level.  It can run several threads, each with its
own visitor, taking whole directories: the syscalls release the GIL, so the
kernel work of one thread overlaps the Python work of another.  Each directory is listed completely before
its entries are visited, so entries the visitor creates or renames while it
works in a directory are never visited themselves.
"""

from __future__ import annotations

import os
import resource
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

#: Flags for opening anything in the tree: never follow a symlink, never become
#: a controlling terminal, never block (a fifo swapped in by a race).
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
DIR_FLAGS = OPEN_FLAGS | os.O_DIRECTORY


class Dir:
    """An open directory of the walk: its fd, its path relative to the root, its stat.

    `state` is free for the visitor (e.g. times to put back when leaving).  A
    plain class, like the reports below: `dataclasses` (with the inspect and
    ast modules it loads) would add ~10 ms to every `cshare convert`, which is
    timed against `chmod -R`.
    """

    __slots__ = ("fd", "path", "st", "state")

    def __init__(self, fd: int, path: str, st: os.stat_result,
                 state: dict[str, object] | None = None) -> None:
        self.fd = fd
        self.path = path  # "." for the root, else "a/b/c" (names are str with surrogateescape)
        self.st = st
        self.state: dict[str, object] = {} if state is None else state

    def __repr__(self) -> str:
        return f"Dir(fd={self.fd}, path={self.path!r})"

    def join(self, name: str) -> str:
        """The relative path of entry `name` of this directory (for messages)."""
        return name if self.path == "." else f"{self.path}/{name}"


_Report = TypeVar("_Report", bound="WalkReport")


class WalkReport:
    """What a walk that changes a tree reports; convert and restore add their counters.

    Every int attribute is a counter, every list attribute a list of findings;
    a subclass names its own counters in COUNTERS (all start at 0).
    """

    COUNTERS: tuple[str, ...] = ()

    def __init__(self, **values: int) -> None:
        self.entries = 0
        self.errors: list[tuple[str, str]] = []
        self.changes: list[str] = []  # dry run only
        self.skipped_mounts: list[str] = []
        for name in self.COUNTERS:
            setattr(self, name, 0)
        for name, value in values.items():
            if name != "entries" and name not in self.COUNTERS:
                raise TypeError(f"{type(self).__name__} has no counter {name!r}")
            setattr(self, name, value)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({inner})"

    def add(self, other: WalkReport) -> None:
        """Count `other` (another worker's report) into this one."""
        for name, mine in vars(self).items():
            if isinstance(mine, list):
                mine.extend(getattr(other, name))
            else:
                setattr(self, name, mine + getattr(other, name))

    @classmethod
    def total(cls: type[_Report], reports: Iterable[WalkReport]) -> _Report:
        """All `reports` added up, errors and skipped mounts in path order."""
        total = cls()
        for report in reports:
            total.add(report)
        total.errors.sort()
        total.skipped_mounts.sort()
        return total

    def summary(self) -> dict[str, object]:
        """For --json: every counter, the errors and the skipped mounts."""
        data: dict[str, object] = {
            name: value for name, value in vars(self).items() if isinstance(value, int)
        }
        data["errors"] = [{"path": p, "message": m} for p, m in self.errors]
        data["skipped_mounts"] = self.skipped_mounts
        return data


class Visitor(Protocol):
    """What a walk calls.  Exceptions other than OSError from a visitor end the walk."""

    def enter(self, d: Dir, names: frozenset[str]) -> bool:
        """The directory `d` is open (`names`: its xattr names); return False to skip its contents."""
        ...

    def file(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        """A regular file, opened read-only as `fd` (closed by the walk afterwards)."""
        ...

    def special(self, d: Dir, name: str, st: os.stat_result) -> None:
        """A symlink, device, fifo or socket (lstat result); never opened."""
        ...

    def leave(self, d: Dir) -> None:
        """All entries of `d` were visited; its fd is still open."""
        ...

    def error(self, path: str, message: str) -> None:
        """An entry could not be visited (it vanished, is unreadable, ...)."""
        ...

    def other_filesystem(self, path: str) -> None:
        """A mount point: neither changed nor entered."""
        ...


def _listxattr(fd: int) -> frozenset[str]:
    names = os.listxattr(fd)
    return frozenset(names) if names else _EMPTY


_EMPTY: frozenset[str] = frozenset()

# Bound once: _visit runs per entry, and a module global is cheaper than os.X.
_open, _fstat, _close, _os_listxattr = os.open, os.fstat, os.close, os.listxattr
_S_IFMT, _S_IFREG = 0o170000, stat.S_IFREG


def raise_fd_limit(depth_hint: int = 4096) -> None:
    # One fd per directory level: a deep tree must not run out of descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, depth_hint)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def _last_component(root: Path | str) -> str:
    """`root` without trailing slashes: `link/` would make the kernel follow `link`."""
    text = os.fspath(root)
    stripped = text.rstrip("/")
    return stripped or text


def symlink_root_problem(root: Path | str) -> str | None:
    """Why `root` may not be walked when its last component is a symlink, else None.

    Root's tools change the tree they are given; a ROOTFS that is a symlink
    would redirect them to wherever it points (a link to / would open up the
    host), so the symlink itself is refused and the message names its target.
    Symlinks in the components above it are the caller's own path and fine.
    """
    path = _last_component(root)
    if not os.path.islink(path):
        return None
    try:
        target = os.readlink(path)
    except OSError as exc:
        target = f"? ({exc.strerror})"
    real = os.path.realpath(path)
    return (
        f"{path} is a symlink to {target} ({real}); cshare does not follow it: "
        f"give {real} itself if that is the tree you mean"
    )


def open_root(root: Path) -> tuple[int, os.stat_result]:
    """Open the tree's root directory; a symlink there is refused (ELOOP), never followed.

    Except /proc/self/fd/N: that names a directory the caller has opened
    already (a magic link, which O_NOFOLLOW would refuse).
    """
    path = _last_component(root)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if not path.startswith("/proc/self/fd/"):
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    return fd, os.fstat(fd)


def default_workers() -> int:
    """Threads for a walk: one.

    Several threads are supported, and correct, but on CPython 3.11 they make
    convert slower, not faster: each entry is a handful of short syscalls, and
    giving the GIL back and taking it again around each of them costs more than
    the overlap gains (measured on 100k entries: 1 thread 1.6 s, 2 threads
    2.6 s, 4 threads 4.6 s wall).  A free-threaded Python may change that.
    """
    return 1


class _Pool:
    """Directories waiting for a worker; a worker shares only when another is idle,
    so the number of open directory fds stays bounded by depth times workers."""

    def __init__(self, workers: int) -> None:
        self.cond = threading.Condition()
        self.queue: list[Dir] = []
        self.busy = 0
        self.idle = 0
        self.workers = workers
        self.error: BaseException | None = None


def walk(root: Path, visitors: Visitor | list[Visitor]) -> None:
    """Visit every entry below `root` (the root directory included, via `enter`).

    With a list of visitors, one thread runs per visitor, each taking whole
    directories: `enter`/`file`/`special`/`leave` of one directory always run
    in one thread, in order, but directories are visited concurrently.
    """
    workers = visitors if isinstance(visitors, list) else [visitors]
    raise_fd_limit()
    root_fd, root_st = open_root(root)
    dev = root_st.st_dev
    top = Dir(root_fd, ".", root_st)
    first = workers[0]
    try:
        names = _listxattr(root_fd)
        descend = first.enter(top, names)
    except OSError as exc:
        os.close(root_fd)
        first.error(".", exc.strerror or str(exc))
        return
    except BaseException:
        os.close(root_fd)
        raise
    if not descend:
        try:
            first.leave(top)
        finally:
            os.close(root_fd)
        return
    pool = _Pool(len(workers))
    pool.queue.append(top)
    threads = [
        threading.Thread(target=_worker, args=(pool, v, dev), name=f"walk-{i}", daemon=True)
        for i, v in enumerate(workers[1:], 1)
    ]
    for t in threads:
        t.start()
    _worker(pool, first, dev)
    for t in threads:
        t.join()
    for d in pool.queue:  # only after an error
        os.close(d.fd)
    if pool.error is not None:
        raise pool.error


def _worker(pool: _Pool, visitor: Visitor, dev: int) -> None:
    while True:
        with pool.cond:
            pool.idle += 1
            while not pool.queue and pool.busy > 0 and pool.error is None:
                pool.cond.wait()
            pool.idle -= 1
            if pool.error is not None or not pool.queue:
                pool.cond.notify_all()
                return
            d = pool.queue.pop()
            pool.busy += 1
        try:
            _walk_from(d, pool, visitor, dev)
        except BaseException as exc:
            with pool.cond:
                if pool.error is None:
                    pool.error = exc
        finally:
            with pool.cond:
                pool.busy -= 1
                pool.cond.notify_all()


def _walk_from(top: Dir, pool: _Pool, visitor: Visitor, dev: int) -> None:
    """Depth-first below `top` (already entered), handing subdirectories to idle workers."""
    stack: list[tuple[Dir, Iterator[os.DirEntry[str]]]] = [(top, _entries(top, visitor))]
    try:
        while stack:
            if pool.error is not None:
                return
            d, entries = stack[-1]
            for entry in entries:
                child = _visit(d, entry, dev, visitor)
                if child is None:
                    continue
                if pool.idle and len(pool.queue) < pool.workers:
                    with pool.cond:
                        pool.queue.append(child)
                        pool.cond.notify()
                    continue
                stack.append((child, _entries(child, visitor)))
                break
            else:
                stack.pop()
                try:
                    visitor.leave(d)
                finally:
                    os.close(d.fd)
    finally:
        for d, _ in stack:  # only after an exception or an error elsewhere
            os.close(d.fd)


def _entries(d: Dir, visitor: Visitor) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(d.fd) as it:
            listing = list(it)
    except OSError as exc:
        visitor.error(d.path, f"cannot list: {exc.strerror or exc}")
        return iter(())
    return iter(listing)


def _visit(d: Dir, entry: os.DirEntry[str], dev: int, visitor: Visitor) -> Dir | None:
    """Visit one listed entry; return it, entered, when it is a directory to descend into."""
    # This runs once per entry of the tree, so the common case (a regular
    # file) comes first and goes straight through; everything else is in
    # _visit_other.  d_type tells files and dirs apart without a syscall;
    # what is opened is checked again through the fd, so a swap in between is
    # harmless.
    name = entry.name
    if entry.is_file(follow_symlinks=False):
        try:
            fd = _open(name, OPEN_FLAGS, dir_fd=d.fd)
        except OSError as exc:
            visitor.error(d.join(name), exc.strerror or str(exc))
            return None
        try:
            st = _fstat(fd)
            if st.st_mode & _S_IFMT == _S_IFREG and st.st_dev == dev:
                xnames = _os_listxattr(fd)
                visitor.file(d, name, fd, st, frozenset(xnames) if xnames else _EMPTY)
                return None
        except OSError as exc:
            visitor.error(d.join(name), exc.strerror or str(exc))
            return None
        finally:
            _close(fd)
    return _visit_other(d, entry, dev, visitor)


def _visit_other(d: Dir, entry: os.DirEntry[str], dev: int, visitor: Visitor) -> Dir | None:
    """_visit for directories, non-regular entries, and files swapped or on another filesystem."""
    name = entry.name
    try:
        if entry.is_dir(follow_symlinks=False):
            fd = os.open(name, DIR_FLAGS, dir_fd=d.fd)
            try:
                st = os.fstat(fd)
                if st.st_dev != dev:
                    visitor.other_filesystem(d.join(name))
                    os.close(fd)
                    return None
                names = _listxattr(fd)
            except BaseException:
                os.close(fd)
                raise
            child = Dir(fd, d.join(name), st)
            try:
                descend = visitor.enter(child, names)
            except BaseException:
                os.close(fd)
                raise
            if descend:
                return child
            try:
                visitor.leave(child)
            finally:
                os.close(fd)
            return None
    except OSError as exc:
        visitor.error(d.join(name), exc.strerror or str(exc))
        return None
    # Not a directory, or a regular file that is not one any more (swapped
    # since the listing) or lives on another filesystem: take it as it is now.
    visit_name(d, name, dev, visitor)
    return None


def visit_name(d: Dir, name: str, dev: int, visitor: Visitor) -> None:
    """Visit the non-directory `name` of `d` as it is now, found by name (lstat first).

    A regular file is opened and checked again through its fd; a directory,
    or a file that changed type in between, is reported as an error: it is
    not this walk's to enter any more.
    """
    try:
        st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
        if st.st_dev != dev:
            visitor.other_filesystem(d.join(name))
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(name, OPEN_FLAGS, dir_fd=d.fd)
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_dev == dev:
                    visitor.file(d, name, fd, st, _listxattr(fd))
                else:
                    visitor.error(d.join(name), "changed type while being visited; skipped")
            finally:
                os.close(fd)
        elif stat.S_ISDIR(st.st_mode):
            visitor.error(d.join(name), "changed type while being visited; skipped")
        else:
            visitor.special(d, name, st)
    except OSError as exc:
        visitor.error(d.join(name), exc.strerror or str(exc))


def display(path: str) -> str:
    """A relative path as one printable line: control characters, backslashes and
    undecodable bytes are escaped as in Python string literals."""
    out = []
    for c in path:
        code = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif code < 32 or code == 127:
            out.append({"\n": "\\n", "\t": "\\t"}.get(c, f"\\x{code:02x}"))
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(c)
    return "".join(out)
