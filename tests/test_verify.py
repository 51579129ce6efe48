"""`cshare verify`: every kind of problem is found; a converted tree is clean."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ensure_user, is_root, require, tool
from tree_support import build_varied_tree

from cshare.tree.convert import convert_tree
from cshare.tree.verify import verify_tree
from cshare_fuse.formats.overrides import OVERRIDE_XATTR

pytestmark = pytest.mark.root


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    require(is_root(), "root (the test tree has devices and other owners)")
    return tmp_path


def kinds_by_path(root: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in verify_tree(root).findings:
        found.setdefault(f.path, set()).add(f.kind)
    return found


def test_unconverted_tree_shows_every_problem(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    found = kinds_by_path(tree.root)
    assert "not-converted" in found["."]
    assert "not-converted" in found["etc/shadow"]
    assert {"world-writable", "not-converted"} <= found["etc/world"]
    assert "setuid" in found["usr/bin/su"]
    assert "setgid" in found["usr/bin/wall"]
    assert {"setuid", "setgid"} <= found["usr/bin/both"]
    assert "world-writable" in found["tmp"]
    for dev in ("dev/null", "dev/sda", "dev/fifo", "dev/sock"):
        assert found[dev] == {"device"}, dev
    assert found["layer/opaque"] >= {"hidden-opaque"}
    # Whiteouts are accepted: a char 0/0 device and an empty .wh. file.
    assert "layer/deleted" not in found
    assert "layer/.wh.gone" not in found
    assert "layer/aufs-opaque/.wh..wh..opq" not in found
    # Symlinks are never findings.
    assert "usr/outside-link" not in found


def test_converted_tree_is_clean_and_cli_agrees(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    convert_tree(tree.root)
    report = verify_tree(tree.root)
    assert report.ok, report.findings
    assert report.entries > 100
    run = subprocess.run([tool("cshare"), "verify", "--json", str(tree.root)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout)["ok"] is True


def test_problems_after_conversion_are_found(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    convert_tree(tree.root)
    os.setxattr(tree.secret, OVERRIDE_XATTR, b"0:0:600")  # 3-field is fine...
    os.setxattr(tree.root / "etc/www", OVERRIDE_XATTR, b"x:0:0600:file")  # ...this is not
    os.chmod(tree.root / "etc/empty", 0o700)  # converted but unreadable for others
    os.mknod(tree.root / "dev/new-null", 0o020666, os.makedev(1, 3))
    (tree.root / "etc/late").write_bytes(b"added after convert")
    os.chmod(tree.root / "etc/late", 0o666)
    found = kinds_by_path(tree.root)
    assert found == {
        "etc/www": {"unparsable"},
        "etc/empty": {"not-readable"},
        "dev/new-null": {"device"},
        "etc/late": {"not-converted", "world-writable"},
    }
    run = subprocess.run([tool("cshare"), "verify", "--json", str(tree.root)], capture_output=True, text=True)
    assert run.returncode == 1
    data = json.loads(run.stdout)
    assert data["ok"] is False
    assert {(f["kind"], f["path"]) for f in data["findings"]} >= {("unparsable", "etc/www"), ("device", "dev/new-null")}
    text = subprocess.run([tool("cshare"), "verify", str(tree.root)], capture_output=True, text=True)
    assert text.returncode == 1
    assert "unparsable: etc/www:" in text.stdout


def test_missing_path(scratch: Path) -> None:
    run = subprocess.run([tool("cshare"), "verify", str(scratch / "nope")], capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.count("\n") == 1


def test_an_ordinary_user_can_verify_a_converted_tree(world_tmp: Path) -> None:
    require(is_root(), "root (to build the tree and create the test user)")
    ensure_user("alice")
    tree = build_varied_tree(world_tmp / "tree", world_tmp)
    before = subprocess.run(
        ["runuser", "-u", "alice", "--", tool("cshare"), "verify", "--json", str(tree.root)],
        capture_output=True,
        text=True,
    )
    assert before.returncode == 1  # unconverted: alice cannot even read some of it
    kinds = {f["kind"] for f in json.loads(before.stdout)["findings"]}
    assert {"unreadable", "not-converted"} <= kinds
    convert_tree(tree.root)
    after = subprocess.run(
        ["runuser", "-u", "alice", "--", tool("cshare"), "verify", "--json", str(tree.root)],
        capture_output=True,
        text=True,
    )
    assert after.returncode == 0, after.stdout + after.stderr
    assert json.loads(after.stdout)["entries"] == verify_tree(tree.root).entries
