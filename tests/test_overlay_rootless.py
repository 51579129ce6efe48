"""Rootless use: an ordinary user mounts the overlay inside a user namespace.

alice runs `unshare --map-auto --map-root-user --mount` (the mapping podman
gives: ns 0 -> alice, ns 1.. -> her subordinate ids) and inside it mounts the
overlay, reads, writes and unmounts with fusermount3.  Files owned by ids that
her namespace does not map (root, uid 1234) must show as the overflow id 65534,
exactly as fuse-overlayfs shows them in the same setup; mapped ids show as
their namespace ids.  Writes land in her upper directory, owned by her.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ensure_user, make_fuse_usable_for_users, require
from overlay_support import build_layer, dir_, file, overlay_command, serving_processes, wait_until

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.rootless, pytest.mark.timeout(120)]

#: What the namespace does, printed as KEY=VALUE lines for the test to read.
SCRIPT = r"""
set -u
CMD="$1"; BASE="$2"
M="$BASE/mnt"
out() { echo "$1=$2"; }
# The daemon's output goes to files: a daemon holding our stdout pipe would
# keep the test waiting.  Whatever happens, leave nothing mounted.
trap 'fusermount3 -u "$M" 2>/dev/null' EXIT
if ! "$CMD" -o "lowerdir=$BASE/lower,upperdir=$BASE/upper,workdir=$BASE/work" "$M" \
    >"$BASE/logs/mount.out" 2>"$BASE/logs/mount.err"; then
  out mount "failed: $(head -c 300 "$BASE/logs/mount.err")"; exit 1
fi
out mount ok
out mounted "$(grep -c " $M " /proc/self/mountinfo)"
for f in root_file uid1234_file alice_file sub33_file sub33_dir root_dir; do
  out "stat_$f" "$(stat -c '%u:%g:%a' "$M/$f" 2>&1)"
done
out read_root "$(cat "$M/root_file" 2>&1)"
out read_alice "$(cat "$M/alice_file" 2>&1)"
out ls_root_dir "$(ls "$M/root_dir" 2>&1 | tr '\n' ' ')"
if echo written > "$M/newfile" 2>/dev/null; then out write_new ok; else out write_new failed; fi
out stat_newfile "$(stat -c '%u:%g:%a' "$M/newfile" 2>&1)"
if echo appended >> "$M/alice_file" 2>/dev/null; then out append_alice ok; else out append_alice failed; fi
if echo appended >> "$M/root_file" 2>/dev/null; then out append_root ok; else out append_root failed; fi
if mkdir "$M/newdir" 2>/dev/null; then out mkdir ok; else out mkdir failed; fi
if rm "$M/sub33_file" 2>/dev/null; then out rm_sub33 ok; else out rm_sub33 failed; fi
out ls "$(ls "$M" | tr '\n' ' ')"
out read_new "$(cat "$M/newfile" 2>&1)"
if fusermount3 -u "$M" 2>"$BASE/logs/umount.err"; then out umount ok; else out umount "failed: $(cat "$BASE/logs/umount.err")"; fi
out mounted_after "$(grep -c " $M " /proc/self/mountinfo)"
"""


def subid_start(name: str) -> int:
    with open("/etc/subuid") as f:
        for line in f:
            user, start, _count = line.strip().split(":")
            if user == name:
                return int(start)
    raise AssertionError(f"{name} has no range in /etc/subuid")


def prepare(base: Path, alice: pwd.struct_passwd) -> None:
    """Root-owned lower layer with owners inside and outside alice's mapping."""
    sub = subid_start(alice.pw_name)
    build_layer(base / "lower", [
        file("root_file", "root's\n"),
        file("uid1234_file", "1234's\n", uid=1234, gid=1234),
        file("alice_file", "alice's\n", uid=alice.pw_uid, gid=alice.pw_gid),
        file("sub33_file", "ns 33's\n", uid=sub + 32, gid=sub + 32),
        dir_("sub33_dir", uid=sub + 32, gid=sub + 32),
        dir_("root_dir"),
        file("root_dir/inside", "x"),
    ])
    for name in ("upper", "work", "mnt", "logs"):
        (base / name).mkdir()
        os.chown(base / name, alice.pw_uid, alice.pw_gid)
    os.chmod(base, 0o755)
    (base / "ns.sh").write_text(SCRIPT)


def run_as_alice(alice: pwd.struct_passwd, cmd: str, base: Path) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": alice.pw_dir,
           "LANG": "C.UTF-8"}
    r = subprocess.run(
        ["setpriv", "--reuid", alice.pw_name, "--regid", alice.pw_name, "--init-groups",
         "unshare", "--map-auto", "--map-root-user", "--mount",
         "sh", str(base / "ns.sh"), cmd, str(base)],
        capture_output=True, text=True, timeout=60, env=env)
    values = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert values.get("mount") == "ok", f"rc={r.returncode} out={r.stdout} err={r.stderr}"
    return values


@pytest.fixture
def alice(root_fuse: None, world_tmp: Path) -> Iterator[pwd.struct_passwd]:
    require(shutil.which("unshare") is not None and shutil.which("newuidmap") is not None,
            "unshare and newuidmap (Debian packages util-linux, uidmap)")
    user = ensure_user("alice")
    make_fuse_usable_for_users()
    yield user
    # A daemon left in a dead namespace would serve an unreachable mount
    # forever: end the ones this test started (their command line names it).
    for mnt in world_tmp.glob("*/mnt"):
        for pid in serving_processes(mnt):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def test_rootless_mount_read_write_unmount(alice: pwd.struct_passwd, world_tmp: Path) -> None:
    base = world_tmp / "cshare"
    base.mkdir()
    prepare(base, alice)
    got = run_as_alice(alice, overlay_command()[0], base)

    assert got["mounted"] == "1"
    assert got["stat_root_file"] == "65534:65534:644", got
    assert got["stat_uid1234_file"] == "65534:65534:644", got
    assert got["stat_alice_file"] == "0:0:644", got
    assert got["stat_sub33_file"] == "33:33:644", got
    assert got["stat_sub33_dir"] == "33:33:755", got
    assert got["read_root"] == "root's" and got["read_alice"] == "alice's"
    assert got["ls_root_dir"].split() == ["inside"]
    assert got["write_new"] == "ok" and got["stat_newfile"] == "0:0:644", got
    assert got["append_alice"] == "ok" and got["mkdir"] == "ok" and got["rm_sub33"] == "ok", got
    assert got["read_new"] == "written"
    assert got["umount"] == "ok" and got["mounted_after"] == "0", got

    # Outside: the writes are alice's, in alice's upper directory.
    new = base / "upper/newfile"
    assert new.read_text() == "written\n"
    assert (new.stat().st_uid, new.stat().st_gid) == (alice.pw_uid, alice.pw_gid)
    copied = base / "upper/alice_file"
    assert copied.read_text() == "alice's\nappended\n"
    assert copied.stat().st_uid == alice.pw_uid
    assert (base / "lower/root_file").read_text() == "root's\n", "a lower layer changed"
    assert not (base / "upper/root_file").exists() or got["append_root"] == "ok"
    assert "sub33_file" not in got["ls"].split()
    assert wait_until(lambda: not serving_processes(base / "mnt"), timeout=5), \
        "the overlay process is still running after unmount"


def test_rootless_matches_fuse_overlayfs(alice: pwd.struct_passwd, world_tmp: Path) -> None:
    """Owners, permissions and results as fuse-overlayfs shows them in the same setup."""
    reference = shutil.which("fuse-overlayfs")
    require(reference is not None, "fuse-overlayfs (Debian package fuse-overlayfs)")
    assert reference is not None
    results = {}
    for name, cmd in (("reference", reference), ("tested", overlay_command()[0])):
        base = world_tmp / name
        base.mkdir()
        prepare(base, alice)
        results[name] = run_as_alice(alice, cmd, base)
    ref, got = results["reference"], results["tested"]
    differ = {k: (ref.get(k), got.get(k)) for k in set(ref) | set(got) if ref.get(k) != got.get(k)}
    assert not differ, f"fuse-overlayfs vs tested: {differ}"
