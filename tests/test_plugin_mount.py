"""Plugins through a real cshare-overlay mount: the rootless proof of the `test`
plugin, a plugin failing mid-operation, the plugin written from cshare-plugins(7),
and the `tar` plugin extracting only what is touched.

The rootless proof (issue 4): root converts a tree holding root's 0600 file and
0700 directory, a uid-33 0640 file, a setuid binary and a device node.  alice
mounts it in `unshare --map-auto --map-root-user --mount` with
`lowerdir=//test//PATH` and sees the original owners and modes; as namespace
root she reads the 0600 file and lists the 0700 directory; a uid-33 process of
the namespace cannot read root's file.  The same tree unconverted shows 65534
owners and refuses those reads.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import (
    ensure_user,
    fuse_usable,
    is_root,
    make_fuse_usable_for_users,
    require,
    tool,
)
from plugin_support import Foreground, root_fuse_dirs

from cshare_fuse.formats.overrides import OVERRIDE_XATTR, Override

__all__ = ["root_fuse_dirs"]  # a fixture used here, defined in plugin_support

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(60)]

EXAMPLE = Path(__file__).resolve().parent / "thirdparty_plugin_example.py"
SECRET = b"root's secret\n"
WWW = b"www-data's file\n"


# -- building and converting the tree ----------------------------------------------------

def build_tree(root: Path) -> None:
    """The tree of the proof, with real owners and modes (needs root)."""
    root.mkdir(mode=0o755)
    (root / "secret").write_bytes(SECRET)
    os.chmod(root / "secret", 0o600)
    (root / "rootdir").mkdir()
    (root / "rootdir" / "inner").write_bytes(b"inner\n")
    os.chmod(root / "rootdir", 0o700)
    (root / "www").write_bytes(WWW)
    os.chown(root / "www", 33, 33)
    os.chmod(root / "www", 0o640)
    shutil.copy(shutil.which("true") or "/bin/true", root / "suid")
    os.chmod(root / "suid", 0o4755)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(root / "null", 0o666)  # mknod's mode went through the umask
    os.symlink("secret", root / "link")


def convert_by_hand(root: Path) -> None:
    """What `cshare convert` does (formats.md §1), for when it is not there yet."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            _convert_entry(Path(dirpath) / name)
    _convert_entry(root)


def _convert_entry(path: Path) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return  # symlinks carry no override
    record = Override.from_stat(st.st_mode, st.st_uid, st.st_gid, st.st_rdev)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        path.unlink()
        path.touch()  # a device, fifo or socket becomes an empty stand-in
    os.setxattr(path, OVERRIDE_XATTR, record.format())
    os.chown(path, 0, 0)
    os.chmod(path, 0o755)


def convert(root: Path) -> str:
    """Convert with `cshare convert` when it is implemented, else by hand; say which."""
    r = subprocess.run([tool("cshare"), "convert", "--quiet", str(root)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode == 0:
        return "cshare convert"
    if "ModuleNotFoundError" in r.stderr or "No such command" in r.stderr:
        convert_by_hand(root)  # the command is not written yet
        return "by hand"
    raise AssertionError(f"cshare convert failed: {r.stderr.strip()[-1000:]}")


# -- running things as alice in a user namespace ----------------------------------------

# Runs inside alice's namespace: mounts, probes, unmounts, prints one JSON document.
PROBE = r'''
import json, os, subprocess, sys

spec = json.loads(sys.argv[1])
mnt = spec["mnt"]
out = {}
r = subprocess.run([spec["overlay"], "-o", spec["options"], mnt], capture_output=True,
                   text=True, stdin=subprocess.DEVNULL)
out["mount"] = [r.returncode, r.stderr.strip()]

def attempt(func):
    try:
        return {"ok": func()}
    except OSError as exc:
        return {"errno": exc.errno}

def read(path):
    with open(path, "rb") as f:
        return f.read().decode()

def as_uid(uid, path):
    code = ("import errno, sys\n"
            "try:\n    open(sys.argv[1], 'rb').read(); print('ok')\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno])\n")
    r = subprocess.run(["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                        sys.executable, "-c", code, path], capture_output=True, text=True)
    return r.stdout.strip() or r.stderr.strip()

def capabilities(uid, program):
    # `program` is a copy of cat: run as `uid`, it shows the capabilities its exec gave.
    r = subprocess.run(["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                        program, "/proc/self/status"], capture_output=True, text=True)
    found = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("CapPrm:")]
    return found[0] if found else r.stderr.strip()

if r.returncode == 0:
    try:
        out["stat"] = {}
        for name in spec["stat"]:
            res = attempt(lambda: os.lstat(os.path.join(mnt, name)))
            if "ok" in res:
                st = res["ok"]
                res = {"ok": [st.st_mode, st.st_uid, st.st_gid, st.st_rdev]}
            out["stat"][name] = res
        out["read"] = {n: attempt(lambda: read(os.path.join(mnt, n))) for n in spec["read"]}
        out["list"] = {n: attempt(lambda: sorted(os.listdir(os.path.join(mnt, n))))
                       for n in spec["list"]}
        out["as_uid"] = {f"{u}:{n}": as_uid(u, os.path.join(mnt, n)) for u, n in spec["as_uid"]}
        out["caps"] = {f"{u}:{n}": capabilities(u, os.path.join(mnt, n)) for u, n in spec["caps"]}
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
print(json.dumps(out))
'''


def as_alice_in_namespace(work: Path, spec: dict) -> dict:
    """Run PROBE as alice inside `unshare --map-auto --map-root-user --mount`."""
    user = ensure_user("alice")
    make_fuse_usable_for_users()
    for d in ("up", "work", "mnt"):
        (work / d).mkdir(parents=True, exist_ok=True)
        os.chown(work / d, user.pw_uid, user.pw_gid)
    probe = work / "probe.py"
    probe.write_text(PROBE)
    probe.chmod(0o644)
    spec = {"mnt": str(work / "mnt"), "overlay": tool("cshare-overlay"), "stat": [], "read": [],
            "list": [], "as_uid": [], "caps": [], **spec}
    spec["options"] += f",upperdir={work / 'up'},workdir={work / 'work'}"
    r = subprocess.run(["runuser", "-u", "alice", "--", "unshare", "--map-auto",
                        "--map-root-user", "--mount", sys.executable, str(probe),
                        json.dumps(spec)], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["mount"][0] == 0, f"mount failed as alice: {result['mount'][1]}"
    return result


def require_rootless() -> None:
    require(is_root(), "root (to build the tree and create the user alice)")
    require(fuse_usable(), "/dev/fuse and fusermount3 (Debian package fuse3)")
    for cmd in ("unshare", "setpriv", "runuser", "newuidmap"):
        require(shutil.which(cmd) is not None, f"the {cmd} command (util-linux, uidmap)")


PROOF = {"stat": ["secret", "rootdir", "www", "suid", "null", "link"],
         "read": ["secret", "rootdir/inner", "www"],
         "list": ["rootdir"],
         "as_uid": [[33, "secret"], [33, "www"], [33, "rootdir/inner"]]}


@pytest.mark.rootless
def test_rootless_user_sees_original_owners_and_modes(world_tmp: Path) -> None:
    require_rootless()
    tree = world_tmp / "converted"
    build_tree(tree)
    how = convert(tree)
    assert os.lstat(tree / "secret").st_mode & 0o7777 == 0o755, how  # really converted
    result = as_alice_in_namespace(world_tmp / "alice", {
        "options": f"plugins=test,lowerdir=//test//{tree}", **PROOF})
    st = result["stat"]
    assert st["secret"]["ok"][:3] == [stat.S_IFREG | 0o600, 0, 0]
    assert st["rootdir"]["ok"][:3] == [stat.S_IFDIR | 0o700, 0, 0]
    assert st["www"]["ok"][:3] == [stat.S_IFREG | 0o640, 33, 33]
    assert st["suid"]["ok"][:3] == [stat.S_IFREG | 0o4755, 0, 0]
    assert st["null"]["ok"] == [stat.S_IFCHR | 0o666, 0, 0, os.makedev(1, 3)]
    assert stat.S_ISLNK(st["link"]["ok"][0]) and st["link"]["ok"][1:3] == [0, 0]
    # Namespace root reads root's 0600 file and lists root's 0700 directory.
    assert result["read"]["secret"] == {"ok": SECRET.decode()}
    assert result["read"]["rootdir/inner"] == {"ok": "inner\n"}
    assert result["list"]["rootdir"] == {"ok": ["inner"]}
    # uid 33 of the namespace: its own file yes, root's no (kernel checks the reported modes).
    assert result["as_uid"]["33:www"] == "ok"
    assert result["as_uid"]["33:secret"] == "EACCES"
    assert result["as_uid"]["33:rootdir/inner"] == "EACCES"


# cap_net_raw, permitted and effective (VFS_CAP_REVISION_2).
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


@pytest.mark.rootless
def test_file_capabilities_set_aside_by_make_shared_work_in_the_users_container(
        world_tmp: Path) -> None:
    """A file capability works again for the container's uid 33, and only on that file."""
    from cshare.store.layercheck import secure_tree

    require_rootless()
    tree = world_tmp / "caps"
    tree.mkdir(mode=0o755)
    cat = shutil.which("cat") or "/bin/cat"
    for name in ("ping", "plaincat"):
        shutil.copy(cat, tree / name)
        os.chmod(tree / name, 0o755)
    os.setxattr(tree / "ping", "security.capability", CAP_NET_RAW)
    convert(tree)
    secure_tree(tree)  # what make-shared does before publishing a layer
    assert "security.capability" not in os.listxattr(tree / "ping")  # nothing on the host
    result = as_alice_in_namespace(world_tmp / "alice", {
        "options": f"plugins=test,lowerdir=//test//{tree}",
        "caps": [[33, "ping"], [33, "plaincat"]]})
    assert int(result["caps"]["33:ping"], 16) == 1 << 13, result["caps"]  # cap_net_raw
    assert int(result["caps"]["33:plaincat"], 16) == 0, result["caps"]


@pytest.mark.rootless
def test_rootless_user_without_conversion_sees_nobody_and_is_refused(world_tmp: Path) -> None:
    """The contrast: the same tree, unconverted, mounted the same way."""
    require_rootless()
    tree = world_tmp / "plain"
    build_tree(tree)
    result = as_alice_in_namespace(world_tmp / "alice", {
        "options": f"plugins=test,lowerdir=//test//{tree}", **PROOF})
    st = result["stat"]
    for name in ("secret", "www", "suid"):
        assert st[name]["ok"][1:3] == [65534, 65534], name
    assert st["suid"]["ok"][0] == stat.S_IFREG | 0o4755  # modes are the real ones
    assert result["read"]["secret"] == {"errno": errno.EACCES}
    assert result["read"]["rootdir/inner"] == {"errno": errno.EACCES}
    assert result["list"]["rootdir"] == {"errno": errno.EACCES}
    assert result["read"]["www"] == {"errno": errno.EACCES}
    assert result["as_uid"]["33:secret"] == "EACCES"
    # An unreadable directory can still be looked up (as with the kernel's overlayfs):
    # only listing it is refused.
    assert st["rootdir"].get("ok", [None])[:3] == [stat.S_IFDIR | 0o700, 65534, 65534], st


# -- mounts as root -----------------------------------------------------------------------

RAISING_PLUGIN = '''
from cshare_fuse.plugin_api import API_VERSION, DataSource

class Source(DataSource):
    def stat(self, path):
        if path.endswith(b"crash"):
            raise ZeroDivisionError("plugin bug in stat")
        return super().stat(path)

    def readdir(self, path):
        if path.endswith(b"unlistable"):
            raise KeyError("plugin bug in readdir")
        return super().readdir(path)

    def open(self, path, flags):
        if path.endswith(b"explode"):
            raise RuntimeError("plugin bug in open")
        return super().open(path, flags)

class Plugin:
    name = "raising"
    api_version = API_VERSION
    def load(self, data, path):
        return Source(path)

plugin = Plugin()
'''


def test_a_plugin_that_raises_gives_eio_and_the_mount_keeps_serving(root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    layer = base / "layer"
    (layer / "sub").mkdir(parents=True)
    (layer / "sub" / "crash").write_text("never seen")
    (layer / "explode").write_text("never read")
    (layer / "fine").write_text("fine\n")
    (layer / "sub" / "unlistable").mkdir()
    plugin_file = base / "raising.py"
    plugin_file.write_text(RAISING_PLUGIN)
    overlay = Foreground(base, f"plugins={plugin_file},lowerdir=//raising//{layer}")
    mnt = overlay.mnt
    try:
        with pytest.raises(OSError) as info:
            os.stat(mnt / "sub" / "crash")
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            (mnt / "explode").read_text()
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            os.listdir(mnt / "sub" / "unlistable")
        assert info.value.errno == errno.EIO
        # Still serving, including the entries next to the failed ones.
        assert (mnt / "fine").read_text() == "fine\n"
        assert os.stat(mnt / "explode").st_size == len("never read")
        assert sorted(os.listdir(mnt)) == ["explode", "fine", "sub"]
    finally:
        log = overlay.close()
    assert "ZeroDivisionError" in log and "plugin bug in stat" in log
    assert "RuntimeError" in log and "plugin bug in open" in log
    assert "KeyError" in log and "plugin bug in readdir" in log


def test_malformed_override_gives_eio_for_that_entry_only(root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    layer = base / "layer"
    (layer / "d").mkdir(parents=True)
    (layer / "d" / "bad").write_text("x")
    os.setxattr(layer / "d" / "bad", OVERRIDE_XATTR, b"0:0:0999:file")
    (layer / "good").write_text("good\n")
    os.setxattr(layer / "good", OVERRIDE_XATTR, b"33:33:0640:file")
    overlay = Foreground(base, f"plugins=test,lowerdir=//test//{layer}")
    try:
        with pytest.raises(OSError) as info:
            os.stat(overlay.mnt / "d" / "bad")
        assert info.value.errno == errno.EIO
        st = os.stat(overlay.mnt / "good")
        assert (st.st_uid, st.st_mode) == (33, stat.S_IFREG | 0o640)
        assert (overlay.mnt / "good").read_text() == "good\n"
    finally:
        log = overlay.close()
    assert "0999" in log  # the log names the bad value


def test_the_plugin_written_from_the_man_page_mounts(root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    layer = base / "layer"
    (layer / "dir").mkdir(parents=True)
    (layer / "visible").write_text("v")
    (layer / "key.secret").write_text("s")
    (layer / "dir" / "other.secret").write_text("s")
    overlay = Foreground(base, f"plugins={EXAMPLE},lowerdir=//hide/*.secret/{layer}")
    try:
        assert sorted(os.listdir(overlay.mnt)) == ["dir", "visible"]
        assert os.listdir(overlay.mnt / "dir") == []
        assert not (overlay.mnt / "key.secret").exists()
        assert (overlay.mnt / "visible").read_text() == "v"
        # Writes go to the upper layer as usual; the hidden lower file stays hidden.
        (overlay.mnt / "new").write_text("n")
        assert (base / "up" / "new").read_text() == "n"
    finally:
        overlay.close()


def test_tar_layer_extracts_only_what_is_touched(root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    cache = base / "cache"
    cache.mkdir()
    with tarfile.open(cache / "layer.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("etc", "usr"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
            for i in range(100):
                data = f"{d}/{i}\n".encode()
                info = tarfile.TarInfo(f"{d}/f{i:02}")
                info.size, info.mode, info.uid = len(data), 0o640, 33
                tar.addfile(info, io.BytesIO(data))
    overlay = Foreground(base, f"plugins=tar,lowerdir=//tar//{cache}")
    try:
        assert (overlay.mnt / "etc" / "f07").read_text() == "etc/7\n"
        st = os.stat(overlay.mnt / "etc" / "f07")
        assert (st.st_uid, st.st_mode) == (33, stat.S_IFREG | 0o640)
        extracted = {str(p.relative_to(cache / "root")) for p in (cache / "root").rglob("*")}
        assert extracted == {"etc", "etc/f07"}  # 1 of 200 files
        # `ls -l usr`: every entry looked up and stat'ed, yet no file data extracted.
        listing = {name: os.lstat(overlay.mnt / "usr" / name) for name in
                   os.listdir(overlay.mnt / "usr")}
        assert len(listing) == 100 and {st.st_uid for st in listing.values()} == {33}
        assert all(st.st_size == len(f"usr/{int(n[1:])}\n") for n, st in listing.items())
        with_data = {str(p.relative_to(cache / "root")) for p in (cache / "root").rglob("*")
                     if p.is_file() and p.stat().st_size}
        assert with_data == {"etc/f07"}
    finally:
        overlay.close()


def test_relative_plugin_path_is_taken_from_where_the_mount_started(root_fuse_dirs: Path) -> None:
    """`//test//layer` (empty DATA, relative PATH) through the daemonizing command."""
    base = root_fuse_dirs
    (base / "layer").mkdir()
    (base / "layer" / "f").write_text("relative\n")
    os.setxattr(base / "layer" / "f", OVERRIDE_XATTR, b"33:33:0600:file")
    r = subprocess.run([tool("cshare-overlay"), "-o",
                        "plugins=test,lowerdir=//test//layer,upperdir=up,workdir=work", "mnt"],
                       cwd=base, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    try:
        st = os.stat(base / "mnt" / "f")
        assert (st.st_uid, st.st_mode) == (33, stat.S_IFREG | 0o600)
        assert (base / "mnt" / "f").read_text() == "relative\n"
    finally:
        subprocess.run(["fusermount3", "-u", str(base / "mnt")], capture_output=True)
