"""Mounting a FUSE connection with mount(2) ourselves, before pyfuse3 is loaded.

Why: importing pyfuse3 (which imports trio) takes ~70 ms, far longer than
fuse-overlayfs takes to mount.  fuse-overlayfs mounts, daemonizes and only
then starts serving; the kernel holds every request made in between until the
daemon answers FUSE_INIT, so a caller that uses the mount at once waits a
little and then gets right answers, never an error.  cshare-overlay does the
same: `mount_fuse` opens /dev/fuse and mounts it here, using only the standard
library, and pyfuse3 later serves the connection through libfuse's
`/dev/fd/N` convention (libfuse >= 3.3: a mountpoint of that form is a
/dev/fuse descriptor somebody else mounted).

This needs the right to mount: root, or root of a user namespace that owns
the mount namespace (podman unshare).  Anyone else gets `MountRefused` and
the caller lets libfuse mount through fusermount3 instead.  Options only
libfuse's helper implements (auto_unmount) go that way too.

libfuse does not unmount a connection it did not mount, so the daemon calls
`unmount_connection` when it stops serving on its own (SIGTERM): it unmounts
only while the connection is alive, never whatever else may be mounted on
that path by then.
"""

from __future__ import annotations

import errno
import os
import select
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

# mount(2) flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_NOATIME = 1024
MS_RELATIME = 1 << 21
MNT_DETACH = 2

#: Options that become mount(2) flags; the rest of FUSE_PASSTHROUGH are mount data.
_FLAG_OPTIONS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV,
                 "noexec": MS_NOEXEC, "noatime": MS_NOATIME, "relatime": MS_RELATIME}
#: Options that cancel a default flag (FUSE mounts are nosuid,nodev unless told).
_CLEARING_OPTIONS = {"suid": MS_NOSUID, "dev": MS_NODEV, "exec": 0, "atime": 0, "rw": 0}
#: What the kernel's fuse takes in the mount data itself.
_DATA_OPTIONS = frozenset({"allow_other", "default_permissions"})
#: Only libfuse (through fusermount3) implements these; they take the slow path.
_LIBFUSE_ONLY = frozenset({"auto_unmount", "allow_root"})


def needs_libfuse(options: Iterable[str]) -> bool:
    """Whether these options can only be mounted through libfuse's helper."""
    return any(o.partition("=")[0] in _LIBFUSE_ONLY for o in options)


class MountRefused(Exception):
    """This process may not mount(2) FUSE itself; libfuse should mount instead."""


def _libc_call(name: str, *args: bytes | int) -> int:
    """Call libc's `name`; return 0, or the errno it failed with (ints pass as unsigned long)."""
    import ctypes  # here, not at module level: the fusermount3 path never needs it

    func = getattr(ctypes.CDLL(None, use_errno=True), name)
    converted = [ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]
    return 0 if func(*converted) == 0 else ctypes.get_errno()


def mount_arguments(options: Iterable[str], fd: int, root_mode: int, uid: int, gid: int
                    ) -> tuple[str, str, int, str]:
    """(source, fstype, flags, data) for mount(2) of a FUSE connection, from `-o` options.

    Pure, so it can be checked without mounting.  `fsname=` is the source and
    `subtype=` makes the type `fuse.SUBTYPE`, as libfuse does; FUSE mounts are
    nosuid and nodev unless `suid`/`dev` is given.
    """
    source, fstype = "fuse", "fuse"
    flags = MS_NOSUID | MS_NODEV
    data = [f"fd={fd}", f"rootmode={stat.S_IFMT(root_mode):o}", f"user_id={uid}", f"group_id={gid}"]
    for option in sorted(options):
        name, _, value = option.partition("=")
        if name == "fsname":
            source = value
        elif name == "subtype":
            fstype = f"fuse.{value}"
        elif name in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[name]
        elif name in _CLEARING_OPTIONS:
            flags &= ~_CLEARING_OPTIONS[name]
        elif name in _DATA_OPTIONS:
            data.append(name)
        elif name in _LIBFUSE_ONLY:
            raise MountRefused(f"{name} needs libfuse's mount helper")
        # Anything else is for libfuse's session, not the kernel.
    return source, fstype, flags, ",".join(data)


def mount_fuse(mountpoint: str, options: Iterable[str]) -> int:
    """Open /dev/fuse, mount it on `mountpoint`; return the connection's fd.

    Raises MountRefused when this process lacks the right to mount (or an
    option needs libfuse), OSError for anything else (e.g. a missing /dev/fuse).
    """
    if os.geteuid() != 0:
        raise MountRefused("not root")
    root_mode = os.stat(mountpoint).st_mode
    # Checked before opening /dev/fuse, so a refusal leaves nothing open.
    mount_arguments(options, 0, root_mode, 0, 0)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        source, fstype, flags, data = mount_arguments(options, fd, root_mode, os.getuid(), os.getgid())
        err = _libc_call("mount", os.fsencode(source), os.fsencode(mountpoint), fstype.encode(),
                         flags, data.encode())
        if err == errno.EPERM:  # no CAP_SYS_ADMIN over this mount namespace
            raise MountRefused(os.strerror(err))
        if err:
            raise OSError(err, os.strerror(err), mountpoint)
    except BaseException:
        os.close(fd)
        raise
    # pyfuse3 takes it as /dev/fd/N, so it must survive into the daemon; it is
    # not inherited by anything the daemon runs (no exec happens in between).
    return fd


def fuse_descriptors(proc_dir: str = "/proc/self") -> list[int]:
    """The descriptors of /dev/fuse the process at `proc_dir` holds.

    Our own always; another process's when we may read its /proc entry (root).
    """
    try:
        names = os.listdir(f"{proc_dir}/fd")
    except OSError:
        return []
    found = []
    for name in names:
        try:
            if os.readlink(f"{proc_dir}/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue  # closed meanwhile
    return found


def unmount_connection(fd: int, mountpoint: str) -> None:
    """Unmount our connection `fd` from `mountpoint`, unless it is gone already.

    A connection the kernel has ended (fusermount3 -u, umount, an abort)
    polls as POLLERR; then nothing is unmounted, so another filesystem mounted
    on the same path since is never touched.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _fd, events in poller.poll(0):
        if events & (select.POLLERR | select.POLLNVAL):
            return
    err = _libc_call("umount2", os.fsencode(mountpoint), MNT_DETACH)
    if err and err not in (errno.EINVAL, errno.ENOENT):  # not mounted any more, path gone
        raise OSError(err, os.strerror(err), mountpoint)
