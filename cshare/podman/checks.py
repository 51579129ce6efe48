"""Pre-flight checks: what would stop a user's `podman run IMAGE` on the shared store.

Each check returns None or one line naming the problem and its fix, so that
`cshare setup` can refuse before it changes anything.  They look at the
machine as the user who runs setup: podman's version, the user's subordinate
ids, /dev/fuse, the shared store's readability, the mount program, and a
network for rootless containers (a helper, or a `netns` setting).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

from ..store.imagestore import (
    IMAGES_DIR,
    IMAGES_JSON,
    IMAGES_LOCK,
    LAYERS_DIR,
    LAYERS_JSON,
    LAYERS_LOCK,
)

MIN_PODMAN = (4, 0)
NETWORK_HELPERS = ("slirp4netns", "pasta")


def podman_version(podman: str = "podman") -> tuple[int, ...] | None:
    """podman's version as numbers, None when it cannot be run."""
    # podman fails at once when $CONTAINERS_STORAGE_CONF names a file not there yet,
    # which is what setup is about to create: the version does not depend on it.
    env = {k: v for k, v in os.environ.items() if k != "CONTAINERS_STORAGE_CONF"}
    try:
        out = subprocess.run([podman, "--version"], capture_output=True, text=True, timeout=30,
                             env=env).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in found.groups() if x is not None) if found else None


def check_podman() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed; as root: apt-get install podman runc"
    version = podman_version()
    if version is None:
        return "podman --version did not answer; check the podman installation"
    if version[:2] < MIN_PODMAN:
        shown = ".".join(map(str, version))
        return (f"podman {shown} is too old (additional image stores with a mount program need "
                f"{MIN_PODMAN[0]}.{MIN_PODMAN[1]} or later); upgrade podman")
    return None


def _has_range(path: Path, user: pwd.struct_passwd) -> bool:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user.pw_name, str(user.pw_uid)):
            if parts[2].isdigit() and int(parts[2]) > 0:
                return True
    return False


def check_subids(user: pwd.struct_passwd, etc: Path = Path("/etc")) -> str | None:
    if user.pw_uid == 0:
        return None
    for kind in ("subuid", "subgid"):
        if not _has_range(etc / kind, user):
            return (f"{user.pw_name} has no subordinate ids in {etc / kind}; as root: "
                    f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user.pw_name}")
    if shutil.which("newuidmap") is None or shutil.which("newgidmap") is None:
        return "newuidmap/newgidmap are missing; as root: apt-get install uidmap"
    return None


def check_fuse(device: str = "/dev/fuse") -> str | None:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{device} does not exist; as root: modprobe fuse (and apt-get install fuse3)"
    except PermissionError:
        return f"{device} cannot be opened (permission denied); as root: chmod 0666 {device}"
    except OSError as exc:
        return f"{device} cannot be opened ({exc.strerror}); check the fuse module"
    os.close(fd)
    return None


def check_store(store: Path) -> str | None:
    """Everything podman reads from the store is readable (shared/docs/formats.md §5)."""
    if not os.access(store, os.X_OK):
        if not os.path.exists(store) and os.access(store.parent, os.X_OK):
            return f"there is no shared store at {store}; give the right --store (as root: cshare make-shared IMAGE)"
        return _unreadable(store, store)
    if (store / "layers").is_dir() and not (store / IMAGES_DIR).is_dir():
        return (f"{store} has the previous shared-store layout, which podman cannot read; "
                f"as root: cshare migrate --store {store}")
    needed = [store / IMAGES_DIR / IMAGES_JSON, store / IMAGES_DIR / IMAGES_LOCK,
              store / LAYERS_DIR / LAYERS_JSON, store / LAYERS_DIR / LAYERS_LOCK]
    for directory in (store, store / "overlay", store / "overlay" / "l", store / IMAGES_DIR, store / LAYERS_DIR):
        if not os.access(directory, os.X_OK):
            return _unreadable(store, directory)
    for path in needed:
        if not os.access(path, os.R_OK):
            if not path.exists():
                return (f"{path} is missing: {store} is not a shared store; "
                        "as root: cshare make-shared IMAGE --store " + str(store))
            return _unreadable(store, path)
    return None


def _unreadable(store: Path, path: Path) -> str:
    return (f"{path} is not readable by you, so podman cannot use {store}; as root: make the store "
            "readable (chmod 0755 on the store) or add yourself to its group (cshare make-shared --group)")


def check_mount_program(program: str) -> str | None:
    if not os.path.isabs(program) or not os.access(program, os.X_OK):
        return f"the mount program {program} is not an executable file; install cshare (scripts/install)"
    return None


def containers_conf_files(env: dict[str, str] | None = None) -> list[Path]:
    """The containers.conf files podman reads, lowest precedence first."""
    env = dict(os.environ) if env is None else env
    if env.get("CONTAINERS_CONF"):
        return [Path(env["CONTAINERS_CONF"])]
    home = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "~"), ".config")
    files: list[Path] = [Path("/usr/share/containers/containers.conf"),
                         Path("/etc/containers/containers.conf")]
    files += sorted(Path("/etc/containers/containers.conf.d").glob("*.conf"))
    user = Path(home) / "containers"
    files += [user / "containers.conf", *sorted((user / "containers.conf.d").glob("*.conf"))]
    return files


def netns_setting(files: Iterable[Path]) -> str | None:
    """The last `[containers] netns` set in these files, or None."""
    value = None
    for path in files:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, ValueError):
            continue
        section = doc.get("containers")
        if isinstance(section, dict) and isinstance(section.get("netns"), str):
            value = section["netns"]
    return value


def check_network(which: Callable[[str], str | None] = shutil.which,
                  files: Iterable[Path] | None = None) -> str | None:
    if any(which(helper) for helper in NETWORK_HELPERS):
        return None
    confs = list(containers_conf_files() if files is None else files)
    if netns_setting(confs) in ("none", "host", "private"):
        return None
    target = confs[-1] if confs else Path("~/.config/containers/containers.conf")
    return ("no network helper for rootless containers (slirp4netns or pasta) and no netns setting; "
            f'as root: apt-get install slirp4netns, or put netns = "none" under [containers] in {target}')
