"""`cshare convert`: what every kind of entry becomes, idempotence, crash safety,
older forms, bad values, symlinks, mounts, races, and the command's checks."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ensure_user, is_root, require, tool, unmount_all_below
from tree_support import Meta, build_large_tree, build_varied_tree, diff_listings, listing

from cshare.errors import CshareError
from cshare.tree.convert import check_can_convert, convert_tree
from cshare_fuse.formats.overrides import (
    FUSE_OVERLAYFS_PRIVILEGED_XATTR,
    FUSE_OVERLAYFS_XATTR,
    OVERRIDE_XATTR,
    PROTOTYPE_XATTR,
    parse_override,
)

pytestmark = pytest.mark.root


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    require(is_root(), "root (convert changes files owned by others, makes devices)")
    return tmp_path


@pytest.fixture
def tmpfs_scratch(scratch: Path) -> Iterator[Path]:
    """A private tmpfs: big trees are built in a second there, whatever the disk is doing.
    Falls back to the disk when this kernel's tmpfs lacks user xattrs (before 6.6)."""
    point = scratch / "tmpfs"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(point)], check=True)
    try:
        try:
            os.setxattr(point, "user.probe", b"1")
            os.removexattr(point, "user.probe")
        except OSError:
            subprocess.run(["umount", str(point)], check=True)
        yield point
    finally:
        unmount_all_below(point)


def xattr(meta: Meta, name: str) -> bytes | None:
    return dict(meta.xattrs).get(name)


# ------------------------------------------------------------------ what entries become
def test_every_entry_is_recorded_and_opened_up(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    outside_st = os.lstat(tree.outside)
    before = listing(tree.root)
    report = convert_tree(tree.root)
    after = listing(tree.root)
    assert report.errors == []
    assert set(after) == set(before)

    specials = {"char", "block", "pipe", "socket"}
    for rel, old in before.items():
        new = after[rel]
        if old.type == "symlink" or (old.type == "char" and old.rdev == (0, 0)):
            assert new == old, f"{rel!r} changed: {diff_listings({rel: old}, {rel: new})}"
            continue
        assert new.mode == 0o755, rel
        assert (new.uid, new.gid) == (old.uid, old.gid), f"{rel!r}: host owner changed"
        assert new.mtime_ns == old.mtime_ns, f"{rel!r}: mtime changed"
        assert new.links == old.links, f"{rel!r}: hardlink group changed"
        record = parse_override(xattr(new, OVERRIDE_XATTR) or b"")
        assert (record.uid, record.gid, record.mode) == (old.uid, old.gid, old.mode), rel
        if old.type in specials:
            assert new.type == "file" and new.size == 0, rel
            assert record.type_name().split("-")[0] == old.type
            if old.type in ("char", "block"):
                assert (record.rdev_major, record.rdev_minor) == old.rdev
        else:
            assert new.type == old.type
            assert record.type_name() == old.type
            assert (new.size, new.extents) == (old.size, old.extents)
            # Every xattr the entry had is still there, unchanged.
            assert set(old.xattrs) <= set(new.xattrs), rel

    assert xattr(after[b"dev/null"], OVERRIDE_XATTR) == b"0:0:0666:char-1-3"
    assert xattr(after[b"dev/sda"], OVERRIDE_XATTR) == b"0:6:0660:block-8-0"
    assert xattr(after[b"dev/fifo"], OVERRIDE_XATTR) == b"33:33:0644:pipe"
    assert xattr(after[b"dev/sock"], OVERRIDE_XATTR) == b"0:0:0755:socket"
    assert xattr(after[b"usr/bin/su"], OVERRIDE_XATTR) == b"0:0:4755:file"
    assert xattr(after[b"locked"], OVERRIDE_XATTR) == b"0:0:0000:dir"
    assert xattr(after[b"."], OVERRIDE_XATTR) == b"0:0:0755:dir"
    assert after[b"dev/fifo"].links == (b"dev/fifo-link",), "the hardlinked fifo must stay linked"
    assert after[b"usr/bin/su"].links == (b"etc/su-third", b"usr/su-again")
    # A .wh. whiteout file stays a whiteout (same name, empty regular file).
    assert after[b"layer/.wh.gone"].type == "file" and after[b"layer/.wh.gone"].size == 0
    # The opaque marker is visible to users now; trusted.* is kept.
    opaque = after[b"layer/opaque"]
    assert xattr(opaque, "user.overlay.opaque") == b"y"
    assert xattr(opaque, "trusted.overlay.opaque") == b"y"
    assert report.opaque_rewritten == 1
    # The symlink pointing out of the tree changed nothing outside.
    out = os.lstat(tree.outside)
    assert (out.st_mode, out.st_uid, out.st_ctime_ns) == (outside_st.st_mode, outside_st.st_uid, outside_st.st_ctime_ns)
    assert os.listxattr(tree.outside) == []

    assert report.entries == len(before)
    assert report.devices_replaced == 6  # null, sda, fifo, fifo-link, sock, suid-char
    n_files_dirs = len(
        {min((rel, *m.links)) for rel, m in before.items() if m.type in ("file", "dir")}
    )
    assert report.converted == n_files_dirs > 80


def test_second_run_changes_nothing(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    first = convert_tree(tree.root)
    once = listing(tree.root)
    second = convert_tree(tree.root)
    assert second.errors == []
    assert second.converted == 0 and second.devices_replaced == 0 and second.opaque_rewritten == 0
    assert second.already_converted == first.converted + first.devices_replaced - 1  # fifo-link: one inode
    assert diff_listings(once, listing(tree.root)) == ""


def test_never_overwrites_a_recorded_original(scratch: Path) -> None:
    root = scratch / "tree"
    root.mkdir()
    f = root / "f"
    f.write_bytes(b"x")
    os.setxattr(f, OVERRIDE_XATTR, b"12:34:0640:file")
    os.chmod(f, 0o600)  # a run killed between the xattr and the chmod
    report = convert_tree(root)
    assert os.getxattr(f, OVERRIDE_XATTR) == b"12:34:0640:file"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755
    assert report.already_converted == 1


CHILD = """
import sys
from pathlib import Path
from cshare.{module} import {function}
count = 0
threshold = int(sys.argv[2])
def tick():
    global count
    count += 1
    if count == threshold:
        sys.stdout.write("reached\\n")
        sys.stdout.flush()
{function}(Path(sys.argv[1]), on_entry=tick)
sys.stdout.write("finished\\n")
"""


def kill_part_way(module: str, function: str, root: Path, thresholds: tuple[int, ...]) -> list[str]:
    """Run `function` on `root` in a child, SIGKILL it as it reaches each threshold in turn."""
    outcomes = []
    code = CHILD.format(module=module, function=function)
    for threshold in thresholds:
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(root), str(threshold)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        outcomes.append(line)
    return outcomes


@pytest.mark.slow
def test_killed_run_then_rerun_equals_one_clean_run(tmpfs_scratch: Path) -> None:
    killed, clean = tmpfs_scratch / "killed", tmpfs_scratch / "clean"
    build_large_tree(killed, 20000)
    build_large_tree(clean, 20000)
    assert diff_listings(listing(killed), listing(clean)) == ""

    outcomes = kill_part_way("tree.convert", "convert_tree", killed, (3000,))
    assert outcomes == ["reached"]
    partial = listing(killed)
    recorded = sum(1 for m in partial.values() if xattr(m, OVERRIDE_XATTR))
    assert 0 < recorded < 19000, f"the kill did not land part-way ({recorded} recorded)"
    time.sleep(0.3)
    assert listing(killed) == partial, "worker processes outlived the killed convert"
    # More kills at later points, each on top of the previous partial state.
    outcomes = kill_part_way("tree.convert", "convert_tree", killed, (8000, 13000, 18000))
    assert outcomes.count("reached") >= 2

    assert convert_tree(killed).errors == []
    assert convert_tree(clean).errors == []
    assert diff_listings(listing(clean), listing(killed)) == ""


# ------------------------------------------------------------------ older forms, bad values
def test_older_forms_are_recognised_and_not_converted_twice(scratch: Path) -> None:
    root = scratch / "tree"
    root.mkdir()
    os.setxattr(root, FUSE_OVERLAYFS_XATTR, b"0:0:40755")  # 3-field, type bits included
    forms = {
        "three-field": (FUSE_OVERLAYFS_XATTR, b"0:0:0600"),
        "no-leading-zero": (FUSE_OVERLAYFS_XATTR, b"33:33:640"),
        "privileged": (FUSE_OVERLAYFS_PRIVILEGED_XATTR, b"0:0:0700"),
        "prototype": (PROTOTYPE_XATTR, b"0600:12:34\0"),
    }
    for name, (attr, value) in forms.items():
        path = root / name
        path.write_bytes(b"x")
        os.setxattr(path, attr, value)
        os.chmod(path, 0o755)
    report = convert_tree(root)
    assert report.errors == []
    assert report.converted == 0 and report.already_converted == len(forms) + 1
    for name, (attr, value) in forms.items():
        path = root / name
        assert os.getxattr(path, attr) == value
        assert OVERRIDE_XATTR not in os.listxattr(path), f"{name} was converted twice"
    assert OVERRIDE_XATTR not in os.listxattr(root)


def test_unparsable_value_is_reported_and_left_untouched(scratch: Path) -> None:
    root = scratch / "tree"
    root.mkdir()
    bad = root / "bad value"
    bad.write_bytes(b"x")
    os.chmod(bad, 0o600)
    os.setxattr(bad, OVERRIDE_XATTR, b"0:0:0999:file")
    good = root / "good"
    good.write_bytes(b"y")
    os.chmod(good, 0o600)
    report = convert_tree(root)
    assert [p for p, _ in report.errors] == ["bad value"]
    assert "0999" in report.errors[0][1]
    assert stat.S_IMODE(os.stat(bad).st_mode) == 0o600
    assert os.getxattr(bad, OVERRIDE_XATTR) == b"0:0:0999:file"
    assert stat.S_IMODE(os.stat(good).st_mode) == 0o755  # the rest was converted

    os.chmod(good, 0o600)
    os.removexattr(good, OVERRIDE_XATTR)
    run = subprocess.run([tool("cshare"), "convert", "-q", str(root)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "bad value" in run.stderr and "0999" in run.stderr
    assert stat.S_IMODE(os.stat(good).st_mode) == 0o755


# ------------------------------------------------------------------ walking safely
def test_mount_points_are_not_crossed(scratch: Path) -> None:
    root = scratch / "tree"
    (root / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "mnt")], check=True)
    try:
        secret = root / "mnt" / "secret"
        secret.write_bytes(b"s")
        os.chmod(secret, 0o600)
        os.chmod(root / "mnt", 0o700)
        report = convert_tree(root)
        assert report.skipped_mounts == ["mnt"]
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(root / "mnt").st_mode) == 0o700
        assert os.listxattr(secret) == []
    finally:
        unmount_all_below(root)


def test_a_rename_race_cannot_redirect_the_walk(scratch: Path) -> None:
    root, outside = scratch / "tree", scratch / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    for i in range(40):
        (root / "a" / f"f{i}").write_bytes(b"in")
        (outside / f"f{i}").write_bytes(b"out")
        os.chmod(outside / f"f{i}", 0o600)
    seen = 0

    def swap() -> None:
        # Once the walk is inside a/, replace a/ by a symlink pointing out of the tree.
        nonlocal seen
        seen += 1
        if seen == 5:
            os.rename(root / "a", root / "moved")
            os.symlink(outside, root / "a")

    report = convert_tree(root, on_entry=swap)
    assert seen > 5 and report.errors == []
    for i in range(40):
        assert stat.S_IMODE(os.stat(outside / f"f{i}").st_mode) == 0o600
        assert os.listxattr(outside / f"f{i}") == []
        assert OVERRIDE_XATTR in os.listxattr(root / "moved" / f"f{i}")


# ------------------------------------------------------------------ the command
def test_dry_run_lists_changes_and_changes_nothing(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    before = listing(tree.root)
    run = subprocess.run(
        [tool("cshare"), "convert", "--dry-run", str(tree.root)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert diff_listings(before, listing(tree.root)) == ""
    assert "record 0:0:0600:file: etc/shadow" in run.stdout
    assert "char-1-3: dev/null" in run.stdout
    assert "etc/new\\nline" in run.stdout  # one line per change, even for odd names
    assert "add user.overlay.opaque=y: layer/opaque" in run.stdout


def test_json_summary(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    run = subprocess.run([tool("cshare"), "convert", "--json", str(tree.root)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["devices_replaced"] == 6
    assert summary["entries"] == len(listing(tree.root))
    assert summary["errors"] == []
    again = json.loads(
        subprocess.run([tool("cshare"), "convert", "--json", str(tree.root)], capture_output=True, text=True).stdout
    )
    assert again["converted"] == 0 and again["already_converted"] > 0


def test_missing_path_is_one_line_error(scratch: Path) -> None:
    run = subprocess.run([tool("cshare"), "convert", str(scratch / "nope")], capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.count("\n") == 1 and "no such file or directory" in run.stderr
    with pytest.raises(CshareError):
        check_can_convert(scratch / "nope")


def test_filesystem_without_user_xattrs_is_refused_before_any_change(scratch: Path) -> None:
    point = scratch / "ramfs"
    point.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(point)], check=True)
    try:
        f = point / "f"
        f.write_bytes(b"x")
        os.chmod(f, 0o600)
        os.chmod(point, 0o700)
        for command in ("convert", "restore"):
            run = subprocess.run([tool("cshare"), command, str(point)], capture_output=True, text=True)
            assert run.returncode != 0
            assert run.stderr.count("\n") == 1 and "user xattrs" in run.stderr, run.stderr
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(point).st_mode) == 0o700
    finally:
        unmount_all_below(point)


def test_not_root_is_refused_before_any_change(scratch: Path) -> None:
    ensure_user("alice")
    root = scratch / "tree"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    os.chmod(root / "f", 0o600)
    for command in ("convert", "restore"):
        run = subprocess.run(
            ["runuser", "-u", "alice", "--", tool("cshare"), command, str(root)],
            capture_output=True,
            text=True,
        )
        assert run.returncode != 0
        assert run.stderr.count("\n") == 1 and "root" in run.stderr, run.stderr
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o600
    assert os.listxattr(root / "f") == []


def test_fast_path_declines_what_it_does_not_know() -> None:
    from cshare.cli.convert_cmd import fast_path

    for argv in (
        ["convert", "--help", "x"],
        ["convert", "-h"],
        ["convert", "--bogus", "x"],
        ["convert"],
        ["convert", "a", "b"],
        ["verify", "--dry-run", "x"],
        ["images"],
    ):
        assert fast_path(argv) is False, argv


def test_fast_path_knows_only_options_the_typer_commands_have() -> None:
    # If an option is renamed or removed in cli.py, the fast path must not keep accepting it.
    import typer

    from cshare.cli.app import app
    from cshare.cli.convert_cmd import _FAST_OPTIONS

    group = typer.main.get_command(app)
    for command, options in _FAST_OPTIONS.items():
        cmd = group.commands[command]  # type: ignore[attr-defined]
        typer_options = {o for p in cmd.params if p.param_type_name == "option" for o in p.opts}
        assert set(options) <= typer_options, command


def test_quiet_convert_runs_without_typer_or_rich(scratch: Path) -> None:
    # A quiet convert is timed against chmod -R; loading typer and rich would
    # triple a small run's time.  The installed entry point must not load them.
    root = scratch / "tree"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    os.chmod(root / "f", 0o644)
    probe = (
        "import sys; from cshare.cli.launch import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'typer', 'rich', 'click'}))"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, "convert", "--quiet", str(root)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]", run.stdout
    assert os.getxattr(root / "f", OVERRIDE_XATTR) == b"0:0:0644:file"


@pytest.mark.parametrize("command", ["convert", "restore", "verify"])
@pytest.mark.parametrize("spelling", ["link", "link/"])
def test_a_rootfs_that_is_a_symlink_is_refused(scratch: Path, command: str, spelling: str) -> None:
    """Issue 12 point 7: `convert LINK` used to convert LINK's target (a link to / would
    open up the host).  convert, restore and verify refuse it, naming the target; the
    target is left exactly as it was, and the directory itself is still accepted."""
    real = scratch / "real"
    real.mkdir(mode=0o700)
    (real / "secret").write_text("x")
    (real / "secret").chmod(0o600)
    if command != "convert":
        convert_tree(real)
    (scratch / "link").symlink_to("real")
    before = listing(real)
    run = subprocess.run([tool("cshare"), command, str(scratch / spelling)],
                         capture_output=True, text=True)
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cshare: error: "), run.stderr
    assert "is a symlink to real" in lines[0] and str(real) in lines[0], lines[0]
    assert diff_listings(before, listing(real)) == ""
    with pytest.raises(CshareError, match="symlink"):
        check_can_convert(scratch / spelling)
    ok = subprocess.run([tool("cshare"), command, str(real)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
