"""libc calls the os module does not offer (ctypes), one wrapper each."""

from __future__ import annotations

import ctypes
import os

RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    """renameat2(2) on two paths; raises OSError naming `old` on failure."""
    if _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)
