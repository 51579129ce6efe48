"""Making a converted layer safe to show every user, and checking that it is.

make-shared runs these on its own staged copy of a layer, after convert:
`secure_tree` takes every entry away from host users (root:root, file
capabilities set aside) and `unsafe_entries` lists what must still not be
published.  Both go through cshare.tree.walk (fd-based, iterative, never
following a symlink), so a layer of any depth is handled completely: a walk
by path name would stop, silently, where paths grow longer than PATH_MAX.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cshare_fuse.formats.markers import is_whiteout_stat
from cshare_fuse.formats.overrides import CAPABILITY_XATTR, STASHED_CAPABILITY_XATTR

from ..errors import CshareError
from .walk import Dir, walk


class _Securer:
    """secure_tree's visitor: chown to root keeping the mode; capabilities set aside."""

    def __init__(self) -> None:
        self.changed = 0
        self.errors: list[str] = []

    def enter(self, d: Dir, names: frozenset[str]) -> bool:
        self._own(d.fd, d.st)
        return True

    def file(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        if CAPABILITY_XATTR in names:
            # Before the chown, which would clear security.capability.
            os.setxattr(fd, STASHED_CAPABILITY_XATTR, os.getxattr(fd, CAPABILITY_XATTR))
            os.removexattr(fd, CAPABILITY_XATTR)
            self.changed += 1
        self._own(fd, st)

    def special(self, d: Dir, name: str, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode) or (st.st_uid == 0 and st.st_gid == 0):
            return  # nobody can change a symlink
        os.chown(name, 0, 0, dir_fd=d.fd, follow_symlinks=False)
        self.changed += 1

    def _own(self, fd: int, st: os.stat_result) -> None:
        if st.st_uid == 0 and st.st_gid == 0:
            return
        os.fchown(fd, 0, 0)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)  # chown may drop bits; keep the converted mode
        self.changed += 1

    def leave(self, d: Dir) -> None:
        pass

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def other_filesystem(self, path: str) -> None:
        self.errors.append(f"{path}: a mount point inside the layer")


def secure_tree(tree: os.PathLike[str] | str) -> int:
    """Make a converted layer safe on the host; return how many entries changed.

    convert keeps host owners, but in the shared store a file owned by, say,
    uid 33 could be rewritten (or its override xattr forged) by whoever has
    uid 33 on the host.  So every entry but symlinks (which nobody can modify)
    becomes root:root.  File capabilities would let any host user run the file
    with privileges, like setuid: they move to `user.cshare.capability`.
    An entry the walk cannot reach is an error: the layer must not be published.
    """
    securer = _Securer()
    walk(Path(tree), securer)
    if securer.errors:
        raise CshareError(
            f"cannot make {tree} safe to share: {'; '.join(securer.errors[:3])}"
            f"{' …' if len(securer.errors) > 3 else ''}"
        )
    return securer.changed


class _Enough(Exception):
    """Ends an unsafe_entries walk once `limit` problems are found."""


class _Inspector:
    """unsafe_entries' visitor."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.problems: list[str] = []

    def _add(self, problem: str) -> None:
        self.problems.append(problem)
        if len(self.problems) >= self.limit:
            raise _Enough

    def enter(self, d: Dir, names: frozenset[str]) -> bool:
        self._check(d.path, d.st, names)
        return True

    def file(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        self._check(d.join(name), st, names)

    def special(self, d: Dir, name: str, st: os.stat_result) -> None:
        mode, rel = st.st_mode, d.join(name)
        if stat.S_ISLNK(mode):
            return  # symlinks may keep any owner: nobody can change one
        if is_whiteout_stat(mode, st.st_rdev):
            if st.st_uid != 0:
                self._add(f"{rel}: whiteout owned by uid {st.st_uid}, not root")
            return
        self._add(f"{rel}: special file (type {stat.S_IFMT(mode):o})")

    def _check(self, rel: str, st: os.stat_result, names: frozenset[str]) -> None:
        mode = st.st_mode
        if st.st_uid != 0:
            self._add(f"{rel}: owned by uid {st.st_uid}, not root")
        if mode & 0o022:
            self._add(f"{rel}: writable by group or others ({stat.S_IMODE(mode):04o})")
        if mode & 0o7000:
            self._add(f"{rel}: setuid/setgid/sticky ({stat.S_IMODE(mode):04o})")
        if stat.S_ISREG(mode) and CAPABILITY_XATTR in names:
            self._add(f"{rel}: has file capabilities")
        needed = 0o005 if stat.S_ISDIR(mode) else 0o004
        if mode & needed != needed:
            self._add(f"{rel}: not readable by users ({stat.S_IMODE(mode):04o})")

    def leave(self, d: Dir) -> None:
        pass

    def error(self, path: str, message: str) -> None:
        self._add(f"{path}: cannot be checked: {message}")

    def other_filesystem(self, path: str) -> None:
        self._add(f"{path}: a mount point inside the layer")


def unsafe_entries(tree: os.PathLike[str] | str, limit: int = 20) -> list[str]:
    """Entries a converted layer must not contain, as `path: reason` (at most `limit`).

    Every user may read the shared store, so a layer may hold nothing writable
    by anyone but root, no setuid/setgid/sticky bits, no device nodes, fifos or
    sockets (a whiteout, char 0/0, is fine), no file capabilities, and
    nothing users cannot read.  Symlinks may keep any owner: nobody can change one.
    Paths are relative to `tree` ("." is its root).
    """
    inspector = _Inspector(limit)
    try:
        walk(Path(tree), inspector)
    except _Enough:
        pass
    return inspector.problems
