"""Differential tests: which names hide a lower entry, and setuid/setgid stripping.

Each test is a reproduction from issue 10, run against the kernel overlayfs
(the reference) and the FUSE overlay under test on identical layers:

- a file the user deleted must stay deleted, however the name it had got its
  upper entry (create, link, rename, copy-up of another name of it): removing
  or replacing a name a lower layer holds leaves a whiteout;
- a setuid/setgid bit the kernel strips must not survive on the FUSE overlay
  (creation through a dangling symlink, in setgid directories, chmod and chown
  by ordinary users, writes and truncation by a non-owner).

Layers are listed topmost first (l0, l1, l2).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ensure_user, require
from overlay_support import (
    Node,
    Op,
    check_pair,
    dir_,
    fifo,
    file,
    hardlink,
    overlay_pair,
    run_op,
    symlink,
    whiteout,
)

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.rootless, pytest.mark.timeout(120)]


def alice_ids() -> tuple[int, int]:
    alice = ensure_user("alice")
    return alice.pw_uid, alice.pw_gid


def as_alice(op: Op) -> Op:
    uid, gid = alice_ids()
    return ("as_user", uid, gid, op)


def assert_same(world_tmp: Path, layers: list[list[Node]], ops: list[Op]) -> None:
    """Run `ops` on both overlays; every result, the merged trees and uppers agree."""
    with overlay_pair(world_tmp, layers) as pair:
        for root in pair.roots:
            os.chmod(root, 0o755)
        problems = check_pair(pair, ops)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ deleted files stay deleted

def test_a_renamed_link_of_a_lower_file_does_not_bring_the_original_back(
        root_fuse: None, world_tmp: Path) -> None:
    """Issue 10, reproduction 1: unlink, link over the name, move the link, unlink the original."""
    l0 = [dir_("e", mode=0o777), file("e/b", "0123456789", mode=0o2755)]
    l1 = [file("e", "e in l1\n"), file("d", "d in l1\n"), hardlink("d2", "d")]
    l2 = [file("d", "d in l2\n")]
    ops: list[Op] = [("unlink", "d"), ("link", "e/b", "d"), ("rename", "d", "e/d"),
                     as_alice(("unlink", "e/b")), ("stat", "e/b"), ("listdir", "e"),
                     ("stat", "d"), ("read", "e/d")]
    assert_same(world_tmp, [l0, l1, l2], ops)


def test_a_link_moved_into_new_directories_does_not_bring_the_original_back(
        root_fuse: None, world_tmp: Path) -> None:
    """Issue 10, reproduction 2: a link of a lower file moves into directories alice made."""
    l0 = [dir_("d", mode=0o1777), file("d/e", "e" * 4095, mode=0o700)]
    ops: list[Op] = [as_alice(("mkdir", "d/a", 0o755)), as_alice(("mkdir", "d/a/h", 0o755)),
                     ("link", "d/e", "d/x"), ("rename", "d/x", "d/a/h/d"), ("unlink", "d/e"),
                     ("stat", "d/e"), ("listdir", "d"), ("read", "d/a/h/d")]
    assert_same(world_tmp, [l0], ops)


def test_a_link_onto_a_whited_out_name_hides_the_lower_entry_when_removed(
        root_fuse: None, world_tmp: Path) -> None:
    """Issue 10, reproduction 3: a name renamed away, linked anew, then unlinked."""
    l0 = [dir_("a"), file("a/d", "lower a/d\n"), file("a/u0", "u\n")]
    ops: list[Op] = [("rename", "a/d", "a/x"), ("create", "a/u", b"upper\n", 0o644),
                     ("link", "a/u", "a/d"), ("rename", "a/u", "a/v"), ("unlink", "a/d"),
                     ("stat", "a/d"),
                     ("listdir", "a"), ("link", "a/x", "a/d"), ("unlink", "a/x"),
                     ("rename", "a/d", "a/y"), ("stat", "a/d"), ("stat", "a/x"),
                     ("listdir", "a")]
    assert_same(world_tmp, [l0], ops)


def test_a_link_of_a_lower_symlink_renamed_over_a_whiteout(
        root_fuse: None, world_tmp: Path) -> None:
    """Issue 10, reproduction 4: the symlink comes back after link, rename over a whiteout, unlink."""
    l0 = [symlink("a", "f"), dir_("b"), whiteout("f")]
    l1 = [file("a", "a in l1\n"), whiteout("b"), file("f", "f in l1\n")]
    l2 = [dir_("a"), file("a/inner", "in l2\n"), fifo("f")]
    ops: list[Op] = [("link", "a", "b/h"), ("rename", "b/h", "f"), ("unlink", "a"),
                     ("stat", "a"), ("readlink", "f"), ("listdir", "."), ("unlink", "f"),
                     ("stat", "f"), ("listdir", ".")]
    assert_same(world_tmp, [l0, l1, l2], ops)


def test_every_name_of_a_copied_up_lower_hardlink_keeps_its_whiteout(
        root_fuse: None, world_tmp: Path) -> None:
    """Copy-up through one name of a lower hardlink, then remove and replace the names."""
    l0 = [dir_("x"), file("h1", "linked\n"), hardlink("h2", "h1"), hardlink("x/h3", "h1")]
    l1 = [file("h4", "h4\n")]
    ops: list[Op] = [("write", "h1", b"W", 0), ("link", "h1", "h4"), ("rename", "h2", "x/m"),
                     ("rename", "h1", "x/h3"), ("unlink", "x/m"), ("unlink", "h4"),
                     ("unlink", "x/h3"), ("listdir", "."), ("listdir", "x"), ("stat", "h1"),
                     ("stat", "h2"), ("stat", "h4")]
    assert_same(world_tmp, [l0, l1], ops)


# ------------------------------------------------------------------ setuid/setgid stripping

def test_creating_through_a_dangling_symlink_strips_setgid(
        root_fuse: None, world_tmp: Path) -> None:
    """Issue 10, the second class: open(O_CREAT, 02755) through a dangling symlink."""
    l0 = [dir_("w", mode=0o777), symlink("w/f", "c")]
    ops: list[Op] = [as_alice(("trunc_write", "w/f", b"x", 0o2755)), ("stat", "w/c")]
    assert_same(world_tmp, [l0], ops)


def test_setgid_directories_strip_setgid_from_files_of_non_members(
        root_fuse: None, world_tmp: Path) -> None:
    """In a setgid directory of another group, alice's new files and their setgid bits.

    The kernel's VFS strips setgid from a new file of another group's setgid
    directory before asking a FUSE filesystem when group-execute is set
    (02755); without it (02745) the bit stays until a write by a non-member,
    which FUSE leaves to the filesystem.  Directories keep it.
    """
    l0 = [dir_("g", mode=0o2777), dir_("plain", mode=0o777), symlink("g/f", "c")]
    ops: list[Op] = []
    for i, mode in enumerate([0o2755, 0o2745, 0o6745, 0o4755, 0o2777]):
        ops += [as_alice(("create", f"g/n{i}", b"x", mode)), ("stat", f"g/n{i}"),
                as_alice(("create", f"g/e{i}", b"", mode)), ("stat", f"g/e{i}"),
                as_alice(("create", f"plain/n{i}", b"x", mode)), ("stat", f"plain/n{i}"),
                as_alice(("mkdir", f"g/d{i}", mode)), ("stat", f"g/d{i}"),
                as_alice(("mkfifo", f"g/p{i}", mode)), ("stat", f"g/p{i}")]
    ops += [as_alice(("trunc_write", "g/f", b"x", 0o2745)), ("stat", "g/c"),
            ("create", "g/by_root", b"x", 0o2745), ("stat", "g/by_root")]
    assert_same(world_tmp, [l0], ops)


def test_chmod_chown_write_and_truncate_strip_like_the_kernel(
        root_fuse: None, world_tmp: Path) -> None:
    """chmod by a non-member, chown, a write and a truncate by a non-owner (copy-up first)."""
    uid, gid = alice_ids()
    require(uid != 0 and gid != 0, "alice is not root")
    l0 = [dir_("w", mode=0o777),
          file("w/sg", "s\n", mode=0o2775, uid=uid, gid=0),
          file("w/su", "s\n", mode=0o6755, uid=uid, gid=gid),
          file("w/open", "s\n", mode=0o6777),
          file("w/open2", "s\n", mode=0o6777),
          file("w/nox", "s\n", mode=0o2767),
          file("w/nox2", "s\n", mode=0o2767),
          file("w/nox3", "s\n", mode=0o6747, uid=uid, gid=0)]
    ops: list[Op] = [as_alice(("chmod", "w/sg", 0o2775)), ("stat", "w/sg"),
                     as_alice(("chmod", "w/su", 0o6755)), ("stat", "w/su"),
                     ("chown", "w/su", 0, -1), ("stat", "w/su"),
                     as_alice(("write", "w/open", b"A", 0)), ("stat", "w/open"),
                     as_alice(("truncate", "w/open2", 1)), ("stat", "w/open2"),
                     as_alice(("append", "w/nox", b"A")), ("stat", "w/nox"),
                     as_alice(("truncate", "w/nox2", 0)), ("stat", "w/nox2"),
                     as_alice(("chown", "w/nox3", -1, gid)), ("stat", "w/nox3"),
                     ("chmod", "w/nox2", 0o2767), as_alice(("append", "w/nox2", b"B")),
                     ("stat", "w/nox2")]
    assert_same(world_tmp, [l0], ops)


def test_the_callers_groups_and_capabilities_come_from_proc(as_root: None) -> None:
    """caller.in_group_or_capable and has_fsetid read a live process's status."""
    import subprocess

    from cshare_fuse.caller import Caller, has_fsetid, in_group_or_capable

    uid, gid = alice_ids()
    assert has_fsetid(Caller(0, 0, os.getpid()))
    child = subprocess.Popen(["sleep", "30"], user=uid, group=gid, extra_groups=[7])
    try:
        alice = Caller(uid, gid, child.pid)
        assert not has_fsetid(alice)
        assert in_group_or_capable(alice, gid) and in_group_or_capable(alice, 7)
        assert not in_group_or_capable(alice, 0)
        gone = Caller(uid, gid, 0)  # no process to ask: unprivileged, own group only
        assert in_group_or_capable(gone, gid) and not in_group_or_capable(gone, 7)
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------ found by the fuzzer

def test_a_copied_up_name_of_a_lower_hardlink_shows_one_link(
        root_fuse: None, world_tmp: Path) -> None:
    """After open-for-write copies one name up, stat shows link count 1 (the kernel's cache
    of the lower attributes must be dropped), while the other name still shows 2."""
    l0 = [file("d/a", "", mode=0o2755, uid=1002, gid=1002), hardlink("e2", "d/a")]
    ops: list[Op] = [("stat", "e2"), ("write", "e2", b"", 300), ("stat", "e2"), ("stat", "d/a"),
                     ("chmod", "d/a", 0o644), ("stat", "d/a"), ("stat", "e2")]
    assert_same(world_tmp, [l0], ops)


def test_chown_to_nothing_does_not_copy_up(root_fuse: None, world_tmp: Path) -> None:
    """The stated difference (cshare-overlay(1) NOTES): chown(f, -1, -1) never reaches a
    FUSE filesystem, so only the kernel's overlay copies f up; nothing else differs."""
    with overlay_pair(world_tmp, [[file("f", "f\n"), file("g", "g\n")]]) as pair:
        for root in pair.roots:
            assert run_op(root, ("chown", "f", -1, -1)) == ("ok", None)
        assert (pair.kernel.upper / "f").exists(), "the kernel's overlay no longer copies up"
        assert not (pair.fuse.upper / "f").exists(), "FUSE now sees chown(f, -1, -1): fix NOTES"
        problems = check_pair(pair, [("stat", "f"), ("read", "f")])
    assert not problems, "\n".join(problems)
