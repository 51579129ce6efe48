"""`cshare setup`: make a user's podman (or every user's) use the shared store.

One call checks first (cshare.podman.checks) and then edits one storage.conf
(cshare.podman.storageconf): the user's own file, or with `system` the
machine's, which podman reads for every user who has no file of their own.
What was added is recorded in a small state file beside cshare's other
configuration, so that `undo` removes exactly that: the store from
`additionalimagestores`, the mount program (the previous one comes back),
the driver line, and the file itself when setup created it and nothing else
was added since.
"""

from __future__ import annotations

import difflib
import json
import os
import pwd
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CshareError
from . import checks
from .storageconf import StorageChange, add_store, read_document, remove_store, write_document

SYSTEM_STORAGE_CONF = Path("/etc/containers/storage.conf")
SYSTEM_STATE = Path("/etc/cshare/setup.json")
#: Keys of the system file that must not reach a user's own file (they name root's store).
ROOT_ONLY_KEYS = ("graphroot", "runroot")


@dataclass
class SetupResult:
    change: StorageChange
    dry_run: bool
    diff: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _config_home(env: dict[str, str]) -> Path:
    return Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME") or os.path.expanduser("~")) / ".config")


def storage_conf_path(system: bool, env: dict[str, str] | None = None) -> Path:
    """The storage.conf podman reads: $CONTAINERS_STORAGE_CONF, else the user's or the system's."""
    env = dict(os.environ) if env is None else env
    if env.get("CONTAINERS_STORAGE_CONF"):
        return Path(env["CONTAINERS_STORAGE_CONF"])
    if system:
        return SYSTEM_STORAGE_CONF
    return _config_home(env) / "containers" / "storage.conf"


def state_path(system: bool, env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    return SYSTEM_STATE if system else _config_home(env) / "cshare" / "setup.json"


def default_mount_program() -> str:
    """cshare-overlay beside the running cshare, else the one on PATH."""
    beside = Path(sys.executable).parent / "cshare-overlay"
    if beside.exists():
        return str(beside)
    found = shutil.which("cshare-overlay")
    return found or "/usr/local/bin/cshare-overlay"


def preflight(store: Path, mount_program: str, system: bool) -> list[str]:
    """Every problem found, one line each (empty: podman run will work)."""
    found = [checks.check_podman(), checks.check_mount_program(mount_program)]
    if not system:
        user = pwd.getpwuid(os.getuid())
        found += [checks.check_subids(user), checks.check_fuse(), checks.check_store(store),
                  checks.check_network()]
    else:
        found.append(checks.check_store(store))
    return [p for p in found if p]


def _seed(system: bool, path: Path) -> str:
    """A new user file starts from the system file (podman reads only one of them)."""
    if system or path == SYSTEM_STORAGE_CONF or not SYSTEM_STORAGE_CONF.is_file():
        return ""
    doc, _ = read_document(SYSTEM_STORAGE_CONF)
    storage = doc.get("storage")
    if isinstance(storage, dict):
        for key in ROOT_ONLY_KEYS:
            storage.pop(key, None)
    import tomlkit

    return tomlkit.dumps(doc)


def setup(store: Path, *, system: bool = False, dry_run: bool = False,
          mount_program: str | None = None, force: bool = False) -> SetupResult:
    """Check, then add `store` and the mount program to the storage.conf podman reads."""
    if os.geteuid() == 0 and not system and not os.environ.get("CONTAINERS_STORAGE_CONF"):
        raise CshareError("cshare setup configures the user who runs it; as root, give --system "
                          "to configure every user, or run it as the user")
    program = mount_program or default_mount_program()
    problems = preflight(store, program, system)
    if problems and not (force or dry_run):
        raise CshareError(problems[0] + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))
    path = storage_conf_path(system)
    doc, existed = read_document(path)
    seed = ""
    if not existed:
        seed = _seed(system, path)
        if seed:
            import tomlkit

            doc = tomlkit.parse(seed)
    before = doc.as_string() if existed else ""
    change = add_store(doc, path, str(store), program, existed)
    result = SetupResult(change, dry_run, warnings=problems)
    result.diff = list(difflib.unified_diff(before.splitlines(), change.text.splitlines(),
                                            str(path), str(path) + " (new)", lineterm=""))
    if change.changed and not dry_run:
        state = state_path(system)
        try:
            _record(state, change, seed)  # first: an undo must know of every change made
            write_document(path, change.text)
        except OSError as exc:
            raise CshareError(f"cannot write {exc.filename or path} ({exc.strerror}); "
                              "nothing was changed in " + str(path)) from None
    return result


def _load_state(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise CshareError(f"cannot read {path} ({exc}); remove it to forget earlier setups") from None
    entries = data.get("entries") if isinstance(data, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _save_state(path: Path, entries: list[dict[str, Any]]) -> None:
    if not entries:
        try:
            path.unlink()
            path.parent.rmdir()
        except OSError:
            pass  # already gone, or the directory holds other files
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_document(path, json.dumps({"entries": entries}, indent=2) + "\n")


def _record(path: Path, change: StorageChange, seed: str) -> None:
    entries = _load_state(path)
    conf = str(change.path)
    entry = next((e for e in entries if e.get("conf") == conf), None)
    if entry is None:
        entry = {"conf": conf, "stores": [], "created": change.created, "seed": seed,
                 "driver_set": False, "mount_program": None, "previous_mount_program": None}
        entries.append(entry)
    if change.added_store and change.added_store not in entry["stores"]:
        entry["stores"].append(change.added_store)
    if change.driver_set:
        entry["driver_set"] = True
    if change.mount_program:
        before, after = change.mount_program
        if entry["mount_program"] is None:
            entry["previous_mount_program"] = before
        entry["mount_program"] = after
    _save_state(path, entries)


def undo(store: Path, *, system: bool = False, dry_run: bool = False) -> SetupResult:
    """Remove what setup added for `store` (and, with the last store, the mount program)."""
    path = storage_conf_path(system)
    state = state_path(system)
    entries = _load_state(state)
    entry = next((e for e in entries if e.get("conf") == str(path)), None)
    doc, existed = read_document(path)
    if entry is None or str(store) not in entry.get("stores", []) or not existed:
        return SetupResult(StorageChange(path, notes=[f"nothing to undo for {store}"]), dry_run)
    last = entry["stores"] == [str(store)]
    before = doc.as_string()
    change = remove_store(doc, path, str(store),
                          mount_program=entry.get("mount_program") if last else None,
                          restore_program=entry.get("previous_mount_program"),
                          drop_driver=last and bool(entry.get("driver_set")))
    delete = last and entry.get("created") and change.text.strip() == str(entry.get("seed", "")).strip()
    result = SetupResult(change, dry_run)
    result.diff = list(difflib.unified_diff(before.splitlines(), [] if delete else change.text.splitlines(),
                                            str(path), str(path) + " (new)", lineterm=""))
    if dry_run:
        return result
    if delete:
        path.unlink()
        change.notes.append("removed the file (cshare setup had created it)")
    elif change.changed:
        write_document(path, change.text)
    entry["stores"].remove(str(store))
    if last:
        entries.remove(entry)
    _save_state(state, entries)
    return result
