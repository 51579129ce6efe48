"""The shared store: converted layers and image records that every user may read.

Layout (a contract: `cshare mount`, podman and the tests rely on exactly this)::

    STORE/                 default /var/lib/cshare; root-owned, 0755
                           (0750 root:GROUP when made with --group GROUP)
      store.lock           0600: writers (make-shared, rm, migrate) hold
                           LOCK_EX; readers take no lock and cannot open it
      images/ID.json       cshare's image record, the truth about an image:
                           {"id", "names": [...], "layers": [top, ..., base],
                            "config": {"entrypoint", "cmd", "env", "workdir",
                            "user"}, "digest", "created", "storage": podman's
                            own images.json entry}
      overlay/ID/          one converted layer, ID = the containers/storage id
        diff/              the layer's files, converted (cshare convert): the
                           one copy of the layer's data
        link, lower        containers/storage's short name and ancestors
        layer.json         {"id", "parent", "diff-digest", "diff-size", "created",
                            "size", "entries", "uidset", "gidset", "link",
                            "storage": podman's own layers.json entry}
      overlay/l/LINK       -> ../ID/diff
      overlay-images/      images.json, images.lock, ID/ (manifest, config, …)
      overlay-layers/      layers.json, layers.lock
      tmp/                 staging, same filesystem, 0700; emptied by every
                           writer when it takes the lock

`overlay*/` is what podman reads when the store is listed under
`additionalimagestores` (cshare.imagestore owns that format).  images.json and
layers.json are regenerated from the records at every change, so a damaged
record costs only its own image.  The previous layout kept layers in
`layers/ID/{diff,layer.json}`; it is still read, and `cshare migrate` moves
each layer directory to `overlay/ID` with one rename (no data copied).

Guarantees:

- A layer appears complete or not at all: it is built in `tmp/`, then renamed
  to `overlay/ID` in one rename(2).  An image record is written to `tmp/` and
  renamed over `images/ID.json`; it is written only after all its layers and
  its big-data items are published, so a reader never finds an image whose
  layers are missing.  The catalogues follow, layers.json first.
- `rm` unlinks the record first, regenerates the catalogues, then moves unused
  layers to `tmp/` (one rename each) and deletes them there.
- Readers take no lock: every change is a rename, so they see a whole file
  before or after it.  A user can therefore never stall a writer (store.lock
  is not even readable by users, and writers never wait on podman's lock
  files).  A reader that races an `rm` may find a layer gone and says so.
- A damaged record (not JSON, wrong types, a file name that is not its id, a
  layer missing) is reported by `damaged()` and listed as damaged; every
  other image keeps working, and `rm ID` removes it.
- A layer present already is reused (dedupe across images).
- Nothing in the store is world- or group-writable; files 0644 or 0755,
  directories 0755, `tmp/` 0700.  Every entry of a layer except symlinks is
  owned by root (a host user owning one could rewrite it or its override
  xattr); the original owners live in the override xattr.  There are no
  setuid/setgid files, no device nodes (a whiteout, char 0/0, is not one) and
  no file capabilities: a layer's `security.capability` is kept as
  `user.cshare.capability` (cshare.store.layercheck).

Python API: `SharedStore(root)` with `images()`, `damaged()`, `resolve(name)`,
`layer_diff(layer_id)`, `lower_dirs(image)` (top first), `read_lock()` (no
lock: a check of the layout); the writer side (`write_lock()`, `stage()`,
`publish_layer()`, `publish_big_data()`, `write_image()`, `remove_image()`,
`sync_catalogues()`) is used by make-shared, rm and migrate.  The fcntl lock
of one process is shared by all its file descriptors (POSIX semantics), so
it is counted per process: nesting it is safe.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import os
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CshareError
from ..system import libc
from ..tree.remove import remove_tree
from . import imagestore
from . import names as refnames
from .inuse import Holder, holders

STORE_LOCK = "store.lock"
LEGACY_LAYERS = "layers"
IMAGES = "images"
TMP = "tmp"
LAYER_META = "layer.json"
#: Top-level names a store may hold (anything else: not a cshare store).
STORE_NAMES = frozenset({STORE_LOCK, LEGACY_LAYERS, IMAGES, TMP, imagestore.OVERLAY,
                         imagestore.IMAGES_DIR, imagestore.LAYERS_DIR})

CONFIG_KEYS = ("entrypoint", "cmd", "env", "workdir", "user")


@dataclass(frozen=True)
class ImageRecord:
    """One image of the shared store (images/ID.json)."""

    id: str
    names: tuple[str, ...]
    layers: tuple[str, ...]  # top first, base last
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    digest: str | None = None
    created: str | None = None
    storage: dict[str, Any] | None = field(default=None, hash=False, compare=True)

    def to_json(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "names": list(self.names),
            "layers": list(self.layers),
            "config": {k: self.config.get(k) for k in CONFIG_KEYS},
            "digest": self.digest,
            "created": self.created,
        }
        if self.storage is not None:
            data["storage"] = self.storage
        return data

    def renamed(self, names: Sequence[str]) -> ImageRecord:
        return ImageRecord(self.id, tuple(names), self.layers, self.config, self.digest,
                           self.created, self.storage)

    @classmethod
    def from_json(cls, data: Any, where: Path) -> ImageRecord:
        try:
            if not isinstance(data, dict):
                raise TypeError("not an object")
            image_id, names, layers = data["id"], data["names"], data["layers"]
            if (
                not isinstance(image_id, str)
                or not isinstance(names, list)
                or not isinstance(layers, list)
            ):
                raise TypeError("bad id, names or layers")
            if not all(isinstance(n, str) for n in names) or not all(
                isinstance(x, str) for x in layers
            ):
                raise TypeError("names and layers must be strings")
            if not layers:
                raise TypeError("no layers")
            config = data.get("config") or {}
            if not isinstance(config, dict):
                raise TypeError("config must be an object")
            storage = data.get("storage")
            if storage is not None and not isinstance(storage, dict):
                raise TypeError("storage must be an object")
            for key in ("digest", "created"):
                if data.get(key) is not None and not isinstance(data[key], str):
                    raise TypeError(f"{key} must be a string")
        except (KeyError, TypeError) as exc:
            raise CshareError(
                f"{where} is not a valid image record ({exc}); remove it with cshare rm {where.stem}"
            ) from None
        return cls(
            id=image_id,
            names=tuple(names),
            layers=tuple(layers),
            config={k: config.get(k) for k in CONFIG_KEYS},
            digest=data.get("digest"),
            created=data.get("created"),
            storage=storage,
        )


@dataclass(frozen=True)
class DamagedRecord:
    """An image record that cannot be used; only its own image is affected."""

    id: str  # the record's file name without .json
    path: Path
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "record": str(self.path), "damaged": self.reason}


@dataclass
class RemoveResult:
    image: ImageRecord | DamagedRecord
    removed_layers: list[str]
    kept_layers: list[str]  # still used by another image


# ------------------------------------------------------------------ locking
# POSIX record locks belong to the process, and closing *any* descriptor of
# the file drops them all.  So one descriptor per lock file, counted.
_locks_guard = threading.Lock()
_held: dict[str, list[Any]] = {}  # path -> [fd, depth]


def _damaged_lock(path: Path, what: str) -> CshareError:
    return CshareError(
        f"{path} is {what}, not the store's lock file: the shared store is damaged; "
        f"as root remove it (rm -r {path}) and run the command again"
    )


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    key = os.path.realpath(path)
    with _locks_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield
        finally:
            with _locks_guard:
                _held[key][1] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CshareError(
            f"no shared store at {path.parent}; create it with cshare make-shared IMAGE"
        ) from None
    except IsADirectoryError:
        raise _damaged_lock(path, "a directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _damaged_lock(path, "a symlink") from None
        raise
    try:
        # Only root can open store.lock (0600): nobody else can hold it, so the
        # wait is only for another root writer.
        fcntl.lockf(fd, fcntl.LOCK_EX)
        with _locks_guard:
            _held[key] = [fd, 1]
        try:
            yield
        finally:
            with _locks_guard:
                del _held[key]
    finally:
        os.close(fd)


class SharedStore:
    """The shared store at `root` (see the module docstring for layout and guarantees)."""

    def __init__(self, root: Path):
        # Absolute: lower_dirs() feeds mount options that outlive our cwd.
        self.root = Path(os.path.abspath(root))

    # ------------------------------------------------------------------ paths
    @property
    def lock_path(self) -> Path:
        return self.root / STORE_LOCK

    @property
    def layers_dir(self) -> Path:
        """overlay/: one directory per layer, as containers/storage lays them out."""
        return self.root / imagestore.OVERLAY

    @property
    def legacy_layers_dir(self) -> Path:
        return self.root / LEGACY_LAYERS

    @property
    def links_dir(self) -> Path:
        return self.layers_dir / imagestore.LINKS

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES

    @property
    def big_data_root(self) -> Path:
        return self.root / imagestore.IMAGES_DIR

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP

    @property
    def where(self) -> str:
        return f"the shared store {self.root}"

    def exists(self) -> bool:
        return os.path.lexists(self.lock_path) and self.images_dir.is_dir() and (
            self.layers_dir.is_dir() or self.legacy_layers_dir.is_dir()
        )

    def is_legacy(self) -> bool:
        """The previous layout still holds layers (cshare migrate moves them)."""
        try:
            return any(not n.startswith(".") for n in os.listdir(self.legacy_layers_dir))
        except (FileNotFoundError, NotADirectoryError):
            return False

    # ------------------------------------------------------------------ readers
    def check_layout(self) -> None:
        """A one-line CshareError, naming the path and the fix, for a damaged layout."""
        if not os.path.lexists(self.root):
            raise CshareError(f"no shared store at {self.root}; create it with cshare make-shared IMAGE")
        try:
            st: os.stat_result | None = os.lstat(self.lock_path)
        except FileNotFoundError:
            st = None
        except PermissionError:
            raise CshareError(
                f"cannot read {self.root}: permission denied (not in the store's group?)"
            ) from None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise _damaged_lock(self.lock_path, "a symlink")
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise _damaged_lock(self.lock_path, "a directory")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _damaged_lock(self.lock_path, "not a regular file")
        for path in (self.images_dir, self.layers_dir, self.legacy_layers_dir, self.tmp_dir,
                     self.big_data_root, self.root / imagestore.LAYERS_DIR):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            except PermissionError:
                raise CshareError(
                    f"cannot read {path}: permission denied (not in the store's group?)"
                ) from None
            if not stat.S_ISDIR(st.st_mode):
                raise CshareError(
                    f"{path} is not a directory: the shared store is damaged; as root move it "
                    f"away (mv {path} {path}.damaged) and run cshare make-shared again"
                )

    @contextmanager
    def read_lock(self) -> Iterator[None]:
        """No lock (readers never block writers): only the layout check.

        Kept as a context so callers mark what they read together; every
        change is a rename, so each file read is whole.
        """
        self.check_layout()
        yield

    def _record_names(self) -> list[str]:
        self.check_layout()
        try:
            entries = sorted(os.listdir(self.images_dir))
        except FileNotFoundError:
            raise CshareError(
                f"no shared store at {self.root}; create it with cshare make-shared IMAGE"
            ) from None
        except PermissionError:
            raise CshareError(
                f"cannot read {self.images_dir}: permission denied (not in the store's group?)"
            ) from None
        return [n for n in entries if n.endswith(".json") and not n.startswith(".")]

    def scan(self) -> tuple[list[ImageRecord], list[DamagedRecord]]:
        """Every image record, good ones sorted by first name then id, and the damaged ones."""
        good: list[ImageRecord] = []
        bad: list[DamagedRecord] = []
        for name in self._record_names():
            path = self.images_dir / name
            stem = name[: -len(".json")]
            try:
                rec = ImageRecord.from_json(_read_json(path), path)
                if rec.id != stem:
                    raise CshareError(f"its id is {rec.id[:12]}, not the file's name")
                for layer_id in rec.layers:
                    _check_id(layer_id)
                    if self._diff_path(layer_id) is None:
                        raise CshareError(f"layer {layer_id[:12]} is missing")
            except CshareError as exc:
                bad.append(DamagedRecord(stem, path, _reason(str(exc), path)))
                continue
            good.append(rec)
        good.sort(key=lambda r: (r.names[0] if r.names else "\uffff", r.id))
        return good, bad

    def images(self) -> list[ImageRecord]:
        """Every usable image record, sorted by first name then id."""
        return self.scan()[0]

    def damaged(self) -> list[DamagedRecord]:
        return self.scan()[1]

    def image(self, image_id: str) -> ImageRecord | None:
        path = self.images_dir / f"{image_id}.json"
        if not path.exists():
            return None
        return ImageRecord.from_json(_read_json(path), path)

    def resolve(self, name: str) -> ImageRecord:
        """The image `name` refers to (id, id prefix, name, short name); CshareError otherwise."""
        records, bad = self.scan()
        try:
            return refnames.resolve(
                name, records, self.where, {r.id: r.digest for r in records if r.digest}
            )
        except CshareError:
            hit = self._damaged_match(name, bad)
            if hit is not None:
                raise CshareError(
                    f"the record of image {hit.id[:12]} ({hit.path}) is damaged: {hit.reason}; "
                    f"remove it with cshare rm {hit.id[:12]}"
                ) from None
            raise

    def find_for_removal(self, name: str) -> ImageRecord | DamagedRecord:
        """What `rm NAME` removes: a usable image, else a damaged record named by its id."""
        records, bad = self.scan()
        hit = self._damaged_match(name, bad)
        try:
            return refnames.resolve(
                name, records, self.where, {r.id: r.digest for r in records if r.digest}
            )
        except CshareError:
            if hit is not None:
                return hit
            raise

    @staticmethod
    def _damaged_match(name: str, bad: Sequence[DamagedRecord]) -> DamagedRecord | None:
        key = name.removeprefix("sha256:")
        hits = [d for d in bad if d.id == key] or (
            [d for d in bad if d.id.startswith(key)] if len(key) >= 3 else []
        )
        return hits[0] if len(hits) == 1 else None

    def _diff_path(self, layer_id: str) -> Path | None:
        for base in (self.layers_dir, self.legacy_layers_dir):
            path = base / layer_id / imagestore.DIFF
            if path.is_dir() and not path.is_symlink():
                return path
        return None

    def has_layer(self, layer_id: str) -> bool:
        return self._diff_path(layer_id) is not None

    def layer_diff(self, layer_id: str) -> Path:
        """The converted diff directory of a layer."""
        _check_id(layer_id)
        path = self._diff_path(layer_id)
        if path is None:
            raise CshareError(
                f"layer {layer_id[:12]} is missing from {self.where}; run cshare make-shared again"
            )
        return path

    def layer_info(self, layer_id: str) -> dict[str, Any]:
        diff = self.layer_diff(layer_id)
        data = _read_json(diff.parent / LAYER_META)
        return data if isinstance(data, dict) else {}

    def lower_dirs(self, image: ImageRecord) -> list[Path]:
        """The image's layer diffs, top first: the overlay lowerdir order."""
        return [self.layer_diff(layer_id) for layer_id in image.layers]

    def layer_ids(self) -> list[str]:
        found: set[str] = set()
        for base in (self.layers_dir, self.legacy_layers_dir):
            try:
                found.update(n for n in os.listdir(base)
                             if not n.startswith(".") and n != imagestore.LINKS)
            except (FileNotFoundError, NotADirectoryError):
                pass
        return sorted(found)

    def layer_users(self, records: Sequence[ImageRecord] | None = None) -> dict[str, list[str]]:
        """layer id -> ids of the images that use it."""
        users: dict[str, list[str]] = {lid: [] for lid in self.layer_ids()}
        for record in self.images() if records is None else records:
            for layer_id in record.layers:
                users.setdefault(layer_id, []).append(record.id)
        return users

    # ------------------------------------------------------------------ writers
    @contextmanager
    def write_lock(self, group: str | None = None) -> Iterator[None]:
        """Create the store if needed, take LOCK_EX, empty tmp/ (root only).

        `group` restricts the whole store to that group (root dir 0750 root:GROUP).
        """
        if os.geteuid() != 0:
            raise CshareError(f"changing {self.where} needs root; run it with sudo")
        gid = _group_id(group) if group is not None else None
        self._create()
        with _exclusive_lock(self.lock_path):
            self._set_access(gid)
            self._empty_tmp()
            yield

    def _create(self) -> None:
        if self.root.is_symlink():
            raise CshareError(
                f"{self.root} is a symlink; give the real path of the store with --store"
            )
        if not self.root.exists():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(self.root, 0o700)  # opened up by _set_access, under the lock
            except FileExistsError:
                pass  # another make-shared won the race: fine
        if not self.root.is_dir():
            raise CshareError(f"{self.root} is not a directory; choose another --store")
        self.check_layout()
        # Never turn an unrelated directory into a store (another writer may be
        # half-way through creating this one: its names are fine).
        foreign = set(os.listdir(self.root)) - STORE_NAMES
        if foreign and not os.path.lexists(self.lock_path):
            raise CshareError(
                f"{self.root} exists and is not a cshare store; choose another --store"
            )
        try:
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        _ensure_file(self.lock_path, 0o600)
        for sub, mode in ((IMAGES, 0o755), (TMP, 0o700)):
            path = self.root / sub
            try:
                os.mkdir(path, mode)
            except FileExistsError:
                pass
            _ensure_dir(path, mode)
        imagestore.ensure_skeleton(self.root)

    def _set_access(self, gid: int | None) -> None:
        """Under the lock: root-owned; 0750 root:GROUP with a group, else 0755 once new."""
        st = os.lstat(self.root)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != 0:
            os.chown(self.root, 0, st.st_gid)
        if gid is not None:
            if st.st_gid != gid:
                os.chown(self.root, 0, gid)
            if mode != 0o750:
                os.chmod(self.root, 0o750)
        elif mode == 0o700:
            # Just created (_create makes it 0700): open it to every user.  An
            # existing store keeps its access (a group store stays 0750).
            os.chmod(self.root, 0o755)
        elif mode & 0o022:
            os.chmod(self.root, mode & ~0o022)

    def _empty_tmp(self) -> None:
        for name in os.listdir(self.tmp_dir):
            remove_path(self.tmp_dir / name)

    def stage(self, prefix: str) -> Path:
        """A new empty directory in tmp/ (same filesystem as overlay/)."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))

    def layer_link(self, layer_id: str) -> str | None:
        path = self._diff_path(layer_id)
        return imagestore.read_link(path.parent) if path is not None else None

    def _lower_links(self, parent: str | None) -> list[str]:
        """Short names of `parent` and its ancestors, nearest first (for the `lower` file)."""
        links: list[str] = []
        seen: set[str] = set()
        while parent and parent not in seen:
            seen.add(parent)
            link = self.layer_link(parent)
            if link is None:
                raise CshareError(f"layer {parent[:12]} has no short name in {self.where}; "
                                  "run cshare migrate")
            links.append(link)
            try:
                parent = self.layer_info(parent).get("parent")
            except CshareError:
                break
        return links

    def publish_layer(self, staged: Path, meta: dict[str, Any]) -> Path:
        """Move a finished staging dir (holding diff/) to overlay/ID in one rename."""
        layer_id = meta["id"]
        _check_id(layer_id)
        target = self.layers_dir / layer_id
        if self.has_layer(layer_id):
            raise CshareError(f"layer {layer_id[:12]} is already in {self.where}")
        link = imagestore.new_link()
        imagestore.write_layer_files(staged, link, self._lower_links(meta.get("parent")))
        _write_json(staged / LAYER_META, dict(meta, link=link))
        os.chmod(staged, 0o755)
        libc.syncfs(self.root)  # a published layer survives a crash whole
        os.rename(staged, target)
        imagestore.publish_link(self.root, link, layer_id, self.tmp_dir)
        return target

    def publish_big_data(self, image_id: str, items: Mapping[str, bytes]) -> None:
        """overlay-images/ID/: the image's manifest, config and other items, replaced whole."""
        _check_id(image_id)
        target = self.big_data_root / image_id
        if target.is_dir() and _same_items(target, items):
            return  # nothing to change (not even tmp/'s mtime)
        staged = self.stage("bigdata-")
        os.chmod(staged, 0o755)
        imagestore.write_big_data(staged, items)
        if target.is_dir():
            trash = self.stage("old-bigdata-")
            os.rename(target, trash / "old")
        os.rename(staged, target)

    def write_image(self, record: ImageRecord) -> bool:
        """Write images/ID.json unless identical; False when nothing changed."""
        _check_id(record.id)
        for layer_id in record.layers:
            self.layer_diff(layer_id)  # all layers first: a record never points to nothing
        try:
            existing = self.image(record.id)
        except CshareError:
            existing = None  # a damaged record of the same image: replaced
        if existing is not None and existing.to_json() == record.to_json():
            return False
        self._replace_json(self.images_dir / f"{record.id}.json", record.to_json())
        return True

    def drop_names(self, names: Sequence[str], keep_id: str) -> list[str]:
        """Take `names` away from every other image (a name belongs to one image)."""
        changed = []
        wanted = set(names)
        for record in self.images():
            if record.id != keep_id and wanted & set(record.names):
                left = tuple(n for n in record.names if n not in wanted)
                self._replace_json(self.images_dir / f"{record.id}.json", record.renamed(left).to_json())
                changed.append(record.id)
        return changed

    def sync_catalogues(self) -> bool:
        """Regenerate overlay-layers/layers.json and overlay-images/images.json from the records.

        Only usable images (record good, every layer present in overlay/, big
        data present) and their layers appear; a legacy or damaged image is
        simply absent from podman's view.  True when either file changed.
        """
        imagestore.ensure_skeleton(self.root)
        entries: dict[str, dict[str, Any]] = {}
        images = []
        for record in self.images():
            if record.storage is None or not (self.big_data_root / record.id).is_dir():
                continue
            layer_entries = []
            for layer_id in record.layers:
                entry = self._layer_entry(layer_id)
                if entry is None:
                    break
                layer_entries.append(entry)
            else:
                for entry in layer_entries:
                    entries[entry["id"]] = entry
                images.append(imagestore.image_entry(record.storage, record.id, record.names,
                                                     record.layers[0]))
        layers = [entries[k] for k in sorted(entries)]
        return imagestore.write_catalogues(self.root, layers, images, self.tmp_dir)

    def _layer_entry(self, layer_id: str) -> dict[str, Any] | None:
        layer_dir = self.layers_dir / layer_id
        if not (layer_dir / imagestore.DIFF).is_dir() or imagestore.read_link(layer_dir) is None:
            return None
        try:
            meta = _read_json(layer_dir / LAYER_META)
        except CshareError:
            return None
        if not isinstance(meta, dict):
            return None
        storage = meta.get("storage")
        source: dict[str, Any] = storage if isinstance(storage, dict) else meta
        return imagestore.layer_entry(source, layer_id, meta.get("parent"))

    def remove_image(self, record: ImageRecord | DamagedRecord, *, force: bool = False) -> RemoveResult:
        """Remove the record, then every layer no other image uses (orphans too).

        Refused, before anything changes, while an overlay anywhere on the
        machine has one of those layers as a lower layer (cshare.store.inuse), unless
        `force`.  With damaged records in the store, orphan layers are kept
        (a damaged record may still name them); only this image's are removed.
        """
        records, bad = self.scan()
        others = [r for r in records if r.id != record.id]
        mine = set(record.layers) if isinstance(record, ImageRecord) else set()
        removed, kept = [], []
        on_disk = set(self.layer_ids())
        for layer_id, image_ids in self.layer_users(others).items():
            if image_ids:
                if layer_id in mine:
                    kept.append(layer_id)
            elif layer_id in on_disk and (layer_id in mine or not bad):
                removed.append(layer_id)
        if not force:
            held = self._holders(removed)
            if held:
                name = record.names[0] if isinstance(record, ImageRecord) and record.names else record.id[:12]
                more = f" and {len(held) - 1} more" if len(held) > 1 else ""
                raise CshareError(
                    f"{name} is in use: {held[0].describe()}{more}; stop it first "
                    "(podman stop, or cshare umount, as that user), or pass --force to remove it anyway"
                )
        os.unlink(self.images_dir / f"{record.id}.json")
        _fsync_dir(self.images_dir)
        self.sync_catalogues()
        if (self.big_data_root / record.id).is_dir():
            os.rename(self.big_data_root / record.id, self.tmp_dir / f"rm-img-{record.id}")
        for layer_id in removed:
            link = self.layer_link(layer_id)
            diff = self._diff_path(layer_id)
            base = diff.parent.parent if diff is not None else self.layers_dir
            trash = self.tmp_dir / f"rm-{layer_id}"
            os.rename(base / layer_id, trash)
            imagestore.remove_link(self.root, link)
        self._empty_tmp()
        return RemoveResult(record, removed, kept)

    def _holders(self, layer_ids: Sequence[str]) -> list[Holder]:
        """Overlays using these layers, through their diff paths or their overlay/l/ short names."""
        found = holders(self.layers_dir, layer_ids) + holders(self.legacy_layers_dir, layer_ids)
        links = {link: lid for lid in layer_ids if (link := self.layer_link(lid))}
        # podman names layers by their short links, through whatever path the user
        # reaches the store by (a read-only bind mount, say): the random 26-letter
        # names are unique enough to match under any `/overlay/l/`.
        for h in holders(Path("/") / imagestore.OVERLAY / imagestore.LINKS, links):
            found.append(Holder(links[h.layer_id], h.pid, h.user, h.what))
        return found

    def _replace_json(self, path: Path, data: Any) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".json-", dir=self.tmp_dir)
        os.close(fd)
        _write_json(Path(tmp), data)
        os.rename(tmp, path)
        _fsync_dir(path.parent)


# ------------------------------------------------------------------ helpers
def _reason(message: str, path: Path) -> str:
    """The part of an error that describes the record, without the path and the advice."""
    text = message.replace(str(path), "").strip()
    for cut in ("; remove it with", "; the shared store"):
        text = text.split(cut)[0]
    return text.strip(" :") or "damaged"


def _same_items(directory: Path, items: Mapping[str, bytes]) -> bool:
    """Does `directory` hold exactly these big-data items?"""
    try:
        wanted = {imagestore.big_data_file_name(k): v for k, v in items.items()}
        if sorted(os.listdir(directory)) != sorted(wanted):
            return False
        return all((directory / n).read_bytes() == v for n, v in wanted.items())
    except OSError:
        return False


def _check_id(layer_id: str) -> None:
    # Ids come from JSON files: never let one be a path.
    if (not isinstance(layer_id, str) or not layer_id or "/" in layer_id
            or layer_id in (".", "..") or layer_id.startswith(".") or layer_id == imagestore.LINKS):
        raise CshareError(f"invalid id {layer_id!r} in the shared store")


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise CshareError(
            f"no group {group!r}; create it with groupadd or give another --group"
        ) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CshareError(f"{path} is missing from the shared store") from None
    except PermissionError:
        raise CshareError(
            f"cannot read {path}: permission denied (not in the store's group?)"
        ) from None
    except ValueError as exc:
        raise CshareError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise CshareError(f"cannot read {path} ({exc.strerror})") from None


def _write_json(path: Path, data: Any) -> None:
    body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body)
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path, mode: int) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CshareError(f"{path} is not a directory; the shared store is damaged")
    if st.st_uid != 0 or st.st_gid != 0:
        os.chown(path, 0, 0, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def _ensure_file(path: Path, mode: int) -> None:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CshareError(f"{path} is not a regular file; the shared store is damaged")
    if st.st_uid != 0 or st.st_gid != 0:
        os.chown(path, 0, 0, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def remove_path(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        # Iterative (a layer may be thousands of levels deep); staged layers
        # keep their original modes (0555 dirs): it opens them up as it goes.
        remove_tree(path)
    else:
        os.unlink(path)
