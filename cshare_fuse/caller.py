"""What the kernel's checks need to know about the process behind a request.

FUSE tells the filesystem the caller's uid, gid and pid, not its supplementary
groups or capabilities; the kernel's setgid rules need both.  They are read
from /proc/PID/status only when a rule depends on them (rarely), and a caller
whose status cannot be read counts as unprivileged: the safe side of a rule
that takes a privilege away.
"""

from __future__ import annotations

from typing import NamedTuple

_CAP_FSETID = 4


class Caller(NamedTuple):
    """The process behind a request, as FUSE names it."""

    uid: int
    gid: int
    pid: int


def _status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def in_group_or_capable(caller: Caller, gid: int) -> bool:
    """The kernel's in_group_or_capable(): in group `gid` (own or supplementary) or CAP_FSETID."""
    if caller.gid == gid:
        return True
    status = _status(caller.pid) if caller.pid > 0 else {}
    if str(gid) in status.get("Groups", "").split():
        return True
    return has_fsetid(caller, status)


def has_fsetid(caller: Caller, status: dict[str, str] | None = None) -> bool:
    """Whether the caller holds CAP_FSETID (may keep setuid/setgid bits)."""
    if status is None:
        status = _status(caller.pid) if caller.pid > 0 else {}
    try:
        effective = int(status.get("CapEff", "0"), 16)
    except ValueError:
        return False
    return bool(effective & (1 << _CAP_FSETID))
