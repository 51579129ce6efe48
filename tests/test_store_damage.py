"""A damaged shared store and hostile readers (issue 12, points 2, 3 and 4).

- A user who can read the store cannot stall root's writers: store.lock is
  root's alone (0600), readers take no lock, and writers never wait on
  containers/storage's lock files, which any reader may lock.
- One damaged image record (empty, truncated, null, wrong types, a stray
  file) affects only its own image: the others are listed, inspected and
  published as before, `images` lists it as damaged, `rm ID` removes it.
- A damaged layout (store.lock a symlink or a directory, images/ a file) is a
  one-line error naming the path and the fix, never a traceback.

The stores are built through the store API (no podman needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ensure_user, is_root, require, tool

from cshare.errors import CshareError
from cshare.store.shared import ImageRecord, SharedStore

ID_A, ID_B, ID_C = ("a" * 64, "b" * 64, "c" * 64)
IMG_1, IMG_2, IMG_3 = ("1" * 64, "2" * 64, "3" * 64)

pytestmark = pytest.mark.root


@pytest.fixture
def store() -> Iterator[SharedStore]:
    """Images one (B on A) and two (C on A), with podman's view of both."""
    require(is_root(), "root (the shared store is root-owned)")
    parent = Path(tempfile.mkdtemp(prefix="cshare-damage-", dir="/var/tmp"))
    parent.chmod(0o755)
    shared = SharedStore(parent / "store")
    with shared.write_lock():
        for layer_id, parent_id in ((ID_A, None), (ID_B, ID_A), (ID_C, ID_A)):
            stage = shared.stage("t-")
            (stage / "diff").mkdir(mode=0o755)
            shared.publish_layer(stage, {"id": layer_id, "parent": parent_id,
                                         "diff-digest": f"sha256:{layer_id}"})
        for image_id, name, layers in ((IMG_1, "one", [ID_B, ID_A]), (IMG_2, "two", [ID_C, ID_A])):
            add_image(shared, image_id, name, layers)
        shared.sync_catalogues()
    yield shared
    shutil.rmtree(parent, ignore_errors=True)


def add_image(shared: SharedStore, image_id: str, name: str, layers: list[str]) -> None:
    shared.publish_big_data(image_id, {"manifest": b"{}", f"sha256:{image_id}": b"{}"})
    shared.write_image(ImageRecord(image_id, (f"localhost/{name}:latest",), tuple(layers),
                                   {"cmd": ["/bin/sh"]}, None, None, {"id": image_id}))


def cshare(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("cshare"), *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cshare: error: "), proc.stderr
    return lines[0]


def catalogue_ids(shared: SharedStore) -> list[str]:
    return [i["id"] for i in json.loads((shared.root / "overlay-images" / "images.json").read_text())]


# ---------------------------------------------------------------- point 2: readers never stall writers
HOLD = """
import fcntl, os, sys, time
held = []
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY)
        fcntl.lockf(fd, fcntl.LOCK_SH)
        held.append(os.path.basename(path))
    except OSError:
        pass
print(" ".join(held), flush=True)
time.sleep(120)
"""


@pytest.mark.rootless
@pytest.mark.timeout(120)
def test_a_user_holding_read_locks_cannot_stall_rm_or_make_shared(store: SharedStore) -> None:
    alice = ensure_user("alice")
    locks = [store.lock_path, store.root / "overlay-images" / "images.lock",
             store.root / "overlay-layers" / "layers.lock"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, locks)], stdout=subprocess.PIPE,
                              text=True, user=alice.pw_uid, group=alice.pw_gid, extra_groups=[])
    try:
        assert holder.stdout is not None
        held = holder.stdout.readline().split()
        # What any reader may lock (podman read-locks these), and what it may not.
        assert held == ["images.lock", "layers.lock"], held
        removed = cshare("rm", "one", "--store", str(store.root), timeout=30)
        assert removed.returncode == 0, removed.stderr
        with store.write_lock():  # make-shared's path: publish and regenerate podman's view
            add_image(store, IMG_3, "three", [ID_C, ID_A])
            store.sync_catalogues()
        assert sorted(catalogue_ids(store)) == [IMG_2, IMG_3]
        assert holder.poll() is None, "the reader let go: the test proved nothing"
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- point 3: one damaged record
DAMAGE = {
    "empty": (IMG_2, b""),
    "truncated": (IMG_2, b'{"id": "2222'),
    "null": (IMG_2, b"null"),
    "wrong-types": (IMG_2, json.dumps({"id": IMG_2, "names": "two", "layers": [ID_C]}).encode()),
    "not-its-id": (IMG_2, json.dumps({"id": IMG_1, "names": [], "layers": [ID_B]}).encode()),
    "missing-layer": (IMG_2, json.dumps({"id": IMG_2, "names": ["localhost/two:latest"],
                                         "layers": ["d" * 64]}).encode()),
    "stray-file": ("junk", b"not json at all"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_record_affects_only_its_image(store: SharedStore, kind: str) -> None:
    bad_id, body = DAMAGE[kind]
    (store.images_dir / f"{bad_id}.json").write_bytes(body)
    root = str(store.root)

    listed = cshare("images", "--store", root, "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    good = [i for i in data if "damaged" not in i]
    damaged = [i for i in data if "damaged" in i]
    assert [i["id"] for i in good] == [IMG_1] + ([IMG_2] if bad_id == "junk" else [])
    assert [d["id"] for d in damaged] == [bad_id] and damaged[0]["damaged"]
    table = cshare("images", "--store", root)
    assert table.returncode == 0 and "damaged" in table.stdout and "localhost/one:latest" in table.stdout

    assert json.loads(cshare("inspect", "one", "--store", root).stdout)["id"] == IMG_1
    if bad_id != "junk":
        message = one_line_error(cshare("inspect", IMG_2[:12], "--store", root))
        assert "damaged" in message and f"cshare rm {IMG_2[:12]}" in message
    # A writer still works, and podman's view keeps every usable image (not the damaged one).
    with store.write_lock():
        add_image(store, IMG_3, "three", [ID_C, ID_A])
        store.sync_catalogues()
    expected = sorted([IMG_1, IMG_3] + ([IMG_2] if bad_id == "junk" else []))
    assert sorted(catalogue_ids(store)) == expected

    # rm removes the damaged record; the others stay.
    gone = cshare("rm", bad_id[:12], "--store", root)
    assert gone.returncode == 0, gone.stderr
    assert not (store.images_dir / f"{bad_id}.json").exists()
    left = json.loads(cshare("images", "--store", root, "--json").stdout)
    assert all("damaged" not in i for i in left)
    assert IMG_1 in [i["id"] for i in left]
    assert store.layer_ids() == [ID_A, ID_B, ID_C]  # still used by images one and three


# ---------------------------------------------------------------- point 4: damaged layout
def _lock_symlink(store: SharedStore) -> str:
    store.lock_path.unlink()
    store.lock_path.symlink_to("/etc/passwd")
    return f"{store.lock_path} is a symlink"


def _lock_directory(store: SharedStore) -> str:
    store.lock_path.unlink()
    store.lock_path.mkdir()
    return f"{store.lock_path} is a directory"


def _images_file(store: SharedStore) -> str:
    shutil.rmtree(store.images_dir)
    store.images_dir.write_text("x")
    return f"{store.images_dir} is not a directory"


@pytest.mark.parametrize("damage", [_lock_symlink, _lock_directory, _images_file],
                         ids=["lock-symlink", "lock-directory", "images-a-file"])
def test_a_damaged_layout_is_one_line_naming_the_path_and_fix(store: SharedStore, damage) -> None:  # type: ignore[no-untyped-def]
    expected = damage(store)
    before = sorted(os.listdir(store.root))
    root = str(store.root)
    for args in (["images"], ["inspect", "one"], ["rm", "one"]):
        message = one_line_error(cshare(*args, "--store", root))
        assert expected in message, (args, message)
        assert "damaged" in message and ("remove it" in message or "move it away" in message)
    with pytest.raises(CshareError, match="damaged"):
        with store.write_lock():
            pass
    assert sorted(os.listdir(store.root)) == before
    assert os.readlink(store.lock_path) == "/etc/passwd" if damage is _lock_symlink else True


# ---------------------------------------------------------------- issue 13: a locked or damaged source store
LOCKER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def _source(base: Path) -> Path:
    root = base / "podman-root"
    for d in ("overlay-images", "overlay-layers", "overlay"):
        (root / d).mkdir(parents=True)
    (root / "overlay-images" / "images.json").write_text("[]")
    for lock in ("overlay-images/images.lock", "overlay-layers/layers.lock"):
        (root / lock).write_text("")
    return root


def test_a_source_store_locked_by_a_writer_is_one_line_naming_it(tmp_path: Path) -> None:
    require(is_root(), "root")
    source = _source(tmp_path)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(source / "overlay-layers" / "layers.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        done = subprocess.run([tool("cshare"), "make-shared", "x", "--storage-root", str(source),
                               "--store", str(tmp_path / "store")], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, CSHARE_LOCK_WAIT="1"))
        message = one_line_error(done)
        assert f"pid {locker.pid}" in message and "layers.lock" in message, message
        assert not (tmp_path / "store").exists()  # nothing was created
    finally:
        locker.kill()
        locker.wait()


def test_a_damaged_source_store_is_one_line(tmp_path: Path) -> None:
    require(is_root(), "root")
    source = _source(tmp_path)
    (source / "overlay-images" / "images.json").write_text("{not json")
    message = one_line_error(cshare("make-shared", "x", "--storage-root", str(source),
                                    "--store", str(tmp_path / "store")))
    assert "images.json is not valid JSON" in message
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- issue 13: podman notices every change
def test_every_change_rewrites_the_last_writer_tokens_and_no_op_does_not(store: SharedStore) -> None:
    locks = [store.root / "overlay-images" / "images.lock", store.root / "overlay-layers" / "layers.lock"]
    tokens = [p.read_bytes() for p in locks]
    assert all(len(t) == 64 for t in tokens)
    with store.write_lock():
        assert not store.sync_catalogues()  # nothing changed: podman need not reload
    assert [p.read_bytes() for p in locks] == tokens
    with store.write_lock():
        add_image(store, IMG_3, "three", [ID_C, ID_A])
        assert store.sync_catalogues()
    changed = [p.read_bytes() for p in locks]
    assert all(new != old and len(new) == 64 for new, old in zip(changed, tokens, strict=True))
    assert IMG_3 in catalogue_ids(store)
