"""Open files and directories: the numbers handed to the kernel as `fh`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .inodes import Node


@dataclass
class FileHandle:
    fd: int
    node: Node
    writable: bool
    #: The layer `fd` is open on: a read-only handle opened before a copy-up
    #: still points at the lower file and must move to the copy.
    layer: int
    #: Writes through it take these setuid/setgid bits (AttributeOps.dropped_privileges).
    drops: int = 0


@dataclass
class DirHandle:
    node: Node
    #: The listing as it was when the reading started (offsets index into it).
    entries: list[tuple[bytes, Node | None]] | None = field(default=None)


class HandleTable:
    def __init__(self) -> None:
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._numbers = itertools.count(1)

    def add(self, handle: FileHandle | DirHandle) -> int:
        number = next(self._numbers)
        self._handles[number] = handle
        return number

    def file(self, number: int) -> FileHandle:
        handle = self._handles[number]
        assert isinstance(handle, FileHandle)
        return handle

    def directory(self, number: int) -> DirHandle:
        handle = self._handles[number]
        assert isinstance(handle, DirHandle)
        return handle

    def pop(self, number: int) -> FileHandle | DirHandle | None:
        return self._handles.pop(number, None)
