"""`cshare migrate`: a shared store of the previous layout, converted in place.

The old layout (layers/ID/{diff,layer.json}, images/ID.json without podman's
entry) is built by hand here; migrate must move every layer by rename (the
diff keeps its inode: no data copied), give each layer its short name and
ancestors, each image a manifest and config, and podman's catalogues; and a
second run must change nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import is_root, require, tool

from cshare.store.shared import SharedStore

ID_A, ID_B = "a" * 64, "b" * 64
IMG = "1" * 64

pytestmark = pytest.mark.root


@pytest.fixture
def old_store() -> Iterator[Path]:
    require(is_root(), "root (the shared store is root-owned)")
    base = Path(tempfile.mkdtemp(prefix="cshare-migrate-", dir="/var/tmp"))
    store = base / "store"
    for d in ("layers", "images", "tmp"):
        (store / d).mkdir(parents=True)
    (store / "tmp").chmod(0o700)
    (store / "store.lock").write_text("")
    for layer_id, parent in ((ID_A, None), (ID_B, ID_A)):
        diff = store / "layers" / layer_id / "diff"
        diff.mkdir(parents=True)
        (diff / f"file-{layer_id[:4]}").write_text(layer_id)
        (store / "layers" / layer_id / "layer.json").write_text(json.dumps(
            {"id": layer_id, "parent": parent, "diff-digest": f"sha256:{layer_id}", "size": 64}))
    (store / "images" / f"{IMG}.json").write_text(json.dumps({
        "id": IMG, "names": ["localhost/old:latest"], "layers": [ID_B, ID_A],
        "config": {"entrypoint": None, "cmd": ["/bin/sh"], "env": ["A=1"], "workdir": "/w", "user": "33"},
        "digest": None, "created": "2026-01-01T00:00:00Z"}))
    yield store
    shutil.rmtree(base, ignore_errors=True)


def test_migrate_moves_layers_by_rename_and_makes_podmans_view(old_store: Path) -> None:
    inodes = {i: os.stat(old_store / "layers" / i / "diff" / f"file-{i[:4]}").st_ino for i in (ID_A, ID_B)}
    assert SharedStore(old_store).resolve("old").layers == (ID_B, ID_A)  # read as it is, before
    # make-shared refuses to mix layouts, and says what to run.
    refused = subprocess.run([tool("cshare"), "make-shared", "x", "--store", str(old_store),
                              "--storage-root", str(old_store.parent / "none")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and f"cshare migrate --store {old_store}" in refused.stderr

    done = subprocess.run([tool("cshare"), "migrate", "--store", str(old_store), "--storage-root",
                           str(old_store.parent / "no-podman-here"), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sorted(report["layers_moved"]) == [ID_A, ID_B] and report["images_rebuilt"] == [IMG]
    assert not (old_store / "layers").exists()
    for layer_id in (ID_A, ID_B):
        moved = old_store / "overlay" / layer_id / "diff" / f"file-{layer_id[:4]}"
        assert os.stat(moved).st_ino == inodes[layer_id], "the layer's data was copied"
    link_a = (old_store / "overlay" / ID_A / "link").read_text()
    assert (old_store / "overlay" / ID_B / "lower").read_text() == f"l/{link_a}"
    assert os.readlink(old_store / "overlay" / "l" / link_a) == f"../{ID_A}/diff"
    images = json.loads((old_store / "overlay-images" / "images.json").read_text())
    assert [(i["id"], i["names"], i["layer"]) for i in images] == [(IMG, ["localhost/old:latest"], ID_B)]
    layers = json.loads((old_store / "overlay-layers" / "layers.json").read_text())
    assert {x["id"]: x.get("parent") for x in layers} == {ID_A: None, ID_B: ID_A}
    # The rebuilt config carries what the record kept, under the digest the manifest names.
    big = old_store / "overlay-images" / IMG
    manifest = json.loads((big / "manifest").read_text())
    config_key = manifest["config"]["digest"]
    from cshare.store.imagestore import big_data_file_name

    config = json.loads((big / big_data_file_name(config_key)).read_text())
    assert config["config"] == {"Cmd": ["/bin/sh"], "Env": ["A=1"], "WorkingDir": "/w", "User": "33"}
    assert config["rootfs"]["diff_ids"] == [f"sha256:{ID_A}", f"sha256:{ID_B}"]
    assert SharedStore(old_store).resolve("old").layers == (ID_B, ID_A)  # cshare reads it still

    again = subprocess.run([tool("cshare"), "migrate", "--store", str(old_store)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout + again.stderr
