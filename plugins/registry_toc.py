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


def is_sha256_digest(value: str) -> bool:
    algo, _, hexpart = value.partition(":")
    return algo == "sha256" and len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def decode_toc(raw: bytes, where: TocLocation) -> list[dict[str, object]]:
    """The TOC's entries, after checking `raw` against the manifest's checksum."""
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
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise TocError(f"TOC is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(
            doc.get("entries"), list):
        raise TocError("TOC is not a version 1 table of contents")
    return doc["entries"]


@dataclass(kw_only=True)
class Entry(Node):
    """One name of the layer, as the plugin reports it."""

    ino: int  # the TOC's entries have no inode on disk: numbered in TOC order
    atime_ns: int = 0
    ctime_ns: int = 0
    digest: str = ""  # a regular file with data: sha256 of its contents
    offset: int = 0  # ... and the compressed range of its frames in the blob
    end_offset: int = 0

    @property
    def has_data(self) -> bool:
        return stat.S_ISREG(self.mode) and self.size > 0


def parse_time_ns(value: object) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time as Go writes it (0 if absent)."""
    import calendar

    if not isinstance(value, str) or len(value) < 20:
        return 0
    try:
        date, clock = value[:10], value[11:]
        offset_s = 0
        if clock.endswith("Z"):
            clock = clock[:-1]
        elif len(clock) > 6 and clock[-6] in "+-" and clock[-3] == ":":
            sign = 1 if clock[-6] == "+" else -1
            offset_s = sign * (int(clock[-5:-3]) * 3600 + int(clock[-2:]) * 60)
            clock = clock[:-6]
        whole, _, fraction = clock.partition(".")
        year, month, day = (int(x) for x in date.split("-"))
        hour, minute, second = (int(x) for x in whole.split(":"))
        nanos = int((fraction + "000000000")[:9]) if fraction else 0
    except ValueError:
        raise TocError(f"time {value!r} is not RFC 3339") from None
    if year < 1970:
        return 0  # Go's zero time: nothing was recorded
    seconds = calendar.timegm((year, month, day, hour, minute, second)) - offset_s
    return seconds * 1_000_000_000 + nanos


def normalize(name: object, what: str) -> bytes:
    """A TOC name (UTF-8, as JSON has it) as a layer-relative path; b"" is the root."""
    if not isinstance(name, str):
        raise TocError(f"{what} has no name")
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
    kind = raw.get("type")
    bits = _TYPE_BITS.get(kind) if isinstance(kind, str) else None
    if bits is None:
        raise TocError(f"entry {raw.get('name')!r} has unsupported type {kind!r}")
    entry = Entry(mode=bits | (_int(raw, "mode") & 0o7777), ino=ino, uid=_int(raw, "uid"),
                  gid=_int(raw, "gid"), mtime_ns=parse_time_ns(raw.get("modtime")),
                  xattrs=_xattrs(raw))
    entry.atime_ns = parse_time_ns(raw.get("accesstime")) or entry.mtime_ns
    entry.ctime_ns = parse_time_ns(raw.get("changetime")) or entry.mtime_ns
    if bits in (stat.S_IFCHR, stat.S_IFBLK):
        entry.rdev = os.makedev(_int(raw, "devMajor"), _int(raw, "devMinor"))
    elif bits == stat.S_IFLNK:
        target = raw.get("linkName")
        if not isinstance(target, str) or not target:
            raise TocError(f"symlink {raw.get('name')!r} has no target")
        entry.symlink = target.encode("utf-8", "surrogateescape")
    elif bits == stat.S_IFREG:
        entry.size = _int(raw, "size")
        if entry.size:
            digest = raw.get("digest")
            if not isinstance(digest, str) or not is_sha256_digest(digest):
                raise TocError(f"file {raw.get('name')!r} has no sha256 digest")
            entry.digest = digest
            entry.offset, entry.end_offset = _int(raw, "offset"), _int(raw, "endOffset")
            if entry.end_offset <= entry.offset:
                raise TocError(f"file {raw.get('name')!r} has an empty data range")
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
