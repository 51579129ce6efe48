"""cshare.tree.remove: a tree of any depth goes, and nothing a symlink in it points to."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cshare.tree.remove import remove_tree


def test_removes_a_chain_deeper_than_the_recursion_limit_and_follows_no_symlink(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    tree = tmp_path / "tree"
    tree.mkdir()
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    depth = sys.getrecursionlimit() + 500
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            os.symlink(str(outside), "link", dir_fd=fd)
            if level % 100 == 0:
                os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if level == depth // 2:
                os.fchmod(fd, 0o555)  # a staged layer keeps its 0555 directories
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    remove_tree(tree)
    assert not tree.exists()
    assert (outside / "keep").read_text() == "x"


def test_a_symlink_given_is_unlinked_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "link").symlink_to(target)
    remove_tree(tmp_path / "link")
    assert not (tmp_path / "link").exists() and (target / "keep").exists()
