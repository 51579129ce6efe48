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
- `other-filesystem`: a mount point inside the tree, not checked;
- `mismatched-record`: a record cshare's convert cannot have written for the
  entry it is on: convert records the real owner, mode and type and then sets
  0755, so a record on an entry that is not 0755, of another type (a `dir`
  record on a file, a device record on a non-empty file, any `symlink`
  record), or (where owners are kept, i.e. outside the shared store) whose
  owner differs from the entry's, was forged (in an image: make-shared drops
  an image's own records) or changed since.  In a shared layer every record
  must also be under cshare's own name: make-shared writes no other.

It also computes `records_digest`, a SHA-256 over every entry's path and its
xattrs in the override and bookkeeping namespaces (not trusted.*, which users
cannot read), independent of listing order.  make-shared keeps it with each
layer it publishes; the command compares it (`records-changed`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cshare_fuse.formats import markers
from cshare_fuse.formats.overrides import (
    ALL_OVERRIDE_XATTRS,
    OVERRIDE_XATTR,
    Override,
    OverrideError,
    read_override,
)

from . import marks
from .walk import Dir, walk

_OVERRIDE_NAMES = frozenset(ALL_OVERRIDE_XATTRS)
#: The key of a published layer's metadata that holds the digest of its records.
RECORDS_DIGEST_KEY = "cshare-records-digest"


@dataclass(frozen=True)
class Finding:
    kind: str
    path: str
    detail: str


@dataclass
class VerifyReport:
    entries: int = 0
    findings: list[Finding] = field(default_factory=list)
    records_digest: str = ""

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "records_digest": self.records_digest,
            "findings": [{"kind": f.kind, "path": f.path, "detail": f.detail} for f in self.findings],
        }


def _recorded(name: str) -> bool:
    """The xattrs the records digest covers: what decides how an entry is shown."""
    return markers.is_internal_xattr(name) and not name.startswith("trusted.")


def records_digest(lines: list[bytes]) -> str:
    """The digest of a tree's records, given one line per recorded xattr (any order)."""
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line)
    return h.hexdigest()


def mismatch(st: os.stat_result, override: Override, owners_kept: bool) -> str | None:
    """Why `override` cannot be what convert recorded for the entry `st`, else None."""
    problem = _mismatch(st, override, owners_kept)
    if problem is None:
        return None
    said = override.format().decode() if override.file_type is not None else (
        f"{override.uid}:{override.gid}:{override.mode:04o}")
    return f"record {said}{problem}"


def _mismatch(st: os.stat_result, override: Override, owners_kept: bool) -> str | None:
    # Runs once per entry: the message is only built by `mismatch` when needed.
    real_dir = stat.S_ISDIR(st.st_mode)
    claimed = override.file_type
    if claimed is not None and claimed != stat.S_IFREG and not (claimed == stat.S_IFDIR and real_dir):
        if claimed == stat.S_IFLNK:
            return ": convert never records a symlink"
        if (claimed == stat.S_IFDIR) != real_dir:
            return f" on a {'directory' if real_dir else 'file'}"
        if st.st_size != 0:
            return " on a non-empty file (convert leaves an empty one for a device)"
    elif claimed == stat.S_IFREG and real_dir:
        return " on a directory"
    perm = st.st_mode & 0o7777
    if perm != 0o755:
        return f" on an entry of mode {perm:04o}; convert leaves 0755"
    if owners_kept and (override.uid != st.st_uid or override.gid != st.st_gid):
        return f" on an entry owned by {st.st_uid}:{st.st_gid}; convert records the real owner"
    return None


class Verifier:
    """The walk visitor of `cshare verify`; make-shared runs it inside its own layer check."""

    def __init__(self, owners_kept: bool = True) -> None:
        self.report = VerifyReport()
        self.is_root = os.geteuid() == 0
        self.owners_kept = owners_kept
        self.records: list[bytes] = []

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
        values = self._records(fd, names, path)
        if not names or names.isdisjoint(_OVERRIDE_NAMES):
            if not whiteout:
                self._add("not-converted", path, "no override record")
            return
        try:
            found = read_override(values.get)
        except OverrideError as exc:
            self._add("unparsable", path, str(exc))
            return
        assert found is not None
        problem = mismatch(st, found[1], self.owners_kept)
        if problem is None and not self.owners_kept and found[0] != OVERRIDE_XATTR:
            problem = f"record under {found[0]}: make-shared writes only {OVERRIDE_XATTR}"
        if problem is not None:
            self._add("mismatched-record", path, problem)
        need = 0o005 if stat.S_ISDIR(mode) else 0o004
        if perm & need != need:
            self._add("not-readable", path, f"mode {perm:04o}: other users cannot read it")


    def finish(self) -> VerifyReport:
        """The report, its records digest filled in, once the walk is over."""
        self.report.records_digest = records_digest(self.records)
        return self.report

    def _records(self, fd: int, names: frozenset[str], path: str) -> dict[str, bytes]:
        """The entry's recorded xattrs (read once: for the digest and for the override)."""
        values: dict[str, bytes] = {}
        for name in names:
            if _recorded(name):
                value = values[name] = os.getxattr(fd, name)
                # Length-prefixed fields: no value can be mistaken for another path or name.
                key, attr = path.encode("utf-8", "surrogateescape"), name.encode()
                self.records.append(b"%d:%s%d:%s%d:%s" % (
                    len(key), key, len(attr), attr, len(value), value))
        return values


def verify_tree(root: Path, *, owners_kept: bool = True) -> VerifyReport:
    """Check the tree at `root`; the report is `.ok` when nothing was found.

    `owners_kept`: the tree keeps its original owners (as `cshare convert`
    leaves it), so a record must name its entry's owner; False for a layer of
    the shared store, which make-shared made root-owned.
    """
    verifier = Verifier(owners_kept)
    walk(Path(root), verifier)
    return verifier.finish()
