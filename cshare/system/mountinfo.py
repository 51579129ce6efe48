"""The mount table as /proc/PID/mountinfo shows it (proc(5)), parsed in one place.

cshare checks mountpoints, finds which filesystem a path is, and (as root)
reads other namespaces' tables to see who still uses a layer.  Every reader
of mountinfo goes through here, so paths are always unescaped the same way.
"""

from __future__ import annotations

from pathlib import Path


def unescape_mountinfo(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field_text):
        if field_text[i] == "\\" and i + 3 < len(field_text) and field_text[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def mount_table() -> dict[str, str]:
    """Mount points of this mount namespace -> filesystem type (the last mount wins)."""
    table: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            table[unescape_mountinfo(fields[4])] = fields[sep + 1]
    return table


def is_mount_point(path: Path) -> bool:
    return str(path) in mount_table()


def mount_device(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The `MAJOR:MINOR` of the filesystem mounted at `path` (the last mount there)."""
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if unescape_mountinfo(fields[4]) == str(path):
                found = fields[2]
    return found
