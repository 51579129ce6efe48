"""Plugin calls that may block run in a bounded worker pool, off the request loop.

The overlay's operations are plain synchronous code over cached layer answers
(merge, node table), run on the trio loop that serves every request.  A
plugin's method may block (a network behind each `open`), and must then not
run there.  Rather than making every operation async, the read-only handlers
run their synchronous operation under `run_deferred`:

1. The operation runs as usual, with "deferring" switched on for its task.
2. A lower layer that is asked something it has not cached, by a method its
   data source does not declare `inline`, raises `NeedsFetch` instead of
   calling the plugin.  `NeedsFetch` is a BaseException, so no `except
   Exception` on the way (the per-entry error handling of a listing) takes it.
3. `run_deferred` runs that one plugin call in a worker thread (at most
   `POOL_SIZE` at once, for the whole mount), while the loop serves others;
   the call's answer lands in the layer's cache, or its exception in a
   one-shot slot that the next attempt raises at the same place.
4. The operation runs again from the start and gets one step further; the
   node table and the caches make the earlier steps free.

So an operation never sees a half-done plugin call, nothing between two
attempts needs undoing (the operations run this way change no state but the
caches), and the direct and `inline` paths pay one context-variable read per
cache miss.  Handlers that write (create, rename, copy-up, ...) do not defer:
their plugin calls run inline, as before.

Light at import (no trio): the layers raise `NeedsFetch` and read the flag.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")

#: Plugin calls running at once in worker threads, for the whole mount.  pyfuse3
#: serves up to MAX_TASKS requests at once, so requests that need no blocking
#: plugin call keep being served while the pool is full.
POOL_SIZE = 8
MAX_TASKS = 2 * POOL_SIZE

_deferring: contextvars.ContextVar[bool] = contextvars.ContextVar("cshare_deferring",
                                                                  default=False)


class NeedsFetch(BaseException):
    """This plugin call may block: run `call(*args)` in the pool, then try again.

    `failed(exc)` keeps an exception of the call for the next attempt to raise.
    """

    def __init__(self, call: Callable[..., object], args: tuple[Any, ...],
                 failed: Callable[[BaseException], None]) -> None:
        super().__init__()
        self.call = call
        self.args = args
        self.failed = failed
        #: For a gathered one (`gather`): the lists of calls to run side by side.
        self.shares: list[list[NeedsFetch]] = []


def _run_each(needs: list[NeedsFetch]) -> None:
    for need in needs:
        try:
            need.call(*need.args)
        except Exception as exc:
            need.failed(exc)  # for that call's own next attempt


def gather(needs: list[NeedsFetch]) -> NeedsFetch:
    """One NeedsFetch for all of `needs`: a listing asks for all its entries at once
    (spread over the pool's threads) rather than one hop and one retry per entry."""
    shares = [needs[i::POOL_SIZE] for i in range(min(POOL_SIZE, len(needs)))]
    need = NeedsFetch(_run_each, (needs,), lambda exc: None)
    need.shares = shares
    return need


def deferring() -> bool:
    """Whether a cache miss that may block should raise NeedsFetch (see above)."""
    return _deferring.get()


#: Calls running in the pool now: while there are any, the request loop waits
#: for requests in trio rather than by polling (session.py), so that a finished
#: call is taken up at once.
_in_flight = 0


def in_flight() -> int:
    return _in_flight


_limiter: Any = None


def _pool() -> Any:
    global _limiter
    if _limiter is None:
        import trio

        _limiter = trio.CapacityLimiter(POOL_SIZE)
    return _limiter


async def run_in_pool(func: Callable[..., R], *args: Any) -> R:
    """`func(*args)` in a worker thread of the pool."""
    global _in_flight
    import trio

    _in_flight += 1
    try:
        return await trio.to_thread.run_sync(func, *args, limiter=_pool())
    finally:
        _in_flight -= 1


async def run_deferred(func: Callable[..., R], *args: Any) -> R:
    """`func(*args)`, with every plugin call that may block run in the worker pool."""
    while True:
        token = _deferring.set(True)
        try:
            return func(*args)
        except NeedsFetch as need:
            pending = need
        finally:
            _deferring.reset(token)
        if len(pending.shares) > 1:
            import trio

            async with trio.open_nursery() as nursery:
                for share in pending.shares:
                    nursery.start_soon(run_in_pool, _run_each, share)
            continue
        try:
            await run_in_pool(pending.call, *pending.args)
        except Exception as exc:
            pending.failed(exc)
