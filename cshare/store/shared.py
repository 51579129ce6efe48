"""The shared store: converted layers and image records that every user may read.

Layout (a contract: `cshare mount` and the tests rely on exactly this)::

    STORE/                 default /var/lib/cshare; root-owned, 0755
                           (0750 root:GROUP when made with --group GROUP)
      store.lock           fcntl lock file: writers (make-shared, rm) hold
                           LOCK_EX, readers (images, inspect, mount) LOCK_SH
      layers/ID/           one converted layer, ID = the containers/storage layer id
        diff/              the layer's files, converted (cshare convert)
        layer.json         {"id", "parent", "diff-digest", "diff-size",
                            "created", "size", "entries", "uidset", "gidset"}
      images/ID.json       {"id", "names": [...], "layers": [top, ..., base],
                            "config": {"entrypoint", "cmd", "env", "workdir",
                            "user"}, "digest", "created"}
      tmp/                 staging, same filesystem, 0700; emptied by every
                           writer when it takes the lock

Guarantees:

- A layer appears complete or not at all: it is built in `tmp/`, then renamed
  to `layers/ID` in one rename(2).  An image record is written to `tmp/` and
  renamed over `images/ID.json`; it is written only after all its layers are
  published, so a reader never finds an image whose layers are missing.
- `rm` unlinks the record first, then moves unused layers to `tmp/` (one
  rename each) and deletes them there.
- Writers are serialised by LOCK_EX on store.lock; readers that take LOCK_SH see
  either the state before or after a writer, never a mix.
- A layer present already is reused (dedupe across images).
- Nothing in the store is world- or group-writable; files 0644 or 0755,
  directories 0755, `tmp/` 0700.  Every entry of a layer except symlinks is
  owned by root (a host user owning one could rewrite it or its override
  xattr); the original owners live in the override xattr.  There are no
  setuid/setgid files, no device nodes (a whiteout, char 0/0, is not one) and
  no file capabilities: a layer's `security.capability` is kept as
  `user.cshare.capability` (cshare.store.layercheck).

Python API: `SharedStore(root)` with `images()`, `resolve(name)`,
`layer_diff(layer_id)`, `lower_dirs(image)` (top first), `read_lock()`; the
writer side (`write_lock()`, `stage()`, `publish_layer()`, `write_image()`,
`remove_image()`) is used by make-shared and rm.  The fcntl locks of one
process are shared by all its file descriptors (POSIX semantics), so the
locks here are counted per process: nesting them is safe.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import stat
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CshareError
from ..system import libc
from ..tree.remove import remove_tree
from . import names as refnames
from .inuse import holders

STORE_LOCK = "store.lock"
LAYERS = "layers"
IMAGES = "images"
TMP = "tmp"
LAYER_META = "layer.json"

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

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "names": list(self.names),
            "layers": list(self.layers),
            "config": {k: self.config.get(k) for k in CONFIG_KEYS},
            "digest": self.digest,
            "created": self.created,
        }

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
            config = data.get("config") or {}
            if not isinstance(config, dict):
                raise TypeError("config must be an object")
        except (KeyError, TypeError) as exc:
            raise CshareError(
                f"{where} is not a valid image record ({exc}); remove it with cshare rm"
            ) from None
        return cls(
            id=image_id,
            names=tuple(names),
            layers=tuple(layers),
            config={k: config.get(k) for k in CONFIG_KEYS},
            digest=data.get("digest"),
            created=data.get("created"),
        )


@dataclass
class RemoveResult:
    image: ImageRecord
    removed_layers: list[str]
    kept_layers: list[str]  # still used by another image


# ------------------------------------------------------------------ locking
# POSIX record locks belong to the process, and closing *any* descriptor of
# the file drops them all.  So one descriptor per lock file, counted.
_locks_guard = threading.Lock()
_held: dict[str, list[Any]] = {}  # path -> [fd, mode, depth]


@contextmanager
def _fcntl_lock(path: Path, exclusive: bool) -> Iterator[None]:
    key = os.path.realpath(path)
    with _locks_guard:
        entry = _held.get(key)
        if entry is not None:
            if exclusive and entry[1] != fcntl.LOCK_EX:
                raise CshareError(
                    f"internal: cannot upgrade the read lock on {path} to a write lock"
                )
            entry[2] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _locks_guard:
                entry = _held[key]
                entry[2] -= 1
        return
    flags = (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CshareError(
            f"no shared store at {path.parent}; create it with cshare make-shared IMAGE"
        ) from None
    except PermissionError:
        raise CshareError(
            f"cannot open {path}: permission denied (not in the store's group?)"
        ) from None
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fcntl.lockf(fd, mode)
        with _locks_guard:
            _held[key] = [fd, mode, 1]
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
        return self.root / LAYERS

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP

    @property
    def where(self) -> str:
        return f"the shared store {self.root}"

    def exists(self) -> bool:
        return self.lock_path.is_file() and self.layers_dir.is_dir() and self.images_dir.is_dir()

    # ------------------------------------------------------------------ readers
    @contextmanager
    def read_lock(self) -> Iterator[None]:
        """Hold LOCK_SH on store.lock: no writer changes the store meanwhile."""
        with _fcntl_lock(self.lock_path, exclusive=False):
            yield

    def images(self) -> list[ImageRecord]:
        """Every image record, sorted by first name then id."""
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
        records = []
        for name in entries:
            if name.endswith(".json") and not name.startswith("."):
                path = self.images_dir / name
                records.append(ImageRecord.from_json(_read_json(path), path))
        records.sort(key=lambda r: (r.names[0] if r.names else "\uffff", r.id))
        return records

    def image(self, image_id: str) -> ImageRecord | None:
        path = self.images_dir / f"{image_id}.json"
        if not path.exists():
            return None
        return ImageRecord.from_json(_read_json(path), path)

    def resolve(self, name: str) -> ImageRecord:
        """The image `name` refers to (id, id prefix, name, short name); CshareError otherwise."""
        records = self.images()
        return refnames.resolve(
            name, records, self.where, {r.id: r.digest for r in records if r.digest}
        )

    def has_layer(self, layer_id: str) -> bool:
        return (self.layers_dir / layer_id / "diff").is_dir()

    def layer_diff(self, layer_id: str) -> Path:
        """The converted diff directory of a layer."""
        _check_id(layer_id)
        path = self.layers_dir / layer_id / "diff"
        if not path.is_dir():
            raise CshareError(
                f"layer {layer_id[:12]} is missing from {self.where}; run cshare make-shared again"
            )
        return path

    def layer_info(self, layer_id: str) -> dict[str, Any]:
        _check_id(layer_id)
        data = _read_json(self.layers_dir / layer_id / LAYER_META)
        return data if isinstance(data, dict) else {}

    def lower_dirs(self, image: ImageRecord) -> list[Path]:
        """The image's layer diffs, top first: the overlay lowerdir order."""
        return [self.layer_diff(layer_id) for layer_id in image.layers]

    def layer_ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.layers_dir) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def layer_users(self) -> dict[str, list[str]]:
        """layer id -> ids of the images that use it."""
        users: dict[str, list[str]] = {lid: [] for lid in self.layer_ids()}
        for record in self.images():
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
        with _fcntl_lock(self.lock_path, exclusive=True):
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
        # Never turn an unrelated directory into a store (another writer may be
        # half-way through creating this one: its names are fine).
        foreign = set(os.listdir(self.root)) - {STORE_LOCK, LAYERS, IMAGES, TMP}
        if foreign and not self.lock_path.exists():
            raise CshareError(
                f"{self.root} exists and is not a cshare store; choose another --store"
            )
        try:
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.close(fd)
        except FileExistsError:
            pass
        _ensure_file(self.lock_path, 0o644)
        for sub, mode in ((LAYERS, 0o755), (IMAGES, 0o755), (TMP, 0o700)):
            path = self.root / sub
            try:
                os.mkdir(path, mode)
            except FileExistsError:
                pass
            _ensure_dir(path, mode)

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
        """A new empty directory in tmp/ (same filesystem as layers/)."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))

    def publish_layer(self, staged: Path, meta: dict[str, Any]) -> Path:
        """Move a finished staging dir (holding diff/) to layers/ID in one rename."""
        layer_id = meta["id"]
        _check_id(layer_id)
        target = self.layers_dir / layer_id
        if target.exists():
            raise CshareError(f"layer {layer_id[:12]} is already in {self.where}")
        _write_json(staged / LAYER_META, meta)
        os.chmod(staged, 0o755)
        libc.syncfs(self.root)  # a published layer survives a crash whole
        os.rename(staged, target)
        return target

    def write_image(self, record: ImageRecord) -> bool:
        """Write images/ID.json unless identical; False when nothing changed."""
        _check_id(record.id)
        for layer_id in record.layers:
            self.layer_diff(layer_id)  # all layers first: a record never points to nothing
        existing = self.image(record.id)
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
                self._replace_json(
                    self.images_dir / f"{record.id}.json",
                    ImageRecord(
                        record.id, left, record.layers, record.config, record.digest, record.created
                    ).to_json(),
                )
                changed.append(record.id)
        return changed

    def remove_image(self, record: ImageRecord, *, force: bool = False) -> RemoveResult:
        """Remove the record, then every layer no other image uses (orphans too).

        Refused, before anything changes, while an overlay anywhere on the
        machine has one of those layers as a lower layer (cshare.store.inuse), unless
        `force`.
        """
        removed, kept = [], []
        on_disk = set(self.layer_ids())
        for layer_id, image_ids in self.layer_users().items():
            if any(i != record.id for i in image_ids):
                if layer_id in record.layers:
                    kept.append(layer_id)
            elif layer_id in on_disk:  # this image's alone, or nobody's (an orphan)
                removed.append(layer_id)
        if not force:
            held = holders(self.layers_dir, removed)
            if held:
                name = record.names[0] if record.names else record.id[:12]
                more = f" and {len(held) - 1} more" if len(held) > 1 else ""
                raise CshareError(
                    f"{name} is in use: {held[0].describe()}{more}; unmount it first "
                    "(cshare umount, as that user), or pass --force to remove it anyway"
                )
        path = self.images_dir / f"{record.id}.json"
        os.unlink(path)
        _fsync_dir(self.images_dir)
        for layer_id in removed:
            trash = self.tmp_dir / f"rm-{layer_id}"
            os.rename(self.layers_dir / layer_id, trash)
            remove_path(trash)
        return RemoveResult(record, removed, kept)

    def _replace_json(self, path: Path, data: Any) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".json-", dir=self.tmp_dir)
        os.close(fd)
        _write_json(Path(tmp), data)
        os.rename(tmp, path)
        _fsync_dir(path.parent)


# ------------------------------------------------------------------ helpers
def _check_id(layer_id: str) -> None:
    # Ids come from JSON files: never let one be a path.
    if not layer_id or "/" in layer_id or layer_id in (".", "..") or layer_id.startswith("."):
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
