"""Rendering for the store commands: make-shared, images, inspect, rm.

The work is done by cshare.store.make_shared and cshare.store; this module only
turns results into rich output (progress, tables, one-line summaries) or JSON.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.progress import TaskID
from rich.table import Table

from cshare_fuse.formats.optsyntax import lowerdir_value

from ..store.make_shared import LayerOutcome, MakeSharedResult, make_shared
from ..store.shared import ImageRecord, SharedStore
from .console import CshareError, print_json, progress, stdout


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # unreachable


def _when(created: str | None) -> str:
    if not created:
        return "-"
    try:
        # containers/storage writes nanoseconds; fromisoformat wants at most micro.
        head, _, frac = created.rstrip("Z").partition(".")
        stamp = datetime.fromisoformat(head + ("." + frac[:6] if frac else "") + "+00:00")
    except ValueError:
        return created
    return stamp.strftime("%Y-%m-%d %H:%M")


class _RichReporter:
    """One progress bar per layer: entries copied, then entries converted."""

    def __init__(self, quiet: bool):
        self.progress = progress(quiet)
        self.task: TaskID | None = None
        self.copy_tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _RichReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def layer_start(self, index: int, total: int, layer_id: str, action: str) -> None:
        label = f"layer {index}/{total} {layer_id[:12]} {action}"
        if action == "convert" and layer_id in self.copy_tasks:
            # The layer's convert bar replaces its copy bar.
            self.progress.update(self.copy_tasks.pop(layer_id), visible=False)
        self.task = self.progress.add_task(label, total=None, rate="")
        if action == "copy":
            self.copy_tasks[layer_id] = self.task

    def entry(self) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def layer_end(self, outcome: LayerOutcome) -> None:
        if self.task is None:
            return
        done = next(t.completed for t in self.progress.tasks if t.id == self.task)
        note = "reused" if outcome.status == "reused" else f"{human_size(outcome.bytes)}"
        self.progress.update(self.task, total=max(done, 1), completed=max(done, 1), rate=note)
        self.task = None


def result_json(result: MakeSharedResult) -> dict[str, Any]:
    return {
        "id": result.image.id,
        "names": list(result.image.names),
        "store": str(result.store),
        "changed": result.changed,
        "record_changed": result.record_changed,
        "names_taken_from": result.renamed_from,
        "layers": [
            {
                "id": o.id,
                "status": o.status,
                "entries": o.entries,
                "bytes": o.bytes,
                "reflinked": o.reflinked,
                "copy_seconds": round(o.copy_seconds, 3),
                "convert_seconds": round(o.convert_seconds, 3),
                "dropped_xattrs": o.dropped_xattrs,
            }
            for o in result.layers
        ],
    }


def run_make_shared(
    image: str, *, storage_root: Path, store: Path, group: str | None, json_out: bool, quiet: bool
) -> None:
    with _RichReporter(quiet or json_out) as reporter:
        result = make_shared(
            image, storage_root=storage_root, store_root=store, group=group, reporter=reporter
        )
    if json_out:
        print_json(result_json(result))
        return
    added = sum(1 for o in result.layers if o.status == "added")
    reused = len(result.layers) - added
    name = result.image.names[0] if result.image.names else result.image.id[:12]
    if not result.changed:
        stdout.print(
            f"{name} ({result.image.id[:12]}) is already shared in {result.store}; nothing changed"
        )
        return
    stdout.print(
        f"{name} ({result.image.id[:12]}) shared in {result.store}: "
        f"{len(result.layers)} layer(s), {added} added, {reused} reused"
    )
    _print_dropped(result)


def _print_dropped(result: MakeSharedResult) -> None:
    """Say which of the image's own xattrs in cshare's namespaces were left behind."""
    for o in result.layers:
        if o.dropped_xattrs:
            shown = ", ".join(f"{n} ({c})" for n, c in sorted(o.dropped_xattrs.items()))
            print(
                f"cshare: layer {o.id[:12]}: the image's own {shown} not copied: a shared "
                "layer's records come only from cshare's conversion",
                file=sys.stderr,
            )


def _image_size(store: SharedStore, record: ImageRecord) -> int:
    total = 0
    for layer_id in record.layers:
        try:
            size = store.layer_info(layer_id).get("size")
        except CshareError:
            continue  # a damaged layer: listing goes on; inspect and mount report it
        total += size if isinstance(size, int) else 0
    return total


def images_json(store: SharedStore) -> list[dict[str, Any]]:
    with store.read_lock():
        return [dict(r.to_json(), size=_image_size(store, r)) for r in store.images()]


def run_images(*, store: Path, json_out: bool) -> None:
    shared = SharedStore(store)
    data = images_json(shared)
    if json_out:
        print_json(data)
        return
    table = Table(title=f"images in {store}", title_justify="left")
    for col, kw in (
        ("NAME", {"overflow": "fold"}),
        ("IMAGE ID", {"style": "cyan"}),
        ("LAYERS", {"justify": "right"}),
        ("SIZE", {"justify": "right"}),
        ("CREATED", {}),
    ):
        table.add_column(col, **kw)  # type: ignore[arg-type]
    for image in data:
        for name in image["names"] or ["<none>"]:
            table.add_row(
                name,
                image["id"][:12],
                str(len(image["layers"])),
                human_size(image["size"]),
                _when(image["created"]),
            )
    if not data:
        stdout.print(f"no images in {store}; add one with cshare make-shared IMAGE")
        return
    stdout.print(table)


def inspect_json(store: SharedStore, ref: str) -> dict[str, Any]:
    with store.read_lock():
        record = store.resolve(ref)
        lowers = store.lower_dirs(record)
        layers = []
        for layer_id, diff in zip(record.layers, lowers, strict=True):
            info = store.layer_info(layer_id)
            layers.append(dict(info, id=layer_id, diff=str(diff)))
        doc = record.to_json()
        doc.update(
            store=str(store.root),
            size=_image_size(store, record),
            lowerdir=lowerdir_value(lowers),
            layer_details=layers,
        )
        return doc


def run_inspect(image: str, *, store: Path) -> None:
    print_json(inspect_json(SharedStore(store), image))


def run_rm(image: str, *, store: Path, json_out: bool, force: bool = False) -> None:
    shared = SharedStore(store)
    if not shared.exists():
        raise CshareError(f"no shared store at {store}; nothing to remove")
    with shared.write_lock():
        result = shared.remove_image(shared.resolve(image), force=force)
    if json_out:
        print_json(
            {
                "id": result.image.id,
                "names": list(result.image.names),
                "removed_layers": result.removed_layers,
                "kept_layers": result.kept_layers,
            }
        )
        return
    name = result.image.names[0] if result.image.names else result.image.id[:12]
    stdout.print(
        f"removed {name} ({result.image.id[:12]}) from {store}: "
        f"{len(result.removed_layers)} layer(s) deleted, {len(result.kept_layers)} kept for other images"
    )
