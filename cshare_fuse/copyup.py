"""Copy-up: bring one lower entry into the upper layer before it is changed.

The copy is built with its data, owner, mode, times and xattrs before it gets
its name: a regular file as an unnamed file in its upper directory, then
linked (`_copy_file`), anything else (or a file where that cannot be done)
under a temporary name in the workdir (same filesystem as the upper layer),
then renamed into place: no reader ever sees a partial file.  Data moves with
copy_file_range (reflink or in-kernel copy where the filesystem can), falling
back to sendfile.  These functions do blocking I/O and touch no shared state,
so the overlay runs large copies in a worker thread.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat as statmod
import threading
from dataclasses import dataclass
from typing import Any

from .datasource import Stat
from .formats.markers import is_internal_xattr
from .formats.overrides import Override
from .layers import Layer, UpperLayer

log = logging.getLogger("cshare_fuse")

_counter = itertools.count()
_CHUNK = 1 << 30


@dataclass(frozen=True)
class CopyPolicy:
    """How attributes land on the upper copy.

    `override_xattr`: write the reported owner/mode into this xattr instead of
    onto the file itself (xattr_permissions=1|2), or None to chown/chmod for real.
    `can_chown`: the daemon may give files away (root, or root of a user namespace).
    """

    override_xattr: str | None
    can_chown: bool


_pid: int | None = None  # this process's id, for staging names (reset in a forked child)


def _forget_pid() -> None:
    global _pid
    _pid = None


os.register_at_fork(after_in_child=_forget_pid)


def staging_name(workdir: bytes) -> bytes:
    global _pid
    if _pid is None:
        _pid = os.getpid()
    return b"%s/#cshare-%d-%d" % (workdir, _pid, next(_counter))


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy `size` bytes between two fds with the kernel's help."""
    remaining = size
    try:
        while remaining > 0:
            done = os.copy_file_range(src_fd, dst_fd, min(remaining, _CHUNK))
            if done == 0:
                break
            remaining -= done
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    offset = size - remaining
    while remaining > 0:
        done = os.sendfile(dst_fd, src_fd, offset, min(remaining, _CHUNK))
        if done == 0:
            break
        offset += done
        remaining -= done


def copy_xattrs(source: Layer, path: bytes, dest: bytes | int) -> None:
    """User-visible xattrs go along; overlay and override records of the lower do not.

    `dest` is the staged entry's path, or a descriptor open on it.
    """
    try:
        names = source.listxattr(path)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return
        raise
    for name in names:
        if is_internal_xattr(name):
            continue
        try:
            value = source.getxattr(path, name)
            if isinstance(dest, int):
                os.setxattr(dest, name, value)
            else:
                os.setxattr(dest, name, value, follow_symlinks=False)
        except OSError as exc:
            # trusted.* and security.* may be refused to an unprivileged daemon;
            # a user.* xattr must come along or the copy is wrong.
            if name.startswith("user.") or exc.errno not in (errno.EPERM, errno.ENOTSUP,
                                                              errno.EACCES, errno.ENODATA):
                raise


def apply_attributes(dest: bytes | int, want: Stat, policy: CopyPolicy, *, record_type: bool,
                     have: os.stat_result | None = None,
                     times: tuple[int, int] | None = None) -> None:
    """Owner, mode and times of `want` (or `times`: atime, mtime) onto the staged entry.

    `dest` is its path, or a descriptor open on it (a regular file: the calls
    then need no path lookup).  `have`, the staged entry's attributes if known,
    lets calls that would change nothing be skipped (a copy-up is a handful of
    syscalls; each one counts).
    """
    by_fd = isinstance(dest, int)
    # A descriptor refers to the entry itself; a path must never follow a symlink.
    nofollow: dict[str, Any] = {} if by_fd else {"follow_symlinks": False}
    is_link = statmod.S_ISLNK(want.mode)
    if policy.override_xattr is not None or record_type:
        name = policy.override_xattr or "user.containers.override_stat"
        record = Override.from_stat(want.mode, want.uid, want.gid, want.rdev)
        os.setxattr(dest, name, record.format(), **nofollow)
        if not is_link:
            # The daemon must keep read/write access to a file whose real mode it no
            # longer reports.
            os.chmod(dest, 0o755 if statmod.S_ISDIR(want.mode) else 0o644)
    else:
        same_owner = have is not None and (have.st_uid, have.st_gid) == (want.uid, want.gid)
        if policy.can_chown and not same_owner:
            try:
                os.chown(dest, want.uid, want.gid, **nofollow)
            except OSError as exc:
                # An owner outside this user namespace's map cannot be given; the
                # copy then belongs to the daemon, as with fuse-overlayfs.
                if exc.errno not in (errno.EINVAL, errno.EPERM):
                    raise
                log.debug("copy-up: cannot chown %r to %d:%d", dest, want.uid, want.gid)
            if have is not None and have.st_mode & (statmod.S_ISUID | statmod.S_ISGID):
                have = None  # chown cleared setuid/setgid bits: the mode must be set again
        if not is_link and (have is None or statmod.S_IMODE(have.st_mode)
                            != statmod.S_IMODE(want.mode)):
            os.chmod(dest, statmod.S_IMODE(want.mode))
    os.utime(dest, ns=times or (want.atime_ns, want.mtime_ns), **nofollow)


def copy_up(source: Layer, path: bytes, real: Stat, want: Stat, upper: UpperLayer,
            workdir: bytes, policy: CopyPolicy) -> tuple[int, int] | None:
    """Copy the lower entry `path` (real attributes `real`, reported `want`) into upper.

    The parent directory must already exist in the upper layer.  A directory is
    copied without its contents (they stay merged from below).  Returns the
    copy's (st_dev, st_ino) where it is known without another stat (a regular
    file), else None.
    """
    destination = upper.real(path)
    parent = os.path.dirname(destination)
    staged = staging_name(workdir)
    ftype = statmod.S_IFMT(want.mode)
    record_type = False
    identity: tuple[int, int] | None = None
    # A copy-up is not a change the user made to the directory: keep its times,
    # as the kernel's overlay does (read just before the name appears: a large
    # copy runs in a thread while other requests may change the directory).
    before: os.stat_result | None = None
    try:
        if ftype == statmod.S_IFREG:
            unnamed = _copy_file(source, path, real, want, policy, parent, unnamed=True)
            if unnamed is not None:
                identity, fd = unnamed
                try:
                    before = os.lstat(parent)
                    if not _name_unnamed(fd, destination):
                        before = None
                finally:
                    os.close(fd)
            if before is None:
                staged_copy = _copy_file(source, path, real, want, policy, staged, unnamed=False)
                assert staged_copy is not None  # only an unnamed copy can be refused
                identity = staged_copy[0]
        elif ftype == statmod.S_IFDIR:
            os.mkdir(staged, 0o700)
        elif ftype == statmod.S_IFLNK:
            os.symlink(source.readlink(path), staged)
        else:
            try:
                os.mknod(staged, ftype | 0o600, want.rdev)
            except PermissionError:
                # No mknod in this namespace: an empty stand-in whose override
                # records what it is, exactly as `cshare convert` stores devices.
                os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                record_type = True
        if ftype != statmod.S_IFREG:
            if ftype != statmod.S_IFLNK or os.geteuid() == 0:
                copy_xattrs(source, path, staged)
            apply_attributes(staged, want, policy, record_type=record_type)
        if before is None:
            before = os.lstat(parent)
            os.rename(staged, destination)
        os.utime(parent, ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False)
    except BaseException:
        _remove_quietly(staged)
        raise
    return identity


def _copy_file(source: Layer, path: bytes, real: Stat, want: Stat, policy: CopyPolicy,
               where: bytes, unnamed: bool) -> tuple[tuple[int, int], int] | None:
    """The copy of a regular file: data, xattrs, owner, mode and times, all set
    through its descriptor; its (st_dev, st_ino), and the copy's descriptor
    when it still has to be named (else -1: closed).

    `unnamed`: an unnamed file (O_TMPFILE) in the directory `where`, the
    destination's, for the caller to name once whole (`_name_unnamed`):
    nothing partial is ever seen, nothing is left after a crash, and its inode
    is allocated beside its directory's.  A copy staged in the workdir gets
    its inode in the workdir's group, where ext4 without a journal first
    steps over every inode freed in the last minutes (`recently_deleted`):
    ~190 µs a create, most of a copy-up, after a tree was removed nearby.
    None when this filesystem cannot: the caller stages the copy at the path
    `where` instead (`unnamed` False) and renames it.
    """
    src = _open_quietly(source, path)
    try:
        # Times as they are now (reads through the mount may have moved the
        # atime since the lookup); the copy itself must not move them.
        fresh = os.fstat(src)
        # Created with its final permission bits (the daemon's umask is 0);
        # the owner's read/write bits are what the copy needs meanwhile.
        mode = (want.mode & 0o777) | 0o600
        if unnamed:
            opened = _open_unnamed(where, mode)
            if opened is None:
                return None
            dst = opened
        else:
            dst = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            if statmod.S_ISREG(real.mode) and real.size:
                copy_data(src, dst, real.size)
            have = os.fstat(dst)
            copy_xattrs(source, path, dst)
            apply_attributes(dst, want, policy, record_type=False, have=have,
                             times=(fresh.st_atime_ns, fresh.st_mtime_ns))
        except BaseException:
            os.close(dst)
            raise
        if not unnamed:
            os.close(dst)
            dst = -1
    finally:
        os.close(src)
    return (have.st_dev, have.st_ino), dst


#: Whether unnamed files can be made and named here (O_TMPFILE, /proc/self/fd);
#: False after the first refusal, for the daemon's lifetime.
_unnamed_copies = True


def _open_unnamed(directory: bytes, mode: int) -> int | None:
    global _unnamed_copies
    if not _unnamed_copies:
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        _unnamed_copies = False
        return None


_proc_fds: tuple[int, int] = (-1, -1)  # (pid, fd on /proc/self/fd): a fork's child opens its own
_proc_fds_lock = threading.Lock()  # large copies run in threads


def _name_unnamed(fd: int, destination: bytes) -> bool:
    """Link the unnamed file `fd` at `destination` (linkat of /proc/self/fd/N
    with AT_SYMLINK_FOLLOW, which needs no capability; os.link makes that call
    only with a src_dir_fd, else it calls link(2), which links the magic link
    itself: EXDEV); False when that is refused (no /proc, or a hard link the
    kernel's protected_hardlinks forbids), or the name is taken."""
    global _unnamed_copies, _proc_fds
    try:
        with _proc_fds_lock:
            if _proc_fds[0] != os.getpid():
                _proc_fds = (os.getpid(),
                             os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        os.link(str(fd), destination, src_dir_fd=_proc_fds[1], follow_symlinks=True)
    except FileExistsError:
        return False  # staged and renamed over it instead, as before
    except (FileNotFoundError, PermissionError):
        _unnamed_copies = False
        return False
    return True


def _open_quietly(source: Layer, path: bytes) -> int:
    """Open for the copy without touching the access time, where that is allowed."""
    try:
        return source.open(path, os.O_RDONLY | os.O_NOATIME)
    except PermissionError:
        return source.open(path, os.O_RDONLY)  # O_NOATIME needs ownership or CAP_FOWNER


def _remove_quietly(path: bytes) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass
