"""Writing whiteouts and opaque marks into the upper layer (formats.md §2).

The markers themselves (names, predicates) are in formats/markers.py; this
module is the I/O.  Writing prefers the kernel style and falls back to
`.wh.` files where mknod is refused (some user namespaces).
"""

from __future__ import annotations

import errno
import os
import stat as statmod

from .formats.markers import OPAQUE_MARKER, TRUSTED_OPAQUE, USER_OPAQUE, aufs_whiteout_name


def write_whiteout(dir_fd: int, name: bytes) -> None:
    """Mark `name` deleted in the directory `dir_fd` of the upper layer."""
    try:
        os.mknod(name, statmod.S_IFCHR | 0o000, 0, dir_fd=dir_fd)
        return
    except PermissionError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    fd = os.open(aufs_whiteout_name(name), os.O_CREAT | os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC,
                 0o000, dir_fd=dir_fd)
    os.close(fd)


def mark_opaque(dir_path: bytes) -> None:
    """Mark an upper directory opaque: it hides everything below it."""
    names = (TRUSTED_OPAQUE, USER_OPAQUE) if os.geteuid() == 0 else (USER_OPAQUE,)
    for name in names:
        try:
            os.setxattr(dir_path, name, b"y", follow_symlinks=False)
            return
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                raise
    fd = os.open(dir_path + b"/" + OPAQUE_MARKER,
                 os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000)
    os.close(fd)
