"""make-shared: copy an image from podman's store into the shared store, converted.

The steps, for IMAGE in podman's store (cshare.store.containers) and the shared store
(cshare.store.shared):

1. take the shared store's write lock (LOCK_EX; concurrent runs queue here);
2. under podman's read locks, resolve IMAGE, walk its layer chain and copy
   every layer the shared store does not hold yet into the store's tmp/
   (cshare.tree.copy; reflink when possible), leaving behind the image's own
   xattrs in cshare's namespaces (override records, user-visible opaque
   markers, user.cshare.*: an image's tar can carry any of them, and a shared
   layer's records must come only from converting the real metadata);
   then release podman's locks;
3. convert each copied layer (cshare.tree.convert.convert_tree), then in one
   more walk make it root-owned with no file capabilities and check that it is
   safe to show to every user, cshare verify's checks included
   (cshare.store.layercheck), then publish it with one rename, base layer first,
   its metadata holding the digest of its records (`cshare verify` of a
   published layer compares it);
4. write the image record last (names, layer order, run config).

So each new layer is walked three times: copied, converted, secured and
checked.  A layer already in the store is reused, so running make-shared twice for the
same image changes nothing, and images sharing layers store them once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cshare_fuse.formats.markers import is_forgeable_in_image

from ..errors import CshareError
from ..tree.copy import copy_tree
from ..tree.verify import RECORDS_DIGEST_KEY
from .containers import SourceImage, SourceLayer, SourceStore
from .layercheck import secure_and_check
from .shared import ImageRecord, SharedStore, remove_path


@dataclass
class LayerOutcome:
    """What happened to one layer of the image."""

    id: str
    status: str  # "added" or "reused"
    entries: int = 0
    bytes: int = 0
    reflinked: int = 0
    copy_seconds: float = 0.0
    convert_seconds: float = 0.0
    #: xattr name -> entries: what the image carried in cshare's namespaces, not copied
    dropped_xattrs: dict[str, int] = field(default_factory=dict)


@dataclass
class MakeSharedResult:
    image: ImageRecord
    store: Path
    layers: list[LayerOutcome] = field(default_factory=list)
    record_changed: bool = False
    renamed_from: list[str] = field(default_factory=list)  # images whose names moved here

    @property
    def changed(self) -> bool:
        return (
            self.record_changed
            or any(o.status == "added" for o in self.layers)
            or bool(self.renamed_from)
        )


class Reporter(Protocol):
    """Progress hooks (the command renders them with rich)."""

    def layer_start(self, index: int, total: int, layer_id: str, action: str) -> None: ...

    def entry(self) -> None: ...

    def layer_end(self, outcome: LayerOutcome) -> None: ...


class _Silent:
    def layer_start(self, index: int, total: int, layer_id: str, action: str) -> None:
        pass

    def entry(self) -> None:
        pass

    def layer_end(self, outcome: LayerOutcome) -> None:
        pass


def _convert(tree: Path, on_entry: Callable[[], None]) -> None:
    try:
        from ..tree.convert import convert_tree
    except ImportError as exc:
        raise CshareError(
            f"cshare's converter is not installed ({exc}); reinstall cshare"
        ) from None
    report = convert_tree(tree, dry_run=False, on_entry=on_entry)
    errors = list(getattr(report, "errors", []) or [])
    if errors:
        shown = "; ".join(
            ": ".join(map(str, e)) if isinstance(e, tuple) else str(e) for e in errors[:3]
        )
        raise CshareError(
            f"converting layer {tree.parent.name} failed: {len(errors)} error(s): {shown}"
        )


def make_shared(
    ref: str,
    *,
    storage_root: Path,
    store_root: Path,
    group: str | None = None,
    reporter: Reporter | None = None,
) -> MakeSharedResult:
    """Put image `ref` of podman's store `storage_root` into the shared store `store_root`."""
    rep: Reporter = reporter or _Silent()
    source = SourceStore(storage_root)
    # Resolve once before touching the shared store, so a typo creates nothing.
    with source.read_lock():
        source.snapshot().resolve(ref)
    store = SharedStore(store_root)
    with store.write_lock(group=group):
        staged: dict[str, Path] = {}
        try:
            return _make_shared_locked(ref, source, store, rep, staged)
        finally:
            for path in staged.values():
                remove_path(path)


def _make_shared_locked(
    ref: str, source: SourceStore, store: SharedStore, rep: Reporter, staged: dict[str, Path]
) -> MakeSharedResult:
    with source.read_lock():
        snap = source.snapshot()
        image: SourceImage = snap.resolve(ref)
        chain: list[SourceLayer] = snap.chain(image)
        config = snap.config(image)
        outcomes = _copy_new_layers(chain, source, store, rep, staged)
    # podman's store is free again; the rest works on our own copies.
    for index, layer in enumerate(reversed(chain), start=1):
        outcome = outcomes[layer.id]
        if outcome.status == "added":
            rep.layer_start(index, len(chain), layer.id, "convert")
            _convert_check_publish(layer, outcome, store, rep, staged)
            rep.layer_end(outcome)
    record = ImageRecord(
        id=image.id,
        names=image.names,
        layers=tuple(layer.id for layer in chain),
        config=config.as_dict(),
        digest=image.digest,
        created=image.created,
    )
    renamed = store.drop_names(record.names, keep_id=record.id)
    changed = store.write_image(record)
    return MakeSharedResult(
        image=record,
        store=store.root,
        layers=[outcomes[layer.id] for layer in chain],
        record_changed=changed,
        renamed_from=renamed,
    )


def _copy_new_layers(
    chain: list[SourceLayer], source: SourceStore, store: SharedStore, rep: Reporter,
    staged: dict[str, Path],
) -> dict[str, LayerOutcome]:
    """Copy every layer of `chain` the store lacks into its tmp/ (under podman's read lock)."""
    outcomes: dict[str, LayerOutcome] = {}
    total = len(chain)
    # Base first: the order they will be published in.
    for index, layer in enumerate(reversed(chain), start=1):
        if store.has_layer(layer.id):
            _check_same_layer(store, layer)
            outcomes[layer.id] = LayerOutcome(layer.id, "reused")
            rep.layer_start(index, total, layer.id, "reuse")
            rep.layer_end(outcomes[layer.id])
            continue
        rep.layer_start(index, total, layer.id, "copy")
        started = time.monotonic()
        stage = store.stage(f"layer-{layer.id[:12]}-")
        staged[layer.id] = stage
        # The image's own override records and markers stay behind: a shared
        # layer's records come only from converting the real metadata.
        stats = copy_tree(
            source.layer_diff(layer), stage / "diff", on_entry=lambda _p: rep.entry(),
            drop_xattr=is_forgeable_in_image,
        )
        outcomes[layer.id] = LayerOutcome(
            layer.id,
            "added",
            entries=stats.entries,
            bytes=stats.bytes,
            reflinked=stats.reflinked,
            copy_seconds=time.monotonic() - started,
            dropped_xattrs=stats.dropped_xattrs,
        )
    return outcomes


def _convert_check_publish(
    layer: SourceLayer, outcome: LayerOutcome, store: SharedStore, rep: Reporter,
    staged: dict[str, Path],
) -> None:
    """Convert a copied layer, secure and check it, and publish it."""
    started = time.monotonic()
    diff = staged[layer.id] / "diff"
    _convert(diff, rep.entry)
    problems, digest = secure_and_check(diff)
    if problems:
        raise CshareError(
            f"layer {layer.id[:12]} is not safe to share after conversion: {'; '.join(problems[:3])}"
            f"{' …' if len(problems) > 3 else ''}; nothing was published for it"
        )
    outcome.convert_seconds = time.monotonic() - started
    store.publish_layer(
        staged.pop(layer.id),
        {
            "id": layer.id,
            "parent": layer.parent,
            "diff-digest": layer.diff_digest,
            "diff-size": layer.diff_size,
            "created": layer.created,
            "size": outcome.bytes,
            "entries": outcome.entries,
            "uidset": list(layer.uidset),
            "gidset": list(layer.gidset),
            RECORDS_DIGEST_KEY: digest,
        },
    )


def _check_same_layer(store: SharedStore, layer: SourceLayer) -> None:
    """A reused layer must be the same content: compare the diff digests."""
    info = store.layer_info(layer.id)
    have, want = info.get("diff-digest"), layer.diff_digest
    if have and want and have != want:
        raise CshareError(
            f"layer {layer.id[:12]} in {store.root} has diff digest {have}, podman's has {want}; "
            f"remove the images using it with cshare rm and run make-shared again"
        )
