"""The override xattr codec: a file's original owner, mode and type.

A converted layer keeps every entry at mode 0755 and records what the entry
really was in an xattr (shared/docs/formats.md §1).  This module is the one
place that reads and writes that record; the filesystem, the plugins and
`cshare convert` all go through it.  It is pure: no I/O except through the
`getxattr` callable that `read_override` is given.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable

#: The name containers/storage writes with `overlay.force_mask`; cshare writes it too.
OVERRIDE_XATTR = "user.containers.override_stat"
#: Names fuse-overlayfs writes and reads; same value format.
FUSE_OVERLAYFS_XATTR = "user.fuseoverlayfs.override_stat"
FUSE_OVERLAYFS_PRIVILEGED_XATTR = "security.fuseoverlayfs.override_stat"
#: The first prototype's name; its value is MODE:UID:GID.
PROTOTYPE_XATTR = "user.original-permissions"

#: A shared layer's file capabilities, set aside: as security.capability on the
#: host, any user could run the file with them (cshare make-shared moves them;
#: the `test` plugin reports them as CAPABILITY_XATTR again).
STASHED_CAPABILITY_XATTR = "user.cshare.capability"
CAPABILITY_XATTR = "security.capability"

#: getxattr errnos that mean "no such attribute here" (absent, unsupported by the
#: filesystem, or not ours to read), never a failure.
ABSENT_XATTR_ERRNOS = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES})

#: Every name an override may be stored under, in the order readers prefer them.
ALL_OVERRIDE_XATTRS: tuple[str, ...] = (
    OVERRIDE_XATTR,
    FUSE_OVERLAYFS_XATTR,
    FUSE_OVERLAYFS_PRIVILEGED_XATTR,
    PROTOTYPE_XATTR,
)

PERMISSION_MASK = 0o7777
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown(2): never a real owner

# TYPE field <-> the S_IFMT bits of the file type it names.
_SIMPLE_KINDS: dict[str, int] = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "pipe": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
}
_DEVICE_KINDS: dict[str, int] = {"block": stat.S_IFBLK, "char": stat.S_IFCHR}
# Parsed with str methods, not re, and Override is a plain class, not a
# dataclass: `cshare convert` (timed against chmod -R) and cshare-overlay's
# start path import this module, and re and dataclasses cost them ~5-10 ms.


def _is_decimal(field: str) -> bool:
    return field.isdigit()  # the value is ASCII (_text), so only 0-9


def _is_octal(field: str) -> bool:
    return bool(field) and not field.strip("01234567")


class OverrideError(ValueError):
    """An override value that does not parse.  Bad input: report it, never guess."""


class Override:
    """What a converted entry really is (immutable, compared and hashed by value).

    `file_type` is the S_IFMT bits of the original type, or None when the record
    did not say (3-field form): then the real inode's type stands.
    """

    __slots__ = ("uid", "gid", "mode", "file_type", "rdev_major", "rdev_minor")
    uid: int
    gid: int
    mode: int  # permission bits plus setuid/setgid/sticky, never type bits
    file_type: int | None
    rdev_major: int
    rdev_minor: int

    def __init__(self, uid: int, gid: int, mode: int, file_type: int | None = None,
                 rdev_major: int = 0, rdev_minor: int = 0) -> None:
        if not 0 <= uid <= _MAX_ID or not 0 <= gid <= _MAX_ID:
            raise OverrideError(f"owner {uid}:{gid} is out of range")
        if mode & ~PERMISSION_MASK:
            raise OverrideError(f"mode {mode:o} has bits outside 07777")
        if file_type is not None and stat.S_IFMT(file_type) != file_type:
            raise OverrideError(f"file type {file_type:o} is not a file type")
        for name, value in zip(self.__slots__, (uid, gid, mode, file_type, rdev_major, rdev_minor),
                               strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Override is immutable (cannot set {name})")

    def _key(self) -> tuple[int, int, int, int | None, int, int]:
        return (self.uid, self.gid, self.mode, self.file_type, self.rdev_major, self.rdev_minor)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Override) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return ("Override(uid={}, gid={}, mode={}, file_type={}, rdev_major={}, rdev_minor={})"
                .format(*self._key()))

    def __reduce__(self) -> tuple[type[Override], tuple[int, int, int, int | None, int, int]]:
        return (Override, self._key())  # pickled between convert's worker processes

    @property
    def is_device(self) -> bool:
        return self.file_type in (stat.S_IFBLK, stat.S_IFCHR)

    @property
    def rdev(self) -> int:
        import os

        return os.makedev(self.rdev_major, self.rdev_minor) if self.is_device else 0

    def type_name(self) -> str:
        """The TYPE field of the containers/storage format."""
        ftype = self.file_type
        if ftype is None:
            raise OverrideError("this override records no file type")
        for name, bits in _SIMPLE_KINDS.items():
            if bits == ftype:
                return name
        for name, bits in _DEVICE_KINDS.items():
            if bits == ftype:
                return f"{name}-{self.rdev_major}-{self.rdev_minor}"
        raise OverrideError(f"unknown file type {ftype:o}")  # unreachable: checked in __post_init__

    def format(self) -> bytes:
        """Encode as containers/storage writes it: `UID:GID:0MODE:TYPE`."""
        return f"{self.uid}:{self.gid}:{self.mode:04o}:{self.type_name()}".encode()

    def st_mode(self, real_st_mode: int) -> int:
        """The full st_mode to report for an inode whose real st_mode is given."""
        ftype = self.file_type if self.file_type is not None else stat.S_IFMT(real_st_mode)
        return ftype | self.mode

    @classmethod
    def from_stat(cls, st_mode: int, uid: int, gid: int, rdev: int = 0) -> Override:
        """The record that describes an entry with these real attributes."""
        import os

        ftype = stat.S_IFMT(st_mode)
        is_dev = ftype in (stat.S_IFBLK, stat.S_IFCHR)
        return cls(
            uid=uid,
            gid=gid,
            mode=stat.S_IMODE(st_mode),
            file_type=ftype,
            rdev_major=os.major(rdev) if is_dev else 0,
            rdev_minor=os.minor(rdev) if is_dev else 0,
        )


def _text(value: bytes) -> str:
    # Some writers terminate the value with NUL; nothing else may be trimmed.
    if value.endswith(b"\0"):
        value = value[:-1]
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise OverrideError(f"{value!r} is not ASCII") from None


def _decimal(field: str, what: str, whole: str) -> int:
    if not _is_decimal(field):
        raise OverrideError(f"{whole!r}: {what} {field!r} is not a decimal number")
    return int(field)


def _octal_mode(field: str, whole: str, allow_type_bits: bool) -> int:
    if not _is_octal(field):
        raise OverrideError(f"{whole!r}: mode {field!r} is not an octal number")
    mode = int(field, 8)
    if allow_type_bits:
        # fuse-overlayfs sometimes stores the whole st_mode; only 07777 is meant.
        if mode > 0o177777:
            raise OverrideError(f"{whole!r}: mode {field!r} is too large")
        return mode & PERMISSION_MASK
    if mode & ~PERMISSION_MASK:
        raise OverrideError(f"{whole!r}: mode {field!r} has bits outside 07777")
    return mode


def _parse_type(field: str, whole: str) -> tuple[int, int, int]:
    if field in _SIMPLE_KINDS:
        return _SIMPLE_KINDS[field], 0, 0
    parts = field.split("-")
    if len(parts) == 3 and parts[0] in ("block", "char") and all(map(_is_decimal, parts[1:])):
        major, minor = int(parts[1]), int(parts[2])
        if major >= 2**32 or minor >= 2**32:
            raise OverrideError(f"{whole!r}: device number out of range")
        return _DEVICE_KINDS[parts[0]], major, minor
    raise OverrideError(f"{whole!r}: unknown type {field!r}")


def parse_override(value: bytes) -> Override:
    """Parse `UID:GID:MODE[:TYPE]` (containers/storage and fuse-overlayfs)."""
    text = _text(value)
    fields = text.split(":")
    if len(fields) not in (3, 4):
        raise OverrideError(f"{text!r}: expected UID:GID:MODE[:TYPE]")
    uid = _decimal(fields[0], "uid", text)
    gid = _decimal(fields[1], "gid", text)
    if len(fields) == 3:
        mode = _octal_mode(fields[2], text, allow_type_bits=True)
        return Override(uid, gid, mode)
    mode = _octal_mode(fields[2], text, allow_type_bits=False)
    ftype, major, minor = _parse_type(fields[3], text)
    return Override(uid, gid, mode, ftype, major, minor)


def parse_prototype(value: bytes) -> Override:
    """Parse the first prototype's `MODE:UID:GID` (octal permission bits first)."""
    text = _text(value)
    fields = text.split(":")
    if len(fields) != 3:
        raise OverrideError(f"{text!r}: expected MODE:UID:GID")
    mode = _octal_mode(fields[0], text, allow_type_bits=False)
    return Override(_decimal(fields[1], "uid", text), _decimal(fields[2], "gid", text), mode)


def parse_named(name: str, value: bytes) -> Override:
    """Parse a value read from the xattr called `name`."""
    if name == PROTOTYPE_XATTR:
        return parse_prototype(value)
    if name in ALL_OVERRIDE_XATTRS:
        return parse_override(value)
    raise OverrideError(f"{name} is not an override xattr")


def read_override(
    getxattr: Callable[[str], bytes | None],
    names: tuple[str, ...] = ALL_OVERRIDE_XATTRS,
) -> tuple[str, Override] | None:
    """Find and parse the first override present among `names`.

    `getxattr(name)` returns the raw value or None when the attribute is absent;
    it may raise OSError for real failures.  A present but malformed value raises
    OverrideError naming the attribute: a reader must never fall back silently to
    another record when the preferred one is damaged.
    """
    for name in names:
        value = getxattr(name)
        if value is None:
            continue
        try:
            return name, parse_named(name, value)
        except OverrideError as exc:
            raise OverrideError(f"{name}={exc}") from None
    return None


def read_override_from(getxattr: Callable[[str], bytes]) -> tuple[str, Override] | None:
    """`read_override` over a plain getxattr that raises OSError when the attribute
    is missing: ABSENT_XATTR_ERRNOS count as absent, any other error is raised."""

    def get(name: str) -> bytes | None:
        try:
            return getxattr(name)
        except OSError as exc:
            if exc.errno in ABSENT_XATTR_ERRNOS:
                return None
            raise

    return read_override(get)
