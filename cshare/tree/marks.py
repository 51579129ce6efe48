"""The marks `convert` and `restore` leave in a tree so that a killed run can be finished.

Both commands change a tree entry by entry; a run killed half-way must leave
something the next run can complete to exactly the state of one clean run:

- Replacing a device by a file (or back) goes through a temporary entry in the
  same directory, named `.cshare-convert-tmp.INO` / `.cshare-restore-tmp.INO`,
  then one rename over the original.  A leftover temporary entry means the
  rename never happened (the original is still there): the next run deletes it.
- Creating and renaming entries changes the directory's mtime.  Before the
  first such change in a directory its original atime and mtime are recorded in
  the xattr `user.cshare.dir_times` (`ATIME_NS:MTIME_NS`); when the directory
  is done they are put back and the mark removed.  A rerun that finds the mark
  uses it, so the original times survive a crash.
- Names of one hardlinked device inode are replaced one by one, each new
  name linked to the first placeholder.  Known limit: a run killed between
  two names of such a group leaves the remaining names to be replaced by a
  fresh placeholder on the rerun, so that group ends up as two inodes (the
  records and everything else are the same as after a clean run).  Restore
  has the same limit for hardlinked placeholders.  Hardlinked device nodes
  are rare in images (tar archives of /dev have none).
- `convert` makes an opaque marker visible to users by adding
  `user.overlay.opaque=y` beside `trusted.overlay.opaque=y`; it records that it
  added it in `user.cshare.opaque_added=y` (set first), so that `restore`
  removes exactly what convert added and nothing the layer had of its own.
"""

from __future__ import annotations

import errno
import os

from .walk import Dir

CONVERT_TMP_PREFIX = ".cshare-convert-tmp."
RESTORE_TMP_PREFIX = ".cshare-restore-tmp."
TIMES_XATTR = "user.cshare.dir_times"

OPAQUE_ADDED = "user.cshare.opaque_added"

_TIMES = "times"


TEMPORARY_START = ".cshare-"  # a cheap first test for callers in a hot loop


def is_temporary(name: str) -> bool:
    """Whether `name` is a temporary entry of convert or restore."""
    if not name.startswith(TEMPORARY_START):
        return False
    for prefix in (CONVERT_TMP_PREFIX, RESTORE_TMP_PREFIX):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return True
    return False


def temporary_name(prefix: str, ino: int) -> str:
    return f"{prefix}{ino}"


def load_times(d: Dir, names: frozenset[str]) -> None:
    """On entering a directory: pick up times recorded by an interrupted run."""
    if TIMES_XATTR not in names:
        return
    value = os.getxattr(d.fd, TIMES_XATTR)
    try:
        atime, mtime = (int(part) for part in value.decode("ascii").split(":"))
    except ValueError:
        raise ValueError(f"{TIMES_XATTR}={value!r} does not parse; remove it by hand") from None
    d.state[_TIMES] = (atime, mtime)


def before_namespace_change(d: Dir) -> None:
    """Call before creating, renaming or deleting an entry of `d`."""
    if _TIMES in d.state:
        return
    times = (d.st.st_atime_ns, d.st.st_mtime_ns)
    os.setxattr(d.fd, TIMES_XATTR, f"{times[0]}:{times[1]}".encode())
    d.state[_TIMES] = times


def put_back_times(d: Dir) -> None:
    """On leaving a directory: restore its times and drop the mark."""
    times = d.state.pop(_TIMES, None)
    if times is None:
        return
    os.utime(d.fd, ns=times)  # type: ignore[arg-type]
    try:
        os.removexattr(d.fd, TIMES_XATTR)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise


def remove_leftover(d: Dir, name: str) -> None:
    """Delete a temporary entry an interrupted run left behind."""
    before_namespace_change(d)
    clear_temporary(d, name)


def clear_temporary(d: Dir, name: str) -> None:
    """Unlink the temporary entry `name` of `d` if there is one (a killed run's), to make it afresh."""
    try:
        os.unlink(name, dir_fd=d.fd)
    except FileNotFoundError:
        pass


def link_fd(fd: int, d: Dir, name: str) -> None:
    """Give the inode open as `fd` (O_PATH is enough) one more name in `d`."""
    # linkat(AT_SYMLINK_FOLLOW) through /proc/self/fd links the inode itself;
    # it needs no path of the first name, which may have been renamed since.
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=d.fd, follow_symlinks=True)
