"""The overlay program: which one, its command line, and finding its daemon.

cshare runs `cshare-overlay` (or $CSHARE_OVERLAY_CMD, e.g. fuse-overlayfs)
with the image's layers as lower layers, served by the bundled `test`
plugin; paths go into `-o` escaped by cshare_fuse.formats.optsyntax, the
syntax cshare-overlay parses.  The daemon it leaves behind is found again
through /proc.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from cshare_fuse.formats.optsyntax import escape

from ..errors import CshareError
from ..system.procfs import process_argv, process_dirs, process_state, runs_overlay_program

#: Environment variable naming another overlay program (e.g. `fuse-overlayfs`) to run.
OVERLAY_ENV = "CSHARE_OVERLAY_CMD"
DEFAULT_OVERLAY = "cshare-overlay"
#: The bundled plugin that reports the original owners and modes of a converted layer.
PLUGIN = "test"


def overlay_command() -> list[str]:
    """The overlay program: $CSHARE_OVERLAY_CMD, else cshare-overlay next to Python, else PATH."""
    configured = os.environ.get(OVERLAY_ENV, "").strip()
    if configured:
        return shlex.split(configured)
    beside = Path(sys.executable).parent / DEFAULT_OVERLAY
    if beside.exists():
        return [str(beside)]
    found = shutil.which(DEFAULT_OVERLAY)
    if found is None:
        raise CshareError(
            f"{DEFAULT_OVERLAY} not found next to {sys.executable} or on PATH: run scripts/install"
        )
    return [found]


def uses_plugins(command: list[str]) -> bool:
    """fuse-overlayfs (the C reference) has no plugins: it reads the override xattr itself."""
    return Path(command[0]).name != "fuse-overlayfs"


def overlay_argv(
    command: list[str], lowers: list[Path], upper: Path, work: Path, mountpoint: Path
) -> list[str]:
    """The full command line: every lower layer through the test plugin, upper and work dirs."""
    with_plugin = uses_plugins(command)
    entries = [f"//{PLUGIN}//{escape(p)}" if with_plugin else escape(p) for p in lowers]
    options = [
        "lowerdir=" + ":".join(entries),
        f"upperdir={escape(upper)}",
        f"workdir={escape(work)}",
        # Other ids of the namespace (a container's uid 33) must reach the mount,
        # and the kernel must check permissions against the modes the plugin reports.
        "allow_other",
        "default_permissions",
    ]
    if with_plugin:
        options.insert(0, f"plugins={PLUGIN}")
    return [*command, "-o", ",".join(options), str(mountpoint)]


def serving(pid: int | None, mountpoint: str | Path) -> bool:
    """True while `pid` is a live overlay daemon for `mountpoint` (a reused pid is not)."""
    if not pid:
        return False
    state = process_state(pid)
    if state is None or state in ("Z", "X"):  # gone, or a zombie that has finished its work
        return False
    argv = process_argv(pid)
    return (
        len(argv) >= 2
        and argv[-1] == os.fsencode(str(mountpoint))
        and runs_overlay_program(pid, argv)
    )


def find_daemon(mountpoint: Path) -> int | None:
    """Best effort: the pid of our process serving `mountpoint` (to wait for it at umount)."""
    me = os.getuid()
    for entry in process_dirs():
        if int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != me:
                continue
        except OSError:
            continue
        if serving(int(entry.name), mountpoint):
            return int(entry.name)
    return None
