"""The node table's compact state (issue 14, point 5) keeps the behaviour it replaced.

Nodes share immutable empty containers until they need their own; a lower
node gives up its Stat once its kernel-facing entry exists, and a directory
keeps its listing as names.  Each shortcut must be invisible: these tests
drive the overlay's plain methods (no FUSE) on a real tree and check that
what one node gets never shows up on another, and that what an operation
reads after the Stat went is what it read before.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from cshare_fuse import main
from cshare_fuse.inodes import Node
from cshare_fuse.options import parse_command_line
from cshare_fuse.overlay import Overlay


def make_overlay(tmp_path: Path) -> Overlay:
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (lower / "d" / name).write_text(name)
    for sub in ("upper", "work", "mnt"):
        (tmp_path / sub).mkdir()
    config = parse_command_line(["-o", f"lowerdir={lower},upperdir={tmp_path}/upper,workdir={tmp_path}/work",
                                 str(tmp_path / "mnt")])
    layout = main.check_layout(config)
    return Overlay(config, layout.layers(), layout.upper, layout.work)


def walk(ov: Overlay, ino: int = 1) -> list[Node]:
    seen = []
    handle = ov.opendir(ino)
    for name, node in ov.dir_entries(handle, 0):
        if name in (b".", b".."):  # readdir gives them first, as the kernel does
            continue
        ov.attributes(node)
        seen.append(node)
        if node.is_dir:
            seen += walk(ov, node.ino)
    ov.releasedir(handle)
    return seen


def test_what_one_node_gets_never_shows_on_another(tmp_path: Path) -> None:
    ov = make_overlay(tmp_path)
    nodes = walk(ov)
    files = [n for n in nodes if not n.is_dir]
    first, second = files[0], files[1]
    assert first.aliases is second.aliases  # shared while empty ...
    parent = ov.node(first.parent.ino) if first.parent else ov.root
    first.add_alias(parent, b"other-name")
    ov.table.fd_opened(first, 99)
    assert (parent, b"other-name") in first.aliases and 99 in first.open_fds
    assert not second.aliases and not second.open_fds  # ... and never written through
    first.discard_alias(parent, b"other-name")
    ov.table.fd_closed(first, 99)
    assert not first.aliases and not first.open_fds
    second.discard_alias(parent, b"never-had-it")  # no error on the shared empty set
    assert not any(n.children for n in files)  # files never got a children dict


def test_a_lower_node_reads_the_same_attributes_after_its_stat_went(tmp_path: Path) -> None:
    ov = make_overlay(tmp_path)
    d = ov.lookup(1, b"d")
    assert d is not None
    node = ov.lookup(d.ino, b"b")
    assert node is not None
    before = ov.stat_of(node)
    entry = ov.attributes(node)
    assert node.lower_stat is None and node.entry is entry  # the Stat went, the entry stays
    after = ov.stat_of(node)  # read from the layer again
    assert after == before
    assert ov.attributes(node) is entry
    assert entry.st_size == os.stat(tmp_path / "lower" / "d" / "b").st_size


def test_a_listing_of_names_follows_changes_in_the_directory(tmp_path: Path) -> None:
    ov = make_overlay(tmp_path)
    d = ov.lookup(1, b"d")
    assert d is not None
    names = [name for name, _ in ov.listing(d)]
    assert sorted(names) == [b"a", b"b", b"c"]
    assert d.listing is not None and all(isinstance(n, bytes) for n in d.listing)

    async def change() -> None:
        await ov.unlink(d.ino, b"b")
        await ov.mkdir(d.ino, b"e", 0o755, os.getuid(), os.getgid())

    trio.run(change)
    pairs = ov.listing(d)
    assert sorted(name for name, _ in pairs) == [b"a", b"c", b"e"]
    for name, node in pairs:
        assert node.name == name and node.parent is d
    # A second reading comes from the kept names and gives the same nodes.
    assert ov.listing(d) == pairs

