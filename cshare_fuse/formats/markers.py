"""Whiteout and opaque markers and the overlay's internal xattr names (formats.md §2).

How layers mark deletions, as names and predicates only; the I/O that writes
markers into an upper layer lives in cshare_fuse/whiteout.py.  Two styles
exist and every layer may use either: the kernel's (a character device 0/0;
an opaque xattr) and AUFS/tar's (an empty `.wh.NAME` file; a `.wh..wh..opq`
file in the opaque directory).  The filesystem, convert, restore, verify and
make-shared all test markers through this module.
"""

from __future__ import annotations

import stat as statmod

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
#: The same prefix for callers that hold names as str (cshare's tree walks).
WHITEOUT_PREFIX_TEXT = WHITEOUT_PREFIX.decode()

#: The kernel overlay's opaque xattr (only root may read trusted.*) and the
#: one unprivileged overlays read.
TRUSTED_OPAQUE = "trusted.overlay.opaque"
USER_OPAQUE = "user.overlay.opaque"

#: Opaque xattrs in the order they are tried when reading.
OPAQUE_XATTRS: tuple[str, ...] = (
    TRUSTED_OPAQUE,
    USER_OPAQUE,
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


def is_forgeable_in_image(name: str) -> bool:
    """An xattr an image must not bring into a shared layer.

    Override records, opaque markers read by unprivileged overlays and
    cshare's bookkeeping decide what every user's container sees, so in a
    shared layer they must come from cshare's own conversion, never from the
    image's tar (where anyone can write them as PAX xattrs).  trusted.overlay.*
    is the exception: root's podman honours it itself (containers/storage sets
    it for opaque directories), so keeping it shows no more than root's podman.
    """
    return name.startswith(INTERNAL_XATTR_PREFIXES) and not name.startswith("trusted.overlay.")


def is_whiteout_stat(mode: int, rdev: int) -> bool:
    """A kernel-style whiteout: a character device with device number 0/0."""
    return statmod.S_ISCHR(mode) and rdev == 0


def is_whiteout_file(name: str, size: int) -> bool:
    """An AUFS/tar-style marker (whiteout or opaque): an empty regular file named `.wh.*`."""
    return size == 0 and name.startswith(WHITEOUT_PREFIX_TEXT)


def is_reserved_name(name: bytes) -> bool:
    """Names users may not create through the mount: they would read as markers."""
    return name.startswith(WHITEOUT_PREFIX)


def aufs_whiteout_name(name: bytes) -> bytes:
    return WHITEOUT_PREFIX + name
