"""Mounting and unmounting: a shared-store image as a private, writable overlay for one user.

`cshare mount IMAGE MOUNTPOINT` resolves IMAGE in the shared store, checks
everything that would make the mount fail (namespace, /dev/fuse, mountpoint) so
the user gets one clear line instead of a FUSE error, then runs the overlay
program (`cshare-overlay`, a drop-in for fuse-overlayfs) with the image's
layers as lower layers, served by the bundled `test` plugin, which shows every
file with its original owner and mode.  Each user's changes go to an upper
directory of their own, kept per image and mountpoint under
$XDG_DATA_HOME/cshare/mounts/, so a later mount of the same image on the same
mountpoint finds them again.  The overlay daemonizes and returns only once the
mount is ready; what was mounted is recorded next to the upper directory so
`cshare umount` can unmount it and clean up.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import CshareError
from ..store.shared import SharedStore
from ..system import namespaces
from ..system.mountinfo import is_mount_point, mount_device, mount_table
from ..system.procfs import mount_tables
from .command import find_daemon, overlay_argv, overlay_command, serving
from .records import (
    LOG_NAME,
    RECORD_NAME,
    MountRecord,
    data_home,
    find_record,
    mount_key,
    mounts_dir,
)

#: How long the overlay may take to report the mount ready (Python start-up included).
READY_TIMEOUT = 60.0
#: How long `umount` waits for the overlay daemon to flush and exit.
EXIT_TIMEOUT = 10.0


def check_can_mount() -> None:
    """One-line errors for the two things no retry fixes: the namespace and /dev/fuse."""
    problem = namespaces.current().mount_problem()
    if problem:
        raise CshareError(problem)
    problem = namespaces.fuse_problem()
    if problem:
        raise CshareError(problem)


def check_mountpoint(mountpoint: Path) -> Path:
    """The absolute mountpoint, which must be an existing, empty directory not mounted on."""
    path = Path(os.path.abspath(mountpoint))
    # Asked before exists(): a mount whose daemon died answers stat() with ENOTCONN.
    if is_mount_point(path) or (path.exists() and is_mount_point(path.resolve())):
        raise CshareError(
            f"mountpoint {path} is busy: something is already mounted there "
            f"(cshare umount {path} first)"
        )
    if not path.exists():
        raise CshareError(f"mountpoint {path} does not exist: create it first (mkdir -p {path})")
    if not path.is_dir():
        raise CshareError(f"mountpoint {path} is not a directory")
    path = path.resolve()
    try:
        with os.scandir(path) as entries:
            if any(True for _ in entries):
                raise CshareError(
                    f"mountpoint {path} is busy: it is not an empty directory; use an empty one"
                )
    except PermissionError:
        raise CshareError(f"mountpoint {path} cannot be read by you") from None
    return path


def _check_dirs(upper: Path | None, work: Path | None) -> None:
    if (upper is None) != (work is None):
        raise CshareError("--upper and --work go together: give both or neither")


def _check_user_dirs(upper: Path | None, work: Path | None) -> None:
    """--upper/--work, checked in the namespace that will use them (ns root may write more)."""
    if upper is not None and work is not None:
        if os.path.abspath(upper) == os.path.abspath(work):
            raise CshareError(f"--upper and --work are both {os.path.abspath(upper)}: give two directories")
        _check_user_dir(Path(os.path.abspath(upper)), "--upper")
        _check_user_dir(Path(os.path.abspath(work)), "--work")


def _check_user_dir(path: Path, option: str) -> None:
    """A directory given with --upper/--work must be one we can write, or be creatable.

    Checked before anything is created, so a refusal leaves nothing behind.
    """
    if os.path.lexists(path):
        if not path.is_dir():
            raise CshareError(f"{option} {path} exists and is not a directory: give a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CshareError(f"{option} {path} is not writable by you: give a directory you own")
        return
    parent = path.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise CshareError(f"{option} {path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CshareError(
            f"{option} {path} cannot be created: {parent} is not writable by you; "
            "give a directory you own"
        )


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p `path`; return the directories it created, outermost first."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    created: list[Path] = []
    for p in reversed(missing):
        try:
            p.mkdir()
        except OSError as exc:
            _remove_created(created)
            raise CshareError(f"cannot create {p}: {exc.strerror}") from None
        created.append(p)
    return created


def _remove_created(created: list[Path]) -> None:
    """Undo _make_dirs (only directories still empty: nothing of the user's is removed)."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            pass


def users_elsewhere(path: Path) -> list[int]:
    """Pids (one per mount namespace) outside ours that still have the filesystem at `path` mounted.

    A container started with `podman run --rootfs` gets its own mount namespace
    holding its own reference to our FUSE filesystem.  Unmounting here would
    leave it running, but this is how to see it is still in use.
    """
    device = mount_device(path)
    if device is None:
        return []
    return [
        pid for pid, table in mount_tables(skip=namespaces.mount_namespace_id())
        if any(entry.device == device for entry in table)
    ]


# ------------------------------------------------------------------ mount / umount
def _prepare_dir(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)


def _log_tail(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


def _check_not_mounted_elsewhere(state: Path, image: str, mnt: Path) -> None:
    """Refuse when the previous record of this image and mountpoint has a live daemon."""
    previous = state / RECORD_NAME
    if not previous.exists():
        return
    try:
        old = MountRecord.load(previous)
    except (OSError, ValueError, TypeError):
        return
    if serving(old.pid, mnt):
        raise CshareError(
            f"{image} is already mounted on {mnt} in another mount namespace "
            f"(overlay pid {old.pid}): run `cshare umount {mnt}` there first"
        )


def _prepare_state(
    state: Path, upper: Path | None, work: Path | None
) -> tuple[Path, Path, list[Path]]:
    """The per-image-and-mountpoint state directory and the upper and work directories,
    and those of --upper/--work it created (to remove again if the mount fails)."""
    state.parent.mkdir(parents=True, exist_ok=True)
    for p in (data_home() / "cshare", state.parent):
        p.chmod(0o700)  # other users must not read each other's changes
    _prepare_dir(state, 0o700)
    upper_dir = (state / "upper") if upper is None else Path(os.path.abspath(upper))
    work_dir = (state / "work") if work is None else Path(os.path.abspath(work))
    if upper is None:
        # The upper root becomes the container's "/": every uid must traverse it.
        _prepare_dir(upper_dir, 0o755)
        _prepare_dir(work_dir, 0o700)
        return upper_dir, work_dir, []
    created = _make_dirs(upper_dir)
    try:
        created += _make_dirs(work_dir)
    except CshareError:
        _remove_created(created)
        raise
    return upper_dir, work_dir, created


def _run_overlay(argv: list[str], log: Path, image: str, mnt: Path) -> None:
    """Run the overlay program; return once it has reported `mnt` mounted."""
    program = Path(argv[0]).name
    with open(log, "ab") as log_file:
        offset = log_file.tell()
        # Output goes to a file, not a pipe: the daemon keeps its stderr open
        # long after the launcher has exited, and a pipe would never close.
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=log_file, timeout=READY_TIMEOUT, check=False)
        except FileNotFoundError:
            raise CshareError(f"overlay program {argv[0]} not found: run scripts/install") from None
        except subprocess.TimeoutExpired:
            raise CshareError(
                f"{program} did not report the mount of {mnt} ready within "
                f"{READY_TIMEOUT:.0f} s (log: {log})"
            ) from None
    if result.returncode != 0:
        reason = _log_tail(log, offset) or f"exit status {result.returncode}"
        raise CshareError(f"{program} could not mount {image} on {mnt}: {reason} (log: {log})")
    if not is_mount_point(mnt):
        raise CshareError(f"{program} exited without error but {mnt} is not mounted (log: {log})")


def mount_image(
    image: str,
    mountpoint: Path,
    store_root: Path,
    upper: Path | None = None,
    work: Path | None = None,
    debug: Callable[[str], None] | None = None,
) -> MountRecord:
    """Mount IMAGE from the shared store on MOUNTPOINT; return once the mount is ready."""
    note = debug or (lambda _msg: None)
    _check_dirs(upper, work)
    check_can_mount()
    _check_user_dirs(upper, work)
    mnt = check_mountpoint(mountpoint)
    if not store_root.is_dir():
        raise CshareError(
            f"no shared store at {store_root}: root creates it with `cshare make-shared IMAGE` "
            "(or give --store)"
        )
    command = overlay_command()
    store = SharedStore(store_root)
    # Hold the store's read lock until the overlay has opened the layers, so a
    # concurrent `cshare rm` cannot pull a layer from under a starting mount.
    with store.read_lock():
        record_image = store.resolve(image)
        lowers = [Path(p) for p in store.lower_dirs(record_image)]
        state = mounts_dir() / mount_key(record_image.id, mnt)
        _check_not_mounted_elsewhere(state, image, mnt)
        upper_dir, work_dir, created = _prepare_state(state, upper, work)
        argv = overlay_argv(command, lowers, upper_dir, work_dir, mnt)
        note("running: " + shlex.join(argv))
        log = state / LOG_NAME
        try:
            _run_overlay(argv, log, image, mnt)
        except BaseException:
            _remove_created(created)
            raise
    name = record_image.names[0] if getattr(record_image, "names", None) else record_image.id
    record = MountRecord(
        image_id=record_image.id,
        image=name,
        mountpoint=str(mnt),
        upper=str(upper_dir),
        work=str(work_dir),
        lowers=[str(p) for p in lowers],
        command=argv,
        state_dir=str(state),
        own_dirs=upper is None,
        mount_ns=namespaces.mount_namespace_id(),
        pid=find_daemon(mnt),
    )
    record.save()
    note(f"overlay pid {record.pid}; record {state / RECORD_NAME}; log {log}")
    return record


def _run_quiet(argv: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        return 127, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} timed out"
    lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
    return done.returncode, (lines[-1] if lines else "")


def _wait_exit(pid: int | None, mountpoint: str, timeout: float = EXIT_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while serving(pid, mountpoint):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def unmount(mountpoint: Path, debug: Callable[[str], None] | None = None) -> MountRecord | None:
    """Unmount MOUNTPOINT, wait for its overlay to exit, and drop what mount recorded."""
    note = debug or (lambda _msg: None)
    mnt = Path(os.path.abspath(mountpoint))
    if mnt.exists():
        mnt = mnt.resolve()
    found = find_record(mnt)
    path, record = found if found else (None, None)
    situation = namespaces.current()
    if not is_mount_point(mnt):
        if path is not None and record is not None and not serving(record.pid, record.mountpoint):
            path.unlink(missing_ok=True)  # stale: its namespace or daemon is gone
            raise CshareError(f"{mnt} is not mounted (a stale cshare record for it was removed)")
        hint = ""
        if situation.euid != 0 and not situation.in_userns:
            hint = ": cshare mounts made inside `podman unshare` are seen only there; run it inside `podman unshare`"
        raise CshareError(f"{mnt} is not mounted{hint}")
    fstype = mount_table().get(str(mnt), "")
    if record is None and not fstype.startswith("fuse"):
        raise CshareError(f"{mnt} is a {fstype} mount that cshare did not make; leaving it alone")
    elsewhere = users_elsewhere(mnt)
    if elsewhere:
        raise CshareError(
            f"{mnt} is busy: a container or another mount namespace still uses it "
            f"(pid {', '.join(map(str, elsewhere[:3]))}); stop it first"
        )
    code, message = _run_quiet(["fusermount3", "-u", str(mnt)])
    note(f"fusermount3 -u: exit {code} {message}")
    if code != 0 and (situation.in_userns or situation.euid == 0):
        # fusermount3 keeps its own table of user mounts; a mount made with
        # mount(2) inside a namespace is not in it, so umount(8) does the work.
        code, message = _run_quiet(["umount", str(mnt)])
        note(f"umount: exit {code} {message}")
    if code != 0 or is_mount_point(mnt):
        if "busy" in message.lower():
            raise CshareError(f"{mnt} is busy: stop the containers or shells using it, then retry")
        raise CshareError(f"could not unmount {mnt}: {message or 'unknown error'}")
    if record is not None and path is not None:
        if not _wait_exit(record.pid, record.mountpoint):
            # Never kill it: whoever still holds the filesystem would lose it.
            # It ends by itself once the kernel drops the last reference.
            note(f"overlay pid {record.pid} still running after unmount; leaving it")
        elif record.own_dirs:
            # The work directory is scratch space the overlay empties at start anyway.
            shutil.rmtree(record.work, ignore_errors=True)
        path.unlink(missing_ok=True)
    return record
