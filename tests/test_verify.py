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
        # A record on an entry that is not 0755 is not what convert leaves behind.
        "etc/empty": {"not-readable", "mismatched-record"},
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


def test_records_convert_cannot_have_written_are_reported(scratch: Path) -> None:
    """Issue 12 point 1: forged records (as an image can carry them) are named, with --json."""
    root = scratch / "tree"
    root.mkdir()
    convert_tree(root)

    def entry(name: str, record: bytes, *, owner: tuple[int, int] = (1000, 1000), mode: int = 0o755,
              data: bytes = b"x", attr: str = OVERRIDE_XATTR, directory: bool = False) -> None:
        path = root / name
        if directory:
            path.mkdir()
        else:
            path.write_bytes(data)
        os.chown(path, *owner)
        os.chmod(path, mode)
        os.setxattr(path, attr, record)

    entry("setuid-root", b"0:0:04755:file")  # owned 1000:1000: convert would have said so
    entry("fuse-setuid", b"0:0:04755", attr="user.fuseoverlayfs.override_stat")
    entry("prototype", b"4755:0:0", attr="user.original-permissions")
    entry("mem", b"1000:1000:0666:char-1-1")  # a "device" that is not an empty placeholder
    entry("dir-record", b"1000:1000:0755:dir")  # on a file
    entry("file-record", b"1000:1000:0755:file", directory=True)  # on a directory
    entry("link-record", b"1000:1000:0777:symlink")
    entry("not-0755", b"1000:1000:0644:file", mode=0o644)
    entry("honest", b"1000:1000:0600:file")  # what convert writes for a 1000:1000 0600 file
    entry("honest-device", b"1000:1000:0666:char-1-1", data=b"")
    found = kinds_by_path(root)
    forged = {"setuid-root", "fuse-setuid", "prototype", "mem", "dir-record", "file-record",
              "link-record", "not-0755"}
    assert {p for p, kinds in found.items() if "mismatched-record" in kinds} == forged, found
    run = subprocess.run([tool("cshare"), "verify", "--json", str(root)], capture_output=True, text=True)
    assert run.returncode == 1
    data = json.loads(run.stdout)
    details = {f["path"]: f["detail"] for f in data["findings"] if f["kind"] == "mismatched-record"}
    assert details.keys() == forged
    assert "owned by 1000:1000" in details["setuid-root"], details
    assert "symlink" in details["link-record"] and "mode 0644" in details["not-0755"]


def test_records_digest_covers_every_record_and_nothing_else(scratch: Path) -> None:
    tree = build_varied_tree(scratch / "tree", scratch)
    convert_tree(tree.root)
    first = verify_tree(tree.root).records_digest
    assert len(first) == 64 and first == verify_tree(tree.root).records_digest
    os.setxattr(tree.root / "etc/www", "user.unrelated", b"x")  # the image's own data
    assert verify_tree(tree.root).records_digest == first
    os.setxattr(tree.secret, OVERRIDE_XATTR, b"0:0:4755:file")
    assert verify_tree(tree.root).records_digest != first


def test_a_published_layer_without_a_records_digest_is_reported() -> None:
    """Layers published before make-shared kept a digest may hold an image's own records."""
    from cshare.cli.convert_cmd import check_records_digest
    from cshare.tree.verify import RECORDS_DIGEST_KEY, VerifyReport

    report = VerifyReport(entries=1, records_digest="ab" * 32)
    check_records_digest(report, "f" * 64, {"id": "f" * 64})
    assert [f.kind for f in report.findings] == ["records-unverified"]
    report = VerifyReport(entries=1, records_digest="ab" * 32)
    check_records_digest(report, "f" * 64, {RECORDS_DIGEST_KEY: "ab" * 32})
    assert report.ok
