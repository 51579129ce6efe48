"""The `registry` plugin: one layer of an image in a registry, fetched file by file when first opened.

Usage: `lowerdir=//registry/LAYER/SPEC`.  SPEC is a small JSON file naming the
image (written by `cshare mount docker://...`, or by hand):

    {"registry": "127.0.0.1:5000", "repository": "team/app",
     "manifest": "sha256:<digest of the image manifest>", "tls_verify": false,
     "cache": "/home/me/.cache/cshare/registry", "timeout": 10, "attempts": 3}

(`cache`, `tls_verify` (default true), `timeout` (seconds per request) and
`attempts` are optional.)  LAYER picks the layer of that manifest: its index
(0 is the base layer) or the 64 hex digits of its digest.

At load the manifest is fetched by digest and checked against it (once for all
layers of the mount); the layer must carry a zstd:chunked table of contents
(TOC, see registry_toc), which is fetched with one range request and checked
against the manifest's checksum annotation, by the image's TOC threads while
the other layers load (registry_image).  Listings, attributes (original
owners, modes, types, times, devices), symlinks, hardlinks and xattrs come from the TOC: no file data is
fetched for `ls -l` or `find`.  A regular file's data is fetched on its first
open, by a range request over its frames, decompressed, and checked against its
digest in the TOC before any byte of it is served; with it come the small
files that follow it in the blob, in a readahead window that grows while files
are read in blob order (registry_fetch).  Contents are kept in the user's cache
(registry_cache), shared by all the user's mounts.  Whiteouts and opaque
directories are the tar-style `.wh.` names, which the overlay honours.

Failures: a file whose fetched or cached bytes do not match its digest is not
served (EIO, one log line naming the file and the layer); a registry that does
not answer makes the opens of not-yet-fetched files fail with EIO after bounded
timeouts and retries, while fetched files keep working.  Only the registry
address in SPEC is ever contacted; no authentication is spoken.

Written only against cshare_fuse.plugin_api, exactly as a third party would.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import dataclass

from cshare_fuse import plugin_api
from cshare_fuse.plugin_api import API_VERSION, DataSource, Stat
from plugins.index_tree import IndexedSource
from plugins.registry_cache import FileCache, default_cache
from plugins.registry_fetch import Fetcher
from plugins.registry_http import RegistryClient, check_address, check_repository
from plugins.registry_image import Images, layer_list
from plugins.registry_toc import (
    Entry,
    TocError,
    build_tree,
    data_entries,
    is_sha256_digest,
    parse_toc,
    toc_location,
)
from plugins.registry_worker import WorkerPool

_OPEN_MODIFIERS = os.O_NOATIME | os.O_NONBLOCK


def _logger() -> logging.Logger:
    """The plugin API's logger for this plugin when it has one, else a child of the daemon's."""
    found = getattr(plugin_api, "logger", None)
    if callable(found):
        return found("registry")
    return logging.getLogger("cshare_fuse.plugin.registry")


@dataclass(frozen=True)
class ImageSpec:
    """What a SPEC file says: which registry, repository and manifest, and how to talk."""

    registry: str
    repository: str
    manifest: str
    tls_verify: bool = True
    cache: str = ""
    timeout: float = 10.0
    attempts: int = 3

    @classmethod
    def read(cls, path: str) -> ImageSpec:
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read(1 << 16))
        except ValueError as exc:
            raise ValueError(f"{path} is not a JSON layer description: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path} is not a JSON object")
        missing = [k for k in ("registry", "repository", "manifest") if not doc.get(k)]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}")
        if not is_sha256_digest(str(doc["manifest"])):
            raise ValueError(f"{path}: manifest {doc['manifest']!r} is not a sha256 digest")
        timeout, attempts = doc.get("timeout", 10.0), doc.get("attempts", 3)
        if not isinstance(timeout, int | float) or not 0 < timeout <= 600 or not isinstance(
                attempts, int) or not 1 <= attempts <= 10:
            raise ValueError(f"{path}: timeout must be 0-600 seconds, attempts 1-10")
        return cls(registry=check_address(str(doc["registry"])),
                   repository=check_repository(str(doc["repository"])),
                   manifest=str(doc["manifest"]), tls_verify=doc.get("tls_verify", True) is not False,
                   cache=str(doc.get("cache") or default_cache()), timeout=float(timeout),
                   attempts=attempts)


def select_layer(layers: list[dict[str, object]], which: str) -> tuple[int, dict[str, object]]:
    """The layer DATA names: an index (0 is the base) or the hex of its digest."""
    if which.isdigit() and len(which) < 6:
        index = int(which)
        if index >= len(layers):
            raise ValueError(f"layer {index}: the image has {len(layers)} layers")
        return index, layers[index]
    for index, layer in enumerate(layers):
        if layer.get("digest") in (which, f"sha256:{which}"):
            return index, layer
    raise ValueError(f"layer {which!r} is not in the image (give its index or digest hex)")


def _layer_index(layers: list[dict[str, object]], which: str) -> int:
    """The index `which` names, or -1 (then select_layer says why)."""
    try:
        return select_layer(layers, which)[0]
    except ValueError:
        return -1


_images = Images()
#: One FileCache per cache directory for all layers of a mount (it checks and fills
#: its directories when made).
_caches: dict[str, FileCache] = {}
#: The mount's fetch workers, for windows fetched ahead by any of its layers.
_workers = WorkerPool()


def _cache_at(root: str) -> FileCache:
    key = os.path.abspath(root)
    found = _caches.get(key)
    if found is None:
        found = _caches[key] = FileCache(root)
    return found


class RegistrySource(IndexedSource[Entry]):
    """A layer tree from a TOC; file contents from the registry through the cache."""

    #: Everything but open answers from memory: only open may wait on the network.
    inline = frozenset(getattr(plugin_api, "ALL_METHODS", frozenset())) - {"open"}

    def __init__(self, spec: ImageSpec, spec_path: str, which: str) -> None:
        self.spec, self.spec_path, self.which = spec, spec_path, which
        self.cache = _cache_at(spec.cache)
        super().__init__(self.cache.root)
        self.client = RegistryClient(spec.registry, tls_verify=spec.tls_verify,
                                     timeout=spec.timeout, attempts=spec.attempts)
        manifest, tocs = _images.get((spec.registry, spec.repository, spec.manifest),
                                     self.client, lambda layers: _layer_index(layers, which))
        index, layer = select_layer(layer_list(manifest), which)
        self.layer_digest = str(layer.get("digest"))
        if not is_sha256_digest(self.layer_digest):
            raise ValueError(f"layer {index} of {spec.repository} has digest "
                             f"{self.layer_digest!r}, not a sha256 one")
        annotations = layer.get("annotations")
        where = toc_location(annotations if isinstance(annotations, dict) else None)
        if where is None:
            raise ValueError(f"layer {index} ({self.layer_digest}) of {spec.repository} has no "
                             "zstd:chunked table of contents (pushed as plain gzip or zstd): "
                             "push the image with --compression-format zstd:chunked")
        try:
            text = tocs.take(index, self.layer_digest, where,
                             lambda: self.client.blob_range(spec.repository, self.layer_digest,
                                                            where.offset,
                                                            where.offset + where.length),
                             wait_limit=spec.timeout * (spec.attempts + 1))
            self.index = build_tree(parse_toc(text))
        except TocError as exc:
            raise TocError(f"layer {index} ({self.layer_digest}): {exc}") from None
        self.dev = (1 << 61) | int(self.layer_digest[7:19], 16)  # one per layer: see raw_stat
        self.fetcher = Fetcher(self.client, self.cache, spec.repository, self.layer_digest,
                               data_entries(self.index), self._layer_name(), _logger(),
                               wait_limit=spec.timeout * (spec.attempts + 1),
                               workers=_workers)

    def describe(self) -> str:
        return f"//registry/{self.which}/{self.spec_path}"

    def _layer_name(self) -> str:
        return f"layer {self.layer_digest} of {self.spec.registry}/{self.spec.repository}"

    # -- the tree: names, listings, symlinks, xattrs (IndexedSource) -------------
    def raw_stat(self, path: bytes) -> Stat:
        e = self.entry(path)
        e.resolve_times()
        size = len(e.symlink) if stat.S_ISLNK(e.mode) else 4096 if e.is_dir else e.size
        # Entries have no inode on disk: numbers are the TOC's, on a device number
        # of this layer's own, so that no two layers' hardlinks are taken as one.
        return Stat(mode=e.mode, ino=e.ino, dev=self.dev, nlink=e.nlink, uid=e.uid, gid=e.gid,
                    rdev=e.rdev, size=size, blocks=(size + 511) // 512, blksize=4096,
                    atime_ns=e.atime_ns, mtime_ns=e.mtime_ns, ctime_ns=e.ctime_ns)

    # -- file data ---------------------------------------------------------------
    def may_block(self, method: str, path: bytes) -> bool:
        """Only an open of a file this mount has not verified yet waits (a fetch, or
        hashing what the cache holds); any other open is an open(2) of a cache file,
        made on the request loop without a hop to a worker thread."""
        if method != "open":
            return True
        entry = self.index.get(path)
        if entry is None or not entry.has_data:
            return False  # an error or an empty file: answered at once
        return not self.fetcher.knows(entry.digest)

    def open(self, path: bytes, flags: int) -> int:
        entry = self.entry(path)
        if not stat.S_ISREG(entry.mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fsdecode(path))
        if not entry.has_data:
            return os.memfd_create("empty", os.MFD_CLOEXEC)
        first = entry.link_to if entry.link_to is not None else path
        return self.fetcher.fd_for(first, entry, flags & _OPEN_MODIFIERS)

    def fetched_bytes(self) -> int:
        """Bytes of file data received from the registry by this layer so far (and its
        TOC when its own load fetched it, not the image's TOC threads)."""
        return self.client.bytes_received


class RegistryPlugin:
    """The `plugin` object: name, API version, and one data source per layer."""

    name = "registry"
    api_version = API_VERSION

    def load(self, data: str, path: str) -> DataSource:
        if not data:
            raise ValueError("DATA must name the layer: its index (0 is the base) or digest hex, "
                             "as in //registry/0/SPEC")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such image description (a JSON file naming "
                                    "registry, repository and manifest)")
        return RegistrySource(ImageSpec.read(path), path, data)


plugin = RegistryPlugin()
