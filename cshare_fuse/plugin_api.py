"""The stable, versioned contract between cshare-overlay and its plugins.

A plugin is a Python module (a .py file given to `-o plugins=`, an importable
module name, or an entry point in the group `cshare.plugins`) with a top-level
object `plugin` that has:

- `name`: the NAME used in `lowerdir=//NAME/DATA/PATH`;
- `api_version`: the `API_VERSION` it was written for;
- `load(data, path) -> DataSource`: the data source for one layer; `data` is the
  opaque DATA string (may be empty, never holds '/'), `path` the PATH made
  absolute against the directory cshare-overlay was started in (it may not
  exist: checking is the plugin's job).  Raising OSError or ValueError refuses
  the layer with that message; the mount does not start.

The data source is a subclass of `DataSource`; its defaults read the layer
directory directly, so a plugin overrides only what it needs (see
cshare-plugins(7)).  A source's methods run in a bounded pool of worker
threads unless it lists them in `inline` (they never wait long) or its
`may_block(method, path)` says a given call will not wait; `logger(name)`
is the plugin's logger, whose records reach the daemon's log.  Everything a
plugin may use is exported here; anything else
in cshare_fuse is private and may change without notice.

Versioning: API_VERSION changes only when a method is added with no default or
an existing signature changes.  A plugin whose api_version differs is refused
before mounting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .datasource import ALL_METHODS, DataSource, Stat, join
from .formats.overrides import (
    ALL_OVERRIDE_XATTRS,
    CAPABILITY_XATTR,
    OVERRIDE_XATTR,
    STASHED_CAPABILITY_XATTR,
    Override,
    OverrideError,
    parse_override,
    read_override,
)

API_VERSION = 1

#: The group third-party packages register their plugins under.
ENTRY_POINT_GROUP = "cshare.plugins"


if TYPE_CHECKING:
    import logging


def logger(name: str) -> logging.Logger:
    """The logger of plugin `name` ("cshare_fuse.plugin.NAME").

    Its records go to the daemon's log: the file named by CSHARE_OVERLAY_LOG,
    else stderr when cshare-overlay runs in the foreground (-f), else syslog;
    INFO and above, DEBUG too with -d.  That holds while `load()` runs and
    after the daemon has left the terminal, where `print` goes nowhere.
    """
    import logging

    return logging.getLogger(f"cshare_fuse.plugin.{name}")


@runtime_checkable
class Plugin(Protocol):
    """What the top-level `plugin` object of a plugin module must provide."""

    name: str
    api_version: int

    def load(self, data: str, path: str) -> DataSource: ...


__all__ = [
    "ALL_METHODS",
    "API_VERSION",
    "ALL_OVERRIDE_XATTRS",
    "CAPABILITY_XATTR",
    "STASHED_CAPABILITY_XATTR",
    "DataSource",
    "ENTRY_POINT_GROUP",
    "OVERRIDE_XATTR",
    "Override",
    "OverrideError",
    "Plugin",
    "Stat",
    "join",
    "logger",
    "parse_override",
    "read_override",
]
