"""Who holds a shared store's layers right now, as root sees it through /proc.

`cshare rm` must not delete a layer under a user's feet.  A user's overlay
lives in that user's mount namespace (podman unshare), where root's own mount
table does not show it.  What root can still see:

- the FUSE daemon serving it (cshare-overlay, fuse-overlayfs, any mount
  program): a process with /dev/fuse open whose command line names every
  lower layer (`lowerdir=...`);
- a kernel overlay mount: the mount table of its namespace, read through
  /proc/PID/mountinfo of any process there, names its lower layers.

A layer is held when one of those names a path inside the layer's directory.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..system.procfs import (
    holds_fuse_device,
    mount_tables,
    process_argv,
    process_dirs,
    process_name,
)


@dataclass(frozen=True)
class Holder:
    """One overlay that has a layer as a lower layer."""

    layer_id: str
    pid: int
    user: str
    what: str  # "cshare-overlay", "fuse-overlayfs", "overlay mounted on /mnt", ...

    def describe(self) -> str:
        return f"{self.what} (pid {self.pid}, user {self.user}) uses layer {self.layer_id[:12]}"


def named_layers(text: str, layers_dir: str) -> Iterator[str]:
    """Layer ids whose directories `text` names a path in (`layers_dir` ends with '/')."""
    start = text.find(layers_dir)
    while start != -1:
        rest = text[start + len(layers_dir):]
        end = len(rest)
        for stop in ("/", ":", ",", "\0", " "):
            found = rest.find(stop)
            if found != -1:
                end = min(end, found)
        if end:
            yield rest[:end]
        start = text.find(layers_dir, start + 1)


def holders(layers_dir: Path, layer_ids: Iterable[str]) -> list[Holder]:
    """Every overlay, in any mount namespace root can see, that has one of `layer_ids` as a lower layer."""
    wanted = set(layer_ids)
    if not wanted:
        return []
    prefix = str(layers_dir).rstrip("/") + "/"
    found: list[Holder] = []
    me = os.getpid()
    for entry in process_dirs():
        if int(entry.name) == me:
            continue
        argv = [os.fsdecode(a) for a in process_argv(int(entry.name))]
        text = "\0".join(argv)
        # /dev/fuse open: a FUSE daemon, not a shell that merely ran a mount command.
        if "lowerdir=" not in text or not holds_fuse_device(entry.path):
            continue
        for layer_id in sorted(set(named_layers(text, prefix)) & wanted):
            found.append(Holder(layer_id, int(entry.name), _owner(entry.path), _program(entry.path, argv)))
    for pid, table in mount_tables():
        for mount in table:
            if mount.fstype != "overlay":
                continue
            for layer_id in sorted(set(named_layers(mount.super_options, prefix)) & wanted):
                what = f"overlay mounted on {mount.mount_point}"
                found.append(Holder(layer_id, pid, _owner(f"/proc/{pid}"), what))
    return found


def _program(proc_dir: str, argv: list[str]) -> str:
    return process_name(proc_dir) or os.path.basename(argv[0])


def _owner(proc_dir: str) -> str:
    try:
        uid = os.stat(proc_dir).st_uid
    except OSError:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
