"""`cshare migrate`: a shared store of the previous layout, converted in place.

The previous layout kept each layer in `layers/ID/{diff,layer.json}` and
nothing podman can read.  Migration moves every layer directory to
`overlay/ID` with one rename (its data is never copied), adds the short name
and ancestors containers/storage needs (`link`, `lower`, `overlay/l/LINK`),
and gives each image what `podman image inspect` reads: its manifest and
config and podman's own entry, taken from the source store when the image is
still there, else built from what the record kept (entrypoint, cmd, env,
workdir, user, and the layers' diff digests).  Then podman's catalogues are
written.  Base layers go first, so a layer's ancestors always have their
short names already; an interruption leaves a store that the next run
finishes (each layer is in one place or the other, never half-moved).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CshareError
from . import imagestore
from .containers import SourceSnapshot, SourceStore
from .shared import LAYER_META, ImageRecord, SharedStore, _read_json, _write_json


@dataclass
class MigrateResult:
    store: Path
    layers_moved: list[str] = field(default_factory=list)
    images_from_source: list[str] = field(default_factory=list)
    images_rebuilt: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.layers_moved or self.images_from_source or self.images_rebuilt)


def migrate(store_root: Path, storage_root: Path | None) -> MigrateResult:
    """Convert `store_root` to the current layout in place; idempotent."""
    store = SharedStore(store_root)
    if not store.exists():
        raise CshareError(f"no shared store at {store_root}; nothing to migrate")
    result = MigrateResult(store.root)
    with store.write_lock():
        snap = _source_snapshot(storage_root)
        raw_layers = snap.layers if snap is not None else {}
        for layer_id in _base_first(store):
            _move_layer(store, layer_id, raw_layers.get(layer_id))
            result.layers_moved.append(layer_id)
        try:
            os.rmdir(store.legacy_layers_dir)
        except OSError:
            pass  # absent, or something unknown is left in it: keep it for the admin
        for record in store.images():
            if record.storage is not None and (store.big_data_root / record.id).is_dir():
                continue
            source = _source_image(snap, record.id)
            if source is not None:
                assert snap is not None
                storage, items = source.raw, snap.big_data(source)
                result.images_from_source.append(record.id)
            else:
                storage, items = _rebuilt(store, record)
                result.images_rebuilt.append(record.id)
            store.publish_big_data(record.id, items)
            store.write_image(ImageRecord(record.id, record.names, record.layers, record.config,
                                          record.digest, record.created, storage))
        store.sync_catalogues()
    return result


def _source_snapshot(storage_root: Path | None) -> SourceSnapshot | None:
    if storage_root is None or not (storage_root / "overlay-images").is_dir():
        return None
    source = SourceStore(storage_root)
    with source.read_lock():
        return source.snapshot()


def _source_image(snap: SourceSnapshot | None, image_id: str) -> Any:
    if snap is None:
        return None
    return next((i for i in snap.images if i.id == image_id), None)


def _base_first(store: SharedStore) -> list[str]:
    """Legacy layer ids in an order where every parent comes before its children."""
    try:
        pending = {n for n in os.listdir(store.legacy_layers_dir) if not n.startswith(".")}
    except FileNotFoundError:
        return []
    parents: dict[str, str | None] = {}
    for layer_id in pending:
        meta = _read_json(store.legacy_layers_dir / layer_id / LAYER_META)
        parents[layer_id] = meta.get("parent") if isinstance(meta, dict) else None
    order: list[str] = []
    while pending:
        ready = sorted(i for i in pending if parents[i] not in pending)
        if not ready:
            raise CshareError(f"the layers in {store.legacy_layers_dir} have a parent cycle; "
                              "remove their images with cshare rm and run make-shared again")
        order += ready
        pending -= set(ready)
    return order


def _move_layer(store: SharedStore, layer_id: str, raw: Any) -> None:
    old = store.legacy_layers_dir / layer_id
    if (store.layers_dir / layer_id).exists():
        raise CshareError(f"layer {layer_id[:12]} is in both {old} and {store.layers_dir}; "
                          f"remove {old} by hand (rm -r) and run cshare migrate again")
    meta = _read_json(old / LAYER_META)
    if not isinstance(meta, dict) or not (old / imagestore.DIFF).is_dir():
        raise CshareError(f"{old} is not a complete layer; remove it (rm -r) and run cshare migrate again")
    link = imagestore.read_link(old) or imagestore.new_link()
    imagestore.write_layer_files(old, link, store._lower_links(meta.get("parent")))
    meta["link"] = link
    if "storage" not in meta:
        meta["storage"] = raw.raw if raw is not None else {
            k: meta[k] for k in ("id", "parent", "diff-digest", "diff-size", "created", "uidset", "gidset")
            if meta.get(k) is not None}
    _write_json(old / LAYER_META, meta)
    os.rename(old, store.layers_dir / layer_id)
    imagestore.publish_link(store.root, link, layer_id, store.tmp_dir)


def _rebuilt(store: SharedStore, record: ImageRecord) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A config, a manifest and an images.json entry from what the record kept."""
    infos = [store.layer_info(lid) for lid in reversed(record.layers)]  # base first
    cfg = record.config
    config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {k: v for k, v in (("Entrypoint", cfg.get("entrypoint")), ("Cmd", cfg.get("cmd")),
                                     ("Env", cfg.get("env")), ("WorkingDir", cfg.get("workdir")),
                                     ("User", cfg.get("user"))) if v},
        "rootfs": {"type": "layers", "diff_ids": [i.get("diff-digest") for i in infos]},
    }
    if record.created:
        config["created"] = record.created
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    # podman checks the config against the manifest's digest; the image id
    # (the original config's digest) cannot be met by a rebuilt config.
    config_key = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_key, "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": i.get("diff-digest"), "size": i.get("diff-size") or 0} for i in infos],
    }, separators=(",", ":")).encode()
    items = {config_key: config_bytes, "manifest": manifest}
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    storage = {
        "id": record.id, "digest": record.digest or digest, "names": list(record.names),
        "created": record.created,
        "big-data-names": list(items),
        "big-data-sizes": {k: len(v) for k, v in items.items()},
        "big-data-digests": {k: "sha256:" + hashlib.sha256(v).hexdigest() for k, v in items.items()},
    }
    return {k: v for k, v in storage.items() if v is not None}, items
