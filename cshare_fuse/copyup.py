"""Copy-up: bring one lower entry into the upper layer before it is changed.

The copy is built under a temporary name in the workdir (same filesystem as
the upper layer) with its data, owner, mode, times and xattrs, and only then
renamed into place: no reader ever sees a partial file.  Data moves with
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
from dataclasses import dataclass

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


def staging_name(workdir: bytes) -> bytes:
    return workdir + b"/#cshare-" + str(os.getpid()).encode() + b"-" + str(next(_counter)).encode()


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


def copy_xattrs(source: Layer, path: bytes, dest: bytes) -> None:
    """User-visible xattrs go along; overlay and override records of the lower do not."""
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
            os.setxattr(dest, name, value, follow_symlinks=False)
        except OSError as exc:
            # trusted.* and security.* may be refused to an unprivileged daemon;
            # a user.* xattr must come along or the copy is wrong.
            if name.startswith("user.") or exc.errno not in (errno.EPERM, errno.ENOTSUP,
                                                              errno.EACCES, errno.ENODATA):
                raise


def apply_attributes(dest: bytes, want: Stat, policy: CopyPolicy, *, record_type: bool,
                     have: os.stat_result | None = None) -> None:
    """Owner, mode and times of `want` onto the staged entry `dest`.

    `have`, the staged entry's attributes if known, lets calls that would change
    nothing be skipped (a copy-up is a handful of syscalls; each one counts).
    """
    is_link = statmod.S_ISLNK(want.mode)
    if policy.override_xattr is not None or record_type:
        name = policy.override_xattr or "user.containers.override_stat"
        record = Override.from_stat(want.mode, want.uid, want.gid, want.rdev)
        os.setxattr(dest, name, record.format(), follow_symlinks=False)
        if not is_link:
            # The daemon must keep read/write access to a file whose real mode it no
            # longer reports.
            os.chmod(dest, 0o755 if statmod.S_ISDIR(want.mode) else 0o644)
    else:
        same_owner = have is not None and (have.st_uid, have.st_gid) == (want.uid, want.gid)
        if policy.can_chown and not same_owner:
            try:
                os.chown(dest, want.uid, want.gid, follow_symlinks=False)
            except OSError as exc:
                # An owner outside this user namespace's map cannot be given; the
                # copy then belongs to the daemon, as with fuse-overlayfs.
                if exc.errno not in (errno.EINVAL, errno.EPERM):
                    raise
                log.debug("copy-up: cannot chown %r to %d:%d", dest, want.uid, want.gid)
            have = None  # chown may have cleared setuid/setgid bits
        if not is_link and (have is None or statmod.S_IMODE(have.st_mode)
                            != statmod.S_IMODE(want.mode)):
            os.chmod(dest, statmod.S_IMODE(want.mode))
    os.utime(dest, ns=(want.atime_ns, want.mtime_ns), follow_symlinks=False)


def copy_up(source: Layer, path: bytes, real: Stat, want: Stat, upper: UpperLayer,
            workdir: bytes, policy: CopyPolicy) -> None:
    """Copy the lower entry `path` (real attributes `real`, reported `want`) into upper.

    The parent directory must already exist in the upper layer.  A directory is
    copied without its contents (they stay merged from below).
    """
    staged = staging_name(workdir)
    ftype = statmod.S_IFMT(want.mode)
    record_type = False
    have: os.stat_result | None = None
    try:
        if ftype == statmod.S_IFREG:
            src = _open_quietly(source, path)
            try:
                # Times as they are now (reads through the mount may have moved the
                # atime since the lookup); the copy itself must not move them.
                fresh = os.fstat(src)
                want = want.replace(atime_ns=fresh.st_atime_ns, mtime_ns=fresh.st_mtime_ns)
                # Created with its final permission bits (the daemon's umask is 0);
                # the owner's read/write bits are what the copy needs meanwhile.
                dst = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              (want.mode & 0o777) | 0o600)
                try:
                    if statmod.S_ISREG(real.mode) and real.size:
                        copy_data(src, dst, real.size)
                    have = os.fstat(dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
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
        if ftype != statmod.S_IFLNK or os.geteuid() == 0:
            copy_xattrs(source, path, staged)
        apply_attributes(staged, want, policy, record_type=record_type, have=have)
        destination = upper.real(path)
        parent = os.path.dirname(destination)
        # A copy-up is not a change the user made to the directory: keep its times,
        # as the kernel's overlay does.
        before = os.lstat(parent)
        os.rename(staged, destination)
        os.utime(parent, ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False)
    except BaseException:
        _remove_quietly(staged)
        raise


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
