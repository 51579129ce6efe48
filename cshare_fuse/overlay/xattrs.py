"""Extended attributes: get, list, set, remove; the overlay's own names stay hidden."""

from __future__ import annotations

import errno
import os

import pyfuse3

from ..errors import OverlayError
from ..formats import markers
from ..inodes import Node
from ..layers import Layer
from .base import OverlayBase


class XattrOps(OverlayBase):
    def _xattr_layer(self, node: Node) -> Layer:
        if self.config.noxattrs:
            raise OverlayError(errno.ENOTSUP)
        return self.layers[node.layer]

    def getxattr(self, ino: int, name: str) -> bytes:
        node = self.node(ino)
        layer = self._xattr_layer(node)
        if markers.is_internal_xattr(name):
            raise OverlayError(pyfuse3.ENOATTR)
        return layer.getxattr(node.path(), name)

    def listxattr(self, ino: int) -> list[str]:
        node = self.node(ino)
        layer = self._xattr_layer(node)
        return [n for n in layer.listxattr(node.path()) if not markers.is_internal_xattr(n)]

    async def setxattr(self, ino: int, name: str, value: bytes) -> None:
        node = self.node(ino)
        self._xattr_layer(node)
        if markers.is_internal_xattr(name):
            raise OverlayError(errno.EPERM, f"{name} belongs to the overlay")
        await self.ensure_upper(node)
        assert self.upper is not None
        os.setxattr(self.upper.real(node.path()), name, value, follow_symlinks=False)

    async def removexattr(self, ino: int, name: str) -> None:
        node = self.node(ino)
        self._xattr_layer(node)
        if markers.is_internal_xattr(name):
            raise OverlayError(errno.EPERM, f"{name} belongs to the overlay")
        if node.layer != self.upper_index:
            # Nothing to remove is no reason to copy up (the kernel checks first too).
            self.layers[node.layer].getxattr(node.path(), name)
        await self.ensure_upper(node)
        assert self.upper is not None
        os.removexattr(self.upper.real(node.path()), name, follow_symlinks=False)
