"""A containers storage.conf, read and edited without losing anything of it.

What `cshare setup` changes, and nothing else:

- `[storage.options] additionalimagestores`: the shared store is appended;
- `[storage.options.overlay] mount_program`: set to cshare-overlay (the value
  it replaced is returned, so that `--undo` can put it back);
- `[storage] driver`: set to "overlay" only when the file names no driver (the
  shared store is an overlay store; another driver is refused).

The file is parsed with tomlkit, which keeps comments, order and formatting,
and is rewritten only when it parsed; a file that does not parse is reported
and left alone.  Writes are atomic (a temporary file in the same directory,
then rename) and keep the file's mode.  `configure_storage` is the reusable
entry point (the benchmark sets up its users' storage.conf through it).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.toml_document import TOMLDocument

from ..errors import CshareError

STORES_KEY = "additionalimagestores"
MOUNT_PROGRAM_KEY = "mount_program"


@dataclass
class StorageChange:
    """What one edit did to one storage.conf (empty lists: nothing to do)."""

    path: Path
    created: bool = False
    added_store: str | None = None
    removed_store: str | None = None
    mount_program: tuple[str | None, str | None] | None = None  # (before, after)
    driver_set: bool = False
    driver_removed: bool = False
    notes: list[str] = field(default_factory=list)
    text: str = ""  # the file's new contents

    @property
    def changed(self) -> bool:
        return bool(self.created or self.added_store or self.removed_store or self.mount_program
                    or self.driver_set or self.driver_removed)

    def lines(self) -> list[str]:
        """What changed, one line each, as `cshare setup` prints it."""
        out = []
        if self.created:
            out.append(f"created {self.path}")
        if self.driver_set:
            out.append(f'{self.path}: [storage] driver = "overlay"')
        if self.driver_removed:
            out.append(f"{self.path}: [storage] driver removed")
        if self.added_store:
            out.append(f"{self.path}: added {self.added_store} to additionalimagestores")
        if self.removed_store:
            out.append(f"{self.path}: removed {self.removed_store} from additionalimagestores")
        if self.mount_program:
            before, after = self.mount_program
            out.append(f"{self.path}: mount_program {before or '(unset)'} -> {after or '(unset)'}")
        return out + [f"{self.path}: {n}" for n in self.notes]


def read_document(path: Path) -> tuple[TOMLDocument, bool]:
    """(document, existed); CshareError for a file that cannot be read or parsed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return tomlkit.document(), False
    except (OSError, UnicodeDecodeError) as exc:
        raise CshareError(f"cannot read {path} ({exc}); fix or remove it, then run cshare setup again") from None
    try:
        return tomlkit.parse(text), True
    except TOMLKitError as exc:
        raise CshareError(
            f"{path} is not valid TOML ({' '.join(str(exc).split())}); nothing was changed: "
            "fix it by hand, then run cshare setup again"
        ) from None


def _table(parent: Any, key: str, path: Path, where: str) -> Any:
    """parent[key] as a table, created when missing; CshareError if it is something else."""
    if key not in parent:
        parent[key] = tomlkit.table()
    value = parent[key]
    if not isinstance(value, dict):
        raise CshareError(f"{path}: [{where}] is not a table; nothing was changed: fix it by hand")
    return value


def _stores(options: Any, path: Path) -> Any:
    value = options.get(STORES_KEY)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CshareError(f"{path}: {STORES_KEY} is not a list of paths; nothing was changed: fix it by hand")
    return value


def add_store(doc: TOMLDocument, path: Path, store: str, mount_program: str,
              existed: bool) -> StorageChange:
    """Add `store` and set `mount_program` in `doc` (in memory); what changed."""
    change = StorageChange(path, created=not existed)
    storage = _table(doc, "storage", path, "storage")
    driver = storage.get("driver")
    if driver is None or driver == "":
        storage["driver"] = "overlay"
        change.driver_set = True
    elif driver != "overlay":
        raise CshareError(
            f'{path}: [storage] driver = "{driver}"; the shared store needs the overlay driver: '
            'set driver = "overlay" (your own images of that driver would be hidden) or leave podman as it is'
        )
    options = _table(storage, "options", path, "storage.options")
    stores = _stores(options, path)
    if stores is None:
        options[STORES_KEY] = [store]
        change.added_store = store
    elif store not in [str(s) for s in stores]:
        stores.append(store)
        change.added_store = store
    overlay = _table(options, "overlay", path, "storage.options.overlay")
    before = overlay.get(MOUNT_PROGRAM_KEY)
    if before != mount_program:
        overlay[MOUNT_PROGRAM_KEY] = mount_program
        change.mount_program = (str(before) if before is not None else None, mount_program)
    outer = options.get(MOUNT_PROGRAM_KEY)
    if outer is not None and outer != mount_program:
        change.notes.append(f"[storage.options] mount_program = {outer} is left as it is; "
                            "[storage.options.overlay] takes precedence")
    change.text = tomlkit.dumps(doc)
    return change


def remove_store(doc: TOMLDocument, path: Path, store: str, *, mount_program: str | None,
                 restore_program: str | None, drop_driver: bool) -> StorageChange:
    """The inverse of add_store for what it added: `store`, and our mount_program if still ours."""
    change = StorageChange(path)
    storage = doc.get("storage")
    options = storage.get("options") if isinstance(storage, dict) else None
    if isinstance(options, dict):
        stores = _stores(options, path)
        if stores is not None and store in [str(s) for s in stores]:
            for i, value in enumerate(list(stores)):
                if str(value) == store:
                    del stores[i]
                    break
            change.removed_store = store
            if len(stores) == 0:
                del options[STORES_KEY]
        overlay = options.get("overlay")
        if isinstance(overlay, dict) and mount_program is not None \
                and overlay.get(MOUNT_PROGRAM_KEY) == mount_program:
            if restore_program is None:
                del overlay[MOUNT_PROGRAM_KEY]
            else:
                overlay[MOUNT_PROGRAM_KEY] = restore_program
            change.mount_program = (mount_program, restore_program)
            if len(overlay) == 0:
                del options["overlay"]
        if len(options) == 0 and isinstance(storage, dict):
            del storage["options"]
    if drop_driver and isinstance(storage, dict) and storage.get("driver") == "overlay":
        del storage["driver"]
        change.driver_removed = True
    if isinstance(storage, dict) and len(storage) == 0:
        del doc["storage"]
    change.text = tomlkit.dumps(doc)
    return change


def write_document(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically, keeping its mode (0644 when new)."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".storage.conf-", dir=path.parent)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def configure_storage(path: Path, store: Path | str, mount_program: Path | str, *,
                      dry_run: bool = False) -> StorageChange:
    """Make the storage.conf at `path` use `store` read-only with `mount_program`.

    Idempotent; keeps every other setting; writes only if something changed
    and not `dry_run`.  CshareError (and nothing written) for a file that does
    not parse or whose settings conflict.
    """
    doc, existed = read_document(path)
    change = add_store(doc, path, str(store), str(mount_program), existed)
    if change.changed and not dry_run:
        write_document(path, change.text)
    return change
