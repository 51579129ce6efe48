"""The override xattr codec (cshare_fuse.overrides): every accepted form, strict rejection,
and a hypothesis round trip.  Pure: needs neither root nor FUSE."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cshare_fuse.formats.overrides import (
    ALL_OVERRIDE_XATTRS,
    FUSE_OVERLAYFS_PRIVILEGED_XATTR,
    FUSE_OVERLAYFS_XATTR,
    OVERRIDE_XATTR,
    PROTOTYPE_XATTR,
    Override,
    OverrideError,
    parse_named,
    parse_override,
    parse_prototype,
    read_override,
    read_override_from,
)

MAX_ID = 2**32 - 2


# ------------------------------------------------------------------ accepted forms
@pytest.mark.parametrize(
    "value, expected",
    [
        (b"0:0:0600:file", Override(0, 0, 0o600, stat.S_IFREG)),
        (b"33:33:0640:file", Override(33, 33, 0o640, stat.S_IFREG)),
        (b"0:0:4755:file", Override(0, 0, 0o4755, stat.S_IFREG)),
        (b"0:0:0700:dir", Override(0, 0, 0o700, stat.S_IFDIR)),
        (b"0:0:0666:char-1-3", Override(0, 0, 0o666, stat.S_IFCHR, 1, 3)),
        (b"0:6:0660:block-8-0", Override(0, 6, 0o660, stat.S_IFBLK, 8, 0)),
        (b"0:0:0644:pipe", Override(0, 0, 0o644, stat.S_IFIFO)),
        (b"0:0:0755:socket", Override(0, 0, 0o755, stat.S_IFSOCK)),
        (b"0:0:0777:symlink", Override(0, 0, 0o777, stat.S_IFLNK)),
        (b"0:0:7777:file", Override(0, 0, 0o7777, stat.S_IFREG)),
        (b"4294967294:0:0:file", Override(MAX_ID, 0, 0, stat.S_IFREG)),
        (b"1:2:0600:file\0", Override(1, 2, 0o600, stat.S_IFREG)),  # NUL-terminated
    ],
)
def test_four_field_form(value: bytes, expected: Override) -> None:
    assert parse_override(value) == expected


@pytest.mark.parametrize(
    "value, mode",
    [
        (b"0:0:0600", 0o600),
        (b"0:0:600", 0o600),  # no leading zero
        (b"0:0:100644", 0o644),  # file-type bits included (fuse-overlayfs)
        (b"0:0:40755", 0o755),
        (b"0:0:104755", 0o4755),
        (b"0:0:0", 0),
    ],
)
def test_three_field_form_keeps_the_real_type(value: bytes, mode: int) -> None:
    record = parse_override(value)
    assert record.mode == mode and record.file_type is None
    assert record.st_mode(stat.S_IFDIR | 0o755) == stat.S_IFDIR | mode
    with pytest.raises(OverrideError):
        record.format()  # a record without a type cannot be written in the 4-field form


def test_prototype_form() -> None:
    assert parse_prototype(b"600:33:34") == Override(33, 34, 0o600)
    assert parse_prototype(b"4755:0:0\0") == Override(0, 0, 0o4755)
    assert parse_named(PROTOTYPE_XATTR, b"0700:1:2") == Override(1, 2, 0o700)
    with pytest.raises(OverrideError):
        parse_prototype(b"100644:0:0")  # type bits are not part of this form


def test_every_name_is_understood() -> None:
    for name in (OVERRIDE_XATTR, FUSE_OVERLAYFS_XATTR, FUSE_OVERLAYFS_PRIVILEGED_XATTR):
        assert parse_named(name, b"5:6:0640").uid == 5
    assert set(ALL_OVERRIDE_XATTRS) == {
        OVERRIDE_XATTR,
        FUSE_OVERLAYFS_XATTR,
        FUSE_OVERLAYFS_PRIVILEGED_XATTR,
        PROTOTYPE_XATTR,
    }
    with pytest.raises(OverrideError):
        parse_named("user.other", b"0:0:0600")


# ------------------------------------------------------------------ strict rejection
@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"0:0",
        b"0:0:0600:file:extra",
        b"a:0:0600:file",
        b"0:b:0600:file",
        b"-1:0:0600:file",
        b"+1:0:0600:file",
        b" 1:0:0600:file",
        b"0:0:0600:file ",
        b"0:0:0600:file\n",
        b"0:0:0999:file",
        b"0:0:0x1ff:file",
        b"0:0:17777:file",  # bits outside 07777 in the 4-field form
        b"0:0:100644:file",
        b"0:0:0600:",
        b"0:0:0600:regular",
        b"0:0:0600:char-1",
        b"0:0:0600:char-1-3-4",
        b"0:0:0600:char--1-3",
        b"0:0:0600:char-4294967296-0",
        b"0:0:0600:FILE",
        b"4294967295:0:0600:file",  # (uid_t)-1 is never an owner
        b"99999999999:0:0600:file",
        b"0:0:1000000",  # 3-field, larger than any st_mode
        b"\xff:0:0600:file",
        b"0:0:0600:file\0\0",
        b"0:0:\xd9\xa3:file",  # a non-ASCII digit
    ],
)
def test_malformed_values_are_refused(value: bytes) -> None:
    with pytest.raises(OverrideError):
        parse_override(value)


@pytest.mark.parametrize("value", [b"", b"600:0", b"600:0:0:0", b"800:0:0", b"600:x:0", b"600:0:-1"])
def test_malformed_prototype_values_are_refused(value: bytes) -> None:
    with pytest.raises(OverrideError):
        parse_prototype(value)


def test_override_refuses_impossible_records() -> None:
    with pytest.raises(OverrideError):
        Override(0, 0, 0o10000)
    with pytest.raises(OverrideError):
        Override(-1, 0, 0)
    with pytest.raises(OverrideError):
        Override(0, 0, 0, file_type=0o1234)


# ------------------------------------------------------------------ reading several names
def test_read_override_prefers_the_containers_name_and_never_falls_back() -> None:
    store = {FUSE_OVERLAYFS_XATTR: b"1:1:0600", OVERRIDE_XATTR: b"2:2:0700:dir"}
    name, record = read_override(store.get) or ("", None)
    assert name == OVERRIDE_XATTR and record == Override(2, 2, 0o700, stat.S_IFDIR)
    assert read_override({}.get) is None
    store[OVERRIDE_XATTR] = b"broken"
    with pytest.raises(OverrideError) as info:
        read_override(store.get)
    assert OVERRIDE_XATTR in str(info.value)


# ------------------------------------------------------------------ round trip
FILE_TYPES = [stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK]

records = st.builds(
    lambda uid, gid, mode, ftype, major, minor: Override(
        uid,
        gid,
        mode,
        ftype,
        major if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0,
        minor if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0,
    ),
    st.integers(0, MAX_ID),
    st.integers(0, MAX_ID),
    st.integers(0, 0o7777),
    st.sampled_from(FILE_TYPES),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)


@given(records)
def test_format_then_parse_is_identity(record: Override) -> None:
    value = record.format()
    assert parse_override(value) == record
    assert parse_override(value + b"\0") == record


@given(st.integers(0, 0o177777), st.integers(0, MAX_ID), st.integers(0, MAX_ID))
def test_from_stat_records_permission_bits_and_type(st_mode: int, uid: int, gid: int) -> None:
    ftype = stat.S_IFMT(st_mode)
    if ftype not in FILE_TYPES:
        with pytest.raises(OverrideError):
            Override.from_stat(st_mode, uid, gid).format()
        return
    record = Override.from_stat(st_mode, uid, gid)
    assert record.st_mode(0) == st_mode
    assert parse_override(record.format()) == record


@given(st.binary(max_size=40))
def test_arbitrary_bytes_parse_or_raise_override_error(value: bytes) -> None:
    # Never any other exception, whatever is stored on disk.
    for parse in (parse_override, parse_prototype):
        try:
            record = parse(value)
        except OverrideError:
            continue
        assert 0 <= record.mode <= 0o7777


@given(st.text(alphabet="0123456789:-abcdefhiklopsrtx", max_size=30))
def test_near_miss_text_parses_or_raises_override_error(text: str) -> None:
    try:
        record = parse_override(text.encode())
    except OverrideError:
        return
    if record.file_type is not None:
        assert parse_override(record.format()) == record


def test_read_override_from_a_raising_getxattr() -> None:
    def getter(values: dict[str, bytes], failure: int) -> Callable[[str], bytes]:
        def get(name: str) -> bytes:
            if name in values:
                return values[name]
            raise OSError(failure, os.strerror(failure))
        return get

    for absent in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
        assert read_override_from(getter({}, absent)) is None
        found = read_override_from(getter({FUSE_OVERLAYFS_XATTR: b"1:2:0644"}, absent))
        assert found == (FUSE_OVERLAYFS_XATTR, Override(1, 2, 0o644))
    with pytest.raises(OSError) as info:
        read_override_from(getter({}, errno.EIO))
    assert info.value.errno == errno.EIO
