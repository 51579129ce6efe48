"""The `test` plugin: a converted layer shown with its original owners, modes and types.

fuse-overlayfs's first plugin, redone: `cshare convert` (or containers/storage
with force_mask) leaves every entry of a layer at mode 0755, root-owned, and
records what it really was in an override xattr.  Served through this plugin,
the layer looks like the original again, so an unprivileged user's container
sees root's 0600 files as root's, uid 33's files as 33's, setuid bits, devices
and fifos.

Usage: `lowerdir=//test//PATH` (or `//test///ABS/PATH`).  DATA is reserved and
must be empty, so that a later version can give it a meaning without changing
what existing command lines do.

Per entry:
- an override in any accepted form (user.containers.override_stat with 4 or 3
  fields, user.fuseoverlayfs.override_stat, security.fuseoverlayfs.override_stat,
  user.original-permissions MODE:UID:GID) gives owner, group, mode and, when
  recorded, the type (an empty regular stand-in whose TYPE says char-1-3, pipe
  or socket is reported as that device, fifo or socket again, with its rdev);
- a symlink carries no override (the kernel refuses user xattrs on it) and is
  reported as owned by 0:0 with its own mode;
- anything else without an override is reported as it is;
- file capabilities come back too: `cshare make-shared` moves a file's
  `security.capability` to `user.cshare.capability` (on the host any user
  could otherwise run the file with them), and this plugin reports that
  record as `security.capability` again.  Through a mount made in a user
  namespace the kernel honours it relative to that namespace's root only;
- a malformed override, or one that contradicts the entry (a directory recorded
  as a file, a non-empty stand-in for a device), raises OverrideError: the
  overlay answers EIO for that entry and logs it, rather than guessing.

Written only against cshare_fuse.plugin_api, exactly as a third party would.
"""

from __future__ import annotations

import errno
import os
import stat

from cshare_fuse.plugin_api import (
    ALL_METHODS,
    API_VERSION,
    CAPABILITY_XATTR,
    STASHED_CAPABILITY_XATTR,
    DataSource,
    OverrideError,
    Stat,
)

#: Types a converted tree stores as an empty regular file (no user xattrs on them).
_STAND_IN_TYPES = frozenset({stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK})


class OverrideSource(DataSource):
    """A layer directory whose entries report their override records."""

    honour_overrides = True
    #: Every method is a local syscall or two: none leaves the request loop.
    inline = ALL_METHODS

    def describe(self) -> str:
        return f"//test//{os.fsdecode(self.root)}"

    def stat(self, path: bytes) -> Stat:
        st = self.raw_stat(path)
        if stat.S_ISLNK(st.mode):
            return st.replace(uid=0, gid=0)
        record = self.override(path, st)
        if record is None:
            return st
        recorded = record.file_type
        if recorded is not None and recorded != st.file_type:
            stand_in = st.file_type == stat.S_IFREG and recorded in _STAND_IN_TYPES
            if not stand_in:
                raise OverrideError(f"{self.describe()}/{os.fsdecode(path)}: the override "
                                    f"records type {record.type_name()} but the entry is "
                                    f"{_kind(st.mode)}")
            if st.size != 0:
                raise OverrideError(f"{self.describe()}/{os.fsdecode(path)}: stand-in for "
                                    f"{record.type_name()} is not empty ({st.size} bytes)")
        return st.with_override(record)

    def getxattr(self, path: bytes, name: str) -> bytes:
        if name == CAPABILITY_XATTR:
            try:
                return super().getxattr(path, STASHED_CAPABILITY_XATTR)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise  # otherwise: a real one, if the layer has it
        return super().getxattr(path, name)

    def listxattr(self, path: bytes) -> list[str]:
        names = super().listxattr(path)
        if STASHED_CAPABILITY_XATTR in names and CAPABILITY_XATTR not in names:
            names.append(CAPABILITY_XATTR)
        return names


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symlink"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a fifo"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return f"of type {stat.S_IFMT(mode):o}"


class TestPlugin:
    """The `plugin` object: name, API version, and one data source per layer."""

    __test__ = False  # not a pytest test class, despite the name

    name = "test"
    api_version = API_VERSION

    def load(self, data: str, path: str) -> DataSource:
        if data:
            raise ValueError(f"DATA must be empty for the test plugin (got {data!r}): "
                             "use //test//PATH")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such directory")
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} is not a directory")
        return OverrideSource(path)


plugin = TestPlugin()
