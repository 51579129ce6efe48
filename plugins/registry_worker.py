"""Fetch workers: processes that fetch readahead windows into the cache, outside the daemon's interpreter.

A window fetched ahead is one range request whose files are each decompressed,
hashed, written to an unnamed cache file and linked into place: a dozen Python
steps and half a dozen system calls a file, tens of thousands of times in a
full read.  Run in a thread of the daemon, every one of those steps takes the
interpreter lock from the request loop and hands it back (a futex wake-up
each way), so the loop that answers the reader and the thread that fetches
ahead of it run one at a time.  A worker is a separate interpreter: it does
the same work with the same code (`registry_fetch.store_range`, the cache's
writer, the HTTP client, so the same checks) on another CPU, and the daemon's
prefetch thread only sends the plan and waits for the answer.

The daemon side is `WorkerPool`: at most `size` workers, started on the first
window fetched ahead (never for a plain open, so a container that reads a
handful of files starts none), each serving one window at a time.  A worker
exits when its pipe closes (the daemon went away) or after IDLE_EXIT_S without
work; a worker that dies or overruns its time is killed, and the window is
simply not fetched ahead (its opens then fetch inline, as without workers).
If no worker can be started, the pool says so once and fetches ahead in
process from then on.

The protocol, one home for it: each message is a 4-byte big-endian length and
a JSON object.  Request: registry, tls_verify, timeout, attempts, cache,
repository, blob, files (a list of [digest, size, offset, end_offset]).
Answer: published (a list of [digest, ino, mtime_ns, ctime_ns]), failures
(a list of [index into files, reason]), received (bytes read from the
registry), and error (a message when the range could not be fetched at all).
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

#: A worker with nothing to do for this long exits (the pool starts another when needed).
IDLE_EXIT_S = 60.0
#: Largest message accepted either way (a plan of MAX_BATCH files is a few tens of KiB).
MAX_MESSAGE = 16 << 20
_HEADER = struct.Struct(">I")


class Span(NamedTuple):
    """What a worker needs of a planned file: its digest and size, and where its frames lie."""

    digest: str
    size: int
    offset: int
    end_offset: int


class WorkerFailed(OSError):
    """A worker died, overran its time, or could not fetch the range."""


# -- messages ------------------------------------------------------------------
def _write_message(fd: int, doc: dict[str, Any]) -> None:
    body = json.dumps(doc, separators=(",", ":")).encode()
    view = memoryview(_HEADER.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    """n bytes from fd; b"" on EOF before the first byte; WorkerFailed on a timeout or a short read."""
    chunks: list[bytes] = []
    got = 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise WorkerFailed("no answer in time")
        chunk = os.read(fd, n - got)
        if not chunk:
            if not got:
                return b""
            raise WorkerFailed("message cut short")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_message(fd: int, deadline: float | None = None) -> dict[str, Any] | None:
    """The next message, or None at EOF."""
    header = _read_exact(fd, _HEADER.size, deadline)
    if not header:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise WorkerFailed(f"a message of {length} bytes")
    doc = json.loads(_read_exact(fd, length, deadline) or b"null")
    if not isinstance(doc, dict):
        raise WorkerFailed("a message that is not a JSON object")
    return doc


# -- the worker process --------------------------------------------------------
def serve(inbound: int = 0, outbound: int = 1) -> None:
    """The worker's loop: fetch each requested window, answer what was published."""
    from plugins.registry_cache import FileCache
    from plugins.registry_http import RegistryClient

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when to stop
    clients: dict[tuple[str, bool, float, int], RegistryClient] = {}
    caches: dict[str, FileCache] = {}
    poller = select.poll()
    poller.register(inbound, select.POLLIN)
    while poller.poll(IDLE_EXIT_S * 1000):
        request = _read_message(inbound)
        if request is None:
            return  # the daemon closed the pipe
        key = (str(request["registry"]), bool(request["tls_verify"]),
               float(request["timeout"]), int(request["attempts"]))
        client = clients.get(key)
        if client is None:
            client = clients[key] = RegistryClient(key[0], tls_verify=key[1], timeout=key[2],
                                                   attempts=key[3])
        root = str(request["cache"])
        cache = caches.get(root)
        if cache is None:
            cache = caches[root] = FileCache(root)
        _write_message(outbound, _fetch_window(client, cache, request))


def _fetch_window(client: Any, cache: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Fetch and publish one requested window: the answer to send back."""
    from plugins.registry_fetch import store_range

    spans = [Span(str(d), int(s), int(o), int(e)) for d, s, o, e in request["files"]]
    published: dict[str, tuple[int, int, int]] = {}
    before = client.bytes_received
    answer: dict[str, Any] = {"published": [], "failures": [], "error": None}
    try:
        answer["failures"] = client.stream_range(
            str(request["repository"]), str(request["blob"]), spans[0].offset,
            spans[-1].end_offset,
            lambda blocks: store_range(cache, spans, spans[0].offset, blocks, published))
    except OSError as exc:
        answer["error"] = str(exc)
    answer["published"] = [[d, *identity] for d, identity in published.items()]
    answer["received"] = client.bytes_received - before
    return answer


# -- the daemon side -----------------------------------------------------------
class _Worker:
    """One worker process and its two pipes."""

    def __init__(self) -> None:
        package = __name__.rpartition(".")[0] or "plugins"
        code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
                f"from {package}.registry_worker import serve; serve()")
        # -S and the daemon's own path: the worker imports exactly what the daemon does.
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-c", code, json.dumps(sys.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/", close_fds=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.to_worker = self.proc.stdin.fileno()
        self.from_worker = self.proc.stdout.fileno()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, request: dict[str, Any], time_limit: float) -> dict[str, Any]:
        try:
            _write_message(self.to_worker, request)
            answer = _read_message(self.from_worker, time.monotonic() + time_limit)
        except (OSError, ValueError) as exc:
            raise WorkerFailed(f"fetch worker {self.proc.pid}: {exc}") from None
        if answer is None:
            raise WorkerFailed(f"fetch worker {self.proc.pid} exited")
        return answer

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.proc.wait()


class WorkerPool:
    """Up to `size` fetch workers, started when first needed, shared by every layer of a mount."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self._idle: list[_Worker] = []
        self._running = 0
        self._cond = threading.Condition()
        #: Why no worker could be started (then every window is fetched in process).
        self.unavailable: str | None = None

    def fetch(self, client: Any, cache_root: str, repository: str, blob: str,
              spans: Sequence[Span], published: dict[str, tuple[int, int, int]],
              time_limit: float) -> list[tuple[int, str]]:
        """Fetch one window in a worker: failures as (index into spans, reason); `published`
        filled with the identity of each file the worker published.  WorkerFailed if the
        worker could not do it at all; RuntimeError if no worker can be had."""
        worker = self._checkout()
        request = {"registry": client.address, "tls_verify": client.tls_verify,
                   "timeout": client.timeout, "attempts": client.attempts, "cache": cache_root,
                   "repository": repository, "blob": blob,
                   "files": [[s.digest, s.size, s.offset, s.end_offset] for s in spans]}
        try:
            answer = worker.call(request, time_limit)
        except BaseException:
            self._discard(worker)
            raise
        self._checkin(worker)
        try:
            known = {s.digest for s in spans}
            for digest, ino, mtime, ctime in answer["published"]:
                if digest in known:  # only what was asked for is taken as verified
                    published[str(digest)] = (int(ino), int(mtime), int(ctime))
            client.count_received(int(answer.get("received") or 0))
            if answer.get("error"):
                raise WorkerFailed(str(answer["error"]))
            return [(int(i), str(reason)) for i, reason in answer["failures"]
                    if 0 <= int(i) < len(spans)]
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkerFailed(f"fetch worker: an answer that does not parse ({exc})") from None

    def _checkout(self) -> _Worker:
        with self._cond:
            while True:
                if self.unavailable is not None:
                    raise RuntimeError(self.unavailable)
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        return worker
                    self._running -= 1  # exited while idle
                    worker.stop()
                if self._running < self.size:
                    self._running += 1
                    break
                self._cond.wait()
        try:
            return _Worker()
        except OSError as exc:
            with self._cond:
                self._running -= 1
                self.unavailable = f"no fetch worker could be started: {exc}"
                self._cond.notify_all()
            raise RuntimeError(self.unavailable) from None

    def _checkin(self, worker: _Worker) -> None:
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def _discard(self, worker: _Worker) -> None:
        worker.stop()
        with self._cond:
            self._running -= 1
            self._cond.notify()

    def close(self) -> None:
        """Stop the idle workers (busy ones end when their pipes close)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._running -= len(idle)
        for worker in idle:
            worker.stop()
