"""The zstd:chunked table of contents (TOC): where a layer blob keeps it, how it is checked, the tree it describes.

Facts (containers/storage pkg/chunked, checked against podman 4.3.1 here):

- A zstd:chunked layer blob is a plain zstd stream of the layer tar, cut into
  independent frames: a file's contents start a new frame, so a file can be
  fetched alone by an HTTP range and decompressed on its own.
- The image manifest's layer descriptor carries two annotations:
  `io.containers.zstd-chunked.manifest-position` = `OFFSET:LENGTH:UNCOMPRESSED:TYPE`
  (TYPE 1 is the CRFS-style JSON TOC) and
  `io.containers.zstd-chunked.manifest-checksum` = the sha256 digest of the
  LENGTH compressed bytes at OFFSET.  (Older releases spelt the keys with
  `io.github.containers.`; both are read.)
- Those bytes are one zstd frame holding JSON `{"version": 1, "entries": [...]}`.
  An entry has `type` (reg, dir, symlink, hardlink, char, block, fifo, chunk),
  `name` (`./etc/passwd`; directories end in `/`), `mode` (permission and
  setuid/setgid/sticky bits), `uid`/`gid` (absent when 0), `size`,
  `modtime`/`accesstime`/`changetime` (RFC 3339 with nanoseconds),
  `linkName` (symlink target, or a hardlink's first name), `devMajor`/`devMinor`,
  `xattrs` (name -> base64 value), and for a regular file with data `digest`
  (sha256 of its contents) with `offset`/`endOffset`: the compressed range of
  its frames in the blob.  `chunk` entries split a big file into pieces (each
  its own frames, inside the file's offset..endOffset); the whole range
  decompressed is the whole file, so this module needs only the `reg` entry.
- Whiteouts and opaque directories are the tar style: `.wh.NAME` files and a
  `.wh..wh..opq` file; the overlay understands those in every layer.

Nothing here does I/O: the plugin fetches, this module checks and decodes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from plugins.index_tree import IndexBuilder, Node, layer_path

POSITION_KEYS = (
    "io.containers.zstd-chunked.manifest-position",
    "io.github.containers.zstd-chunked.manifest-position",
)
CHECKSUM_KEYS = (
    "io.containers.zstd-chunked.manifest-checksum",
    "io.github.containers.zstd-chunked.manifest-checksum",
)
#: The only TOC type there is: the CRFS-style JSON table of contents.
TOC_TYPE_CRFS = 1
#: A TOC larger than this (uncompressed) is refused rather than held in memory.
MAX_TOC_BYTES = 1 << 30

_TYPE_BITS = {
    "reg": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


class TocError(ValueError):
    """The TOC is missing, does not match its checksum, or describes an unsafe tree."""


@dataclass(frozen=True)
class TocLocation:
    """Where the TOC is in the blob, and what it must hash to."""

    offset: int
    length: int
    uncompressed: int
    checksum: str  # "sha256:HEX"


def toc_location(annotations: Mapping[str, str] | None) -> TocLocation | None:
    """The TOC's place from a layer descriptor's annotations; None when it has none."""
    annotations = annotations or {}
    position = next((annotations[k] for k in POSITION_KEYS if k in annotations), None)
    checksum = next((annotations[k] for k in CHECKSUM_KEYS if k in annotations), None)
    if position is None:
        return None
    parts = position.split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise TocError(f"TOC position annotation {position!r} is not OFFSET:LENGTH:SIZE:TYPE")
    offset, length, uncompressed, kind = (int(p) for p in parts)
    if kind != TOC_TYPE_CRFS:
        raise TocError(f"TOC type {kind} is not the JSON table of contents (type 1)")
    if checksum is None or not is_sha256_digest(checksum):
        raise TocError("the layer has a TOC position but no sha256 TOC checksum annotation")
    if length <= 0 or uncompressed <= 0 or uncompressed > MAX_TOC_BYTES:
        raise TocError(f"TOC position annotation {position!r} gives an impossible size")
    return TocLocation(offset, length, uncompressed, checksum)


_SHA256 = re.compile(r"sha256:[0-9a-f]{64}\Z")


def is_sha256_digest(value: str) -> bool:
    return _SHA256.match(value) is not None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def decode_toc_text(raw: bytes, where: TocLocation) -> bytes:
    """The TOC's JSON text, after checking `raw` against the manifest's checksum."""
    import zstandard

    if len(raw) != where.length:
        raise TocError(f"TOC is {len(raw)} bytes, the manifest says {where.length}")
    actual = sha256_digest(raw)
    if actual != where.checksum:
        raise TocError(f"TOC digest {actual} does not match the manifest's {where.checksum}")
    try:
        decoder = zstandard.ZstdDecompressor().decompressobj()
        text = decoder.decompress(raw)
    except zstandard.ZstdError as exc:
        raise TocError(f"TOC does not decompress: {exc}") from None
    if len(text) != where.uncompressed:
        raise TocError(f"TOC decompresses to {len(text)} bytes, the manifest says "
                       f"{where.uncompressed}")
    return text


def parse_toc(text: bytes) -> list[dict[str, object]]:
    """The entries of a checked TOC text."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise TocError(f"TOC is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(
            doc.get("entries"), list):
        raise TocError("TOC is not a version 1 table of contents")
    return doc["entries"]


def decode_toc(raw: bytes, where: TocLocation) -> list[dict[str, object]]:
    """The TOC's entries, after checking `raw` against the manifest's checksum."""
    return parse_toc(decode_toc_text(raw, where))


@dataclass(kw_only=True)
class Entry(Node):
    """One name of the layer, as the plugin reports it."""

    ino: int  # the TOC's entries have no inode on disk: numbered in TOC order
    atime_ns: int = 0
    ctime_ns: int = 0
    digest: str = ""  # a regular file with data: sha256 of its contents
    offset: int = 0  # ... and the compressed range of its frames in the blob
    end_offset: int = 0
    #: The TOC's modtime, accesstime and changetime, checked but not yet converted:
    #: most entries of a big layer are never stat'ed, and converting every time at
    #: load was a fifth of it (resolve_times, on the first stat).
    times: tuple[object, object, object] | None = None

    @property
    def has_data(self) -> bool:
        return stat.S_ISREG(self.mode) and self.size > 0

    def resolve_times(self) -> None:
        """Fill mtime_ns, atime_ns and ctime_ns from `times` (once)."""
        times = self.times
        if times is not None:
            self.mtime_ns = mtime = parse_time_ns(times[0])
            self.atime_ns = parse_time_ns(times[1]) or mtime
            self.ctime_ns = parse_time_ns(times[2]) or mtime
            self.times = None


#: RFC 3339 as Go writes it: date, time, an optional fraction, then Z or an offset.
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d).(\d\d):(\d\d):(\d\d)(?:\.(\d*))?"
                   r"(Z|[+-]\d\d:\d\d)?\Z", re.ASCII)
#: Go's zero time, which the TOC writes for every time it has no record of.
_ZERO_TIME = "0001-01-01T00:00:00Z"
#: Seconds since the epoch of each "YYYY-MM-DDTHH:MM" seen: the files of one layer
#: are written within a few minutes, so this saves the calendar arithmetic.
_minutes: dict[str, int] = {}


def parse_time_ns(value: object) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time as Go writes it (0 if absent)."""
    if not isinstance(value, str) or len(value) < 20 or value == _ZERO_TIME:
        return 0
    found = _TIME.match(value)
    if found is None:
        raise TocError(f"time {value!r} is not RFC 3339")
    if value[:4] < "1970":
        return 0  # Go's zero time (or another one before the epoch): nothing was recorded
    base = _minutes.get(value[:16])
    if base is None:
        import calendar

        year, month, day, hour, minute = (int(x) for x in found.groups()[:5])
        base = calendar.timegm((year, month, day, hour, minute, 0))
        if len(_minutes) < 4096:
            _minutes[value[:16]] = base
    seconds = base + int(found[6])
    zone = found[8]
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    fraction = found[7]
    nanos = int((fraction + "000000000")[:9]) if fraction else 0
    return seconds * 1_000_000_000 + nanos


def check_time(value: object) -> None:
    """Refuse a time parse_time_ns would refuse, without converting it."""
    if (isinstance(value, str) and len(value) >= 20 and value != _ZERO_TIME
            and _TIME.match(value) is None):
        raise TocError(f"time {value!r} is not RFC 3339")


def normalize(name: object, what: str) -> bytes:
    """A TOC name (UTF-8, as JSON has it) as a layer-relative path; b"" is the root."""
    if not isinstance(name, str):
        raise TocError(f"{what} has no name")
    # The common spelling ("./a/b", "a/b/"), with no empty, "." or ".." part and
    # no part starting with ".": already what layer_path would make of it.
    rest = (name[2:] if name.startswith("./") else name).rstrip("/")
    if rest and rest[0] not in "./" and "//" not in rest and "/." not in rest:
        return rest.encode("utf-8", "surrogateescape")
    return layer_path(name.encode("utf-8", "surrogateescape"), name, what, TocError)


def _int(raw: Mapping[str, object], key: str) -> int:
    value = raw.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TocError(f"entry {raw.get('name')!r}: {key} {value!r} is not a number")
    return value


def _xattrs(raw: Mapping[str, object]) -> dict[str, bytes]:
    found = raw.get("xattrs") or {}
    if not isinstance(found, dict):
        raise TocError(f"entry {raw.get('name')!r}: xattrs is not a mapping")
    try:
        return {str(k): base64.b64decode(str(v), validate=True) for k, v in found.items()}
    except binascii.Error:
        raise TocError(f"entry {raw.get('name')!r}: an xattr value is not base64") from None


def entry_of(raw: Mapping[str, object], ino: int) -> Entry:
    """The Entry for one non-hardlink TOC record."""
    get = raw.get
    kind = get("type")
    bits = _TYPE_BITS.get(kind) if isinstance(kind, str) else None
    if bits is None:
        raise TocError(f"entry {get('name')!r} has unsupported type {kind!r}")
    # Checked in one go on the common path (type is int, not bool); _int says what is wrong.
    mode, uid, gid = get("mode", 0), get("uid", 0), get("gid", 0)
    if not (type(mode) is int and type(uid) is int and type(gid) is int
            and mode >= 0 and uid >= 0 and gid >= 0):
        mode, uid, gid = _int(raw, "mode"), _int(raw, "uid"), _int(raw, "gid")
    times = get("modtime"), get("accesstime"), get("changetime")
    for value in times:
        if value is not None and value != _ZERO_TIME:
            check_time(value)
    entry = Entry(mode=bits | (mode & 0o7777), ino=ino, uid=uid, gid=gid, times=times,
                  xattrs=_xattrs(raw) if get("xattrs") else {})
    if bits == stat.S_IFREG:
        size, offset, end = get("size", 0), get("offset", 0), get("endOffset", 0)
        if not (type(size) is int and type(offset) is int and type(end) is int
                and size >= 0 and offset >= 0):
            size, offset, end = _int(raw, "size"), _int(raw, "offset"), _int(raw, "endOffset")
        entry.size = size
        if size:
            digest = get("digest")
            if not isinstance(digest, str) or not is_sha256_digest(digest):
                raise TocError(f"file {get('name')!r} has no sha256 digest")
            entry.digest, entry.offset, entry.end_offset = digest, offset, end
            if end <= offset:
                raise TocError(f"file {get('name')!r} has an empty data range")
    elif bits == stat.S_IFLNK:
        target = get("linkName")
        if not isinstance(target, str) or not target:
            raise TocError(f"symlink {get('name')!r} has no target")
        entry.symlink = target.encode("utf-8", "surrogateescape")
    elif bits in (stat.S_IFCHR, stat.S_IFBLK):
        entry.rdev = os.makedev(_int(raw, "devMajor"), _int(raw, "devMinor"))
    return entry


def build_tree(records: list[dict[str, object]], layer_time_ns: int = 0) -> dict[bytes, Entry]:
    """Every name of the layer (and the directories its names imply), by layer path."""
    inos = iter(range(2, 1 << 62))  # 1 is the root's
    builder = IndexBuilder(
        Entry(mode=stat.S_IFDIR | 0o755, ino=1, mtime_ns=layer_time_ns),
        lambda: Entry(mode=stat.S_IFDIR | 0o755, ino=next(inos), mtime_ns=layer_time_ns),
        TocError, "entry")
    for raw in records:
        if not isinstance(raw, dict):
            raise TocError("a TOC entry is not an object")
        if raw.get("type") == "chunk":
            continue  # a piece of the file before it: its frames lie in that file's range
        path = normalize(raw.get("name"), "entry")
        if raw.get("type") == "hardlink":
            target = normalize(raw.get("linkName"), f"hardlink {raw.get('name')!r} ->")
            linked = builder.hardlink(path, target, raw.get("name"), raw.get("linkName"))
            if linked is None:
                continue  # a link to itself changes nothing
            entry = linked  # the same inode number: the overlay sees one file
        else:
            entry = entry_of(raw, next(inos))
            if path == b"":
                entry.ino = 1  # the root keeps its number whatever the TOC calls it
        builder.add(path, entry, raw.get("name"))
    return builder.finish()


def data_entries(tree: dict[bytes, Entry]) -> list[tuple[bytes, Entry]]:
    """The files with data (first names only), in the order of their frames in the blob."""
    found = [(p, e) for p, e in tree.items() if e.has_data and e.link_to is None]
    found.sort(key=lambda item: item[1].offset)
    return found
