"""The `tar` plugin: a lower layer served from a tar archive, extracted on demand.

Usage: `lowerdir=//tar/ARCHIVE/PATH`.  PATH is a directory (the cache) that
holds the archive; ARCHIVE is the archive's file name inside it (DATA cannot
hold a '/'), and empty DATA means `layer.tar`.  So `//tar//cache` serves
`cache/layer.tar` and `//tar/base.tar.gz//srv/cache` serves
`/srv/cache/base.tar.gz`.  Uncompressed archives are read by seeking straight
to a member; compressed ones (gzip, bzip2, xz) work but each extraction may
decompress from the start.

How it loads on demand:
- `load` reads only the archive's headers and builds an index (names, types,
  owners, modes, times, symlink targets, hardlinks, xattrs from PAX
  `SCHILY.xattr.*` records).  Nothing is extracted.
- Directory listings, symlink targets, xattrs and existence are answered from
  the index.
- An entry is created in `PATH/root/` when the overlay first looks it up
  (`on_lookup`, or failing that its first stat or open): its parent directories
  first; directories, symlinks and hardlinks as themselves; a regular file as
  an empty file of its own (created in `PATH/tmp/` and renamed into place, so
  its inode number is fixed from then on).  Its data is extracted into it only
  when it is first opened.  So listing a directory with attributes (`ls -l`,
  which looks up every entry) costs no file data; reading a file extracts that
  file alone.  A hardlink shares the inode of the first name of its file in the
  archive, which is created with it.
- A file counts as extracted when its size is the archive's: data is written
  under an exclusive flock (another mount of the same cache may be at it too)
  and synced before anyone reads it, and a file found shorter is extracted
  again.
- Owner, group, mode, type, size and times are reported from the archive, not
  from the extracted copy: that copy is owned by whoever runs the mount and
  always readable and writable by it (a 0555 directory must still take its
  children later).  Devices, fifos and sockets are created as empty regular
  files and reported with their real type and device number.
- `PATH/stamp` records which archive (name, size, mtime) `root/` was
  extracted from; a different archive empties `root/` at the next load.  Use
  one cache directory per archive.

Safety: an archive with an absolute member name, a `..` component, a member
below a non-directory, or a hardlink to something that is not an earlier
non-directory member is refused as a whole when loading.  Extraction walks
directories with O_NOFOLLOW, so nothing is ever written outside `PATH/root`.

If the archive's root entry carries an override xattr (a converted tree packed
with `tar --xattrs`), the layer honours overrides like a converted directory.
DATA must not contain ',' or ':' (the option syntax uses them).

Written only against cshare_fuse.plugin_api, exactly as a third party would;
the index tree it shares with the registry plugin (plugins/index_tree) is too.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import shutil
import stat
import tarfile
import threading
from dataclasses import dataclass

from cshare_fuse.plugin_api import (
    ALL_METHODS,
    ALL_OVERRIDE_XATTRS,
    API_VERSION,
    DataSource,
    Stat,
)
from plugins.index_tree import IndexBuilder, IndexedSource, Node, basename, layer_path, parent

DEFAULT_ARCHIVE = "layer.tar"
_XATTR_PREFIX = "SCHILY.xattr."
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ArchiveError(ValueError):
    """The archive is unsafe or inconsistent: it is refused before mounting."""


@dataclass
class Entry(Node):
    """One name of the archive, as the layer reports it."""

    member: tarfile.TarInfo | None = None  # None for a directory the archive only implies


def _type_bits(member: tarfile.TarInfo) -> int:
    if member.isdir():
        return stat.S_IFDIR
    if member.issym():
        return stat.S_IFLNK
    if member.ischr():
        return stat.S_IFCHR
    if member.isblk():
        return stat.S_IFBLK
    if member.isfifo():
        return stat.S_IFIFO
    if member.isreg():
        return stat.S_IFREG
    raise ArchiveError(f"member {member.name!r} has unsupported tar type {member.type!r}")


def _entry_of(member: tarfile.TarInfo) -> Entry:
    xattrs = {
        key[len(_XATTR_PREFIX):]: value.encode("utf-8", "surrogateescape")
        for key, value in member.pax_headers.items()
        if key.startswith(_XATTR_PREFIX)
    }
    ftype = _type_bits(member)
    is_dev = ftype in (stat.S_IFCHR, stat.S_IFBLK)
    return Entry(
        mode=ftype | (member.mode & 0o7777),
        uid=member.uid,
        gid=member.gid,
        size=member.size if ftype == stat.S_IFREG else 0,
        mtime_ns=int(round(member.mtime * 1_000_000_000)),
        rdev=os.makedev(member.devmajor, member.devminor) if is_dev else 0,
        symlink=os.fsencode(member.linkname) if ftype == stat.S_IFLNK else b"",
        member=member,
        xattrs=xattrs,
    )


def _normalize(name: str, what: str) -> bytes:
    """A member name as a layer path; tarfile decoded it with the file system encoding."""
    return layer_path(os.fsencode(name), name, what, ArchiveError)


def build_index(members: list[tarfile.TarInfo], default_mtime_ns: int) -> dict[bytes, Entry]:
    """Every name of the archive (and the directories it implies), by layer path."""
    builder = IndexBuilder(
        Entry(mode=stat.S_IFDIR | 0o755, mtime_ns=default_mtime_ns),
        lambda: Entry(mode=stat.S_IFDIR | 0o755, mtime_ns=default_mtime_ns),
        ArchiveError, "member")
    for member in members:
        path = _normalize(member.name, "member")
        if member.islnk():
            target = _normalize(member.linkname, f"hardlink {member.name!r} ->")
            linked = builder.hardlink(path, target, member.name, member.linkname)
            if linked is None:
                continue  # a link to itself changes nothing
            linked.member = member  # its own header; the data is the first name's
            entry = linked
        else:
            entry = _entry_of(member)
        builder.add(path, entry, member.name)
    return builder.finish()


class TarSource(IndexedSource[Entry]):
    """A layer whose tree is the index of a tar archive, extracted into `cache/root`.

    Names, listings, symlinks and xattrs are answered from the index (IndexedSource).
    """

    #: Answers come from the index in memory and from creating empty entries;
    #: only `open` may take long (it extracts the file's data, decompressing a
    #: compressed archive from its start), so it runs in the overlay's pool
    #: unless `may_block` finds the data already there.
    inline = ALL_METHODS - {"open"}

    def __init__(self, archive: str, cache: str) -> None:
        self.archive = archive
        self.cache = cache
        root = os.path.join(cache, "root")
        self._tmp = os.path.join(cache, "tmp")
        self._prepare_cache(root)
        super().__init__(root)
        try:
            self._tar = tarfile.open(archive, "r:*")  # open for the mount's life
        except tarfile.TarError as exc:
            raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from None
        try:
            members = self._tar.getmembers()
            self.index = build_index(members, os.stat(archive).st_mtime_ns)
        except tarfile.TarError as exc:
            self._tar.close()
            raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from None
        except ArchiveError as exc:
            self._tar.close()
            raise ArchiveError(f"{archive}: {exc}") from None
        root_xattrs = self.index[b""].xattrs
        self.honour_overrides = any(name in root_xattrs for name in ALL_OVERRIDE_XATTRS)
        self._done: set[bytes] = {b""}  # paths created in root/
        self._filled: set[bytes] = set()  # first names of files whose data is in place
        self._lock = threading.RLock()  # one TarFile position; extraction is recursive
        self._counter = itertools.count()

    def describe(self) -> str:
        return f"//tar/{os.path.basename(self.archive)}/{self.cache}"

    # -- the cache ------------------------------------------------------------------
    def _prepare_cache(self, root: str) -> None:
        st = os.stat(self.archive)
        stamp = f"{os.path.basename(self.archive)} {st.st_size} {st.st_mtime_ns}\n"
        stamp_path = os.path.join(self.cache, "stamp")
        try:
            with open(stamp_path) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != stamp:
            # Extracted from another archive (or an unfinished first load): start again.
            for stale in (root, self._tmp):
                if os.path.lexists(stale):
                    shutil.rmtree(stale)
        os.makedirs(root, mode=0o755, exist_ok=True)
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        if current != stamp:
            with open(stamp_path + ".new", "w") as f:
                f.write(stamp)
            os.replace(stamp_path + ".new", stamp_path)

    def extracted(self) -> set[bytes]:
        """Layer paths created in root/ by this data source so far (for tests and logs)."""
        return set(self._done)

    def filled(self) -> set[bytes]:
        """Files whose data this data source extracted or found complete (for tests)."""
        return set(self._filled)

    # -- materialization -----------------------------------------------------------------
    def _open_dir(self, path: bytes) -> int:
        """An fd on the extracted directory `path`, walked without following symlinks."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in path.split(b"/") if path else ():
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _temp_name(self) -> str:
        return f"{os.getpid()}-{next(self._counter)}-{os.urandom(4).hex()}"

    def _ensure(self, path: bytes) -> None:
        """Extract `path` (and its parents) unless already done."""
        if path in self._done:
            return
        entry = self.entry(path)
        with self._lock:
            if path in self._done:
                return
            self._ensure(parent(path))
            if entry.link_to is not None:
                self._ensure(entry.link_to)
            self._extract(path, entry)
            self._done.add(path)

    def _extract(self, path: bytes, entry: Entry) -> None:
        name = basename(path)
        dir_fd = self._open_dir(parent(path))
        try:
            try:
                os.lstat(name, dir_fd=dir_fd)
                return  # extracted by an earlier mount of this cache: creation is atomic
            except FileNotFoundError:
                pass
            if entry.is_dir:
                try:
                    os.mkdir(name, 0o755, dir_fd=dir_fd)
                except FileExistsError:
                    pass
                return
            if entry.link_to is not None:
                source_fd = self._open_dir(parent(entry.link_to))
                try:
                    os.link(basename(entry.link_to), name, src_dir_fd=source_fd,
                            dst_dir_fd=dir_fd, follow_symlinks=False)
                except FileExistsError:
                    pass
                finally:
                    os.close(source_fd)
                return
            tmp_fd = os.open(self._tmp, _DIR_FLAGS)
            try:
                tmp_name = self._temp_name()
                if stat.S_ISLNK(entry.mode):
                    os.symlink(entry.symlink, tmp_name, dir_fd=tmp_fd)
                else:
                    self._write_file(entry, tmp_name, tmp_fd)
                os.rename(tmp_name, name, src_dir_fd=tmp_fd, dst_dir_fd=dir_fd)
            finally:
                os.close(tmp_fd)
        finally:
            os.close(dir_fd)

    def _write_file(self, entry: Entry, tmp_name: str, tmp_fd: int) -> None:
        """The file's own inode, empty: its data comes on first open (`_fill`)."""
        # Owner-writable so its data can be written later; what is reported comes
        # from the index.
        mode = 0o755 if entry.mode & 0o111 else 0o644
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode,
                     dir_fd=tmp_fd)
        os.close(fd)

    def _fill(self, path: bytes) -> None:
        """Put the data of the regular file `path` into its extracted inode."""
        entry = self.index[path]
        if not stat.S_ISREG(entry.mode) or entry.size == 0:
            return
        first = entry.link_to if entry.link_to is not None else path
        if first in self._filled:
            return
        with self._lock:
            if first in self._filled:
                return
            self._ensure(first)
            member = self.index[first].member
            assert member is not None  # a regular file always comes from a member
            dir_fd = self._open_dir(parent(first))
            try:
                fd = os.open(basename(first), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_size != entry.size:
                    os.ftruncate(fd, 0)
                    self._copy_member(member, fd)
                    # Synced before the size can be trusted as "complete" after a crash.
                    os.fdatasync(fd)
            finally:
                os.close(fd)  # releases the flock
            self._filled.add(first)

    def _copy_member(self, member: tarfile.TarInfo, fd: int) -> None:
        source = self._tar.extractfile(member)
        if source is None:
            raise OSError(errno.EIO, f"{self.archive}: no data for {member.name}")
        with source:
            while chunk := source.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]

    # -- the DataSource methods ----------------------------------------------------------
    def on_lookup(self, path: bytes) -> None:
        if path in self.index:
            self._ensure(path)

    def raw_stat(self, path: bytes) -> Stat:
        self._ensure(path)
        entry = self.index[path]
        disk = os.lstat(os.path.join(self.root, path) if path else self.root)
        size, blocks = entry.size, disk.st_blocks
        if stat.S_ISLNK(entry.mode):
            size = len(entry.symlink)
        elif entry.is_dir:
            size = disk.st_size
        else:
            blocks = max(blocks, (size + 511) // 512)  # what it will take once read
        return Stat(mode=entry.mode, ino=disk.st_ino, dev=disk.st_dev, nlink=entry.nlink,
                    uid=entry.uid, gid=entry.gid, rdev=entry.rdev, size=size,
                    blocks=blocks, blksize=disk.st_blksize, atime_ns=entry.mtime_ns,
                    mtime_ns=entry.mtime_ns, ctime_ns=entry.mtime_ns)

    def may_block(self, method: str, path: bytes) -> bool:
        """Only an open whose data is not extracted yet (a stat of the copy, at most)."""
        entry = self.index.get(path)
        if method != "open" or entry is None or not stat.S_ISREG(entry.mode):
            return False
        first = entry.link_to if entry.link_to is not None else path
        if entry.size == 0 or first in self._filled:
            return False
        try:
            done = os.lstat(os.path.join(self.root, first)).st_size == entry.size
        except OSError:
            return True  # not even created yet
        return not done

    def open(self, path: bytes, flags: int) -> int:
        self._ensure(path)
        self._fill(path)
        return super().open(path, flags)


class TarPlugin:
    """The `plugin` object: name, API version, and one data source per layer."""

    name = "tar"
    api_version = API_VERSION

    def load(self, data: str, path: str) -> DataSource:
        archive_name = data or DEFAULT_ARCHIVE
        if archive_name in (".", "..", "root", "tmp", "stamp"):
            raise ValueError(f"DATA {data!r} is not an archive file name")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such cache directory (it holds the archive)")
        archive = os.path.join(path, archive_name)
        if not os.path.isfile(archive):
            raise FileNotFoundError(f"{archive}: no such archive")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable: the tar plugin extracts into "
                                  f"{path}/root")
        return TarSource(archive, path)


plugin = TarPlugin()
