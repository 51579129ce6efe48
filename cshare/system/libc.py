"""The libc calls Python has no wrapper for, through ctypes: the one module that loads libc.

syncfs(2), to make a published layer durable without flushing every
filesystem, and prctl(PR_SET_PDEATHSIG), so a walker's worker processes die
with the parent that forked them.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def syncfs(path: Path) -> None:
    """Flush the filesystem holding `path` (all of them, where syncfs is missing)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def prctl() -> Callable[..., int] | None:
    """libc's prctl, or None.  Look it up in the parent, before fork: dlopen in a
    child of a threaded process could wait forever on a loader lock another thread held."""
    try:
        call: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return call
    except (OSError, AttributeError):
        return None


def die_with_parent(call: Callable[..., int] | None) -> None:
    """In a forked child: be killed when the parent dies (exit now if it already has)."""
    if call is not None:
        call(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)
