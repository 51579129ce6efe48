"""The bundled `test` plugin at the data-source level: every override form of
formats.md §1 gives back the original owner, mode and type.  No FUSE needed."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from conftest import is_root, require

from cshare_fuse.datasource import DataSource
from cshare_fuse.options import parse_lower
from cshare_fuse.plugin_api import CAPABILITY_XATTR, STASHED_CAPABILITY_XATTR, OverrideError
from cshare_fuse.plugins import load_registry, open_plugin_layer


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    path = tmp_path / "layer"
    path.mkdir()
    return path


def serve(layer: Path) -> DataSource:
    return open_plugin_layer(parse_lower(f"//test//{layer}"), load_registry(("test",)), "/")


def make(layer: Path, name: str, kind: str = "file", content: bytes = b"") -> bytes:
    path = layer / name
    if kind == "dir":
        path.mkdir()
    else:
        path.write_bytes(content)
    path.chmod(0o755)  # what a converted entry really is
    return name.encode()


# (xattr name, value, kind of stand-in, expected st_mode, expected uid, gid, rdev)
CASES = [
    ("user.containers.override_stat", b"0:0:0600:file", "file", stat.S_IFREG | 0o600, 0, 0, 0),
    ("user.containers.override_stat", b"33:33:0640:file", "file", stat.S_IFREG | 0o640, 33, 33, 0),
    ("user.containers.override_stat", b"0:0:4755:file", "file", stat.S_IFREG | 0o4755, 0, 0, 0),
    ("user.containers.override_stat", b"0:0:0700:dir", "dir", stat.S_IFDIR | 0o700, 0, 0, 0),
    ("user.containers.override_stat", b"0:0:1777:dir", "dir", stat.S_IFDIR | 0o1777, 0, 0, 0),
    ("user.containers.override_stat", b"0:0:0666:char-1-3", "file", stat.S_IFCHR | 0o666, 0, 0,
     os.makedev(1, 3)),
    ("user.containers.override_stat", b"0:6:0660:block-8-0", "file", stat.S_IFBLK | 0o660, 0, 6,
     os.makedev(8, 0)),
    ("user.containers.override_stat", b"0:0:0644:pipe", "file", stat.S_IFIFO | 0o644, 0, 0, 0),
    ("user.containers.override_stat", b"0:0:0755:socket", "file", stat.S_IFSOCK | 0o755, 0, 0, 0),
    # 3-field form: the real inode's type stands; with or without a leading zero,
    # and with file-type bits in MODE as fuse-overlayfs sometimes writes them.
    ("user.containers.override_stat", b"33:44:0640", "file", stat.S_IFREG | 0o640, 33, 44, 0),
    ("user.containers.override_stat", b"33:44:640", "file", stat.S_IFREG | 0o640, 33, 44, 0),
    ("user.containers.override_stat", b"1000:1000:100644", "file", stat.S_IFREG | 0o644,
     1000, 1000, 0),
    ("user.containers.override_stat", b"5:6:40700", "dir", stat.S_IFDIR | 0o700, 5, 6, 0),
    ("user.fuseoverlayfs.override_stat", b"5:6:0751", "file", stat.S_IFREG | 0o751, 5, 6, 0),
    ("user.fuseoverlayfs.override_stat", b"0:0:2755:file", "file", stat.S_IFREG | 0o2755, 0, 0, 0),
    ("user.original-permissions", b"0640:12:13", "file", stat.S_IFREG | 0o640, 12, 13, 0),
    ("user.original-permissions", b"0700:0:0\0", "dir", stat.S_IFDIR | 0o700, 0, 0, 0),
]


@pytest.mark.parametrize("xattr, value, kind, mode, uid, gid, rdev", CASES,
                         ids=[f"{c[0].split('.')[1]}={c[1]!r}" for c in CASES])
def test_every_override_form_reports_the_original(
        layer: Path, xattr: str, value: bytes, kind: str, mode: int, uid: int, gid: int,
        rdev: int) -> None:
    path = make(layer, "entry", kind)
    os.setxattr(layer / "entry", xattr, value)
    source = serve(layer)
    raw = source.raw_stat(path)
    st = source.stat(path)
    assert raw.mode & 0o7777 == 0o755  # the converted inode itself is untouched
    assert (st.mode, st.uid, st.gid, st.rdev) == (mode, uid, gid, rdev)
    assert (st.ino, st.dev) == (raw.ino, raw.dev)  # identity is the real file's


def test_security_namespace_form(layer: Path) -> None:
    require(is_root(), "root (only root may set security.* xattrs)")
    path = make(layer, "f")
    os.setxattr(layer / "f", "security.fuseoverlayfs.override_stat", b"7:8:0700:file")
    st = serve(layer).stat(path)
    assert (st.mode, st.uid, st.gid) == (stat.S_IFREG | 0o700, 7, 8)


def test_containers_name_wins_over_the_older_ones(layer: Path) -> None:
    path = make(layer, "f")
    os.setxattr(layer / "f", "user.original-permissions", b"0600:1:1")
    os.setxattr(layer / "f", "user.fuseoverlayfs.override_stat", b"2:2:0640")
    os.setxattr(layer / "f", "user.containers.override_stat", b"3:3:0444:file")
    st = serve(layer).stat(path)
    assert (st.mode, st.uid, st.gid) == (stat.S_IFREG | 0o444, 3, 3)


def test_converted_device_reports_size_zero_and_its_type(layer: Path) -> None:
    path = make(layer, "null")
    os.setxattr(layer / "null", "user.containers.override_stat", b"0:0:0666:char-1-3")
    st = serve(layer).stat(path)
    assert stat.S_ISCHR(st.mode) and st.size == 0
    assert (os.major(st.rdev), os.minor(st.rdev)) == (1, 3)


def test_symlinks_carry_no_override_and_belong_to_root(layer: Path) -> None:
    require(is_root(), "root (to give a symlink another owner with lchown)")
    os.symlink("target/somewhere", layer / "link")
    os.lchown(layer / "link", 4242, 4343)
    source = serve(layer)
    assert source.raw_stat(b"link").uid == 4242
    st = source.stat(b"link")
    assert (st.uid, st.gid) == (0, 0)
    assert st.mode == source.raw_stat(b"link").mode and stat.S_ISLNK(st.mode)
    assert source.readlink(b"link") == b"target/somewhere"


def test_entries_without_override_are_reported_as_they_are(layer: Path) -> None:
    path = make(layer, "plain", content=b"abc")
    os.chmod(layer / "plain", 0o640)
    source = serve(layer)
    assert source.stat(path) == source.raw_stat(path)


# cap_net_raw, permitted and effective (VFS_CAP_REVISION_2), as make-shared stashes it.
CAP_NET_RAW = bytes.fromhex("01000002") + (1 << 13).to_bytes(4, "little") + bytes(12)


def test_stashed_file_capabilities_come_back(layer: Path) -> None:
    ping = make(layer, "ping")
    os.setxattr(layer / "ping", STASHED_CAPABILITY_XATTR, CAP_NET_RAW)
    plain = make(layer, "plain")
    source = serve(layer)
    assert source.getxattr(ping, CAPABILITY_XATTR) == CAP_NET_RAW
    assert CAPABILITY_XATTR in source.listxattr(ping)
    with pytest.raises(OSError) as info:
        source.getxattr(plain, CAPABILITY_XATTR)
    assert info.value.errno == errno.ENODATA
    assert CAPABILITY_XATTR not in source.listxattr(plain)


def test_real_device_nodes_and_fifos_pass_through(layer: Path) -> None:
    os.mkfifo(layer / "fifo", 0o600)
    source = serve(layer)
    st = source.stat(b"fifo")
    assert stat.S_ISFIFO(st.mode) and st.mode & 0o7777 == 0o600


@pytest.mark.parametrize("value", [b"0:0:0999:file", b"abc", b"0:0", b"0:0:0644:weird",
                                   b"-1:0:0644:file", b"0:0:0644:file:extra"])
def test_malformed_override_raises(layer: Path, value: bytes) -> None:
    path = make(layer, "bad")
    os.setxattr(layer / "bad", "user.containers.override_stat", value)
    source = serve(layer)
    with pytest.raises(OverrideError) as info:
        source.stat(path)
    assert "user.containers.override_stat" in str(info.value)


def test_malformed_preferred_record_is_not_bypassed(layer: Path) -> None:
    path = make(layer, "f")
    os.setxattr(layer / "f", "user.containers.override_stat", b"garbage")
    os.setxattr(layer / "f", "user.original-permissions", b"0644:0:0")
    with pytest.raises(OverrideError):
        serve(layer).stat(path)


@pytest.mark.parametrize("kind, value", [("dir", b"0:0:0644:file"), ("file", b"0:0:0755:dir"),
                                          ("file", b"0:0:0777:symlink")])
def test_override_contradicting_the_entry_raises(layer: Path, kind: str, value: bytes) -> None:
    path = make(layer, "x", kind)
    os.setxattr(layer / "x", "user.containers.override_stat", value)
    with pytest.raises(OverrideError) as info:
        serve(layer).stat(path)
    assert "records type" in str(info.value)


def test_non_empty_stand_in_raises(layer: Path) -> None:
    path = make(layer, "dev", content=b"not empty")
    os.setxattr(layer / "dev", "user.containers.override_stat", b"0:0:0666:char-1-3")
    with pytest.raises(OverrideError) as info:
        serve(layer).stat(path)
    assert "not empty" in str(info.value)


def test_other_methods_pass_through(layer: Path) -> None:
    (layer / "d").mkdir()
    (layer / "d" / "f").write_bytes(b"content")
    os.setxattr(layer / "d" / "f", "user.containers.override_stat", b"0:0:0600:file")
    os.setxattr(layer / "d" / "f", "user.other", b"v")
    source = serve(layer)
    assert source.honour_overrides
    assert source.readdir(b"d") == [b"f"]
    assert source.exists(b"d/f") and not source.exists(b"d/none")
    assert source.getxattr(b"d/f", "user.other") == b"v"
    assert {"user.other", "user.containers.override_stat"} <= set(source.listxattr(b"d/f"))
    fd = source.open(b"d/f", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"content"
    finally:
        os.close(fd)
    assert source.describe() == f"//test//{layer}"
