"""hide: a third-party plugin written from cshare-plugins(7) alone, to prove the page.

`lowerdir=//hide/PATTERN/PATH` serves the directory PATH without the entries
whose name matches the shell pattern PATTERN (fnmatch; DATA cannot hold '/', so
it matches single names at any depth).  Empty PATTERN hides nothing.  It also
counts `on_lookup` calls, so a test can see when the overlay notifies it.

Loaded by the tests as `-o plugins=tests/thirdparty_plugin_example.py`.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading

from cshare_fuse.plugin_api import API_VERSION, DataSource, Stat


class HideSource(DataSource):
    def __init__(self, root: str, pattern: str) -> None:
        super().__init__(root)
        self.pattern = os.fsencode(pattern)
        self.lookups: list[bytes] = []
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"//hide/{os.fsdecode(self.pattern)}/{os.fsdecode(self.root)}"

    def _hidden(self, path: bytes) -> bool:
        if not self.pattern:
            return False
        return any(fnmatch.fnmatchcase(part, self.pattern) for part in path.split(b"/") if part)

    def _check(self, path: bytes) -> None:
        if self._hidden(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(path))

    def on_lookup(self, path: bytes) -> None:
        with self._lock:
            self.lookups.append(path)

    def raw_stat(self, path: bytes) -> Stat:
        self._check(path)
        return super().raw_stat(path)

    def exists(self, path: bytes) -> bool:
        return not self._hidden(path) and super().exists(path)

    def readdir(self, path: bytes) -> list[bytes]:
        self._check(path)
        return [n for n in super().readdir(path) if not fnmatch.fnmatchcase(n, self.pattern)]

    def readlink(self, path: bytes) -> bytes:
        self._check(path)
        return super().readlink(path)

    def open(self, path: bytes, flags: int) -> int:
        self._check(path)
        return super().open(path, flags)

    def getxattr(self, path: bytes, name: str) -> bytes:
        self._check(path)
        return super().getxattr(path, name)

    def listxattr(self, path: bytes) -> list[str]:
        self._check(path)
        return super().listxattr(path)


class HidePlugin:
    name = "hide"
    api_version = API_VERSION

    def load(self, data: str, path: str) -> DataSource:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such directory")
        return HideSource(path, data)


plugin = HidePlugin()
