"""make-shared: copy an image from podman's store into the shared store, converted.

The steps, for IMAGE in podman's store (cshare.store.containers) and the shared store
(cshare.store.shared):

1. take the shared store's write lock (LOCK_EX; concurrent runs queue here);
2. under podman's read locks, resolve IMAGE, walk its layer chain and copy
   every layer the shared store does not hold yet into the store's tmp/
   (cshare.tree.copy; reflink when possible); then release podman's locks;
3. convert each copied layer (cshare.tree.convert.convert_tree), make it root-owned
   with no file capabilities (`secure_tree`), check that it is safe to show to
   every user (`unsafe_entries` and cshare verify's `verify_tree`), then publish
   it with one rename, base layer first;
4. write the image record last (names, layer order, run config).

A layer already in the store is reused, so running make-shared twice for the
same image changes nothing, and images sharing layers store them once.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cshare_fuse.formats.markers import is_whiteout_stat
from cshare_fuse.formats.overrides import CAPABILITY_XATTR, STASHED_CAPABILITY_XATTR

from ..errors import CshareError
from ..tree.copy import copy_tree
from .containers import SourceImage, SourceLayer, SourceStore
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


def secure_tree(tree: Path) -> int:
    """Make a converted layer safe on the host; return how many entries changed.

    convert keeps host owners, but in the shared store a file owned by, say,
    uid 33 could be rewritten (or its override xattr forged) by whoever has
    uid 33 on the host.  So every entry but symlinks (which nobody can modify)
    becomes root:root.  File capabilities would let any host user run the file
    with privileges, like setuid: they move to `user.cshare.capability`.
    """
    changed = 0

    def fix(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return
        if stat.S_ISREG(st.st_mode) and CAPABILITY_XATTR in os.listxattr(
            path, follow_symlinks=False
        ):
            value = os.getxattr(path, CAPABILITY_XATTR, follow_symlinks=False)
            os.setxattr(path, STASHED_CAPABILITY_XATTR, value, follow_symlinks=False)
            os.removexattr(path, CAPABILITY_XATTR, follow_symlinks=False)
            changed += 1
        if st.st_uid != 0 or st.st_gid != 0:
            mode = stat.S_IMODE(st.st_mode)
            os.chown(path, 0, 0, follow_symlinks=False)
            if not stat.S_ISCHR(st.st_mode) and stat.S_IMODE(os.lstat(path).st_mode) != mode:
                os.chmod(path, mode)  # chown may drop bits; keep the converted mode
            changed += 1

    fix(str(tree))
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            fix(os.path.join(dirpath, name))
    return changed


def _verify(tree: Path) -> list[str]:
    """cshare verify's findings on a layer, as `path: kind (detail)`."""
    from ..tree.verify import verify_tree

    report = verify_tree(tree)
    return [f"{f.path}: {f.kind} ({f.detail})" for f in report.findings]


def unsafe_entries(tree: Path, limit: int = 20) -> list[str]:
    """Entries a converted layer must not contain, as `path: reason` (at most `limit`).

    Every user may read the shared store, so a layer may hold nothing writable
    by anyone but root, no setuid/setgid/sticky bits, no device nodes, fifos or
    sockets (a whiteout, char 0/0, is fine), no file capabilities, and
    nothing users cannot read.  Symlinks may keep any owner: nobody can change one.
    """
    problems: list[str] = []

    def check(path: str, st: os.stat_result) -> None:
        mode = st.st_mode
        rel = os.path.relpath(path, tree)
        if stat.S_ISLNK(mode):
            return
        if is_whiteout_stat(mode, st.st_rdev):
            if st.st_uid != 0:
                problems.append(f"{rel}: whiteout owned by uid {st.st_uid}, not root")
            return
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            problems.append(f"{rel}: special file (type {stat.S_IFMT(mode):o})")
            return
        if st.st_uid != 0:
            problems.append(f"{rel}: owned by uid {st.st_uid}, not root")
        if mode & 0o022:
            problems.append(f"{rel}: writable by group or others ({stat.S_IMODE(mode):04o})")
        if mode & 0o7000:
            problems.append(f"{rel}: setuid/setgid/sticky ({stat.S_IMODE(mode):04o})")
        if stat.S_ISREG(mode) and CAPABILITY_XATTR in os.listxattr(path, follow_symlinks=False):
            problems.append(f"{rel}: has file capabilities")
        needed = 0o005 if stat.S_ISDIR(mode) else 0o004
        if mode & needed != needed:
            problems.append(f"{rel}: not readable by users ({stat.S_IMODE(mode):04o})")

    check(str(tree), os.lstat(tree))
    for dirpath, dirnames, filenames in os.walk(tree):  # os.walk never follows symlinks by default
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            check(path, os.lstat(path))
            if len(problems) >= limit:
                return problems
    return problems


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
    outcomes: dict[str, LayerOutcome] = {}
    with source.read_lock():
        snap = source.snapshot()
        image: SourceImage = snap.resolve(ref)
        chain: list[SourceLayer] = snap.chain(image)
        config = snap.config(image)
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
            stats = copy_tree(
                source.layer_diff(layer), stage / "diff", on_entry=lambda _p: rep.entry()
            )
            outcomes[layer.id] = LayerOutcome(
                layer.id,
                "added",
                entries=stats.entries,
                bytes=stats.bytes,
                reflinked=stats.reflinked,
                copy_seconds=time.monotonic() - started,
            )
    # podman's store is free again; the rest works on our own copies.
    for index, layer in enumerate(reversed(chain), start=1):
        outcome = outcomes[layer.id]
        if outcome.status != "added":
            continue
        rep.layer_start(index, total, layer.id, "convert")
        started = time.monotonic()
        diff = staged[layer.id] / "diff"
        _convert(diff, rep.entry)
        secure_tree(diff)
        problems = unsafe_entries(diff) + _verify(diff)
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
            },
        )
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


def _check_same_layer(store: SharedStore, layer: SourceLayer) -> None:
    """A reused layer must be the same content: compare the diff digests."""
    info = store.layer_info(layer.id)
    have, want = info.get("diff-digest"), layer.diff_digest
    if have and want and have != want:
        raise CshareError(
            f"layer {layer.id[:12]} in {store.root} has diff digest {have}, podman's has {want}; "
            f"remove the images using it with cshare rm and run make-shared again"
        )
