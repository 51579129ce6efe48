"""Resolving a name, and listing a directory, top-down across the layers.

The rules are the kernel overlayfs's (redirect_dir=off): the topmost entry of a
name wins; a whiteout (char 0/0 or `.wh.NAME`) hides the name in every layer
below; a directory merges with directories of the same name below it until a
layer marks it opaque or holds a non-directory there.  Pure over the `Layer`
read interface: no node table, no writes.
"""

from __future__ import annotations

import stat as statmod
from collections.abc import Sequence
from typing import NamedTuple

from .datasource import Stat
from .formats.markers import OPAQUE_MARKER, WHITEOUT_PREFIX, is_whiteout_stat
from .layers import Layer, LowerLayer

NAME_MAX = 255


def child_path(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Resolved(NamedTuple):
    """Where a name lives: the winning layer, its attributes, what merges below.

    A named tuple, as Stat: one is made for every name a walk resolves.
    """

    layer: int
    stat: Stat
    dir_layers: tuple[int, ...]  # for a directory: every merged layer, top first
    has_lower: bool  # a lower layer shows this name: deleting it needs a whiteout


def _entry_in(layer: Layer, parent_path: bytes, name: bytes, path: bytes) -> Stat | None | bool:
    """The entry `name` (at `path`) in one layer: its Stat, None if absent, False if whited out."""
    if isinstance(layer, LowerLayer) and not layer.has(parent_path, name):
        # Listing the (immutable) directory once answers every miss.
        marker = WHITEOUT_PREFIX + name
        # A name too long to carry the prefix cannot have an AUFS-style whiteout.
        return False if len(marker) <= NAME_MAX and layer.has(parent_path, marker) else None
    st = layer.stat(path)
    if st is None:
        # An AUFS-style whiteout only matters where the name itself is absent.
        marker = WHITEOUT_PREFIX + name
        if len(marker) <= NAME_MAX and layer.stat(child_path(parent_path, marker)) is not None:
            return False
        return None
    if is_whiteout_stat(st.mode, st.rdev):
        return False
    return st


def resolve(layers: Sequence[Layer], parent_layers: Sequence[int], parent_path: bytes,
            name: bytes) -> Resolved | None:
    """Resolve `name` in the merged directory made of `parent_layers`."""
    path = child_path(parent_path, name)
    if len(parent_layers) == 1:
        # The parent lives in one layer (most directories of a walk): nothing
        # merges and nothing lies below to hide, so an opaque marker changes
        # nothing and the loop below reduces to this.
        index = parent_layers[0]
        layer = layers[index]
        entry = _entry_in(layer, parent_path, name, path)
        if entry is None or entry is False:
            return None
        assert isinstance(entry, Stat)
        return Resolved(index, entry, (index,) if statmod.S_ISDIR(entry.mode) else (),
                        not layer.is_upper)
    found: tuple[int, Stat] | None = None
    dir_layers: list[int] = []
    has_lower = False
    merging = True
    for index in parent_layers:
        layer = layers[index]
        entry = _entry_in(layer, parent_path, name, path)
        if entry is None:
            continue
        if entry is False:
            break  # whited out here: nothing below counts
        assert isinstance(entry, Stat)
        if not layer.is_upper:
            has_lower = True
        if found is None:
            found = (index, entry)
            if not statmod.S_ISDIR(entry.mode):
                if layer.is_upper:
                    continue  # keep looking only to learn whether a lower shows the name
                break
            dir_layers.append(index)
            if layer.is_opaque(path):
                merging = False
                if not layer.is_upper:
                    break
            continue
        # Below the winner: only directories merge, and only until something stops it.
        if not merging or not statmod.S_ISDIR(found[1].mode):
            break
        if not statmod.S_ISDIR(entry.mode):
            break
        dir_layers.append(index)
        if layer.is_opaque(path):
            break
    if found is None:
        return None
    return Resolved(found[0], found[1], tuple(dir_layers), has_lower)


def merged_names(layers: Sequence[Layer], dir_layers: Sequence[int], path: bytes) -> list[bytes]:
    """Candidate names of a merged directory, top layer first, markers left out.

    Whiteout character devices are not filtered here: the caller resolves each
    name anyway (readdirplus needs its attributes) and drops those that vanish.
    """
    seen: set[bytes] = set()
    hidden: set[bytes] = set()
    names: list[bytes] = []
    for index in dir_layers:
        layer_names = layers[index].names(path)
        for name in layer_names:
            if name.startswith(WHITEOUT_PREFIX):
                if name != OPAQUE_MARKER:
                    hidden.add(name[len(WHITEOUT_PREFIX):])
                continue
        for name in layer_names:
            if name.startswith(WHITEOUT_PREFIX) or name in seen:
                continue
            seen.add(name)
            names.append(name)
        # Names whited out in this layer are hidden from the layers below only:
        # entries of this same layer were already taken above.
        seen |= hidden
        hidden.clear()
    return names
