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


def mount_tables(skip: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """(a pid, its mountinfo lines), once for every mount namespace but `skip`.

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
            with open(f"{entry.path}/mountinfo") as f:
                lines = f.readlines()
        except OSError:
            continue  # gone, or not ours to look at
        yield int(entry.name), lines
