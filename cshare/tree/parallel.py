"""The tree walk of cshare.tree.walk, spread over several processes.

convert and restore spend most of their time in a handful of short syscalls
per entry; threads do not help under the GIL (see walk.default_workers),
processes do.  The parent walks the top of the tree breadth-first until it
has enough directories for everybody, then forks workers that take those
directories one at a time (from a pipe of indices) and walk each below it
with their own visitor, reopening it from the root fd name by name
(O_NOFOLLOW|O_DIRECTORY) and checking it is the inode the parent saw.

Anything whose handling needs to know about other names of the same inode
(a non-directory with st_nlink > 1: hardlinked files, devices, placeholders)
is not handled by a worker but deferred: its path goes back to the parent,
which handles all of them itself, in one process, after the workers are done.
Reports come back pickled; progress comes back as one byte per
PROGRESS_BATCH entries.  Workers die with the parent (PR_SET_PDEATHSIG), so a
killed run leaves nothing running, and the marks of cshare.tree.marks make
any interrupted state complete on the next run.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..system import libc
from .walk import (
    DIR_FLAGS,
    Dir,
    Visitor,
    _entries,
    _listxattr,
    _Pool,
    _visit,
    _walk_from,
    open_root,
    raise_fd_limit,
    visit_name,
)

PROGRESS_BATCH = 1024
#: Directories handed out per worker: enough to even out uneven subtrees.
SPREAD = 16


class ParallelVisitor(Visitor, Protocol):
    """A visitor that can work in a worker process."""

    #: None in the parent; in a worker, where deferred paths go.
    defer: list[str] | None
    on_entry: Callable[[], None] | None
    report: Any

    def resume(self, d: Dir, names: frozenset[str]) -> bool:
        """Take over `d`, already entered elsewhere (reload its marks); False skips it."""
        ...

    def absorb(self, report: Any) -> None:
        """Add a worker's report to this one."""
        ...


def default_processes() -> int:
    """One worker per usable CPU (at most 8); $CSHARE_WALK_PROCESSES overrides it."""
    override = os.environ.get("CSHARE_WALK_PROCESSES", "")
    if override.isdigit() and int(override) > 0:
        return int(override)
    return max(1, min(8, len(os.sched_getaffinity(0))))


def walk_parallel(root: Path, visitor: ParallelVisitor, processes: int, spread: int | None = None) -> None:
    """Like walk.walk(root, visitor), with `processes` worker processes."""
    raise_fd_limit()
    root_fd, root_st = open_root(root)
    try:
        dev = root_st.st_dev
        top = Dir(root_fd, ".", root_st)
        try:
            names = _listxattr(root_fd)
            if not visitor.enter(top, names):
                visitor.leave(top)
                return
        except OSError as exc:
            visitor.error(".", exc.strerror or str(exc))
            return
        work = _breadth_first(top, visitor, dev, (spread or SPREAD) * processes)
        if work:
            _run_workers(root_fd, dev, work, visitor, processes)
    finally:
        os.close(root_fd)


def _breadth_first(top: Dir, visitor: ParallelVisitor, dev: int, enough: int) -> list[tuple[str, int]]:
    """Walk the top levels in the parent until `enough` directories wait; return them
    as (path, inode), already entered but with their contents not yet visited.

    Waiting directories are kept as paths, not fds, so a level however wide
    costs no descriptors; whoever takes one reopens it (open_below)."""
    waiting: list[tuple[str, int]] = []
    _expand(top, visitor, dev, waiting)
    while waiting and len(waiting) < enough:
        path, ino = waiting.pop(0)
        d = _reopen(top.fd, dev, path, ino, visitor)
        if d is None:
            continue
        try:
            _expand(d, visitor, dev, waiting)
        finally:
            os.close(d.fd)
    return waiting


def _expand(d: Dir, visitor: Visitor, dev: int, waiting: list[tuple[str, int]]) -> None:
    """Visit the entries of `d` (entered), queueing its subdirectories, then leave it."""
    for entry in _entries(d, visitor):
        child = _visit(d, entry, dev, visitor)
        if child is not None:
            waiting.append((child.path, child.st.st_ino))
            os.close(child.fd)
    visitor.leave(d)


def _reopen(root_fd: int, dev: int, path: str, ino: int, visitor: ParallelVisitor) -> Dir | None:
    """Open a waiting directory again and let the visitor resume it."""
    try:
        fd = open_below(root_fd, path, dev)
    except OSError as exc:
        visitor.error(path, f"cannot reopen: {exc.strerror or exc}")
        return None
    try:
        st = os.fstat(fd)
        if st.st_ino != ino:
            visitor.error(path, "replaced during the walk; not entered")
            os.close(fd)
            return None
        d = Dir(fd, path, st)
        if not visitor.resume(d, _listxattr(fd)):
            os.close(fd)
            return None
        return d
    except BaseException:
        os.close(fd)
        raise


def open_below(root_fd: int, path: str, dev: int) -> int:
    """Open directory `path` (relative, "/"-separated) below root_fd, following no symlink."""
    fd = os.dup(root_fd)
    if path == ".":
        return fd
    try:
        for name in path.split("/"):
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if os.fstat(fd).st_dev != dev:
                raise OSError(0, "crossed into another filesystem")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _run_workers(
    root_fd: int, dev: int, work: list[tuple[str, int]], visitor: ParallelVisitor, processes: int
) -> None:
    task_r, task_w = os.pipe()
    progress_r, progress_w = os.pipe()
    # All indices are in the pipe before any worker starts: every read gets a whole one.
    os.write(task_w, b"".join(struct.pack("=I", i) for i in range(len(work))))
    os.close(task_w)
    results: dict[int, tuple[int, int]] = {}  # read fd -> (pid, index)
    sys.stdout.flush()
    sys.stderr.flush()
    prctl = libc.prctl()
    for n in range(min(processes, len(work))):
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(result_r)
                os.close(progress_r)
                libc.die_with_parent(prctl)
                code = _worker(root_fd, dev, work, visitor, task_r, progress_w, result_w)
            finally:
                os._exit(code)
        os.close(result_w)
        results[result_r] = (pid, n)
    os.close(task_r)
    os.close(progress_w)
    deferred = _collect(results, progress_r, visitor)
    os.close(progress_r)
    _handle_deferred(root_fd, dev, deferred, visitor)


def _worker(
    root_fd: int,
    dev: int,
    work: list[tuple[str, int]],
    visitor: ParallelVisitor,
    task_r: int,
    progress_w: int,
    result_w: int,
) -> int:
    visitor.defer = []
    visitor.report = type(visitor.report)()  # fork copied the parent's: report only our own
    # Progress is counted from the report after each directory handed out, not
    # per entry: a call per entry costs more than the entry's own Python work.
    visitor.on_entry = None
    sent = 0
    pool = _Pool(1)  # never shares: this worker walks its directory alone
    failure: str | None = None
    try:
        while True:
            raw = os.read(task_r, 4)
            if len(raw) < 4:
                break
            path, ino = work[struct.unpack("=I", raw)[0]]
            d = _reopen(root_fd, dev, path, ino, visitor)
            if d is None:
                continue
            _walk_from(d, pool, visitor, dev)
            if pool.error is not None:
                raise pool.error
            batches = (visitor.report.entries - sent) // PROGRESS_BATCH
            if batches:
                os.write(progress_w, b"." * batches)
                sent += batches * PROGRESS_BATCH
    except BaseException as exc:  # reported by the parent, which raises it
        failure = f"{type(exc).__name__}: {exc}"
    count = visitor.report.entries - sent
    payload = pickle.dumps((visitor.report, visitor.defer, count, failure))
    view = memoryview(payload)
    while view:
        view = view[os.write(result_w, view) :]
    os.close(result_w)
    return 0 if failure is None else 1


def _collect(results: dict[int, tuple[int, int]], progress_r: int, visitor: ParallelVisitor) -> list[str]:
    """Wait for the workers; pass on their progress; merge their reports; return deferred paths."""
    buffers: dict[int, bytearray] = {fd: bytearray() for fd in results}
    open_fds = set(results) | {progress_r}
    on_entry = visitor.on_entry
    while open_fds:
        ready, _, _ = select.select(list(open_fds), [], [])
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if fd == progress_r:
                if not data:
                    open_fds.discard(fd)
                elif on_entry is not None:
                    for _ in range(len(data) * PROGRESS_BATCH):
                        on_entry()
                continue
            if data:
                buffers[fd].extend(data)
            else:
                open_fds.discard(fd)
                os.close(fd)
    failures = []
    deferred: list[str] = []
    for fd, (pid, _n) in results.items():
        _, status = os.waitpid(pid, 0)
        if not buffers[fd]:
            failures.append(f"worker {pid} ended without a report (status {status})")
            continue
        report, defer, count, failure = pickle.loads(bytes(buffers[fd]))
        visitor.absorb(report)
        deferred.extend(defer)
        if on_entry is not None:
            for _ in range(count):
                on_entry()
        if failure:
            failures.append(failure)
    if failures:
        raise RuntimeError("; ".join(failures))
    return deferred


def _handle_deferred(root_fd: int, dev: int, paths: list[str], visitor: ParallelVisitor) -> None:
    """Entries with other names (st_nlink > 1), handled here in one process."""
    by_dir: dict[str, list[str]] = {}
    for path in paths:
        parent, _, name = path.rpartition("/")
        by_dir.setdefault(parent or ".", []).append(name)
    for parent, names in sorted(by_dir.items()):
        try:
            fd = open_below(root_fd, parent, dev)
        except OSError as exc:
            visitor.error(parent, f"cannot reopen: {exc.strerror or exc}")
            continue
        d = Dir(fd, parent, os.fstat(fd))
        try:
            if not visitor.resume(d, _listxattr(fd)):
                continue
            for name in names:
                visit_name(d, name, dev, visitor)
            visitor.leave(d)
        finally:
            os.close(fd)
