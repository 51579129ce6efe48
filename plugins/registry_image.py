"""One image of a registry as a mount sees it: its verified manifest, and its layers' TOCs fetched side by side.

A mount of an image loads one `//registry/N/SPEC` layer after another (the
overlay asks its plugins in lowerdir order, one at a time).  Each layer needs
the image manifest and its own TOC, and on a real image most of the load is
waiting for those answers.  So the first layer of an image that is loaded
fetches the manifest (checked against its digest) once for all of them, and
starts a few threads that fetch the other layers' TOCs while the loads go on:
every TOC is checked against the manifest's checksum annotation and
decompressed in those threads (hashlib and zstandard let go of the GIL),
and the load of each layer then takes its TOC's text from there instead of
asking the registry itself.

What does not change: only the address in SPEC is contacted, through the same
client (timeouts, bounded retries); nothing is taken on trust, since a TOC
reaches a layer only once it matches the checksum of a manifest that matched
its digest; and a TOC whose fetch failed in the background is fetched again
by the layer's own load, which fails with the same message as ever.  What
does: an image's TOCs are all fetched, even for a mount of only some of its
layers (they are small, and a mount of an image names every layer).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from plugins.registry_http import RegistryClient
from plugins.registry_toc import TocError, TocLocation, decode_toc_text, sha256_digest, toc_location

IMAGE_MANIFESTS = ("application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json")
#: Threads fetching one image's TOCs at once: enough to keep a registry's
#: answers overlapping the loads, few enough not to crowd a small machine.
TOC_THREADS = 4

Key = tuple[str, str, str]  # (registry, repository, manifest digest)


def fetch_manifest(client: RegistryClient, repository: str, digest: str) -> dict[str, object]:
    """The image manifest, checked against its digest."""
    body, media, _ = client.manifest(repository, digest)
    if sha256_digest(body) != digest:
        raise ValueError(f"manifest of {repository} does not match its digest {digest}")
    doc = json.loads(body)
    media = doc.get("mediaType") or media
    if media not in IMAGE_MANIFESTS or not isinstance(doc.get("layers"), list):
        raise ValueError(f"{digest} is a {media or 'manifest of unknown type'}, not an "
                         "image manifest")
    return doc


def layer_list(manifest: dict[str, object]) -> list[dict[str, object]]:
    listed = manifest["layers"]
    return [x for x in listed if isinstance(x, dict)] if isinstance(listed, list) else []


class ImageTocs:
    """The TOC texts of one image's layers, fetched ahead by a few threads; taken once each."""

    def __init__(self, client: RegistryClient, repository: str,
                 layers: list[dict[str, object]], first: int) -> None:
        self.client, self.repository = client, repository
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._texts: dict[int, bytes] = {}
        self._failed: set[int] = set()
        self._where: dict[int, tuple[str, TocLocation]] = {}
        for index, layer in enumerate(layers):
            try:
                annotations = layer.get("annotations")
                where = toc_location(annotations if isinstance(annotations, dict) else None)
            except TocError:
                where = None  # its own load says what is wrong with it
            if where is not None and isinstance(layer.get("digest"), str):
                self._where[index] = (str(layer["digest"]), where)
        # The overlay loads the topmost layer first, and `cshare mount` lists them
        # top first: fetch the one asked for, then the others from the top down.
        self._queue = sorted(self._where, key=lambda i: (i != first, -i))
        self._taken: set[int] = set()
        for n in range(min(TOC_THREADS, len(self._queue))):
            threading.Thread(target=self._work, name=f"registry-toc-{n}", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                index = self._queue.pop(0)
            digest, where = self._where[index]
            try:
                raw = self.client.blob_range(self.repository, digest, where.offset,
                                             where.offset + where.length)
                text = decode_toc_text(raw, where)
            except Exception:  # fetched again by the layer's own load, which reports it
                with self._lock:
                    self._failed.add(index)
                    self._done.notify_all()
                continue
            with self._lock:
                self._texts[index] = text
                self._done.notify_all()

    def take(self, index: int, digest: str, where: TocLocation,
             fetch: Callable[[], bytes], wait_limit: float) -> bytes:
        """Layer `index`'s checked, decompressed TOC: from the threads, else `fetch()`ed raw now."""
        with self._lock:
            known = self._where.get(index)
            if known == (digest, where) and index not in self._taken:
                self._taken.add(index)  # a layer named twice fetches it again at once
                if index in self._queue:
                    self._queue.remove(index)  # not started yet: quicker to fetch it here
                else:
                    self._done.wait_for(lambda: index in self._texts or index in self._failed,
                                        timeout=wait_limit)
                text = self._texts.pop(index, None)
                if text is not None:
                    return text
        return decode_toc_text(fetch(), where)


class Images:
    """Verified manifests and TOC fetchers by (registry, repository, digest): one for all layers of a mount."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[Key, tuple[dict[str, object], ImageTocs]] = {}

    def get(self, key: Key, client: RegistryClient, first: Callable[[list[dict[str, object]]], int]
            ) -> tuple[dict[str, object], ImageTocs]:
        """The manifest of `key` (fetched and checked on first use) and its TOC fetcher."""
        with self._lock:
            found = self._known.get(key)
            if found is None:
                # Under the lock: the loads run one after another, and a second
                # caller must not fetch the manifest again.
                manifest = fetch_manifest(client, key[1], key[2])
                layers = layer_list(manifest)
                found = (manifest, ImageTocs(client, key[1], layers, first(layers)))
                self._known[key] = found
        return found
