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


def may_keep_setgid(pid: int, gid: int, caller_gid: int) -> bool:
    """Whether a file of group `gid` made by this caller keeps its setgid bit.

    The kernel's rule: the caller is in that group (as its own gid or a
    supplementary one) or has CAP_FSETID.
    """
    if caller_gid == gid:
        return True
    if pid <= 0:
        return False
    status = _status(pid)
    groups = status.get("Groups", "").split()
    if str(gid) in groups:
        return True
    try:
        effective = int(status.get("CapEff", "0"), 16)
    except ValueError:
        return False
    return bool(effective & (1 << _CAP_FSETID))
