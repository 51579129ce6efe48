"""The registry plugin's file cache: verified file contents by digest, in a directory the user owns.

Layout under the cache root (mode 0700, owned by the mounting user):
`files/sha256/XX/HEX` holds the contents of a file whose sha256 is HEX
(read-only, 0400), `tmp/` holds files being written.  Contents are addressed
by digest, so every mount of the same layer by that user (and any other layer
holding the same file) shares one copy, and hardlinked names share it too.

Nothing unverified is ever served: a file is decompressed into `tmp/`, hashed
while it is written, and renamed into `files/` only when its size and digest
are the TOC's.  A file already in `files/` is hashed again the first time a
mount uses it (the cache may have been damaged on disk since); a damaged one is
removed and fetched again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading

import zstandard

_BLOCK = 1 << 20


def default_cache() -> str:
    """$XDG_CACHE_HOME/cshare/registry, by default ~/.cache/cshare/registry."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cshare", "registry")


class DigestMismatch(Exception):
    """Fetched or cached contents do not hash to the digest the TOC gives."""


def check_private_dir(path: str, what: str) -> None:
    """Refuse a directory someone else owns or may write: the cache decides what is served."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{what} {path} is owned by uid {st.st_uid}, not by the user "
                              f"who mounts (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise PermissionError(f"{what} {path} is writable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): make it 0700")


class FileCache:
    """Contents by digest below `root`."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        check_private_dir(self.root, "cache directory")
        self.files = os.path.join(self.root, "files", "sha256")
        self.tmp = os.path.join(self.root, "tmp")
        os.makedirs(self.files, mode=0o700, exist_ok=True)
        os.makedirs(self.tmp, mode=0o700, exist_ok=True)
        # All 256 fan-out directories up front: publishing a file is then one link.
        if len(os.listdir(self.files)) < 256:
            for n in range(256):
                os.makedirs(os.path.join(self.files, f"{n:02x}"), mode=0o700, exist_ok=True)
        self._local = threading.local()
        self._proc_fd, self._proc_pid = -1, -1

    def proc_fds(self) -> int:
        """An fd on /proc/self/fd, kept open (names an unnamed file by linkat)."""
        if self._proc_pid != os.getpid():  # opened before a fork, it names the parent's fds
            self._proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._proc_pid = os.getpid()
        return self._proc_fd

    def decompressor(self) -> zstandard.ZstdDecompressor:
        """This thread's decompressor (one may not be shared between threads)."""
        found = getattr(self._local, "decompressor", None)
        if found is None:
            found = self._local.decompressor = zstandard.ZstdDecompressor()
        return found

    def path(self, digest: str) -> str:
        hexpart = digest.partition(":")[2]
        return os.path.join(self.files, hexpart[:2], hexpart)

    def present(self, digest: str) -> bool:
        return os.path.exists(self.path(digest))

    def open_trusted(self, digest: str, flags: int = 0) -> int:
        """An fd on a file this mount has already verified."""
        return os.open(self.path(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags)

    def open_checked(self, digest: str, size: int, flags: int = 0) -> int | None:
        """An fd on the cached contents if they hash right; None if absent or damaged (removed)."""
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            good = stat.S_ISREG(st.st_mode) and st.st_size == size and _hash_fd(fd) == digest
        except BaseException:
            os.close(fd)
            raise
        if good:
            return fd
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return None

    def writer(self, digest: str, size: int) -> CacheWriter:
        return CacheWriter(self, digest, size)


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, _BLOCK, offset):
        h.update(block)
        offset += len(block)
    return "sha256:" + h.hexdigest()


class CacheWriter:
    """Decompress one file's frames into an unnamed file, hash them, and publish them if they verify."""

    def __init__(self, cache: FileCache, digest: str, size: int) -> None:
        self.cache, self.digest, self.size = cache, digest, size
        self._decoder = cache.decompressor().decompressobj(read_across_frames=True)
        self._hash = hashlib.sha256()
        self._written = 0
        self._tmp: str | None = None
        #: (inode, mtime, ctime) of the published file, for the mount's record of it.
        self.identity: tuple[int, int, int] | None = None
        # Read-only from the start (the fd is writable all the same): one fchmod
        # less per file, of the tens of thousands a full read publishes.
        try:  # unnamed until published: nothing partial ever has a name
            self._fd = os.open(cache.tmp, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o400)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self._tmp = os.path.join(cache.tmp, f"{os.getpid()}-{os.urandom(6).hex()}")
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o400)

    def feed(self, compressed: bytes | memoryview) -> None:
        try:
            data = self._decoder.decompress(compressed)
        except zstandard.ZstdError as exc:
            raise DigestMismatch(f"its frames do not decompress ({exc})") from None
        if not data:
            return
        self._written += len(data)
        if self._written > self.size:
            raise DigestMismatch(f"it decompresses to more than its {self.size} bytes")
        self._hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def finish(self) -> None:
        """Publish the file if it is complete and hashes to its digest; else DigestMismatch."""
        if self._written != self.size:
            raise DigestMismatch(f"it decompresses to {self._written} bytes, not {self.size}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise DigestMismatch(f"its contents hash to {actual}, the TOC says {self.digest}")
        final = self.cache.path(self.digest)
        if self._tmp is None:
            try:
                self._link(final)
            except FileExistsError:  # published meanwhile (maybe damaged): replace it
                self._tmp = os.path.join(self.cache.tmp, f"{os.getpid()}-{os.urandom(6).hex()}")
                self._link(self._tmp)
        if self._tmp is not None:
            os.replace(self._tmp, final)  # atomic: readers see the old file or the whole new one
            self._tmp = None
        st = os.fstat(self._fd)  # what it is now that it has its name (linking changes ctime)
        self.identity = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        os.close(self._fd)
        self._fd = -1

    def _link(self, name: str) -> None:
        """Give the unnamed file a name: linkat(/proc/self/fd/N, AT_SYMLINK_FOLLOW)."""
        os.link(str(self._fd), name, src_dir_fd=self.cache.proc_fds(), follow_symlinks=True)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            self._tmp = None
