"""What `cshare mount` recorded, and where: XDG paths and mount.json records.

Each user's changes go to an upper directory of their own, kept per image and
mountpoint under $XDG_DATA_HOME/cshare/mounts/, so a later mount of the same
image on the same mountpoint finds them again.  Next to it `mount.json` says
what was mounted, so `cshare umount` can unmount it and clean up.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..system import namespaces

RECORD_NAME = "mount.json"
LOG_NAME = "overlay.log"


@dataclass
class MountRecord:
    """What `cshare mount` mounted, kept as JSON so `cshare umount` can undo it."""

    image_id: str
    image: str
    mountpoint: str
    upper: str
    work: str
    lowers: list[str]
    command: list[str]
    state_dir: str
    own_dirs: bool  # upper/work are ours (not --upper/--work): umount may empty work
    mount_ns: str
    pid: int | None = None
    created: float = field(default_factory=time.time)

    def save(self) -> None:
        path = Path(self.state_dir) / RECORD_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)  # atomic: umount never reads half a record

    @classmethod
    def load(cls, path: Path) -> MountRecord:
        return cls(**json.loads(path.read_text()))


def data_home() -> Path:
    """$XDG_DATA_HOME, else ~/.local/share of the real (host) user."""
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    home = os.environ.get("HOME")
    if not home:
        # Inside a user namespace our uid is 0: look up the host user instead.
        uid = namespaces.host_uid()
        home = pwd.getpwuid(uid if uid is not None else os.geteuid()).pw_dir
    return Path(home) / ".local" / "share"


def mounts_dir() -> Path:
    return data_home() / "cshare" / "mounts"


def mount_key(image_id: str, mountpoint: Path) -> str:
    """`<image-id-12>-<hash of mountpoint>`: one upper layer per image and mountpoint."""
    digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:12]
    return f"{image_id[:12]}-{digest}"


def records() -> Iterator[tuple[Path, MountRecord]]:
    base = mounts_dir()
    if not base.is_dir():
        return
    for path in sorted(base.glob(f"*/{RECORD_NAME}")):
        try:
            yield path, MountRecord.load(path)
        except (OSError, ValueError, TypeError):
            continue  # a damaged record must not stop umount of the others


def find_record(mountpoint: Path) -> tuple[Path, MountRecord] | None:
    for path, record in records():
        if record.mountpoint == str(mountpoint):
            return path, record
    return None
