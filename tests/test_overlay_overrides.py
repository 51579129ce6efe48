"""Original owners and modes survive changes (issue 4, points 5 and 6).

- Writing to a converted file copies it up with its original owner and mode;
  a later chmod/chown shows the new values.  As root and rootless.
- With xattr_permissions=2 chmod/chown land in the upper file's
  user.containers.override_stat, and the backing file keeps its own mode/owner.
- A plain lowerdir (no plugin) whose root carries the override xattr has its
  overrides honoured, as fuse-overlayfs does; without the root record they are not.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ensure_user, make_fuse_usable_for_users, require, tool, unmount_all_below
from test_plugin_mount import WWW, build_tree, convert

from cshare_fuse.formats.overrides import OVERRIDE_XATTR, parse_override

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(120)]


@pytest.fixture
def converted(root_fuse: None, world_tmp: Path) -> Iterator[Path]:
    layer = world_tmp / "layer"
    build_tree(layer)
    convert(layer)
    yield world_tmp
    unmount_all_below(world_tmp)


def _mount(base: Path, lowerdir: str, *extra: str, name: str = "m") -> tuple[Path, Path]:
    upper, work, mnt = base / f"{name}-upper", base / f"{name}-work", base / name
    for d in (upper, work, mnt):
        d.mkdir()
    opts = ",".join([f"lowerdir={lowerdir}", f"upperdir={upper}", f"workdir={work}", *extra])
    r = subprocess.run([tool("cshare-overlay"), "-o", opts, str(mnt)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return mnt, upper


def _owner_mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_copy_up_keeps_original_owner_and_mode_then_chmod_chown_show(converted: Path) -> None:
    mnt, upper = _mount(converted, f"//test//{converted / 'layer'}", "plugins=test")
    assert _owner_mode(mnt / "www") == (33, 33, 0o640)
    with open(mnt / "www", "ab") as f:
        f.write(b"appended\n")
    # The copy is real: the upper file itself has the original owner and mode.
    assert _owner_mode(upper / "www") == (33, 33, 0o640)
    assert _owner_mode(mnt / "www") == (33, 33, 0o640)
    assert (mnt / "www").read_bytes() == WWW + b"appended\n"
    os.chmod(mnt / "www", 0o600)
    os.chown(mnt / "www", 44, 45)
    assert _owner_mode(mnt / "www") == (44, 45, 0o600)
    assert _owner_mode(upper / "www") == (44, 45, 0o600)
    # The setuid binary keeps its bit through a metadata copy-up.
    os.utime(mnt / "suid", ns=(1, 2))
    assert _owner_mode(mnt / "suid") == (0, 0, 0o4755)
    # Nothing reached the shared layer.
    assert (converted / "layer" / "www").read_bytes() == WWW
    assert stat.S_IMODE(os.lstat(converted / "layer" / "www").st_mode) == 0o755


def test_xattr_permissions_2_records_changes_in_the_upper_override(converted: Path) -> None:
    mnt, upper = _mount(converted, f"//test//{converted / 'layer'}", "plugins=test",
                        "xattr_permissions=2")
    with open(mnt / "www", "ab") as f:
        f.write(b"x")
    os.chmod(mnt / "www", 0o604)
    os.chown(mnt / "www", 50, 51)
    assert _owner_mode(mnt / "www") == (50, 51, 0o604)
    record = parse_override(os.getxattr(upper / "www", OVERRIDE_XATTR))
    assert (record.uid, record.gid, record.mode, record.file_type) == (50, 51, 0o604,
                                                                        stat.S_IFREG)
    # The backing file was not chowned or chmodded to those values.
    real_uid, _, real_mode = _owner_mode(upper / "www")
    assert (real_uid, real_mode) != (50, 0o604)
    # The record is the overlay's own: invisible and untouchable through the mount.
    assert OVERRIDE_XATTR not in os.listxattr(mnt / "www")
    with pytest.raises(PermissionError):
        os.setxattr(mnt / "www", OVERRIDE_XATTR, b"0:0:4755:file")


def test_overrides_honoured_without_plugin_when_layer_root_carries_them(converted: Path) -> None:
    layer = converted / "layer"
    mnt, _ = _mount(converted, str(layer))
    assert _owner_mode(mnt / "secret") == (0, 0, 0o600)
    assert _owner_mode(mnt / "www") == (33, 33, 0o640)
    assert stat.S_ISCHR(os.lstat(mnt / "null").st_mode)
    subprocess.run(["umount", str(mnt)], check=True)
    # Without the record on the root the layer is taken as it is (fuse-overlayfs's rule).
    os.removexattr(layer, OVERRIDE_XATTR)
    mnt, _ = _mount(converted, str(layer), name="again")
    assert _owner_mode(mnt / "secret") == (0, 0, 0o755)
    assert stat.S_ISREG(os.lstat(mnt / "null").st_mode)


ROOTLESS_PROBE = r"""
import json, os, stat, subprocess, sys
spec = json.loads(sys.argv[1])
mnt, upper = spec["mnt"], spec["upper"]
r = subprocess.run([spec["overlay"], "-o", spec["options"], mnt], capture_output=True, text=True)
out = {"mount": [r.returncode, r.stderr]}
def om(p):
    st = os.lstat(p)
    return [st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)]
if r.returncode == 0:
    try:
        out["before"] = om(mnt + "/www")
        with open(mnt + "/www", "ab") as f:
            f.write(b"alice was here\n")
        out["after_write"] = om(mnt + "/www")
        out["upper_real"] = om(upper + "/www")
        os.chmod(mnt + "/www", 0o600)
        os.chown(mnt + "/www", 44, 44)
        out["after_change"] = om(mnt + "/www")
        out["secret"] = om(mnt + "/secret")
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
print(json.dumps(out))
"""


def test_rootless_copy_up_keeps_original_owner_and_mode(converted: Path) -> None:
    user = ensure_user("alice")
    make_fuse_usable_for_users()
    base = converted / "alice"
    base.mkdir()
    for d in ("upper", "work", "mnt"):
        (base / d).mkdir()
    os.chown(base, user.pw_uid, user.pw_gid)
    for d in ("upper", "work", "mnt"):
        os.chown(base / d, user.pw_uid, user.pw_gid)
    spec = {
        "overlay": tool("cshare-overlay"),
        "mnt": str(base / "mnt"),
        "upper": str(base / "upper"),
        "options": f"plugins=test,lowerdir=//test//{converted / 'layer'},"
                   f"upperdir={base / 'upper'},workdir={base / 'work'}",
    }
    r = subprocess.run(
        ["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid), "--init-groups",
         "unshare", "--map-auto", "--map-root-user", "--mount",
         sys.executable, "-c", ROOTLESS_PROBE, json.dumps(spec)],
        capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})
    require(r.returncode == 0 or "unshare" not in r.stderr, "unshare --map-auto (uidmap)")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mount"][0] == 0, out["mount"][1]
    assert out["before"] == [33, 33, 0o640]
    assert out["after_write"] == [33, 33, 0o640]
    assert out["upper_real"] == [33, 33, 0o640]  # really given to the namespace's uid 33
    assert out["after_change"] == [44, 44, 0o600]
    assert out["secret"] == [0, 0, 0o600]
