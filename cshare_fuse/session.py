"""How the request loop waits for the next kernel request: a measured shortcut.

pyfuse3's workers wait for /dev/fuse through trio: a trio.Lock (whose acquire
is a full checkpoint, i.e. a scheduler pass with an epoll_wait), then
`wait_readable`.  For the ping-pong traffic of metadata work (stat, create,
the seven requests of one `open; write; close`) that machinery costs more
than the request itself.  Measured here, before any shortcut: a stat round
trip ~550 µs against fuse-overlayfs's ~80 µs, a small-file create 3.3 ms
against 0.8 ms.

The replacement keeps pyfuse3's contract (return True when a request is
waiting and the caller may read it, False when the session ends) and its one
rule: never two readers at once, for the fd blocks, and a second reader
would stall the whole loop.  It works so:

- When no task is parked on the fd, the asking task polls it directly for up
  to `spin_ms` (the next request of a busy client usually arrives well within
  that) and, if a request is there, returns at once, without any trio call.
  The caller reads synchronously right after, so no other task can slip in
  between the poll and the read.
- Before that sleeping poll, while the client is in a burst, it busy-polls
  for up to BUSY_POLL_S (poll with a zero timeout, yielding the CPU between
  looks).  A daemon that sleeps between requests is woken by the kernel for
  each one, and on this project's virtual machines a wake-up costs ~30 µs
  (a ping-pong between two processes through pipes: ~65 µs a round trip with
  both sleeping, ~21 µs with one spinning): about what the request itself
  costs.  Spinning is adaptive, so that a mount that is not in a burst never
  spins: it stops after one spin that found nothing, and starts again when a
  request comes within BUSY_POLL_S of the daemon being ready for it.  It is
  off with one CPU (the client would wait for the spinner to be preempted).
- Otherwise it parks on the fd in trio (`wait_readable`) as before, so an
  idle mount costs nothing and threads (large copy-ups) still complete; tasks
  that come while one is parked wait in a ParkingLot until it has its request.
- Returning without a checkpoint starves the rest of trio (signals, finished
  threads, other workers) while requests keep coming, so every
  FAST_BUDGET fast returns, or CHECKPOINT_S seconds, one real checkpoint
  is taken.

It replaces the private `pyfuse3._wait_fuse_readable`, looked up by pyfuse3's
session loop at run time.  When a pyfuse3 version lacks it, nothing is changed.
"""

from __future__ import annotations

import os
import select
import time

import pyfuse3
import trio

from .deferral import in_flight
from .fusemount import fuse_descriptors

#: Fast returns in a row before one real trio checkpoint, and the longest time between two.
FAST_BUDGET = 64
CHECKPOINT_S = 0.005
#: The longest busy poll for the next request of a burst (see above); 0 turns it off.
#: At 50-500 µs a cold find took 0.41-0.45 s against 0.47-0.49 s without, a warm
#: one 0.12-0.14 s against 0.16-0.17 (fuse-overlayfs: 0.36 and 0.13 s).
BUSY_POLL_S = 200e-6

_closing = False


def install(fd: int | None = None, spin_ms: int = 1) -> bool:
    """Swap in the polling wait on the session's /dev/fuse descriptor `fd`.

    None: the descriptor libfuse opened itself (it mounted through
    fusermount3), found among ours (one session per process).  Returns whether
    the wait was installed.
    """
    if not hasattr(pyfuse3, "_wait_fuse_readable") or spin_ms <= 0:
        return False
    if fd is None:
        descriptors = fuse_descriptors()
        if not descriptors:
            return False
        fd = descriptors[-1]
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poll = poller.poll
    clock = time.perf_counter
    yield_cpu = os.sched_yield
    busy_s = BUSY_POLL_S if len(os.sched_getaffinity(0)) > 1 else 0.0
    bursting = False  # the last request came within busy_s: spin for the next one
    parked = False  # a task waits in trio.lowlevel.wait_readable(fd)
    lot: trio.lowlevel.ParkingLot | None = None  # tasks waiting for that one to get its request
    fast = 0
    last_checkpoint = time.monotonic()

    def spin() -> bool:
        """Busy-poll for up to busy_s; whether a request came."""
        deadline = clock() + busy_s
        while not poll(0):
            if clock() > deadline:
                return False
            yield_cpu()  # another task runnable on this CPU (the client?) goes first
        return True

    async def wait_fuse_readable() -> bool:
        nonlocal parked, lot, fast, last_checkpoint, bursting
        if lot is None:
            lot = trio.lowlevel.ParkingLot()
        while True:
            if _closing:
                return False
            if parked:
                await lot.park()
                continue
            if fast >= FAST_BUDGET or time.monotonic() - last_checkpoint > CHECKPOINT_S:
                fast = 0
                await trio.lowlevel.checkpoint()
                last_checkpoint = time.monotonic()
                continue  # others ran: one of them may have parked meanwhile
            # While plugin calls run in worker threads, wait in trio: it takes up
            # a finished call at once, where polling would hold it for spin_ms.
            if not in_flight():
                if bursting:
                    if spin():
                        fast += 1
                        return True  # the caller reads now, before any other task runs
                    bursting = False  # the burst is over: sleep until it starts again
                ready_at = clock()
                if poll(spin_ms):
                    fast += 1
                    bursting = busy_s > 0 and clock() - ready_at < busy_s
                    return True
            parked = True
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return False
            finally:
                parked = False
                fast = 0
                last_checkpoint = time.monotonic()
                lot.unpark_all()
            return not _closing

    pyfuse3._wait_fuse_readable = wait_fuse_readable
    return True


def terminate() -> None:
    """End the main loop (signal handler): the waits above see it too."""
    global _closing
    _closing = True
    pyfuse3.terminate()
