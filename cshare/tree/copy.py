"""Copy one layer tree exactly: the first step of making a layer shared.

What "exactly" means for a container layer:

- every entry keeps its type, owner, mode (setuid/setgid/sticky included),
  timestamps and xattrs (`trusted.*` too when run as root: the kernel-style
  opaque marker `trusted.overlay.opaque` lives there);
- hard links stay hard links (within the tree), sparse files stay sparse;
- device nodes, fifos, sockets and whiteouts (char 0/0) are recreated with
  mknod; `.wh.` files and `.wh..wh..opq` markers are plain files and copied as such;
- symlinks are copied as symlinks and never followed: the walk (cshare.tree.walk,
  iterative, so any depth) goes through directory file descriptors with
  O_NOFOLLOW, so a symlink (or a race that puts one in place of a directory)
  can never lead the copy out of the tree.

Regular file contents are cloned with a reflink (FICLONE) when the filesystem
can share extents; otherwise they are copied in the kernel with
copy_file_range, data segment by data segment (SEEK_DATA/SEEK_HOLE), which
keeps holes.  The destination must not exist; the caller publishes it
atomically once complete (cshare.store.shared).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CshareError
from .walk import Dir, walk

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_CHUNK = 1 << 30
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors meaning "this filesystem (pair) cannot clone": fall back to copying.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}


@dataclass
class CopyStats:
    """What one copy did."""

    entries: int = 0
    files: int = 0
    bytes: int = 0
    reflinked: int = 0
    hardlinks: int = 0
    specials: int = 0  # devices, fifos, sockets, whiteouts
    skipped_xattrs: list[str] = field(default_factory=list)
    #: xattr name -> how many entries had it, of those `drop_xattr` left behind
    dropped_xattrs: dict[str, int] = field(default_factory=dict)


class _Copier:
    """A walk visitor (cshare.tree.walk) that recreates each entry it visits below `dst`."""

    def __init__(
        self, src: Path, dst: Path, on_entry: Callable[[str], None] | None,
        drop_xattr: Callable[[str], bool] | None = None,
    ):
        self.src, self.dst = src, dst
        self.stats = CopyStats()
        self.on_entry = on_entry
        self.drop_xattr = drop_xattr
        self.links: dict[tuple[int, int], str] = {}  # (dev, ino) -> path below the destination root
        self.reflink_ok: bool | None = None  # learnt on the first regular file
        #: The open destination directory of each source directory the walk holds open.
        self.dst_fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self.dst_fds.values():
            os.close(fd)
        self.dst_fds.clear()

    # ---------------------------------------------------------------- walking
    def _count(self, rel: str) -> None:
        self.stats.entries += 1
        if self.on_entry is not None:
            self.on_entry(rel)

    def enter(self, d: Dir, names: frozenset[str]) -> bool:
        if d.path == ".":
            return True  # copy_tree made and opened the destination root
        self._count(d.path)
        parent, _, name = d.path.rpartition("/")
        parent_fd = self.dst_fds[parent or "."]
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        self.dst_fds[d.path] = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        d.state["xattrs"] = names
        return True

    def leave(self, d: Dir) -> None:
        dfd = self.dst_fds.pop(d.path)
        try:
            self.finish_fd(d.fd, dfd, d.st, d.state.get("xattrs"))  # type: ignore[arg-type]
            os.utime(dfd, ns=(d.st.st_atime_ns, d.st.st_mtime_ns))
        finally:
            os.close(dfd)

    def file(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        rel = d.join(name)
        self._count(rel)
        if not self._linked(d, name, st):
            self.copy_file(fd, self.dst_fds[d.path], name, st, names)
            self._remember(st, rel)

    def special(self, d: Dir, name: str, st: os.stat_result) -> None:
        rel = d.join(name)
        self._count(rel)
        if self._linked(d, name, st):
            return
        mode, dst_dir = st.st_mode, self.dst_fds[d.path]
        if stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=d.fd)
            os.symlink(target, name, dir_fd=dst_dir)
            self.finish_path(d.fd, dst_dir, name, st, chmod=False)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            # mknod makes all four; a whiteout is simply char 0/0.
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst_dir)
            self.stats.specials += 1
            self.finish_path(d.fd, dst_dir, name, st, chmod=True)
        else:
            raise CshareError(f"{rel}: unknown file type {stat.S_IFMT(mode):o}; cannot copy it")
        self._remember(st, rel)

    def error(self, path: str, message: str) -> None:
        raise CshareError(f"copying {self.src} to {self.dst} failed at {path}: {message}")

    def other_filesystem(self, path: str) -> None:
        raise CshareError(
            f"copying {self.src} to {self.dst}: {path} is a mount point; a layer cannot hold one"
        )

    def _linked(self, d: Dir, name: str, st: os.stat_result) -> bool:
        """Make `name` another link to an inode copied before; False if it is new."""
        target = self.links.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
        if target is None:
            return False
        os.link(target, name, src_dir_fd=self.dst_fds["."], dst_dir_fd=self.dst_fds[d.path],
                follow_symlinks=False)
        self.stats.hardlinks += 1
        return True

    def _remember(self, st: os.stat_result, rel: str) -> None:
        if st.st_nlink > 1:
            self.links[(st.st_dev, st.st_ino)] = rel

    # ---------------------------------------------------------------- contents
    def copy_file(
        self, sfd: int, dst_dir: int, name: str, st: os.stat_result, names: frozenset[str]
    ) -> None:
        """Copy the regular file open as `sfd` (the walk checked its type) to `name` in `dst_dir`."""
        dfd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dst_dir,
        )
        try:
            if st.st_size and self.copy_data(sfd, dfd, st):
                self.stats.reflinked += 1
            self.finish_fd(sfd, dfd, st, names)
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dfd)
        self.stats.files += 1
        self.stats.bytes += st.st_size

    def copy_data(self, sfd: int, dfd: int, st: os.stat_result) -> bool:
        size = st.st_size
        if self.reflink_ok is not False:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
                self.reflink_ok = True
                return True
            except OSError as exc:
                if exc.errno not in _NO_REFLINK:
                    raise
                self.reflink_ok = False
        if st.st_blocks * 512 >= size:
            # Fully allocated (most files): no holes to look for.
            self.copy_range(sfd, dfd, 0, size)
            return False
        offset = 0
        while offset < size:
            try:
                data = os.lseek(sfd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            hole = os.lseek(sfd, data, os.SEEK_HOLE)
            self.copy_range(sfd, dfd, data, hole)
            offset = hole
        os.ftruncate(dfd, size)  # a trailing hole
        return False

    @staticmethod
    def copy_range(sfd: int, dfd: int, start: int, end: int) -> None:
        pos = start
        while pos < end:
            n = os.copy_file_range(sfd, dfd, min(end - pos, _CHUNK), pos, pos)
            if n == 0:  # the file shrank under us
                break
            pos += n

    # ---------------------------------------------------------------- metadata
    def copy_xattrs(self, src: int | str, dst: int | str, names: frozenset[str] | None = None) -> None:
        """Copy every xattr (`names`, when the walk listed them); paths are never followed
        (l*xattr), fds are used as they are."""
        follow = not isinstance(src, str)
        for attr in sorted(names) if names is not None else os.listxattr(src, follow_symlinks=follow):
            if self.drop_xattr is not None and self.drop_xattr(attr):
                dropped = self.stats.dropped_xattrs
                dropped[attr] = dropped.get(attr, 0) + 1
                continue
            try:
                value = os.getxattr(src, attr, follow_symlinks=follow)
                os.setxattr(dst, attr, value, follow_symlinks=follow)
            except OSError as exc:
                # security.* labels belong to the host's policy (SELinux, IMA) and
                # may be refused here; everything else must come across.
                refused = exc.errno in (errno.EOPNOTSUPP, errno.EPERM, errno.EACCES)
                if attr.startswith("security.") and refused:
                    self.stats.skipped_xattrs.append(attr)
                    continue
                raise

    def finish_fd(
        self, sfd: int, dfd: int, st: os.stat_result, names: frozenset[str] | None = None
    ) -> None:
        # chown first: it clears setuid/setgid and security.capability.
        os.fchown(dfd, st.st_uid, st.st_gid)
        os.fchmod(dfd, stat.S_IMODE(st.st_mode))
        self.copy_xattrs(sfd, dfd, names)

    def finish_path(
        self, src_dir: int, dst_dir: int, name: str, st: os.stat_result, chmod: bool
    ) -> None:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        if chmod:
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst_dir)
        # l*xattr through /proc/self/fd/N: the directory is pinned by its fd and
        # the last component is not followed.
        self.copy_xattrs(f"/proc/self/fd/{src_dir}/{name}", f"/proc/self/fd/{dst_dir}/{name}")
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


def copy_tree(
    src: Path,
    dst: Path,
    *,
    on_entry: Callable[[str], None] | None = None,
    drop_xattr: Callable[[str], bool] | None = None,
) -> CopyStats:
    """Copy the directory `src` to the new directory `dst` (which must not exist).

    `on_entry(relative_path)` is called for every entry below the root, for
    progress.  xattrs for which `drop_xattr(name)` is true are not copied
    (counted in the stats' `dropped_xattrs`): make-shared leaves an image's
    own override records behind this way.  Raises CshareError on anything
    that cannot be copied exactly; the partial `dst` is then left for the
    caller to remove.
    """
    try:
        src_fd = os.open(src, _DIR_FLAGS)  # O_NOFOLLOW: the root itself must not be a symlink
    except OSError as exc:
        raise CshareError(f"cannot open layer directory {src}: {exc.strerror}") from None
    copier = _Copier(src, dst, on_entry, drop_xattr)
    try:
        os.mkdir(dst, 0o700)
        copier.dst_fds["."] = os.open(dst, _DIR_FLAGS)
        # The walk opens its root by path: give it the directory opened above.
        walk(Path(f"/proc/self/fd/{src_fd}"), copier)
    except OSError as exc:
        where = exc.filename or src
        raise CshareError(
            f"copying {src} to {dst} failed at {where}: {exc.strerror or exc}"
        ) from None
    finally:
        copier.close()
        os.close(src_fd)
    return copier.stats
