"""Read-only access to podman's image store (containers/storage, overlay driver).

cshare never writes to podman's store.  It reads, under the store's own fcntl
read locks (overlay-layers/layers.lock, then overlay-images/images.lock, the
order containers/storage takes them), the image list, the layer list and the
image configurations, and hands out the path of each layer's unpacked `diff`
directory.  The layout is described in shared/docs/formats.md §3:

- `overlay-images/images.json`: images (`id`, `names`, `layer` = top layer,
  `digest`, `created`, `big-data-names`);
- `overlay-images/ID/KEY`: an image's big-data items; KEY is the file name when
  made only of `[.0-9a-z]`, else `=` + base64(KEY).  The configuration is the
  item `sha256:ID` (the image id is the config digest);
- `overlay-layers/layers.json` and `volatile-layers.json`: layers (`id`,
  `parent`, `diff-digest`, `flags.incomplete`);
- `overlay/ID/diff`: the unpacked layer.

The `parent` chain in layers.json is the truth about a layer's ancestors; the
`overlay/ID/lower` and `overlay/l/` short links are ignored.  Layers marked
incomplete are never used.

Everything returned is a snapshot: the diff paths stay valid only as long as
the caller keeps the read lock (podman may delete a layer once it is released).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CshareError
from . import names as refnames

_PLAIN_KEY_CHARS = frozenset(".0123456789abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class SourceLayer:
    """One layer of podman's store."""

    id: str
    parent: str | None
    diff_digest: str | None
    diff_size: int | None
    created: str | None
    diff: Path
    uidset: tuple[int, ...] = ()
    gidset: tuple[int, ...] = ()


@dataclass(frozen=True)
class SourceImage:
    """One image of podman's store (config read lazily through the snapshot)."""

    id: str
    names: tuple[str, ...]
    top_layer: str | None
    digest: str | None
    created: str | None
    big_data_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageConfig:
    """What is needed to run an image: the OCI config fields cshare keeps."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "entrypoint": self.entrypoint,
            "cmd": self.cmd,
            "env": list(self.env),
            "workdir": self.workdir,
            "user": self.user,
        }


def big_data_file_name(key: str) -> str:
    """The file name containers/storage uses for a big-data key."""
    if key and all(c in _PLAIN_KEY_CHARS for c in key):
        return key
    return "=" + base64.b64encode(key.encode()).decode("ascii")


def config_from_document(doc: Any) -> ImageConfig:
    """Pick entrypoint, cmd, env, workdir and user out of an OCI/Docker image config."""
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        return ImageConfig()

    def str_list(value: Any) -> list[str] | None:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        return None

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) and value else None

    return ImageConfig(
        entrypoint=str_list(cfg.get("Entrypoint")),
        cmd=str_list(cfg.get("Cmd")),
        env=str_list(cfg.get("Env")) or [],
        workdir=text(cfg.get("WorkingDir")),
        user=text(cfg.get("User")),
    )


class SourceSnapshot:
    """images.json and layers.json as read under one read lock."""

    def __init__(self, root: Path, images: list[SourceImage], layers: dict[str, SourceLayer]):
        self.root = root
        self.images = images
        self.layers = layers

    @property
    def where(self) -> str:
        return f"podman's store {self.root}"

    def resolve(self, ref: str) -> SourceImage:
        digests = {i.id: i.digest for i in self.images if i.digest}
        return refnames.resolve(ref, self.images, self.where, digests)

    def chain(self, image: SourceImage) -> list[SourceLayer]:
        """The image's layers, top first, following `parent` down to the base."""
        result: list[SourceLayer] = []
        seen: set[str] = set()
        layer_id = image.top_layer
        while layer_id:
            if layer_id in seen:
                raise CshareError(
                    f"layer {layer_id[:12]} of image {image.id[:12]} has a parent cycle in {self.where}"
                )
            seen.add(layer_id)
            layer = self.layers.get(layer_id)
            if layer is None:
                raise CshareError(
                    f"layer {layer_id[:12]} of image {image.id[:12]} is missing or incomplete in {self.where}; "
                    "repair the image with podman (podman rmi; podman import/pull)"
                )
            result.append(layer)
            layer_id = layer.parent
        return result

    def config(self, image: SourceImage) -> ImageConfig:
        """The image's run configuration from its config big-data item (empty if none)."""
        key = f"sha256:{image.id}"
        keys = [key] if key in image.big_data_names or not image.big_data_names else []
        # Some writers store the config under another key; any item that parses
        # as an image config (it has a "rootfs" section) will do.
        keys += [
            k
            for k in image.big_data_names
            if k != key and not k.startswith(("manifest", "signature"))
        ]
        for k in keys:
            path = self.root / "overlay-images" / image.id / big_data_file_name(k)
            try:
                doc = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                raise CshareError(
                    f"cannot read the config of image {image.id[:12]} ({path}): {exc}"
                ) from None
            if isinstance(doc, dict) and ("config" in doc or "rootfs" in doc):
                return config_from_document(doc)
        return ImageConfig()


class SourceStore:
    """podman's containers/storage graph root, overlay driver, read only."""

    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(root))

    @property
    def images_dir(self) -> Path:
        return self.root / "overlay-images"

    @property
    def layers_dir(self) -> Path:
        return self.root / "overlay-layers"

    def _check(self) -> None:
        if not self.root.is_dir():
            raise CshareError(
                f"no containers/storage at {self.root}; give the graph root with --storage-root"
            )
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise CshareError(
                f"cannot read podman's store {self.root}: permission denied; run as root"
            )
        if not (self.images_dir / "images.json").exists() and not (self.root / "overlay").is_dir():
            raise CshareError(
                f"{self.root} is not a containers/storage store with the overlay driver "
                "(no overlay-images/images.json); give the right --storage-root"
            )

    @contextmanager
    def read_lock(self) -> Iterator[None]:
        """Hold containers/storage's read locks (layers, then images) for the block."""
        self._check()
        with ExitStack() as stack:
            for lock in (self.layers_dir / "layers.lock", self.images_dir / "images.lock"):
                stack.enter_context(_shared_lock(lock))
            yield

    def snapshot(self) -> SourceSnapshot:
        """Read images and layers; call inside `read_lock()`."""
        return SourceSnapshot(self.root, self._read_images(), self._read_layers())

    def _read_json_list(self, path: Path, missing_ok: bool) -> list[dict[str, Any]]:
        try:
            data = json.loads(path.read_bytes() or b"[]")
        except FileNotFoundError:
            if missing_ok:
                return []
            raise CshareError(f"{path} is missing; is {self.root} a podman store?") from None
        except PermissionError:
            raise CshareError(f"cannot read {path}: permission denied; run as root") from None
        except ValueError as exc:
            raise CshareError(f"{path} is not valid JSON ({exc}); check podman's store") from None
        if not isinstance(data, list):
            raise CshareError(f"{path} is not a JSON list; check podman's store")
        return [d for d in data if isinstance(d, dict) and isinstance(d.get("id"), str)]

    def _read_images(self) -> list[SourceImage]:
        images = []
        # A fresh store has no images.json until the first image is written.
        for raw in self._read_json_list(self.images_dir / "images.json", missing_ok=True):
            images.append(
                SourceImage(
                    id=raw["id"],
                    names=tuple(n for n in raw.get("names") or () if isinstance(n, str)),
                    top_layer=raw.get("layer") or None,
                    digest=raw.get("digest") or None,
                    created=raw.get("created") or None,
                    big_data_names=tuple(raw.get("big-data-names") or ()),
                )
            )
        return images

    def _read_layers(self) -> dict[str, SourceLayer]:
        layers: dict[str, SourceLayer] = {}
        for name in ("layers.json", "volatile-layers.json"):
            for raw in self._read_json_list(self.layers_dir / name, missing_ok=True):
                flags = raw.get("flags") or {}
                if isinstance(flags, dict) and flags.get("incomplete"):
                    continue  # half-written by an interrupted podman: never use it
                layer_id = raw["id"]
                layers[layer_id] = SourceLayer(
                    id=layer_id,
                    parent=raw.get("parent") or None,
                    diff_digest=raw.get("diff-digest") or None,
                    diff_size=raw.get("diff-size")
                    if isinstance(raw.get("diff-size"), int)
                    else None,
                    created=raw.get("created") or None,
                    diff=self.root / "overlay" / layer_id / "diff",
                    uidset=tuple(raw.get("uidset") or ()),
                    gidset=tuple(raw.get("gidset") or ()),
                )
        return layers

    def layer_diff(self, layer: SourceLayer) -> Path:
        """The layer's diff directory, checked to be a real directory (not a symlink)."""
        try:
            st = os.lstat(layer.diff)
        except FileNotFoundError:
            raise CshareError(
                f"layer {layer.id[:12]} has no diff directory {layer.diff}; the store is damaged"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise CshareError(
                f"{layer.diff} is not a directory; refusing to read layer {layer.id[:12]}"
            )
        return layer.diff


@contextmanager
def _shared_lock(path: Path) -> Iterator[None]:
    """An fcntl (POSIX record) read lock on a containers/storage lock file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        # containers/storage creates its lock files on first use; an untouched
        # store has none, and nobody can be writing to it without creating it.
        yield
        return
    except PermissionError:
        raise CshareError(f"cannot open {path}: permission denied; run as root") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CshareError(f"{path} is a symlink; refusing to use it as a lock") from None
        raise
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the record lock
