"""Getting a layer's file contents: verified cache first, else range requests, with readahead.

`Fetcher.fd_for` answers an open: an fd on verified contents.  A file this
mount already verified is opened straight from the cache (as long as the cache
file is still the same inode with the same times); one found in the cache is
hashed first; anything else is fetched by one range request over its frames,
together with the small files that follow it in the blob (the readahead
window), and every file of that request is verified before it is published.

Readahead adapts as a kernel's does: the window starts at 64 KiB, doubles (up
to 4 MiB) each time a file fetched ahead is then opened, and halves on an open
that needed a fetch.  While opens keep landing on files fetched ahead, one
background thread has the next window fetched (by a fetch worker process,
registry_worker), so a tree read in order overlaps the network,
decompression and hashing with the reads.

Threads: any number may call `fd_for`; a file being fetched by one is waited
for by the others (no file is fetched twice at once).  A window fetched ahead
is handed to a fetch worker process when the mount has them
(registry_worker), so that its per-file work does not take the interpreter
from the request loop; an open's own fetch is made in the opening thread.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

from plugins.registry_cache import DigestMismatch, FileCache
from plugins.registry_http import RegistryClient
from plugins.registry_toc import Entry
from plugins.registry_worker import Span, WorkerPool

READAHEAD_MIN = 64 << 10
READAHEAD_MAX = 4 << 20
#: A file fetched ahead along with an open is at most this big (compressed).
AHEAD_FILE_MAX = 64 << 10
#: At most this many files are fetched by one request.
MAX_BATCH = 256

Plan = list[tuple[bytes, Entry]]


class Fetcher:
    """File contents of one layer blob, through `cache`."""

    def __init__(self, client: RegistryClient, cache: FileCache, repository: str,
                 blob: str, order: Plan, layer_name: str, log: logging.Logger,
                 wait_limit: float, workers: WorkerPool | None = None) -> None:
        self.client, self.cache, self.repository, self.blob = client, cache, repository, blob
        self.order, self.layer_name, self.log = order, layer_name, log
        self.wait_limit = wait_limit
        self.workers = workers
        self.position = {path: i for i, (path, _) in enumerate(order)}
        self.lock = threading.Lock()
        self.verified: dict[str, tuple[int, int, int]] = {}  # digest -> (ino, mtime, ctime)
        self.inflight: dict[str, threading.Event] = {}
        self.ahead: set[str] = set()  # fetched ahead, not opened yet
        self.window = READAHEAD_MIN
        self.frontier = 0  # index in `order` after the last file fetched
        self.prefetching = False

    # -- opens ---------------------------------------------------------------------
    def knows(self, digest: str) -> bool:
        """Whether this mount verified `digest` already (its open needs no fetch and no hashing)."""
        return digest in self.verified

    def fd_for(self, path: bytes, entry: Entry, flags: int) -> int:
        """An fd on the verified contents of `path` (its first name); OSError(EIO) if none."""
        digest = entry.digest
        while True:
            with self.lock:
                fd = self._open_verified(digest, flags)
                if fd is not None:
                    if digest in self.ahead:
                        self.ahead.discard(digest)
                        self.window = min(self.window * 2, READAHEAD_MAX)
                        hit = True
                    else:
                        hit = False
                if fd is None:
                    waiter = self.inflight.get(digest)
                    if waiter is None:
                        self.inflight[digest] = threading.Event()
            if fd is not None:
                if hit:
                    self._schedule_prefetch()
                return fd
            if waiter is None:
                break
            waiter.wait(self.wait_limit)  # someone fetches it (maybe ahead): look again
        try:
            fd = self.cache.open_checked(digest, entry.size, flags)
            if fd is None:
                with self.lock:
                    self.window = max(self.window // 2, READAHEAD_MIN)
                self._fetch(path, entry)
                fd = self.cache.open_trusted(digest, flags)
            st = os.fstat(fd)
            with self.lock:
                self.verified[digest] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            return fd
        finally:
            self._release([digest])

    def _open_verified(self, digest: str, flags: int) -> int | None:
        """An fd on contents this mount verified, if the cache file is still the same."""
        known = self.verified.get(digest)
        if known is None:
            return None
        try:
            fd = self.cache.open_trusted(digest, flags)
        except FileNotFoundError:
            del self.verified[digest]
            return None
        st = os.fstat(fd)
        if (st.st_ino, st.st_mtime_ns, st.st_ctime_ns) == known:
            return fd
        os.close(fd)  # changed on disk since: check it again
        del self.verified[digest]
        return None

    def _release(self, digests: list[str]) -> None:
        with self.lock:
            for digest in digests:
                event = self.inflight.pop(digest, None)
                if event is not None:
                    event.set()

    # -- planning ------------------------------------------------------------------
    def _available(self, entry: Entry) -> bool:
        """Worth fetching: not verified, not being fetched, not in the cache (lock held)."""
        return not (entry.digest in self.verified or entry.digest in self.inflight
                    or self.cache.present(entry.digest))

    def _claim(self, start: int, limit: int, file_max: int, seen: set[str]) -> Plan:
        """Consecutive available files from index `start` ending before `limit` (lock held)."""
        plan: Plan = []
        last_end = self.order[start - 1][1].end_offset if start else 0
        for other_path, other in self.order[start:start + MAX_BATCH]:
            if (other.end_offset > limit or other.offset < last_end or other.digest in seen
                    or other.end_offset - other.offset > file_max or not self._available(other)):
                break
            self.inflight[other.digest] = threading.Event()
            seen.add(other.digest)
            plan.append((other_path, other))
            last_end = other.end_offset
        return plan

    # -- fetching ------------------------------------------------------------------
    def _fetch(self, path: bytes, entry: Entry) -> None:
        """Fetch `entry` with the files after it, verify, publish; EIO with a log line if it fails."""
        with self.lock:
            index = self.position[path]
            extra = self._claim(index + 1, entry.end_offset + self.window, AHEAD_FILE_MAX,
                                {entry.digest})
        try:
            failures = self._get([(path, entry), *extra])
        except OSError as exc:
            self.log.error("%s: %s: cannot fetch: %s", self.layer_name, os.fsdecode(path), exc)
            raise OSError(errno.EIO, f"cannot fetch {os.fsdecode(path)}") from None
        finally:
            self._release([e.digest for _, e in extra])
        if path in failures:
            raise OSError(errno.EIO, f"{os.fsdecode(path)} does not match its digest")

    def _get(self, plan: Plan, ahead: bool = False) -> set[bytes]:
        """One range request for `plan`; logs and returns the paths that failed to verify.

        `ahead`: a window fetched ahead of the reader, done in a fetch worker
        when the mount has them (registry_worker), else in this thread."""
        start, end = plan[0][1].offset, plan[-1][1].end_offset
        published: dict[str, tuple[int, int, int]] = {}
        entries = [e for _, e in plan]
        broken: list[tuple[int, str]] | None = None
        if ahead and self.workers is not None and self.workers.unavailable is None:
            spans = [Span(e.digest, e.size, e.offset, e.end_offset) for e in entries]
            try:
                broken = self.workers.fetch(self.client, self.cache.root, self.repository,
                                            self.blob, spans, published, self.wait_limit)
            except RuntimeError as exc:  # no worker can be had: fetch here from now on
                self.log.warning("%s; windows are fetched ahead in the daemon", exc)
        if broken is None:
            broken = self.client.stream_range(
                self.repository, self.blob, start, end,
                lambda blocks: store_range(self.cache, entries, start, blocks, published))
        failures = [(plan[n][0], reason) for n, reason in broken]
        for failed_path, reason in failures:
            self.log.error("%s: %s: %s; not served", self.layer_name, os.fsdecode(failed_path),
                           reason)
        failed = {p for p, _ in failures}
        with self.lock:
            # An open records its own file (fd_for); a window fetched ahead is all ahead.
            for other_path, other in (plan if ahead else plan[1:]):
                identity = published.get(other.digest)
                if other_path in failed or identity is None:
                    continue
                self.verified[other.digest] = identity  # recorded by its writer: no stat
                self.ahead.add(other.digest)
            self.frontier = max(self.frontier, self.position[plan[-1][0]] + 1)
        return failed

    # -- background prefetch ----------------------------------------------------------
    def _schedule_prefetch(self) -> None:
        with self.lock:
            if self.prefetching or self.frontier >= len(self.order):
                return
            self.prefetching = True
        threading.Thread(target=self._prefetch, name="registry-prefetch", daemon=True).start()

    def _prefetch(self) -> None:
        """Fetch the next window after the frontier (the reader is going that way)."""
        plan: Plan = []
        try:
            with self.lock:
                start = self.frontier
                while start < len(self.order) and not self._available(self.order[start][1]):
                    start += 1  # already here or on its way
                if start < len(self.order):
                    first = self.order[start][1]
                    plan = self._claim(start, first.offset + max(self.window, first.end_offset
                                                                  - first.offset),
                                       READAHEAD_MAX, set())
                    if not plan:  # too big to fetch ahead, or taken: go past it
                        self.frontier = start + 1
            if plan:
                self._get(plan, ahead=True)
        except Exception as exc:  # a prefetch is only a guess: its opens will retry
            self.log.debug("%s: prefetch failed: %s", self.layer_name, exc)
        finally:
            self._release([e.digest for _, e in plan])
            with self.lock:
                self.prefetching = False


class _Planned(Protocol):
    """What storing a range needs of each planned file (a TOC Entry, or a worker's Span)."""

    @property
    def digest(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def end_offset(self) -> int: ...


def store_range(cache: FileCache, plan: Sequence[_Planned], start: int, blocks: Iterator[bytes],
                published: dict[str, tuple[int, int, int]]) -> list[tuple[int, str]]:
    """Route the bytes of one range (from `start`) to each planned file's cache writer.

    Returns (index into plan, reason) for each file that did not verify;
    `published` gets the cache file identity of each file published."""
    writers = [cache.writer(e.digest, e.size) for e in plan]
    broken: dict[int, str] = {}
    try:
        pos, i = start, 0
        for block in blocks:
            view, block_end = memoryview(block), pos + len(block)
            while i < len(plan) and pos < block_end:
                e = plan[i]
                lo, hi = max(pos, e.offset), min(block_end, e.end_offset)
                if lo < hi and i not in broken:
                    try:
                        writers[i].feed(view[lo - pos:hi - pos])
                    except DigestMismatch as exc:
                        broken[i] = str(exc)
                if e.end_offset > block_end:
                    break
                i += 1
            pos = block_end
        for n, writer in enumerate(writers):
            if n not in broken:
                try:
                    writer.finish()
                except DigestMismatch as exc:
                    broken[n] = str(exc)
                else:
                    assert writer.identity is not None
                    published[writer.digest] = writer.identity
    finally:
        for writer in writers:
            writer.abort()  # a no-op for the published ones
    return sorted(broken.items())
