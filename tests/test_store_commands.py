"""The shared store API (cshare.store.shared) and the images / inspect / rm commands.

The store tests build layers by hand (no podman): what matters here is the
layout, the locks, dedupe bookkeeping and what rm keeps.  The command test at
the end runs the real commands on images made by make-shared.
"""

# ruff: noqa: F811  (fixtures imported from podman_support are parameters here)
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import is_root, require, tool
from podman_support import BASE, CHANGED, PodmanImages, podman_images  # noqa: F401

from cshare.errors import CshareError
from cshare.store.shared import ImageRecord, SharedStore

ID_A, ID_B, ID_C = ("a" * 64, "b" * 64, "c" * 64)
IMG_1, IMG_2 = ("1" * 64, "2" * 64)


@pytest.fixture
def root_store() -> Iterator[SharedStore]:
    require(is_root(), "root (the shared store is root-owned)")
    parent = Path(tempfile.mkdtemp(prefix="cshare-store-", dir="/var/tmp"))
    parent.chmod(0o755)
    yield SharedStore(parent / "store")
    shutil.rmtree(parent, ignore_errors=True)


def add_layer(store: SharedStore, layer_id: str, parent: str | None = None) -> None:
    stage = store.stage("t-")
    (stage / "diff").mkdir(mode=0o755)
    (stage / "diff" / f"file-{layer_id[:4]}").write_text(layer_id)
    store.publish_layer(
        stage, {"id": layer_id, "parent": parent, "diff-digest": f"sha256:{layer_id}"}
    )


def record(image_id: str, names: list[str], layers: list[str]) -> ImageRecord:
    return ImageRecord(image_id, tuple(names), tuple(layers), {"cmd": ["/bin/sh"]}, None, None)


def test_layout_publish_and_lookup(root_store: SharedStore) -> None:
    with root_store.write_lock():
        add_layer(root_store, ID_A)
        add_layer(root_store, ID_B, ID_A)
        assert root_store.write_image(record(IMG_1, ["localhost/one:latest"], [ID_B, ID_A]))
        # the same record again: nothing written
        assert not root_store.write_image(record(IMG_1, ["localhost/one:latest"], [ID_B, ID_A]))
    root = root_store.root
    assert oct(os.stat(root).st_mode & 0o777) == oct(0o755)
    assert oct(os.stat(root / "tmp").st_mode & 0o777) == oct(0o700)
    assert os.listdir(root / "tmp") == []
    assert sorted(os.listdir(root / "layers")) == [ID_A, ID_B]
    with root_store.read_lock():
        image = root_store.resolve("one")
        assert root_store.lower_dirs(image) == [
            root / "layers" / ID_B / "diff",
            root / "layers" / ID_A / "diff",
        ]
        assert root_store.layer_info(ID_B)["parent"] == ID_A
        with root_store.read_lock():  # nesting in one process must not drop the lock
            pass
        assert image.config["cmd"] == ["/bin/sh"]
    data = json.loads((root / "images" / f"{IMG_1}.json").read_text())
    assert data["layers"] == [ID_B, ID_A] and data["names"] == ["localhost/one:latest"]
    assert set(data["config"]) == {"entrypoint", "cmd", "env", "workdir", "user"}


def test_record_needs_its_layers_first(root_store: SharedStore) -> None:
    with root_store.write_lock():
        with pytest.raises(CshareError, match="missing"):
            root_store.write_image(record(IMG_1, ["localhost/x:latest"], [ID_C]))
    assert os.listdir(root_store.images_dir) == []


def test_a_name_moves_to_the_newer_image(root_store: SharedStore) -> None:
    with root_store.write_lock():
        add_layer(root_store, ID_A)
        root_store.write_image(record(IMG_1, ["localhost/app:latest", "localhost/app:v1"], [ID_A]))
        assert root_store.drop_names(["localhost/app:latest"], keep_id=IMG_2) == [IMG_1]
        root_store.write_image(record(IMG_2, ["localhost/app:latest"], [ID_A]))
    assert root_store.resolve("app").id == IMG_2
    assert root_store.resolve("app:v1").id == IMG_1


def two_images_sharing_a_base(store: SharedStore) -> None:
    """Images one (B on A) and two (C on A)."""
    add_layer(store, ID_A)
    add_layer(store, ID_B, ID_A)
    add_layer(store, ID_C, ID_A)
    store.write_image(record(IMG_1, ["localhost/one:latest"], [ID_B, ID_A]))
    store.write_image(record(IMG_2, ["localhost/two:latest"], [ID_C, ID_A]))


def test_rm_keeps_layers_in_use(root_store: SharedStore) -> None:
    with root_store.write_lock():
        two_images_sharing_a_base(root_store)
        result = root_store.remove_image(root_store.resolve("one"))
    assert result.removed_layers == [ID_B] and result.kept_layers == [ID_A]
    assert sorted(os.listdir(root_store.layers_dir)) == [ID_A, ID_C]
    assert [r.id for r in root_store.images()] == [IMG_2]
    assert os.listdir(root_store.tmp_dir) == []


@pytest.mark.root
@pytest.mark.timeout(60)
def test_rm_refuses_layers_an_overlay_in_another_namespace_uses(root_store: SharedStore) -> None:
    with root_store.write_lock():
        two_images_sharing_a_base(root_store)
    mnt = root_store.root.parent / "mnt"
    mnt.mkdir()
    lowers = f"{root_store.layers_dir / ID_B / 'diff'}:{root_store.layers_dir / ID_A / 'diff'}"
    # A kernel overlay on image one's layers, in a mount namespace root's table does not show.
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t overlay overlay -o lowerdir={lowers} {mnt} && echo ready && read line'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        assert not os.path.ismount(mnt)  # invisible here: only /proc tells
        with root_store.write_lock(), pytest.raises(CshareError) as info:
            root_store.remove_image(root_store.resolve("one"))
        message = str(info.value)
        assert "in use" in message and f"overlay mounted on {mnt}" in message and ID_B[:12] in message
        assert "--force" in message
        assert sorted(os.listdir(root_store.layers_dir)) == [ID_A, ID_B, ID_C]  # nothing changed
        assert sorted(r.id for r in root_store.images()) == [IMG_1, IMG_2]
        # Image two's own layer is not held (A stays for image one): removed at once.
        with root_store.write_lock():
            assert root_store.remove_image(root_store.resolve("two")).removed_layers == [ID_C]
        with root_store.write_lock():
            result = root_store.remove_image(root_store.resolve("one"), force=True)
        assert sorted(result.removed_layers) == [ID_A, ID_B]
    finally:
        holder.communicate("done\n", timeout=10)


def test_bad_ids_and_records_are_errors(root_store: SharedStore) -> None:
    with root_store.write_lock():
        pass
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(CshareError):
            root_store.layer_diff(bad)
    (root_store.images_dir / f"{IMG_1}.json").write_text('{"id": 1}')
    with pytest.raises(CshareError, match="not a valid image record"):
        root_store.images()


def test_not_a_store_is_refused(tmp_path: Path) -> None:
    require(is_root(), "root")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something").write_text("x")
    with pytest.raises(CshareError, match="not a cshare store"):
        with SharedStore(tmp_path / "busy").write_lock():
            pass
    with pytest.raises(CshareError, match="make-shared"):
        with SharedStore(tmp_path / "none").read_lock():
            pass


HOLD = """
import sys, time
from pathlib import Path
from cshare.store.shared import SharedStore
with SharedStore(Path(sys.argv[1])).{lock}():
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    print(time.time(), flush=True)  # still holding the lock
"""


def test_writer_waits_for_a_reader_in_another_process(root_store: SharedStore) -> None:
    with root_store.write_lock():
        pass
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(lock="read_lock"), str(root_store.root), "3.0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None and reader.stdout.readline().strip() == "held"
    # a second reader is not blocked: it gets in while the first still holds
    other = subprocess.run(
        [sys.executable, "-c", HOLD.format(lock="read_lock"), str(root_store.root), "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert other.stdout.splitlines()[0] == "held"
    assert reader.poll() is None, "the first reader should still hold its lock"
    with root_store.write_lock():
        acquired = time.time()
    last_moment_held = float(reader.stdout.readline())
    reader.wait(timeout=10)
    assert acquired >= last_moment_held, "the writer got the lock while a reader held it"


def test_commands_on_a_missing_store_say_so(tmp_path: Path) -> None:
    for args in (["images"], ["inspect", "x"], ["rm", "x"]):
        proc = subprocess.run(
            [tool("cshare"), *args, "--store", str(tmp_path / "none")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "no shared store" in lines[0], proc.stderr


# ---------------------------------------------------------------- the commands, for real
def cshare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("cshare"), *args], capture_output=True, text=True, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cshare: error: "), proc.stderr
    return lines[0]


@pytest.mark.podman
@pytest.mark.timeout(120)
def test_images_inspect_and_rm(root_store: SharedStore, podman_images: PodmanImages) -> None:
    store = root_store.root
    root = str(podman_images.store.root)
    for ref in ("tinybb-changed", "tinybb"):
        proc = cshare("make-shared", ref, "--storage-root", root, "--store", str(store), "-q")
        assert proc.returncode == 0, proc.stderr
        assert "shared" in proc.stdout
    listed = json.loads(cshare("images", "--store", str(store), "--json").stdout)
    assert sorted(n for i in listed for n in i["names"]) == sorted([BASE, CHANGED])
    assert all(i["size"] > 1_000_000 for i in listed)  # busybox is in both
    table = cshare("images", "--store", str(store))
    assert table.returncode == 0
    assert "tinybb-changed" in table.stdout and podman_images.base_id[:12] in table.stdout

    doc = json.loads(cshare("inspect", "tinybb-changed", "--store", str(store)).stdout)
    assert doc["id"] == podman_images.changed_id
    lowers = doc["lowerdir"].split(":")
    assert lowers == [str(store / "layers" / lid / "diff") for lid in doc["layers"]]
    assert [d["id"] for d in doc["layer_details"]] == doc["layers"]
    top, base = doc["layers"]

    removed = cshare("rm", "tinybb-changed", "--store", str(store), "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["removed_layers"] == [top]
    assert json.loads(removed.stdout)["kept_layers"] == [base]
    assert os.listdir(store / "layers") == [base]
    assert (store / "layers" / base / "diff" / "bin" / "busybox").is_file()
    listed = json.loads(cshare("images", "--store", str(store), "--json").stdout)
    assert [i["names"] for i in listed] == [[BASE]]
    assert "tinybb-changed" in one_line_error(
        cshare("inspect", "tinybb-changed", "--store", str(store))
    )

    text = cshare("rm", podman_images.base_id[:8], "--store", str(store))
    assert text.returncode == 0 and "removed" in text.stdout
    assert os.listdir(store / "layers") == [] and os.listdir(store / "images") == []
    assert os.listdir(store / "tmp") == []
    assert "nothere" in one_line_error(cshare("rm", "nothere", "--store", str(store)))
    empty = cshare("images", "--store", str(store))
    assert empty.returncode == 0 and "no images" in empty.stdout


def test_modes_do_not_depend_on_the_umask(root_store: SharedStore) -> None:
    old = os.umask(0o077)
    try:
        with root_store.write_lock():
            add_layer(root_store, ID_A)
            root_store.write_image(record(IMG_1, ["localhost/one:latest"], [ID_A]))
    finally:
        os.umask(old)
    root = root_store.root
    modes = {
        p: os.stat(root / p).st_mode & 0o777
        for p in ("", "store.lock", "layers", "images", "tmp", f"layers/{ID_A}", f"layers/{ID_A}/layer.json",
                  f"images/{IMG_1}.json")
    }  # fmt: skip
    assert modes == {
        "": 0o755, "store.lock": 0o644, "layers": 0o755, "images": 0o755, "tmp": 0o700,
        f"layers/{ID_A}": 0o755, f"layers/{ID_A}/layer.json": 0o644, f"images/{IMG_1}.json": 0o644,
    }  # fmt: skip
