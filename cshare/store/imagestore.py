"""The shared store's containers/storage view: what podman reads from an additional image store.

The shared store is laid out as containers/storage's overlay driver lays out
its graph root (shared/docs/formats.md §3, §5), so that a user's podman can
list it under `additionalimagestores` and use its images read-only:

    overlay/ID/diff/            the converted layer (the only copy of its data)
    overlay/ID/link             its 26-character short name
    overlay/ID/lower            `l/SHORT:l/SHORT…` of its ancestors, nearest first
                                (absent for a base layer)
    overlay/l/SHORT             symlink to ../ID/diff
    overlay-layers/layers.json  every published layer (containers/storage fields)
    overlay-layers/layers.lock  lock file with a last-writer token
    overlay-images/images.json  every published image
    overlay-images/images.lock  lock file with a last-writer token
    overlay-images/ID/KEY       the image's big-data items (manifest, config, …)

This module owns that format: the short names, the files of a layer
directory, the big-data file names and the two catalogues.  The catalogues are
never edited: cshare's own per-image and per-layer records are the truth, and
`write_catalogues` regenerates both JSON files from them, each with one
rename, layers first (so an image in images.json never names a layer that
layers.json lacks), then rewrites both tokens so that a running podman
reloads.  Writers never take containers/storage's fcntl locks: a reader (any
user may open the lock files) could hold them forever, and the renames give
readers a consistent file already.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import string
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

OVERLAY = "overlay"
LINKS = "l"
IMAGES_DIR = "overlay-images"
LAYERS_DIR = "overlay-layers"
IMAGES_JSON = "images.json"
LAYERS_JSON = "layers.json"
IMAGES_LOCK = "images.lock"
LAYERS_LOCK = "layers.lock"
LINK_FILE = "link"
LOWER_FILE = "lower"
DIFF = "diff"

LINK_LENGTH = 26
_LINK_ALPHABET = string.ascii_uppercase + string.digits
_PLAIN_KEY_CHARS = frozenset(".0123456789abcdefghijklmnopqrstuvwxyz")
TOKEN_LENGTH = 64

#: Fields of a containers/storage layer entry a read-only store keeps.
LAYER_FIELDS = ("id", "parent", "names", "created", "compressed-diff-digest", "compressed-size",
                "diff-digest", "diff-size", "compression", "uidset", "gidset", "metadata")
#: Fields of an image entry a read-only store keeps (`layer` is set by cshare).
IMAGE_FIELDS = ("id", "digest", "digests", "names", "names-history", "metadata",
                "big-data-names", "big-data-sizes", "big-data-digests", "created")


def new_link() -> str:
    """A fresh short name for overlay/l/ (containers/storage uses 26 of [A-Z0-9])."""
    return "".join(secrets.choice(_LINK_ALPHABET) for _ in range(LINK_LENGTH))


def valid_link(text: str) -> bool:
    return len(text) == LINK_LENGTH and all(c in _LINK_ALPHABET for c in text)


def big_data_file_name(key: str) -> str:
    """The file name containers/storage uses for a big-data key."""
    if key and all(c in _PLAIN_KEY_CHARS for c in key):
        return key
    return "=" + base64.b64encode(key.encode()).decode("ascii")


def layer_entry(source: Mapping[str, Any], layer_id: str, parent: str | None) -> dict[str, Any]:
    """The layers.json entry of a shared layer, from podman's own entry for it."""
    entry = {k: source[k] for k in LAYER_FIELDS if k in source and source[k] is not None}
    entry["id"] = layer_id
    entry.pop("parent", None)
    if parent:
        entry["parent"] = parent
    return entry


def image_entry(source: Mapping[str, Any], image_id: str, names: Iterable[str],
                top_layer: str) -> dict[str, Any]:
    """The images.json entry of a shared image: podman's entry, with cshare's names."""
    entry = {k: source[k] for k in IMAGE_FIELDS if k in source and source[k] is not None}
    entry["id"] = image_id
    entry["names"] = list(names)
    entry["layer"] = top_layer
    return entry


def write_layer_files(layer_dir: Path, link: str, lower_links: Iterable[str]) -> None:
    """`link` and (unless a base layer) `lower` inside a staged overlay/ID directory."""
    _write_file(layer_dir / LINK_FILE, link.encode())
    lowers = [f"{LINKS}/{name}" for name in lower_links]
    if lowers:
        _write_file(layer_dir / LOWER_FILE, ":".join(lowers).encode())


def read_link(layer_dir: Path) -> str | None:
    """The layer's short name, or None when `link` is missing or malformed."""
    try:
        text = (layer_dir / LINK_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if valid_link(text) else None


def publish_link(root: Path, link: str, layer_id: str, tmp_dir: Path) -> None:
    """overlay/l/LINK -> ../ID/diff, made in tmp/ and renamed into place."""
    target = f"../{layer_id}/{DIFF}"
    path = root / OVERLAY / LINKS / link
    try:
        if os.readlink(path) == target:
            return
    except OSError:
        pass
    staged = Path(tempfile.mktemp(prefix=".link-", dir=tmp_dir))
    os.symlink(target, staged)
    os.rename(staged, path)


def remove_link(root: Path, link: str | None) -> None:
    if link and valid_link(link):
        try:
            os.unlink(root / OVERLAY / LINKS / link)
        except FileNotFoundError:
            pass


def write_big_data(image_dir: Path, items: Mapping[str, bytes]) -> None:
    """The big-data files of one image in a staged overlay-images/ID directory."""
    for key, value in items.items():
        _write_file(image_dir / big_data_file_name(key), value)


def ensure_skeleton(root: Path) -> None:
    """The directories and lock files a reader needs (root-owned, readable by all)."""
    for sub in (OVERLAY, f"{OVERLAY}/{LINKS}", IMAGES_DIR, LAYERS_DIR):
        path = root / sub
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        _check_dir(path)
    for lock in (root / IMAGES_DIR / IMAGES_LOCK, root / LAYERS_DIR / LAYERS_LOCK):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
        except FileExistsError:
            _check_file(lock)
            continue
        try:
            os.write(fd, _token())
            os.fchmod(fd, 0o644)  # whatever the umask: every reader opens it
        finally:
            os.close(fd)


def write_catalogues(root: Path, layers: list[dict[str, Any]], images: list[dict[str, Any]],
                     tmp_dir: Path) -> bool:
    """Regenerate layers.json then images.json; rewrite the tokens if either changed."""
    changed = _replace_json(root / LAYERS_DIR / LAYERS_JSON, layers, tmp_dir)
    changed = _replace_json(root / IMAGES_DIR / IMAGES_JSON, images, tmp_dir) or changed
    if changed:
        touch(root / LAYERS_DIR / LAYERS_LOCK)
        touch(root / IMAGES_DIR / IMAGES_LOCK)
    return changed


def touch(lock: Path) -> None:
    """Rewrite a lock file's last-writer token in place (a running podman compares it).

    In place, not by rename: a podman process holds the file open and reads
    the token through that descriptor.
    """
    fd = os.open(lock, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.pwrite(fd, _token(), 0)
    finally:
        os.close(fd)


def _token() -> bytes:
    return secrets.token_hex(TOKEN_LENGTH // 2).encode()


def _replace_json(path: Path, data: Any, tmp_dir: Path) -> bool:
    body = json.dumps(data, separators=(",", ":")).encode()
    try:
        if path.read_bytes() == body:
            return False
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=".catalogue-", dir=tmp_dir)
    try:
        os.write(fd, body)
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    return True


def _write_file(path: Path, body: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body)
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)


def _check_dir(path: Path) -> None:
    from ..errors import CshareError

    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CshareError(f"{path} is not a directory; the shared store is damaged "
                          "(move it away and run cshare make-shared again)")
    if st.st_uid != 0 or st.st_gid != 0:
        os.chown(path, 0, 0, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != 0o755:
        os.chmod(path, 0o755)


def _check_file(path: Path) -> None:
    from ..errors import CshareError

    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CshareError(f"{path} is not a regular file; the shared store is damaged "
                          "(remove it and run cshare make-shared again)")
    if st.st_uid != 0 or st.st_gid != 0:
        os.chown(path, 0, 0, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != 0o644:
        os.chmod(path, 0o644)
