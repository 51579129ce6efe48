"""Where this process runs: which user namespace, and whether it may mount FUSE.

`cshare mount` is meant to run as an ordinary user inside `podman unshare` (or
`unshare --map-auto --map-root-user --mount`): there the user is root of a user
namespace that owns a private mount namespace, so the overlay can call mount(2)
itself and the container's other ids (a container's uid 33) can be mapped.  This
module answers, without side effects, the questions that decide whether a mount
can work, so the command fails with one clear line instead of a FUSE error.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

#: The uid_map of the initial user namespace: every id maps to itself.
IDENTITY_MAP = ((0, 0, 4294967295),)

FUSE_DEVICE = Path("/dev/fuse")
FUSE_MAJOR, FUSE_MINOR = 10, 229


def parse_id_map(text: str) -> tuple[tuple[int, int, int], ...]:
    """Parse /proc/PID/uid_map (or gid_map) text: `INSIDE OUTSIDE COUNT` a line."""
    ranges: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"bad id map line {line!r}")
        inside, outside, count = (int(f) for f in fields)
        ranges.append((inside, outside, count))
    return tuple(ranges)


def is_identity_map(ranges: tuple[tuple[int, int, int], ...]) -> bool:
    """True for the initial user namespace's map (`0 0 4294967295`)."""
    return ranges == IDENTITY_MAP


def uid_map(pid: int | str = "self") -> tuple[tuple[int, int, int], ...]:
    return parse_id_map(Path(f"/proc/{pid}/uid_map").read_text())


def in_user_namespace() -> bool:
    """True when this process runs in a user namespace other than the initial one."""
    return not is_identity_map(uid_map())


def host_uid(uid: int | None = None) -> int | None:
    """The id of the initial namespace that `uid` (default: our euid) maps to, if any."""
    if uid is None:
        uid = os.geteuid()
    for inside, outside, count in uid_map():
        if inside <= uid < inside + count:
            return outside + uid - inside
    return None


@dataclass(frozen=True)
class Situation:
    """What decides how (and whether) this process can mount a FUSE overlay."""

    euid: int
    in_userns: bool

    @property
    def can_mount(self) -> bool:
        """Root of the initial namespace, or root of a user namespace (CAP_SYS_ADMIN there)."""
        return self.euid == 0

    def mount_problem(self) -> str | None:
        """None when a FUSE mount is possible here, else a one-line reason with the fix."""
        if self.can_mount:
            return None
        if not self.in_userns:
            return (
                "not in a user namespace: as an ordinary user, run it inside `podman unshare` "
                "(e.g. podman unshare cshare mount IMAGE MOUNTPOINT)"
            )
        return (
            f"this user namespace maps you to uid {self.euid}, not root: run it inside "
            "`podman unshare` or `unshare --map-auto --map-root-user --mount`"
        )


def current() -> Situation:
    return Situation(euid=os.geteuid(), in_userns=in_user_namespace())


def fuse_problem(device: Path = FUSE_DEVICE) -> str | None:
    """None when /dev/fuse can be opened for reading and writing, else why not (one line).

    Opening and closing the device has no effect: a FUSE connection only exists
    once a mount is made with the descriptor.
    """
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return f"{device} does not exist: load the fuse module (modprobe fuse) or install fuse3"
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (
        FUSE_MAJOR,
        FUSE_MINOR,
    ):
        return f"{device} is not the FUSE device (character device {FUSE_MAJOR}:{FUSE_MINOR})"
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            mode = stat.S_IMODE(st.st_mode)
            return (
                f"{device} is not usable by you (mode {mode:04o}): ask root to "
                f"`chmod 0666 {device}` (the usual mode on distributions)"
            )
        return f"{device} cannot be opened: {os.strerror(exc.errno or 0)}"
    os.close(fd)
    return None


def mount_namespace_id(pid: int | str = "self") -> str:
    """The mount namespace of `pid` as `mnt:[INODE]` (to tell namespaces apart in records)."""
    return os.readlink(f"/proc/{pid}/ns/mnt")
