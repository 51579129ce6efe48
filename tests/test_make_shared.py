"""make-shared end to end: a private podman store -> the shared store.

Covers issue 5 points 1 and 2: resolving, copying, converting, atomic publish,
locking, dedupe, metadata, safety of what the store exposes, --group, and that
whiteouts and opaque directories still hide what they hide (checked through a
kernel overlay mount and through the FUSE overlay).
"""

# ruff: noqa: F811  (fixtures imported from podman_support are parameters here)
from __future__ import annotations

import grp
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ensure_user, is_root, require, tool, unmount_all_below
from mount_support import cshare_cmd, kill_overlays_below, rootless_user, user_dir
from overlay_support import LayerDirs, mounted
from podman_support import (  # noqa: F401
    BASE,
    CHANGED,
    DEMO,
    PodmanImages,
    podman_images,
    podman_store,
)
from tree_support import deep_tree_removed, make_chain

from cshare.demo.image import build_demo_rootfs
from cshare.store.containers import SourceStore
from cshare.store.layercheck import secure_tree, unsafe_entries
from cshare.store.make_shared import make_shared
from cshare.store.shared import SharedStore
from cshare_fuse.formats.overrides import OVERRIDE_XATTR, STASHED_CAPABILITY_XATTR, parse_override

pytestmark = [pytest.mark.root, pytest.mark.podman, pytest.mark.timeout(180)]

TEST_GROUP = "cshare-readers"


# ---------------------------------------------------------------- helpers
def new_store_dir() -> Path:
    """A parent every user can traverse, and a store path below it (not created)."""
    parent = Path(tempfile.mkdtemp(prefix="cshare-store-", dir="/var/tmp"))
    parent.chmod(0o755)
    return parent / "store"


def drop_store(store: Path) -> None:
    unmount_all_below(store.parent)
    shutil.rmtree(store.parent, ignore_errors=True)


def cshare(
    *args: str, user: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    argv = [tool("cshare"), *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=60
    )


def checksum(root: Path) -> dict[str, tuple[Any, ...]]:
    """Content and metadata of every entry below root (the store itself included)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        names = dirnames + filenames + ([""] if dirpath == str(root) else [])
        for name in names:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            xattrs = tuple(
                sorted(
                    (a, os.getxattr(path, a, follow_symlinks=False))
                    for a in os.listxattr(path, follow_symlinks=False)
                )
            )
            content: str | None = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            out[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
                st.st_rdev,
                xattrs,
                content,
            )
    return out


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cshare: error: ")
    return lines[0]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shared(podman_images: PodmanImages) -> Iterator[SharedStore]:
    """A shared store holding the changed (two-layer) image and the demo image."""
    path = new_store_dir()
    try:
        for ref in (CHANGED, DEMO):
            make_shared(ref, storage_root=podman_images.store.root, store_root=path)
        yield SharedStore(path)
    finally:
        drop_store(path)


@pytest.fixture
def fresh_store() -> Iterator[Path]:
    path = new_store_dir()
    yield path
    drop_store(path)


# ---------------------------------------------------------------- content and metadata
def test_record_matches_podman(shared: SharedStore, podman_images: PodmanImages) -> None:
    source = SourceStore(podman_images.store.root)
    with source.read_lock():
        snap = source.snapshot()
        image = snap.resolve(CHANGED)
        chain = [layer.id for layer in snap.chain(image)]
        config = snap.config(image).as_dict()
    with shared.read_lock():
        record = shared.resolve("tinybb-changed")
        lowers = shared.lower_dirs(record)
    assert record.id == podman_images.changed_id
    assert list(record.names) == [CHANGED]
    assert list(record.layers) == chain  # top first
    assert record.config == config
    assert record.config["cmd"] == json.loads(
        podman_images.store.inspect(CHANGED, "{{json .Config.Cmd}}")
    )
    assert lowers == [shared.root / "layers" / lid / "diff" for lid in chain]
    info = shared.layer_info(chain[0])
    assert info["parent"] == chain[1] and info["id"] == chain[0]


def test_demo_layer_keeps_owners_and_modes_in_overrides(shared: SharedStore) -> None:
    with shared.read_lock():
        (diff,) = shared.lower_dirs(shared.resolve("cshare-demo"))

    def override(rel: str) -> tuple[int, int, int, int | None]:
        o = parse_override(os.getxattr(diff / rel, OVERRIDE_XATTR, follow_symlinks=False))
        return o.uid, o.gid, o.mode, o.file_type

    assert override("etc/secret") == (0, 0, 0o600, stat.S_IFREG)
    assert override("root/private") == (0, 0, 0o700, stat.S_IFDIR)
    assert override("var/www/index.html") == (33, 33, 0o640, stat.S_IFREG)
    assert override("usr/bin/su-demo") == (0, 0, 0o4755, stat.S_IFREG)
    assert override("dev/null")[3] == stat.S_IFCHR
    assert stat.S_ISREG(os.lstat(diff / "dev" / "null").st_mode)  # no device node on the host
    assert os.path.islink(diff / "bin" / "sh")


def test_store_exposes_no_more_than_it_must(shared: SharedStore) -> None:
    root = shared.root
    st = os.lstat(root)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o700
    assert os.listdir(root / "tmp") == []
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            m = os.lstat(path).st_mode
            if stat.S_ISLNK(m):
                continue
            if stat.S_ISCHR(m) and os.lstat(path).st_rdev == 0:
                continue  # a whiteout
            if not (stat.S_ISREG(m) or stat.S_ISDIR(m)):
                bad.append(f"{path}: special")
            if m & 0o022 or m & 0o6000:
                bad.append(f"{path}: {stat.S_IMODE(m):o}")
    assert bad == []
    for layer_id in shared.layer_ids():
        assert unsafe_entries(shared.layer_diff(layer_id)) == []


def test_users_can_read_every_layer(shared: SharedStore) -> None:
    ensure_user("alice")
    with shared.read_lock():
        (diff,) = shared.lower_dirs(shared.resolve("cshare-demo"))
    secret = as_user("alice", "cat", str(diff / "etc" / "secret"))
    assert secret.returncode == 0 and "only root" in secret.stdout
    # everything but whiteouts (char 0/0, never opened) is readable by an ordinary user
    unreadable = as_user(
        "alice", "find", str(shared.root / "layers"), "!", "-type", "c", "!", "-readable"
    )
    assert unreadable.returncode == 0 and unreadable.stdout.strip() == ""


def test_verify_passes_on_every_layer(shared: SharedStore) -> None:
    layers = shared.layer_ids()
    assert len(layers) == 3
    for layer_id in layers:
        proc = cshare("verify", str(shared.layer_diff(layer_id)))
        assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- whiteouts and opaque dirs
def assert_changed_image_view(mnt: Path) -> None:
    assert not os.path.lexists(mnt / "f"), "the deleted file is visible"
    assert sorted(os.listdir(mnt / "d")) == ["new"], "the replaced directory shows old content"
    assert (mnt / "bin" / "busybox").is_file()  # the base layer is there


def overlay_dirs(shared: SharedStore, base: Path) -> LayerDirs:
    with shared.read_lock():
        lowers = shared.lower_dirs(shared.resolve(CHANGED))
    mnt = base / "mnt"
    mnt.mkdir()
    return LayerDirs(lowers=lowers, upper=base / "upper", work=base / "work", mnt=mnt)


def test_whiteout_and_opaque_kernel_overlay(shared: SharedStore, tmp_path: Path) -> None:
    dirs = overlay_dirs(shared, tmp_path)
    # the source layer really has the kernel-style markers this test is about
    top = dirs.lowers[0]
    assert stat.S_ISCHR(os.lstat(top / "f").st_mode) and os.lstat(top / "f").st_rdev == 0
    assert os.getxattr(top / "d", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(top / "d", "user.overlay.opaque") == b"y"
    try:
        with mounted(dirs, "kernel", upper=False) as mnt:
            assert_changed_image_view(mnt)
    finally:
        unmount_all_below(dirs.mnt)


def test_whiteout_and_opaque_fuse_overlay(shared: SharedStore, tmp_path: Path) -> None:
    dirs = overlay_dirs(shared, tmp_path)
    try:
        with mounted(dirs, "fuse", upper=False) as mnt:
            assert_changed_image_view(mnt)
    finally:
        unmount_all_below(dirs.mnt)


# ---------------------------------------------------------------- idempotence and dedupe
def test_running_again_changes_nothing(shared: SharedStore, podman_images: PodmanImages) -> None:
    before = checksum(shared.root)
    proc = cshare(
        "make-shared",
        "tinybb-changed",
        "--storage-root",
        str(podman_images.store.root),
        "--store",
        str(shared.root),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["changed"] is False
    assert [x["status"] for x in result["layers"]] == ["reused", "reused"]
    assert checksum(shared.root) == before


def test_shared_layers_are_stored_once(fresh_store: Path, podman_images: PodmanImages) -> None:
    root = podman_images.store.root
    first = make_shared(CHANGED, storage_root=root, store_root=fresh_store)
    assert [o.status for o in first.layers] == ["added", "added"]
    base_layer = first.image.layers[-1]
    inode = os.stat(fresh_store / "layers" / base_layer / "diff" / "bin" / "busybox").st_ino
    second = make_shared(BASE, storage_root=root, store_root=fresh_store)
    assert [o.status for o in second.layers] == ["reused"]
    assert second.image.layers == (base_layer,)
    assert sorted(os.listdir(fresh_store / "layers")) == sorted(first.image.layers)
    assert os.stat(fresh_store / "layers" / base_layer / "diff" / "bin" / "busybox").st_ino == inode


# ---------------------------------------------------------------- commands and errors
def test_unknown_image_is_one_line_and_creates_nothing(
    fresh_store: Path,
    podman_images: PodmanImages,
) -> None:
    proc = cshare(
        "make-shared",
        "nosuchimage",
        "--storage-root",
        str(podman_images.store.root),
        "--store",
        str(fresh_store),
    )
    line = one_line_error(proc)
    assert "nosuchimage" in line and "localhost/tinybb:latest" in line
    assert not fresh_store.exists()
    proc = cshare(
        "make-shared",
        "tinybb",
        "--storage-root",
        str(fresh_store.parent / "nothere"),
        "--store",
        str(fresh_store),
    )
    assert "--storage-root" in one_line_error(proc)


def test_group_restricts_the_store(fresh_store: Path, podman_images: PodmanImages) -> None:
    alice, bob = ensure_user("alice"), ensure_user("bob")
    try:
        grp.getgrnam(TEST_GROUP)
    except KeyError:
        subprocess.run(["groupadd", TEST_GROUP], check=True)
    subprocess.run(["usermod", "-a", "-G", TEST_GROUP, alice.pw_name], check=True)
    gid = grp.getgrnam(TEST_GROUP).gr_gid
    assert bob.pw_name not in grp.getgrnam(TEST_GROUP).gr_mem and bob.pw_gid != gid
    proc = cshare(
        "make-shared", "tinybb", "--storage-root", str(podman_images.store.root), "--store", str(fresh_store),
        "--group", TEST_GROUP,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    st = os.lstat(fresh_store)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o750)
    record = next((fresh_store / "images").iterdir())
    assert as_user("alice", "cat", str(record)).returncode == 0
    assert as_user("bob", "cat", str(record)).returncode != 0
    assert as_user("bob", "ls", str(fresh_store)).returncode != 0
    assert cshare("images", "--store", str(fresh_store), "--json", user="alice").returncode == 0
    assert "permission denied" in one_line_error(
        cshare("images", "--store", str(fresh_store), user="bob")
    )
    assert "no group" in one_line_error(
        cshare(
            "make-shared",
            "tinybb",
            "--storage-root",
            str(podman_images.store.root),
            "--store",
            str(fresh_store),
            "--group",
            "no-such-group-x",
        )  # fmt: skip
    )


# ---------------------------------------------------------------- locking and atomicity
def test_writers_are_serialized_and_readers_wait(
    fresh_store: Path, podman_images: PodmanImages
) -> None:
    root = str(podman_images.store.root)
    store = SharedStore(fresh_store)
    with store.write_lock():
        writer = subprocess.Popen(
            [
                tool("cshare"),
                "make-shared",
                "tinybb",
                "--storage-root",
                root,
                "--store",
                str(fresh_store),
                "-q",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        reader = subprocess.Popen(
            [tool("cshare"), "images", "--store", str(fresh_store), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        assert writer.poll() is None, "make-shared did not wait for the store lock"
        assert reader.poll() is None, "images did not wait for the store lock"
        assert os.listdir(fresh_store / "images") == []
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    # the reader ran after the writer or before it, never in between
    assert len(json.loads(out)) in (0, 1)

    # two writers at once: both succeed, one after the other
    procs = [
        subprocess.Popen(
            [
                tool("cshare"),
                "make-shared",
                ref,
                "--storage-root",
                root,
                "--store",
                str(fresh_store),
                "-q",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for ref in ("tinybb-changed", "cshare-demo")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with store.read_lock():
        assert sorted(n for r in store.images() for n in r.names) == sorted([BASE, CHANGED, DEMO])
        for record in store.images():
            assert all(p.is_dir() for p in store.lower_dirs(record))
    assert os.listdir(fresh_store / "tmp") == []


KILLED_RUN = """
import os, sys, time
from pathlib import Path
from cshare.store.make_shared import make_shared

class Stall:
    # A real make-shared that stops in the middle of copying a layer.
    count = 0
    def layer_start(self, *a): pass
    def layer_end(self, *a): pass
    def entry(self):
        Stall.count += 1
        if Stall.count == 10:
            Path(sys.argv[3]).write_text("copying")
            time.sleep(600)

make_shared("cshare-demo", storage_root=Path(sys.argv[1]), store_root=Path(sys.argv[2]), reporter=Stall())
"""


def test_killed_make_shared_publishes_nothing(
    fresh_store: Path, podman_images: PodmanImages
) -> None:
    marker = fresh_store.parent / "marker"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_RUN,
            str(podman_images.store.root),
            str(fresh_store),
            str(marker),
        ]
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "make-shared ended before it was interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.listdir(fresh_store / "layers") == []
    assert os.listdir(fresh_store / "images") == []
    assert os.listdir(fresh_store / "tmp") != []  # the half-copied layer is only in staging
    result = make_shared(DEMO, storage_root=podman_images.store.root, store_root=fresh_store)
    assert [o.status for o in result.layers] == ["added"]
    assert os.listdir(fresh_store / "tmp") == []
    assert unsafe_entries(fresh_store / "layers" / result.image.layers[0] / "diff") == []


def test_secure_tree_takes_layers_away_from_host_users(tmp_path: Path) -> None:
    """A converted entry owned by uid 33 could be rewritten by uid 33 of the host."""
    require(is_root(), "root (chown, security.capability)")
    tree = tmp_path / "layer"
    (tree / "www").mkdir(parents=True)
    ping = tree / "www" / "ping"
    ping.write_bytes(b"\x7fELF")
    os.setxattr(ping, OVERRIDE_XATTR, b"33:33:0750:file")
    # VFS_CAP_REVISION_2 with the effective flag; permitted = CAP_NET_RAW (13)
    capability = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    (tree / "www" / "link").symlink_to("ping")
    for path in (tree / "www", ping):
        os.chown(path, 33, 33)
        os.chmod(path, 0o755)
    os.setxattr(ping, "security.capability", capability)  # after chown, which drops it
    os.chown(tree / "www" / "link", 33, 33, follow_symlinks=False)
    assert unsafe_entries(tree) != []
    assert secure_tree(tree) == 3  # the dir, the file's owner, the file's capability
    assert (os.stat(ping).st_uid, os.stat(ping).st_mode & 0o7777) == (0, 0o755)
    assert os.stat(tree / "www").st_uid == 0
    assert "security.capability" not in os.listxattr(ping)
    assert os.getxattr(ping, STASHED_CAPABILITY_XATTR) == capability
    assert os.getxattr(ping, OVERRIDE_XATTR) == b"33:33:0750:file"
    assert os.lstat(tree / "www" / "link").st_uid == 33  # nobody can change a symlink
    assert unsafe_entries(tree) == []
    assert secure_tree(tree) == 0


@pytest.mark.rootless
@pytest.mark.fuse
def test_whiteout_and_opaque_for_an_ordinary_user(shared: SharedStore, world_tmp: Path) -> None:
    """alice cannot see trusted.* xattrs: the user-visible markers must do the hiding."""
    user = rootless_user("alice", world_tmp)
    mnt = user_dir(user, world_tmp / "mnt")
    script = (
        f"{cshare_cmd()} mount tinybb-changed {mnt} --store {shared.root} || exit 1; "
        f"if [ -e {mnt}/f ]; then echo f:visible; else echo f:gone; fi; "
        f"echo d:$(ls {mnt}/d); "
        f"if [ -x {mnt}/bin/busybox ]; then echo base:ok; fi; "
        f"{cshare_cmd()} umount {mnt}"
    )
    try:
        proc = user.run(["unshare", "--map-auto", "--map-root-user", "--mount", "sh", "-c", script])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        seen = [w for w in proc.stdout.split() if w.startswith(("f:", "d:", "base:"))]
        assert seen == ["f:gone", "d:new", "base:ok"], proc.stdout + proc.stderr
    finally:
        kill_overlays_below([user], world_tmp, [mnt])


def test_demo_rootfs_has_the_cases_that_matter(tmp_path: Path) -> None:
    require(is_root(), "root (owners and a device node)")
    root = build_demo_rootfs(tmp_path / "rootfs")

    def meta(rel: str) -> tuple[int, int, int, int]:
        st = os.lstat(root / rel)
        return stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert meta("etc/secret") == (stat.S_IFREG, 0, 0, 0o600)
    assert meta("root/private") == (stat.S_IFDIR, 0, 0, 0o700)
    assert [p.name for p in (root / "root" / "private").iterdir()] != []
    assert meta("var/www/index.html") == (stat.S_IFREG, 33, 33, 0o640)
    assert meta("usr/bin/su-demo") == (stat.S_IFREG, 0, 0, 0o4755)
    assert meta("dev/null")[0] == stat.S_IFCHR and os.lstat(
        root / "dev" / "null"
    ).st_rdev == os.makedev(1, 3)
    assert os.readlink(root / "bin" / "sh") == "busybox"
    users = {
        line.split(":")[0]: line.split(":")[2]
        for line in (root / "etc" / "passwd").read_text().splitlines()
    }
    assert users["root"] == "0" and users["www-data"] == "33" and "nobody" in users
    # busybox-static runs with no libraries: the image needs nothing from the host
    out = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "id -u; cat /etc/secret"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.split("\n")[0] == "0" and "only root" in out.stdout


def test_layer_checks_walk_a_chain_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    """secure_tree and unsafe_entries walk iteratively: a 1,100-level chain is just a tree."""
    require(is_root(), "root (chown)")
    tree = tmp_path / "layer"
    tree.mkdir()
    with deep_tree_removed(tree):
        leaf = tree / Path(*make_chain(tree, 1100)) / "leaf"
        leaf.write_text("x")
        os.chown(leaf, 33, 33)
        os.chmod(leaf, 0o755)
        assert unsafe_entries(tree) == [f"{'d/' * 1100}leaf: owned by uid 33, not root"]
        assert secure_tree(tree) == 1
        assert os.stat(leaf).st_uid == 0
        assert unsafe_entries(tree) == []
