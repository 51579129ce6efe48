"""What `convert` and `restore` share as runs that rewrite a tree in place: their visitor's frame, the state its threads share, and how a run walks.

- `InPlaceVisitor`: the report, dry-run flag, progress callback and deferred
  paths (tree.parallel) of a visitor; the marks of cshare.tree.marks picked
  up on entering a directory and put back on leaving it; what comes before a
  file or special entry is handled (a hardlinked one deferred to the parent
  process, the count, a leftover temporary entry removed).  The subclass says
  what happens to the directory, file or special entry itself.
- `SharedState`: both handle every name of a hardlinked inode once, and both
  replace a node by another (a device by a placeholder file, or back) whose
  further names must end up linked to it: so both keep, across threads, the
  inode numbers already handled and an O_PATH fd of each replacement, under
  one lock.
- `walk_in_place`: one thread for a dry run (its changes come in walk order),
  threads when asked for, else processes (cshare.tree.parallel).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from . import marks
from .parallel import ParallelVisitor, default_processes, walk_parallel
from .walk import Dir, WalkReport, display, walk


class SharedState:
    """What the walk's threads share; subclasses add their caches of encoded or parsed values."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards seen and replaced
        self.seen: set[int] = set()  # inode numbers of hardlinked entries already handled
        #: ino of a replaced hardlinked node -> O_PATH fd of its replacement, so that
        #: its other names are linked to it (the old inode number is what tells).
        self.replaced: dict[int, int] = {}

    def first_time_locked(self, ino: int) -> bool:
        """Whether `ino` is handled here for the first time; the caller holds `lock`."""
        if ino in self.seen:
            return False
        self.seen.add(ino)
        return True

    def first_time(self, ino: int) -> bool:
        with self.lock:
            return self.first_time_locked(ino)

    def close(self) -> None:
        """Close the replacements' fds (the run is over: no name is linked any more)."""
        for fd in self.replaced.values():
            os.close(fd)
        self.replaced.clear()


_Report = TypeVar("_Report", bound=WalkReport)
_State = TypeVar("_State", bound=SharedState)


class InPlaceVisitor(ABC, Generic[_Report, _State]):
    """The walk visitor frame of convert and restore; one per thread, each with its own report."""

    def __init__(self, report: _Report, shared: _State, dry_run: bool,
                 on_entry: Callable[[], None] | None) -> None:
        self.report = report
        self.shared = shared
        self.dry_run = dry_run
        self.on_entry = on_entry
        self.defer: list[str] | None = None  # set in a worker process (tree.parallel)

    # ------------------------------------------------------------------ what the subclass does
    @abstractmethod
    def directory(self, d: Dir, names: frozenset[str]) -> None:
        """The directory `d` itself, once its marks are picked up."""

    @abstractmethod
    def regular(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        """A regular file, counted, neither deferred nor a leftover temporary file."""

    @abstractmethod
    def other(self, d: Dir, name: str, st: os.stat_result) -> None:
        """A symlink, device, fifo or socket, counted and not deferred."""

    # ------------------------------------------------------------------ the walk's Visitor
    def enter(self, d: Dir, names: frozenset[str]) -> bool:
        self._count()
        if not self.resume(d, names):
            return False
        self.directory(d, names)
        return True

    def file(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        if st.st_nlink > 1 and self.defer is not None:
            self.defer.append(d.join(name))  # other names may be in other workers' directories
            return
        # Inline rather than _count(): this runs once per file, the hottest path of a run.
        self.report.entries += 1
        if self.on_entry is not None:
            self.on_entry()
        if name.startswith(marks.TEMPORARY_START) and marks.is_temporary(name):
            self.leftover(d, name, "file")
            return
        self.regular(d, name, fd, st, names)

    def special(self, d: Dir, name: str, st: os.stat_result) -> None:
        if st.st_nlink > 1 and self.defer is not None:
            self.defer.append(d.join(name))
            return
        self._count()
        self.other(d, name, st)

    def resume(self, d: Dir, names: frozenset[str]) -> bool:
        """Pick up the times an interrupted run recorded for `d`; False skips it (bad mark)."""
        if self.dry_run:
            return True
        try:
            marks.load_times(d, names)
        except ValueError as exc:
            self.report.errors.append((d.path, str(exc)))
            return False
        return True

    def leave(self, d: Dir) -> None:
        if not self.dry_run:
            marks.put_back_times(d)

    def error(self, path: str, message: str) -> None:
        self.report.errors.append((path, message))

    def other_filesystem(self, path: str) -> None:
        self.report.skipped_mounts.append(path)

    def absorb(self, report: _Report) -> None:
        self.report.add(report)

    # ------------------------------------------------------------------ helpers
    def leftover(self, d: Dir, name: str, kind: str) -> None:
        """A temporary entry (`kind`: "file" or "node") an interrupted run left: it goes."""
        if self.dry_run:
            self.report.changes.append(f"remove leftover temporary {kind}: {display(d.join(name))}")
            return
        marks.remove_leftover(d, name)

    def _count(self) -> None:
        self.report.entries += 1
        if self.on_entry is not None:
            self.on_entry()


_V = TypeVar("_V", bound=ParallelVisitor)


def walk_in_place(root: Path, make_visitor: Callable[[], _V], *, dry_run: bool,
                  workers: int | None, processes: int | None) -> list[_V]:
    """Walk `root` with visitors from `make_visitor` and return them (their reports).

    A dry run walks in one thread, so that its list of changes comes in walk
    order; otherwise `workers` > 1 means that many threads, else `processes`
    processes (default: parallel.default_processes(); a small tree never forks).
    """
    if workers is not None and workers > 1 and not dry_run:
        visitors = [make_visitor() for _ in range(workers)]
        walk(Path(root), list(visitors))
        return visitors
    visitor = make_visitor()
    count = processes if processes is not None else default_processes()
    if count > 1 and not dry_run:
        walk_parallel(Path(root), visitor, count)
    else:
        walk(Path(root), visitor)
    return [visitor]
