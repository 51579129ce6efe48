"""Whiteouts and opaque directories: how layers mark deletions (formats.md §2).

Two styles exist and every layer may use either: the kernel's (a character
device 0/0; an opaque xattr) and AUFS/tar's (an empty `.wh.NAME` file; a
`.wh..wh..opq` file in the opaque directory).  Reading understands both
everywhere; writing prefers the kernel style and falls back to `.wh.` files
where mknod is refused (some user namespaces).
"""

from __future__ import annotations

import errno
import os
import stat as statmod

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

#: Opaque xattrs in the order they are tried when reading.
OPAQUE_XATTRS: tuple[str, ...] = (
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
)

#: Attribute-name prefixes that belong to the overlay machinery, never to users.
INTERNAL_XATTR_PREFIXES: tuple[str, ...] = (
    "trusted.overlay.",
    "user.overlay.",
    "user.fuseoverlayfs.",
    "security.fuseoverlayfs.",
    "user.containers.override_stat",
    "user.original-permissions",
    # cshare's own bookkeeping in converted layers (opaque_added, dir_times,
    # capability): machinery, not the image's data.
    "user.cshare.",
)


def is_internal_xattr(name: str) -> bool:
    return name.startswith(INTERNAL_XATTR_PREFIXES)


def is_whiteout_stat(mode: int, rdev: int) -> bool:
    """A kernel-style whiteout: a character device with device number 0/0."""
    return statmod.S_ISCHR(mode) and rdev == 0


def is_reserved_name(name: bytes) -> bool:
    """Names users may not create through the mount: they would read as markers."""
    return name.startswith(WHITEOUT_PREFIX)


def aufs_whiteout_name(name: bytes) -> bytes:
    return WHITEOUT_PREFIX + name


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
    names = ("trusted.overlay.opaque", "user.overlay.opaque") if os.geteuid() == 0 else (
        "user.overlay.opaque",)
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
