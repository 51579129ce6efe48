"""The overlay's operations as plain methods, one module per family.

`Overlay` implements each filesystem operation by node number and name,
raising OverlayError or OSError on failure.  It knows nothing of pyfuse3's
request objects: the thin handlers in `operations` call it, and tests can
drive it without FUSE.  Methods that may copy a large file up are async (the
copy runs in a worker thread, under a per-node lock); everything else runs
inline on the trio loop, because small syscalls cost less than a thread hop.
Plugin calls that may block are the exception: the read-only operations run
under `deferral.run_deferred`, which sends them to the plugin pool.

The families: `base` (layers, node table, names and lookup, copy-up),
`entries` (new names: mkdir, mknod, symlink, link), `files` (create, open and
handles), `dirs` (unlink, rmdir, rename, reading directories), `attributes`
(setattr) and `xattrs`.  Each family is a class over `OverlayBase`; `Overlay`
joins them and adds nothing.
"""

from __future__ import annotations

from .attributes import AttributeOps
from .dirs import DirOps
from .files import FileOps
from .xattrs import XattrOps


class Overlay(FileOps, DirOps, AttributeOps, XattrOps):
    """The whole overlay: every operation family over one tree."""


__all__ = ["Overlay"]
