"""Reading podman's containers/storage (cshare.store.containers).

Two kinds of tests: against a real private podman store (what podman itself
reports is the reference), and against small hand-written stores for the
cases podman will not produce on demand (incomplete layers, volatile layers,
parent cycles).
"""

# ruff: noqa: F811  (fixtures imported from podman_support are parameters here)
from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from podman_support import BASE, CHANGED, DEMO, PodmanImages, podman_images, podman_store  # noqa: F401

from cshare.errors import CshareError
from cshare.store.containers import SourceStore, big_data_file_name

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- pure parts
def test_big_data_file_names() -> None:
    assert big_data_file_name("manifest") == "manifest"
    assert big_data_file_name("a.b-c") == "=" + base64.b64encode(b"a.b-c").decode()
    key = "sha256:" + "ab" * 32
    name = big_data_file_name(key)
    assert name.startswith("=") and base64.b64decode(name[1:]).decode() == key


def write_store(
    root: Path, images: list[dict], layers: list[dict], volatile: list[dict] | None = None
) -> None:
    (root / "overlay-images").mkdir(parents=True)
    (root / "overlay-layers").mkdir()
    (root / "overlay").mkdir()
    (root / "overlay-images" / "images.json").write_text(json.dumps(images))
    (root / "overlay-layers" / "layers.json").write_text(json.dumps(layers))
    if volatile is not None:
        (root / "overlay-layers" / "volatile-layers.json").write_text(json.dumps(volatile))
    for layer in layers + (volatile or []):
        (root / "overlay" / layer["id"] / "diff").mkdir(parents=True)


def test_incomplete_layers_are_never_used(tmp_path: Path) -> None:
    write_store(
        tmp_path,
        [{"id": "i" * 64, "names": ["localhost/x:latest"], "layer": "top"}],
        [{"id": "base"}, {"id": "top", "parent": "base", "flags": {"incomplete": True}}],
    )
    source = SourceStore(tmp_path)
    with source.read_lock():
        snap = source.snapshot()
    assert "top" not in snap.layers and "base" in snap.layers
    with pytest.raises(CshareError, match="incomplete"):
        snap.chain(snap.resolve("x"))


def test_volatile_layers_and_parent_chain(tmp_path: Path) -> None:
    write_store(
        tmp_path,
        [{"id": "i" * 64, "names": ["localhost/x:latest"], "layer": "c"}],
        [{"id": "a"}, {"id": "b", "parent": "a"}],
        volatile=[{"id": "c", "parent": "b"}],
    )
    source = SourceStore(tmp_path)
    with source.read_lock():
        snap = source.snapshot()
        chain = snap.chain(snap.resolve("localhost/x"))
    assert [layer.id for layer in chain] == ["c", "b", "a"]
    assert chain[0].diff == tmp_path / "overlay" / "c" / "diff"


def test_parent_cycle_is_an_error(tmp_path: Path) -> None:
    write_store(
        tmp_path,
        [{"id": "i" * 64, "names": ["localhost/x:latest"], "layer": "a"}],
        [{"id": "a", "parent": "b"}, {"id": "b", "parent": "a"}],
    )
    source = SourceStore(tmp_path)
    with source.read_lock():
        snap = source.snapshot()
    with pytest.raises(CshareError, match="cycle"):
        snap.chain(snap.images[0])


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(CshareError, match="--storage-root"):
        with SourceStore(tmp_path / "missing").read_lock():
            pass
    (tmp_path / "empty").mkdir()
    with pytest.raises(CshareError, match="overlay"):
        with SourceStore(tmp_path / "empty").read_lock():
            pass


def test_config_under_encoded_key(tmp_path: Path) -> None:
    image_id = "d" * 64
    key = f"sha256:{image_id}"
    write_store(
        tmp_path,
        [{"id": image_id, "names": [], "layer": "a", "big-data-names": [key]}],
        [{"id": "a"}],
    )
    (tmp_path / "overlay-images" / image_id).mkdir()
    doc = {
        "config": {
            "Entrypoint": ["/e"],
            "Cmd": ["c"],
            "Env": ["A=1"],
            "WorkingDir": "/w",
            "User": "33",
        }
    }
    (tmp_path / "overlay-images" / image_id / big_data_file_name(key)).write_text(json.dumps(doc))
    source = SourceStore(tmp_path)
    with source.read_lock():
        snap = source.snapshot()
        config = snap.config(snap.resolve(image_id[:6]))
    assert config.as_dict() == {
        "entrypoint": ["/e"],
        "cmd": ["c"],
        "env": ["A=1"],
        "workdir": "/w",
        "user": "33",
    }


# ---------------------------------------------------------------- real podman
def test_images_match_podman(podman_images: PodmanImages) -> None:
    store = podman_images.store
    listed = store.podman(
        "images", "--no-trunc", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}"
    ).stdout
    expected = {
        line.split()[0].removeprefix("sha256:"): line.split()[1] for line in listed.splitlines()
    }
    source = SourceStore(store.root)
    with source.read_lock():
        snap = source.snapshot()
    got = {i.id: i.names for i in snap.images}
    assert set(got) == set(expected)
    for image_id, name in expected.items():
        assert name in got[image_id]
    assert snap.resolve("cshare-demo").id == podman_images.demo_id
    assert snap.resolve(BASE).id == podman_images.base_id


def test_layer_chain_and_config_match_podman(podman_images: PodmanImages) -> None:
    store = podman_images.store
    source = SourceStore(store.root)
    with source.read_lock():
        snap = source.snapshot()
        changed = snap.resolve(CHANGED)
        chain = snap.chain(changed)
        config = snap.config(changed)
        demo_config = snap.config(snap.resolve(DEMO))
    # podman lists diff ids base first; the chain is top first
    diff_ids = json.loads(store.inspect(CHANGED, "{{json .RootFS.Layers}}"))
    assert [layer.diff_digest for layer in reversed(chain)] == diff_ids
    assert len(chain) == 2
    assert chain[-1].parent is None and chain[0].parent == chain[1].id
    assert all(layer.diff.is_dir() for layer in chain)
    assert config.cmd == json.loads(store.inspect(CHANGED, "{{json .Config.Cmd}}"))
    assert config.env == json.loads(store.inspect(CHANGED, "{{json .Config.Env}}"))
    assert demo_config.cmd == json.loads(store.inspect(DEMO, "{{json .Config.Cmd}}"))


LOCK_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    print("blocked")
else:
    print("free")
"""


def probe(lock: Path) -> str:
    return subprocess.run(
        [sys.executable, "-c", LOCK_PROBE, str(lock)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_read_lock_keeps_podman_writers_out(podman_images: PodmanImages) -> None:
    root = podman_images.store.root
    locks = [root / "overlay-layers" / "layers.lock", root / "overlay-images" / "images.lock"]
    assert [probe(lock) for lock in locks] == ["free", "free"]
    with SourceStore(root).read_lock():
        assert [probe(lock) for lock in locks] == ["blocked", "blocked"]
    assert [probe(lock) for lock in locks] == ["free", "free"]


def test_read_lock_waits_for_a_writer(podman_images: PodmanImages) -> None:
    lock = podman_images.store.root / "overlay-images" / "images.lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        code = (
            "import sys; from pathlib import Path; from cshare.store.containers import SourceStore\n"
            "with SourceStore(Path(sys.argv[1])).read_lock(): print('got it')\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(podman_images.store.root)],
            stdout=subprocess.PIPE,
            text=True,
        )
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
    finally:
        os.close(fd)  # releases the writer lock
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "got it"
