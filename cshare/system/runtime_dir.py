"""A user's runtime directory (/run/user/UID) as a login would leave it, for a user with no login.

Rootless podman keeps its per-boot state in $XDG_RUNTIME_DIR: the pause
process's pid (libpod/tmp/pause.pid), the run root, the marker that tells it
the machine has rebooted.  On a desktop that directory is a tmpfs that logind
makes at login and empties when the user's last session ends, so the state
never outlives the processes it describes.  Where nobody logs in (the demo's
user, the test users) root makes the directory, and where /run is a plain
directory on disk, as on this project's CI machines, it outlives reboots.

podman 4.3 trusts what it finds there: if the pid in pause.pid is alive it
joins that process's user namespace.  A pid left from an earlier boot can by
then name one of the user's own processes in the host namespace, and every
podman command of that user fails with "cannot set user namespace".  So the
directory is made fresh for a user who has no process left, and a pause.pid
that names no process of the user inside a user namespace of its own is
removed, as podman itself removes one that names no process at all.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .procfs import process_dirs

PAUSE_PID_FILE = Path("libpod", "tmp", "pause.pid")


def runtime_dir_path(uid: int) -> Path:
    return Path(f"/run/user/{uid}")


def has_processes(uid: int) -> bool:
    """Whether any process visible to us runs as `uid` (its /proc entry's owner)."""
    for entry in process_dirs():
        try:
            if entry.stat().st_uid == uid:
                return True
        except OSError:
            continue  # gone meanwhile
    return False


def _open_pause_dir(runtime: Path) -> int | None:
    """A descriptor of RUNTIME/libpod/tmp, reached without following a symlink (the
    user owns everything below RUNTIME; root must not be led elsewhere)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(runtime, flags)
    except OSError:
        return None
    for part in PAUSE_PID_FILE.parts[:-1]:
        try:
            child = os.open(part, flags, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = child
    return fd


def _read_pid(dir_fd: int, name: str) -> int | None:
    """The pid in a regular file `name` below `dir_fd`; None for anything else (a FIFO
    would block root forever, a symlink would lead it anywhere)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return int(os.read(fd, 32))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def is_pause_process(pid: int, uid: int) -> bool:
    """Whether `pid` is a live process of `uid` in a user namespace other than ours."""
    proc = f"/proc/{pid}"
    try:
        return os.stat(proc).st_uid == uid and os.readlink(f"{proc}/ns/user") != os.readlink(
            "/proc/self/ns/user"
        )
    except OSError:
        return False


def prepare_runtime_dir(uid: int, gid: int, path: Path | None = None) -> Path:
    """/run/user/UID (or `path`, an XDG_RUNTIME_DIR of root's choosing) for `uid`: made
    if missing, without state left from an earlier boot.

    A directory that is a mount point is logind's, and only a stale
    pause.pid is removed from it.
    """
    path = path if path is not None else runtime_dir_path(uid)
    if path.is_dir() and not path.is_symlink() and not os.path.ismount(path) and not has_processes(uid):
        try:
            shutil.rmtree(path)  # fd-based: a symlink the user planted inside is not followed
        except OSError:
            pass  # something in it is busy (a dead mount): at least the pause.pid goes, below
    if not path.is_dir():
        path.mkdir(parents=True, mode=0o700)
        os.chown(path, uid, gid)
    dir_fd = _open_pause_dir(path)
    if dir_fd is not None:
        try:
            name = PAUSE_PID_FILE.name
            pid = _read_pid(dir_fd, name)
            if pid is None or not is_pause_process(pid, uid):
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
        finally:
            os.close(dir_fd)
    return path
