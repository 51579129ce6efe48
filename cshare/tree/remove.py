"""Removing a whole tree: iterative, through directory fds, never following a symlink.

shutil.rmtree recurses once per directory level, so a layer with a chain of
a few thousand directories (an image can carry one) ends in RecursionError,
and a path-based removal fails where paths exceed PATH_MAX.  This walk keeps
its own stack of open directories (one fd per level) and unlinks relative to
them, so it removes a tree of any depth.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .walk import raise_fd_limit

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _open_child(parent: int, name: str) -> int:
    """Open subdirectory `name` for emptying; one its owner made unsearchable is opened up first."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=parent)  # not a symlink: _is_dir said so without following
        return os.open(name, _DIR_FLAGS, dir_fd=parent)


def _empty_files(fd: int) -> list[str]:
    """Unlink every non-directory of the open directory `fd`; return its subdirectories."""
    subdirs = []
    with os.scandir(fd) as entries:
        listing = list(entries)
    for entry in listing:
        if _is_dir(entry):
            subdirs.append(entry.name)
            continue
        try:
            os.unlink(entry.name, dir_fd=fd)
        except PermissionError:
            os.fchmod(fd, 0o700)  # a 0555 directory of a staged layer (not root)
            os.unlink(entry.name, dir_fd=fd)
    return subdirs


def remove_tree(path: Path) -> None:
    """Remove the directory `path` and everything below it (a symlink at `path` itself is unlinked)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    raise_fd_limit()
    root = os.open(path, _DIR_FLAGS)
    # Per open directory: its fd and the subdirectories still to remove.
    stack: list[tuple[int, list[str]]] = [(root, _empty_files(root))]
    try:
        while stack:
            fd, subdirs = stack[-1]
            if subdirs:
                child = _open_child(fd, subdirs[-1])
                stack.append((child, _empty_files(child)))
                continue
            stack.pop()
            os.close(fd)
            if stack:
                parent, pending = stack[-1]
                name = pending.pop()
                try:
                    os.rmdir(name, dir_fd=parent)
                except PermissionError:
                    os.fchmod(parent, 0o700)
                    os.rmdir(name, dir_fd=parent)
    finally:
        for fd, _ in stack:
            os.close(fd)
    os.rmdir(path)
