"""Changing attributes: setattr (chown, chmod, truncate, utimes).

Under xattr_permissions the owner and mode live in the override record of the
upper entry instead of its inode; everything else goes to the upper file (or,
for a removed but still open file, to its descriptor).
"""

from __future__ import annotations

import os
import stat as statmod

import pyfuse3

from ..caller import Caller, has_fsetid, in_group_or_capable
from ..formats.overrides import Override
from ..inodes import Node
from .base import OverlayBase


class AttributeOps(OverlayBase):
    async def setattr(self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, caller: Caller | None = None) -> pyfuse3.EntryAttributes:
        node = self.node(ino)
        # Even a setattr that changes nothing visible (times set to what they are)
        # copies up, as with the kernel's overlay: the file was "changed".  (A
        # chown(f, -1, -1) never gets here: the kernel's FUSE client sends nothing.)
        changing = (fields.update_mode or fields.update_uid or fields.update_gid
                    or fields.update_size or fields.update_atime or fields.update_mtime
                    or fields.update_ctime)
        if not changing:
            return self.attributes(node)
        if node.unlinked:
            return self._setattr_unlinked(node, attr, fields, fh)
        # Decided on the attributes before the change, as the kernel does.  A mode
        # sent along with an owner or size is the kernel's own removal of bits.
        strip = self.dropped_privileges(node, caller) if caller is not None and (
            fields.update_size or fields.update_uid or fields.update_gid) else 0
        await self.ensure_upper(node)
        assert self.upper is not None
        handle = self.handles.file(fh) if fh is not None and fh else None
        real = self.upper.real(node.path())
        target: bytes | int = handle.fd if handle is not None and node.unlinked else real
        record = self._upper_override(node) if self.copy_policy.override_xattr else None
        if fields.update_uid or fields.update_gid:
            record = self._change_owner(node, target, record, attr, fields)
        if node.file_type != statmod.S_IFLNK and (fields.update_mode or strip):
            if fields.update_mode:
                mode = statmod.S_IMODE(attr.st_mode)
            else:  # what chown left, less what the change takes
                mode = (record.mode if record is not None
                        else statmod.S_IMODE(self.stat_of(node).mode))
            mode &= ~strip
            record = self._change_mode(target, record, mode)
        if record is not None:
            name = self.copy_policy.override_xattr
            assert name is not None
            os.setxattr(real, name, record.format(), follow_symlinks=False)
        if fields.update_size:
            if handle is not None:
                os.ftruncate(handle.fd, attr.st_size)
            else:
                os.truncate(real, attr.st_size)
        if fields.update_atime or fields.update_mtime:
            current = self.stat_of(node)
            atime = attr.st_atime_ns if fields.update_atime else current.atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.mtime_ns
            if isinstance(target, int):
                os.utime(target, ns=(atime, mtime))
            else:
                os.utime(target, ns=(atime, mtime), follow_symlinks=False)
        return self.attributes(node)

    def dropped_privileges(self, node: Node, caller: Caller) -> int:
        """The setuid/setgid bits a write, truncate or chown by `caller` takes from `node`.

        The kernel's rule (setattr_should_drop_suidgid): for a regular file and
        a caller without CAP_FSETID, setuid goes, and setgid goes if
        group-execute is set or the caller is not in the file's group.  The
        kernel's FUSE code removes setuid and setgid-with-execute itself on
        write, truncate and chown, but not on open(O_TRUNC) and never setgid
        without execute: those are ours.
        """
        if node.file_type != statmod.S_IFREG:
            return 0
        # The mode alone first: most files have neither bit, and an upper node's
        # attributes would be built only to be thrown away (every open for writing).
        mode = node.entry.st_mode if node.entry is not None else self.stat_of(node).mode
        if not mode & (statmod.S_ISUID | statmod.S_ISGID):
            return 0
        bits = statmod.S_ISUID if mode & statmod.S_ISUID else 0
        if mode & statmod.S_ISGID and (mode & statmod.S_IXGRP or not in_group_or_capable(
                caller, self.attributes(node).st_gid)):
            bits |= statmod.S_ISGID
        if bits and has_fsetid(caller):
            return 0
        return bits

    def _change_owner(self, node: Node, target: bytes | int, record: Override | None,
                      attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
                      ) -> Override | None:
        uid = self.policy.stored_uid(attr.st_uid) if fields.update_uid else -1
        gid = self.policy.stored_gid(attr.st_gid) if fields.update_gid else -1
        if record is not None:
            return Override(uid if uid != -1 else record.uid,
                            gid if gid != -1 else record.gid,
                            record.mode & ~(statmod.S_ISUID | statmod.S_ISGID)
                            if not node.is_dir else record.mode,
                            record.file_type, record.rdev_major, record.rdev_minor)
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            os.chown(target, uid, gid, follow_symlinks=False)
        return None

    @staticmethod
    def _change_mode(target: bytes | int, record: Override | None, mode: int
                     ) -> Override | None:
        if record is not None:
            return Override(record.uid, record.gid, mode, record.file_type,
                            record.rdev_major, record.rdev_minor)
        if isinstance(target, int):
            os.fchmod(target, mode)
        else:
            os.chmod(target, mode)
        return None

    def _setattr_unlinked(self, node: Node, attr: pyfuse3.EntryAttributes,
                          fields: pyfuse3.SetattrFields, fh: int | None) -> pyfuse3.EntryAttributes:
        """A removed but still open file: change it through its descriptor, if it has one."""
        fds = [self.handles.file(fh).fd] if fh else list(node.open_fds)
        if node.layer != self.upper_index or not fds:
            return self.attributes(node)  # nothing of it is left to change
        fd = fds[0]
        if fields.update_mode:
            os.fchmod(fd, statmod.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.fchown(fd, self.policy.stored_uid(attr.st_uid) if fields.update_uid else -1,
                      self.policy.stored_gid(attr.st_gid) if fields.update_gid else -1)
        if fields.update_size:
            os.ftruncate(fd, attr.st_size)
        if fields.update_atime or fields.update_mtime:
            current = os.fstat(fd)
            os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                             attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns))
        return self.attributes(node)

    def _upper_override(self, node: Node) -> Override | None:
        """The override record of an upper entry under xattr_permissions (made if missing)."""
        assert self.upper is not None
        if node.file_type == statmod.S_IFLNK:
            return None
        existing = self.upper.override(node.path())
        if existing is not None:
            return existing
        st = self.stat_of(node)
        return Override.from_stat(st.mode, st.uid, st.gid, st.rdev)
