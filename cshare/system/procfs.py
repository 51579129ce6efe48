"""Scanning /proc: processes, their command lines, descriptors and mount namespaces.

`cshare umount` looks for the overlay daemon serving a mountpoint and for
other namespaces still holding it; `cshare rm` (as root) looks for FUSE
daemons and overlay mounts that use a layer.  What they read of /proc is
here, so each question is answered by one scan of the same kind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from . import mountinfo
from .mountinfo import MountEntry


def process_dirs() -> Iterator[os.DirEntry[str]]:
    """The /proc/PID entries of every process visible to us (pid = int(entry.name))."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield entry


def process_argv(pid: int) -> list[bytes]:
    """The command line of `pid`, one bytes object an argument ([] when unreadable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return []


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` (R, S, Z...; proc(5)), None when it is gone."""
    try:
        # The command name in parentheses may itself contain ") ".
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def process_name(proc_dir: str) -> str | None:
    """`comm` of the process at `proc_dir`: the name of the file it executed (a script's
    own name, where argv[0] is its interpreter); None when unreadable."""
    try:
        with open(f"{proc_dir}/comm") as f:
            return f.read().strip() or None
    except OSError:
        return None


def runs_overlay_program(pid: int, argv: list[bytes]) -> bool:
    """Whether `pid`, whose command line is `argv`, runs an overlay program
    (cshare-overlay, fuse-overlayfs).

    cshare-overlay is a script: its command line starts with the interpreter
    and the interpreter's flags (`python3 -S /usr/local/bin/cshare-overlay
    -o ...`), and `comm` names the script, also in a daemon the mount server
    forked.
    """
    if any(b"overlay" in os.path.basename(arg) for arg in argv[:3]):
        return True
    name = process_name(f"/proc/{pid}")
    return name is not None and "overlay" in name


def holds_fuse_device(proc_dir: str) -> bool:
    """Whether the process at `proc_dir` (e.g. /proc/123) has /dev/fuse open: a FUSE daemon."""
    try:
        names = os.listdir(f"{proc_dir}/fd")
    except OSError:
        return False  # gone, or not ours to look at
    for name in names:
        try:
            if os.readlink(f"{proc_dir}/fd/{name}") == "/dev/fuse":
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def mount_tables(skip: str | None = None) -> Iterator[tuple[int, list[MountEntry]]]:
    """(a pid, its mount table), once for every mount namespace but `skip`.

    Root sees every namespace this way, users' (podman unshare) and containers'
    included; an ordinary user only those of its own processes.
    """
    seen = {skip} if skip is not None else set()
    for entry in process_dirs():
        try:
            ns = os.readlink(f"{entry.path}/ns/mnt")
            if ns in seen:
                continue
            seen.add(ns)
            table = mountinfo.read(f"{entry.path}/mountinfo")
        except OSError:
            continue  # gone, or not ours to look at
        yield int(entry.name), table
