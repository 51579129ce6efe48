"""The bundled `tar` plugin at the data-source level: an archive served on demand.

Proves that only what is looked up is extracted, that listings come from the
archive's index, and that owners, modes, links, devices and xattrs are right and
escapes are refused.  No FUSE needed.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
from pathlib import Path

import pytest

from cshare_fuse.datasource import DataSource
from cshare_fuse.errors import ConfigError
from cshare_fuse.options import parse_lower
from cshare_fuse.plugins import load_registry, open_plugin_layer

MTIME = 1_700_000_000


def member(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"", mode: int = 0o644,
           uid: int = 0, gid: int = 0, linkname: str = "", dev: tuple[int, int] = (0, 0),
           xattrs: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = MTIME
    info.linkname = linkname
    info.devmajor, info.devminor = dev
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> None:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def serve(cache: Path, data: str = "") -> DataSource:
    return open_plugin_layer(parse_lower(f"//tar/{data}/{cache}"), load_registry(("tar",)), "/")


def on_disk(cache: Path) -> set[str]:
    """Every path extracted below cache/root."""
    root = cache / "root"
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def read_all(source: DataSource, path: bytes) -> bytes:
    fd = source.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def lookup(source: DataSource, path: bytes) -> None:
    """What the overlay does for a path: notify every component, parents first."""
    parts = path.split(b"/")
    for i in range(1, len(parts) + 1):
        source.on_lookup(b"/".join(parts[:i]))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def big(cache: Path) -> Path:
    """An archive of two directories of 200 files each, a symlink, a hardlink, a device."""
    members = [member("./", tarfile.DIRTYPE, mode=0o755)]
    for d in ("etc", "usr"):
        members.append(member(f"./{d}/", tarfile.DIRTYPE, mode=0o755))
        for i in range(200):
            members.append(member(f"./{d}/f{i:03}", data=f"{d} {i}\n".encode() * (i + 1)))
    members += [
        member("./etc/shadow", data=b"root:secret\n", mode=0o600),
        member("./etc/www", data=b"www data\n", mode=0o640, uid=33, gid=33),
        member("./usr/su", data=b"\x7fELF fake", mode=0o4755),
        member("./etc/link", tarfile.SYMTYPE, linkname="f001", mode=0o777),
        member("./usr/hard", tarfile.LNKTYPE, linkname="./etc/f002"),
        member("./dev/", tarfile.DIRTYPE, mode=0o755),
        member("./dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        member("./dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(8, 0)),
        member("./dev/fifo", tarfile.FIFOTYPE, mode=0o644),
        member("./secret/", tarfile.DIRTYPE, mode=0o700),
        member("./secret/key", data=b"k", mode=0o400),
    ]
    write_tar(cache / "layer.tar", members)
    return cache


def test_only_looked_up_entries_are_extracted(big: Path) -> None:
    source = serve(big)
    assert on_disk(big) == set()  # loading reads headers only
    assert len(source.readdir(b"etc")) == 200 + 3
    assert len(source.readdir(b"usr")) == 200 + 2
    assert sorted(source.readdir(b"")) == [b"dev", b"etc", b"secret", b"usr"]
    assert on_disk(big) == set()  # listings come from the index
    lookup(source, b"etc/f007")
    assert on_disk(big) == {"etc", "etc/f007"}
    assert (big / "root" / "etc" / "f007").stat().st_size == 0  # the data waits for open
    assert source.stat(b"etc/f007").size == len(b"etc 7\n" * 8)  # reported from the archive
    assert read_all(source, b"etc/f007") == b"etc 7\n" * 8
    assert (big / "root" / "etc" / "f007").read_bytes() == b"etc 7\n" * 8
    lookup(source, b"usr/f199")
    assert read_all(source, b"usr/f199") == b"usr 199\n" * 200
    assert on_disk(big) == {"etc", "etc/f007", "usr", "usr/f199"}
    extracted_files = [p for p in on_disk(big) if (big / "root" / p).is_file()]
    assert len(extracted_files) == 2  # of 406 in the archive


def data_on_disk(cache: Path) -> dict[str, int]:
    """Extracted regular files that hold data, with their sizes."""
    root = cache / "root"
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and p.stat().st_size}


def test_looking_up_every_entry_extracts_no_file_data(big: Path) -> None:
    """What `ls -l` costs: every entry of a directory is looked up and stat'ed."""
    source = serve(big)
    names = source.readdir(b"etc")
    for name in names:
        lookup(source, b"etc/" + name)
        source.stat(b"etc/" + name)
    assert len(on_disk(big)) == 1 + len(names)
    assert data_on_disk(big) == {}
    assert read_all(source, b"etc/f100") == b"etc 100\n" * 101
    assert data_on_disk(big) == {"etc/f100": len(b"etc 100\n") * 101}


def test_a_file_found_incomplete_is_extracted_again(big: Path) -> None:
    source = serve(big)
    lookup(source, b"etc/f050")
    expected = b"etc 50\n" * 51
    assert read_all(source, b"etc/f050") == expected
    # As a crash in the middle of writing would leave it:
    os.truncate(big / "root" / "etc" / "f050", 10)
    again = serve(big)
    lookup(again, b"etc/f050")
    assert read_all(again, b"etc/f050") == expected


def test_attributes_come_from_the_archive(big: Path) -> None:
    source = serve(big)
    for path in (b"etc/shadow", b"etc/www", b"usr/su", b"secret/key", b"secret"):
        lookup(source, path)
    shadow = source.stat(b"etc/shadow")
    assert (shadow.mode, shadow.uid, shadow.gid, shadow.size) == (stat.S_IFREG | 0o600, 0, 0, 12)
    assert shadow.mtime_ns == MTIME * 10**9
    www = source.stat(b"etc/www")
    assert (www.mode, www.uid, www.gid) == (stat.S_IFREG | 0o640, 33, 33)
    assert source.stat(b"usr/su").mode == stat.S_IFREG | 0o4755
    assert source.stat(b"secret").mode == stat.S_IFDIR | 0o700
    assert source.stat(b"secret/key").mode == stat.S_IFREG | 0o400
    assert read_all(source, b"secret/key") == b"k"  # 0400 in the archive, readable by the mount
    # nlink of a directory: "." plus its parent's entry plus each subdirectory's "..".
    assert source.stat(b"").nlink == 2 + 4


def test_symlinks_devices_and_fifos(big: Path) -> None:
    source = serve(big)
    for path in (b"etc/link", b"dev/null", b"dev/sda", b"dev/fifo"):
        lookup(source, path)
    link = source.stat(b"etc/link")
    assert stat.S_ISLNK(link.mode) and link.size == len(b"f001")
    assert source.readlink(b"etc/link") == b"f001"
    assert os.readlink(big / "root" / "etc" / "link") == "f001"
    null = source.stat(b"dev/null")
    assert null.mode == stat.S_IFCHR | 0o666 and null.rdev == os.makedev(1, 3)
    sda = source.stat(b"dev/sda")
    assert sda.mode == stat.S_IFBLK | 0o660 and sda.rdev == os.makedev(8, 0) and sda.gid == 6
    assert stat.S_ISFIFO(source.stat(b"dev/fifo").mode)
    with pytest.raises(OSError):
        source.readlink(b"dev/null")


def test_hardlinks_share_an_inode(big: Path) -> None:
    source = serve(big)
    lookup(source, b"usr/hard")
    # The first name of the inode is extracted with it: the data is stored once.
    assert on_disk(big) == {"usr", "usr/hard", "etc", "etc/f002"}
    lookup(source, b"etc/f002")
    hard, first = source.stat(b"usr/hard"), source.stat(b"etc/f002")
    assert (hard.ino, hard.dev) == (first.ino, first.dev)
    assert hard.nlink == first.nlink == 2
    assert source.stat(b"etc/f003").nlink == 1
    assert read_all(source, b"usr/hard") == b"etc 2\n" * 3


def test_missing_entries(big: Path) -> None:
    source = serve(big)
    source.on_lookup(b"etc/none")  # must be harmless
    assert not source.exists(b"etc/none") and source.exists(b"etc/f000")
    with pytest.raises(FileNotFoundError):
        source.stat(b"etc/none")
    with pytest.raises(NotADirectoryError):
        source.stat(b"etc/f000/below")
    with pytest.raises(NotADirectoryError):
        source.readdir(b"etc/f000")
    with pytest.raises(FileNotFoundError):
        source.readdir(b"nothing")
    assert on_disk(big) == set()


def test_xattrs_from_pax_headers_and_overrides(cache: Path) -> None:
    write_tar(cache / "layer.tar", [
        member(".", tarfile.DIRTYPE, mode=0o755,
               xattrs={"user.containers.override_stat": "0:0:0755:dir"}),
        member("f", mode=0o755, xattrs={"user.containers.override_stat": "33:33:0640:file",
                                        "user.note": "hello"}),
        member("null", mode=0o755, xattrs={"user.containers.override_stat": "0:0:0666:char-1-3"}),
        member("plain", mode=0o644),
    ])
    source = serve(cache)
    assert source.honour_overrides  # the root carries an override: a converted layer
    assert source.getxattr(b"f", "user.note") == b"hello"
    assert set(source.listxattr(b"f")) == {"user.containers.override_stat", "user.note"}
    with pytest.raises(OSError) as info:
        source.getxattr(b"plain", "user.note")
    assert info.value.errno == getattr(os, "ENODATA", 61)
    lookup(source, b"f")
    lookup(source, b"null")
    st = source.stat(b"f")
    assert (st.mode, st.uid, st.gid) == (stat.S_IFREG | 0o640, 33, 33)
    null = source.stat(b"null")
    assert null.mode == stat.S_IFCHR | 0o666 and null.rdev == os.makedev(1, 3)


def test_a_plain_archive_does_not_honour_overrides(cache: Path) -> None:
    write_tar(cache / "layer.tar", [
        member("f", mode=0o755, xattrs={"user.containers.override_stat": "33:33:0640:file"})])
    source = serve(cache)
    assert not source.honour_overrides
    lookup(source, b"f")
    assert source.stat(b"f").mode == stat.S_IFREG | 0o755


def test_implied_directories_and_read_only_directories(cache: Path) -> None:
    write_tar(cache / "layer.tar", [
        member("ro/", tarfile.DIRTYPE, mode=0o555),
        member("ro/a", data=b"A"),
        member("ro/b", data=b"B"),
        member("deep/er/file", data=b"deep"),  # no member for deep/ or deep/er/
    ])
    source = serve(cache)
    assert sorted(source.readdir(b"")) == [b"deep", b"ro"]
    lookup(source, b"ro/a")
    lookup(source, b"ro/b")  # the 0555 directory still takes its second child
    assert read_all(source, b"ro/b") == b"B"
    assert source.stat(b"ro").mode == stat.S_IFDIR | 0o555
    lookup(source, b"deep/er/file")
    assert source.stat(b"deep").mode == stat.S_IFDIR | 0o755
    assert read_all(source, b"deep/er/file") == b"deep"


def test_a_later_member_replaces_an_earlier_one(cache: Path) -> None:
    write_tar(cache / "layer.tar", [member("f", data=b"old"), member("f", data=b"newer")])
    source = serve(cache)
    assert source.readdir(b"") == [b"f"]
    lookup(source, b"f")
    assert read_all(source, b"f") == b"newer"


def test_stat_without_lookup_still_extracts(big: Path) -> None:
    """A caller that skips on_lookup gets correct answers, not errors."""
    source = serve(big)
    assert read_all(source, b"usr/f010") == b"usr 10\n" * 11
    assert source.stat(b"etc/f000").size == len(b"etc 0\n")


def test_extraction_survives_a_remount_and_restarts_for_another_archive(big: Path) -> None:
    source = serve(big)
    lookup(source, b"etc/f001")
    again = serve(big)
    assert on_disk(big) == {"etc", "etc/f001"}  # kept: each entry was complete on disk
    lookup(again, b"etc/f001")
    assert read_all(again, b"etc/f001") == b"etc 1\n" * 2
    write_tar(big / "layer.tar", [member("etc/f001", data=b"different archive")])
    third = serve(big)
    assert on_disk(big) == set()  # the stamp changed: start again
    lookup(third, b"etc/f001")
    assert read_all(third, b"etc/f001") == b"different archive"


def test_data_names_a_compressed_archive(cache: Path) -> None:
    write_tar(cache / "base.tar.gz", [member("a", data=b"gz" * 1000), member("b", data=b"x")],
              mode="w:gz")
    source = serve(cache, "base.tar.gz")
    assert source.describe() == f"//tar/base.tar.gz/{cache}"
    lookup(source, b"b")
    lookup(source, b"a")
    assert read_all(source, b"a") == b"gz" * 1000 and read_all(source, b"b") == b"x"


def test_concurrent_lookups(big: Path) -> None:
    source = serve(big)
    errors: list[BaseException] = []

    def work(start: int) -> None:
        try:
            for i in range(start, 200, 4):
                path = f"usr/f{i:03}".encode()
                lookup(source, path)
                assert read_all(source, path) == f"usr {i}\n".encode() * (i + 1)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(on_disk(big)) == 201
    assert os.listdir(big / "tmp") == []  # every file was renamed into place


@pytest.mark.parametrize("members, expected", [
    ([member("../evil", data=b"x")], "contains '..'"),
    ([member("a/../../evil", data=b"x")], "contains '..'"),
    ([member("/etc/evil", data=b"x")], "absolute path"),
    ([member("link", tarfile.SYMTYPE, linkname="/tmp"), member("link/evil", data=b"x")],
     "not a directory"),
    ([member("f", data=b"x"), member("f/evil", data=b"x")], "not a directory"),
    ([member("hard", tarfile.LNKTYPE, linkname="missing")], "not an earlier non-directory"),
    ([member("d/", tarfile.DIRTYPE), member("hard", tarfile.LNKTYPE, linkname="d")],
     "not an earlier non-directory"),
    ([member("hard", tarfile.LNKTYPE, linkname="../../etc/passwd")], "contains '..'"),
], ids=["dotdot", "dotdot-inside", "absolute", "below-symlink", "below-file",
        "hardlink-missing", "hardlink-dir", "hardlink-escape"])
def test_unsafe_archives_are_refused(cache: Path, members: list, expected: str) -> None:
    write_tar(cache / "layer.tar", members)
    with pytest.raises(ConfigError) as info:
        serve(cache)
    message = str(info.value)
    assert "\n" not in message and expected in message
    assert message.startswith(f"lowerdir //tar//{cache}: plugin tar cannot load the layer: ")
    assert not (cache.parent / "evil").exists() and on_disk(cache) == set()


@pytest.mark.parametrize("setup, expected", [
    ("nothing", "no such archive"),
    ("garbage", "not a readable tar archive"),
])
def test_bad_archives(cache: Path, setup: str, expected: str) -> None:
    if setup == "garbage":
        (cache / "layer.tar").write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(ConfigError) as info:
        serve(cache)
    assert expected in str(info.value)


def test_missing_cache_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        serve(tmp_path / "nothere")
    assert "no such cache directory" in str(info.value)


def test_an_open_may_block_only_until_the_data_is_extracted(big: Path) -> None:
    """tar declares every method inline but open, and its open blocks only while the
    file's data still has to come out of the archive (then the overlay runs it in
    its worker pool); everything else it answers at once."""
    source = serve(big)
    assert source.inline == frozenset(source.inline) and "open" not in source.inline
    lookup(source, b"etc/f005")
    assert source.may_block("open", b"etc/f005")
    assert not source.may_block("stat", b"etc/f005")
    assert read_all(source, b"etc/f005") == b"etc 5\n" * 6
    assert not source.may_block("open", b"etc/f005")
    # Extracted by an earlier mount of the same cache: found complete on disk.
    again = serve(big)
    assert not again.may_block("open", b"etc/f005")
    assert again.may_block("open", b"etc/f006")
    # A hardlink shares its first name's data.
    assert again.may_block("open", b"usr/hard") and again.may_block("open", b"etc/f002")
    lookup(again, b"usr/hard")
    assert read_all(again, b"usr/hard") == read_all(again, b"etc/f002")
    assert not again.may_block("open", b"usr/hard")
