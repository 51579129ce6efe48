"""The mount table as /proc/PID/mountinfo shows it (proc(5)), parsed in one place.

cshare checks mountpoints, finds which filesystem a path is, and (as root)
reads other namespaces' tables to see who still uses a layer.  Every reader
of mountinfo goes through here, so paths are always unescaped the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple


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


class MountEntry(NamedTuple):
    """One line of mountinfo, its paths unescaped."""

    device: str  # MAJOR:MINOR of the filesystem
    root: str  # the directory of the filesystem mounted here
    mount_point: str
    fstype: str
    source: str
    super_options: str  # the filesystem's own options (an overlay's lowerdir=...)


def parse_line(line: str) -> MountEntry | None:
    """One mountinfo line (proc(5)), or None for a line that is not one.

    `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`
    """
    fields = line.split()
    try:
        sep = fields.index("-", 6)
    except ValueError:
        return None
    tail = fields[sep + 1 :] + ["", "", ""]
    return MountEntry(
        device=fields[2],
        root=unescape_mountinfo(fields[3]),
        mount_point=unescape_mountinfo(fields[4]),
        fstype=tail[0],
        source=unescape_mountinfo(tail[1]),
        super_options=unescape_mountinfo(tail[2]),
    )


def parse(lines: Iterable[str]) -> list[MountEntry]:
    return [entry for entry in map(parse_line, lines) if entry is not None]


def read(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """The mount table at `path` (default: this process's mount namespace), in mount order."""
    with open(path) as f:
        return parse(f)


def find(path: Path | str, entries: Iterable[MountEntry] | None = None) -> MountEntry | None:
    """The mount at `path` that is visible there (the last one), or None."""
    found = None
    for entry in read() if entries is None else entries:
        if entry.mount_point == str(path):
            found = entry
    return found


def mount_table() -> dict[str, str]:
    """Mount points of this mount namespace -> filesystem type (the last mount wins)."""
    return {entry.mount_point: entry.fstype for entry in read()}


def is_mount_point(path: Path) -> bool:
    return str(path) in mount_table()


def mount_device(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The `MAJOR:MINOR` of the filesystem mounted at `path` (the last mount there)."""
    entry = find(path, read(mountinfo))
    return entry.device if entry is not None else None


def points_below(path: Path | str) -> list[str]:
    """Mount points at or below `path`, deepest first (the order to unmount them in)."""
    prefix = str(path)
    points = {e.mount_point for e in read()}
    return sorted((p for p in points if p == prefix or p.startswith(prefix.rstrip("/") + "/")),
                  key=len, reverse=True)
