"""A converted layer made safe to share and checked, in one walk before it is published.

Every user may read the shared store, so a layer may hold nothing writable
by anyone but root, no setuid/setgid/sticky bits, no device nodes, fifos or
sockets (a whiteout, char 0/0, is fine), no file capabilities, and nothing
users cannot read.  Symlinks may keep any owner: nobody can change one.

convert keeps host owners, but in the shared store a file owned by, say,
uid 33 could be rewritten (or its override xattr forged) by whoever has
uid 33 on the host.  So securing makes every entry but symlinks root:root,
and moves file capabilities (which would let any host user run the file
with privileges, like setuid) to `user.cshare.capability`.

make-shared secures each entry, checks it (the rules above and everything
`cshare verify` checks) and moves on: one walk of the layer (cshare.tree.walk,
through directory fds, never following a symlink, any depth) instead of one
walk per step.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cshare_fuse.formats.markers import is_whiteout_stat
from cshare_fuse.formats.overrides import CAPABILITY_XATTR, STASHED_CAPABILITY_XATTR

from ..tree.verify import Verifier
from ..tree.walk import Dir, walk

#: How many rule violations a check lists before it stops listing.
LIMIT = 20


class LayerGuard:
    """Walk visitor: secure each entry (`fix`), then check it (and run `verifier` on it)."""

    def __init__(self, fix: bool, verifier: Verifier | None = None, limit: int = LIMIT) -> None:
        self.fix = fix
        self.verifier = verifier
        self.limit = limit
        self.changed = 0
        self.problems: list[str] = []

    # ---------------------------------------------------------------- the walk
    def enter(self, d: Dir, names: frozenset[str]) -> bool:
        if self.fix:
            d.st = self._secure_fd(d.fd, d.st)
        self._check(d.path, d.st, names)
        return self.verifier.enter(d, names) if self.verifier else True

    def file(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        if self.fix:
            if CAPABILITY_XATTR in names:
                # Set aside before the chown, which would drop the capability.
                os.setxattr(fd, STASHED_CAPABILITY_XATTR, os.getxattr(fd, CAPABILITY_XATTR))
                os.removexattr(fd, CAPABILITY_XATTR)
                names = (names - {CAPABILITY_XATTR}) | {STASHED_CAPABILITY_XATTR}
                self.changed += 1
            st = self._secure_fd(fd, st)
        self._check(d.join(name), st, names)
        if self.verifier:
            self.verifier.file(d, name, fd, st, names)

    def special(self, d: Dir, name: str, st: os.stat_result) -> None:
        if self.fix and not stat.S_ISLNK(st.st_mode) and (st.st_uid or st.st_gid):
            mode = stat.S_IMODE(st.st_mode)
            os.chown(name, 0, 0, dir_fd=d.fd, follow_symlinks=False)
            st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
            if not stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(name, mode, dir_fd=d.fd)  # chown may drop bits; keep the converted mode
            self.changed += 1
        self._check(d.join(name), st, frozenset())
        if self.verifier:
            self.verifier.special(d, name, st)

    def leave(self, d: Dir) -> None:
        if self.verifier:
            self.verifier.leave(d)

    def error(self, path: str, message: str) -> None:
        self._problem(path, f"cannot be checked: {message}")
        if self.verifier:
            self.verifier.error(path, message)

    def other_filesystem(self, path: str) -> None:
        self._problem(path, "a mount point; not checked")
        if self.verifier:
            self.verifier.other_filesystem(path)

    # ---------------------------------------------------------------- the work
    def _secure_fd(self, fd: int, st: os.stat_result) -> os.stat_result:
        """root:root for the directory or file open as `fd`; its stat afterwards."""
        if st.st_uid == 0 and st.st_gid == 0:
            return st
        mode = stat.S_IMODE(st.st_mode)
        os.fchown(fd, 0, 0)
        after = os.fstat(fd)
        if stat.S_IMODE(after.st_mode) != mode:
            os.fchmod(fd, mode)  # chown may drop bits; keep the converted mode
            after = os.fstat(fd)
        self.changed += 1
        return after

    def _problem(self, path: str, reason: str) -> None:
        if len(self.problems) < self.limit:
            self.problems.append(f"{path}: {reason}")

    def _check(self, path: str, st: os.stat_result, names: frozenset[str]) -> None:
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            return
        if is_whiteout_stat(mode, st.st_rdev):
            if st.st_uid != 0:
                self._problem(path, f"whiteout owned by uid {st.st_uid}, not root")
            return
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            self._problem(path, f"special file (type {stat.S_IFMT(mode):o})")
            return
        perm = stat.S_IMODE(mode)
        if st.st_uid != 0:
            self._problem(path, f"owned by uid {st.st_uid}, not root")
        if mode & 0o022:
            self._problem(path, f"writable by group or others ({perm:04o})")
        if mode & 0o7000:
            self._problem(path, f"setuid/setgid/sticky ({perm:04o})")
        if stat.S_ISREG(mode) and CAPABILITY_XATTR in names:
            self._problem(path, "has file capabilities")
        needed = 0o005 if stat.S_ISDIR(mode) else 0o004
        if mode & needed != needed:
            self._problem(path, f"not readable by users ({perm:04o})")


def secure_tree(tree: Path) -> int:
    """Make a converted layer safe on the host (see above); return how many changes it took."""
    guard = LayerGuard(fix=True)
    walk(tree, guard)
    return guard.changed


def unsafe_entries(tree: Path, limit: int = LIMIT) -> list[str]:
    """Entries a converted layer must not contain, as `path: reason` (at most `limit`)."""
    guard = LayerGuard(fix=False, limit=limit)
    walk(tree, guard)
    return guard.problems


def secure_and_check(tree: Path) -> tuple[list[str], str]:
    """Secure the layer, then what still makes it unsafe (the rules above, then verify's
    findings) and the digest of its records, which make-shared keeps with the layer."""
    verifier = Verifier(owners_kept=False)  # securing made every entry root's
    guard = LayerGuard(fix=True, verifier=verifier)
    walk(tree, guard)
    report = verifier.finish()
    findings = [f"{f.path}: {f.kind} ({f.detail})" for f in report.findings]
    return guard.problems + findings, report.records_digest
