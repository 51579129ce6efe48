"""`cshare verify`: check that a tree is converted and safe to share.

Finds, per entry (kinds are stable strings scripts may match):

- `not-converted`: a file or directory without any override record (`.wh.*`
  whiteout files, which carry no content, are accepted either way);
- `unparsable`: an override value that does not parse;
- `world-writable`, `setuid`, `setgid`: dangerous modes left on the host
  (a converted entry is 0755; its original mode lives in the record);
- `not-readable`: a converted entry others cannot read (or enter);
- `device`: a device node, fifo or socket left on the host (a character
  device 0/0 is a whiteout and accepted);
- `hidden-opaque`: `trusted.overlay.opaque` without a user-visible marker
  (only root can see trusted.*, so this is checked only when run as root);
- `incomplete`: traces of an interrupted convert or restore (temporary
  entries, directory-time marks): run convert again;
- `other-filesystem`: a mount point inside the tree, not checked.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cshare_fuse.formats import markers
from cshare_fuse.formats.overrides import ALL_OVERRIDE_XATTRS, OverrideError, read_override

from . import marks
from .walk import Dir, walk

_OVERRIDE_NAMES = frozenset(ALL_OVERRIDE_XATTRS)


@dataclass(frozen=True)
class Finding:
    kind: str
    path: str
    detail: str


@dataclass
class VerifyReport:
    entries: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "findings": [{"kind": f.kind, "path": f.path, "detail": f.detail} for f in self.findings],
        }


class Verifier:
    """The walk visitor of `cshare verify`; make-shared runs it inside its own layer check."""

    def __init__(self) -> None:
        self.report = VerifyReport()
        self.is_root = os.geteuid() == 0

    def _add(self, kind: str, path: str, detail: str) -> None:
        self.report.findings.append(Finding(kind, path, detail))

    def enter(self, d: Dir, names: frozenset[str]) -> bool:
        self.report.entries += 1
        if marks.TIMES_XATTR in names:
            self._add("incomplete", d.path, "directory-time mark of an interrupted run")
        if (
            self.is_root
            and markers.TRUSTED_OPAQUE in names
            and markers.USER_OPAQUE not in names
            and os.getxattr(d.fd, markers.TRUSTED_OPAQUE) == b"y"
        ):
            self._add("hidden-opaque", d.path, "trusted.overlay.opaque=y is invisible to users")
        self._check(d.fd, d.st, names, d.path, whiteout=False)
        return True

    def file(self, d: Dir, name: str, fd: int, st: os.stat_result, names: frozenset[str]) -> None:
        self.report.entries += 1
        path = d.join(name)
        if marks.is_temporary(name):
            self._add("incomplete", path, "temporary file of an interrupted run")
            return
        self._check(fd, st, names, path, whiteout=markers.is_whiteout_file(name, st.st_size))

    def special(self, d: Dir, name: str, st: os.stat_result) -> None:
        self.report.entries += 1
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            return
        path = d.join(name)
        if markers.is_whiteout_stat(mode, st.st_rdev):
            return  # whiteout
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "char" if stat.S_ISCHR(mode) else "block"
            self._add("device", path, f"{kind} device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} on the host")
        else:
            self._add("device", path, f"{'fifo' if stat.S_ISFIFO(mode) else 'socket'} on the host")

    def leave(self, d: Dir) -> None:
        pass

    def error(self, path: str, message: str) -> None:
        self._add("unreadable", path, message)

    def other_filesystem(self, path: str) -> None:
        self._add("other-filesystem", path, "a mount point; not checked")

    def _check(self, fd: int, st: os.stat_result, names: frozenset[str], path: str, whiteout: bool) -> None:
        mode = st.st_mode
        perm = stat.S_IMODE(mode)
        if perm & stat.S_IWOTH:
            self._add("world-writable", path, f"mode {perm:04o}")
        if perm & stat.S_ISUID:
            self._add("setuid", path, f"mode {perm:04o}")
        if perm & stat.S_ISGID and not stat.S_ISDIR(mode):
            self._add("setgid", path, f"mode {perm:04o}")
        elif perm & stat.S_ISGID:
            self._add("setgid", path, f"directory mode {perm:04o}")
        if not names or names.isdisjoint(_OVERRIDE_NAMES):
            if not whiteout:
                self._add("not-converted", path, "no override record")
            return
        try:
            read_override(lambda n: os.getxattr(fd, n) if n in names else None)
        except OverrideError as exc:
            self._add("unparsable", path, str(exc))
            return
        need = 0o005 if stat.S_ISDIR(mode) else 0o004
        if perm & need != need:
            self._add("not-readable", path, f"mode {perm:04o}: other users cannot read it")


def verify_tree(root: Path) -> VerifyReport:
    """Check the tree at `root`; the report is `.ok` when nothing was found."""
    verifier = Verifier()
    walk(Path(root), verifier)
    return verifier.report
