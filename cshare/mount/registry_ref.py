"""`cshare mount docker://HOST:PORT/REPO:TAG`: an image in a registry, mounted lazily by the registry plugin.

The command resolves the tag to the digest of an image manifest once (so every
layer of one mount comes from the same image, even if the tag moves later),
writes the registry plugin's image description (SPEC, see cshare-registry(7))
into the mount's state directory, and mounts every layer of that manifest as
`//registry/N/SPEC`, topmost first.  The registry is only contacted at the
address the user gave; nothing is pulled: files are fetched when first opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CshareError
from ..system import namespaces
from .command import find_daemon, overlay_command, uses_plugins
from .records import LOG_NAME, RECORD_NAME, MountRecord, mount_key, mounts_dir

PREFIX = "docker://"
SPEC_NAME = "image.json"
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x"}
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class RegistryRef:
    """docker://ADDRESS/REPOSITORY[:TAG|@DIGEST], split."""

    address: str
    repository: str
    reference: str  # a tag, or sha256:HEX

    def __str__(self) -> str:
        sep = "@" if self.reference.startswith("sha256:") else ":"
        return f"{PREFIX}{self.address}/{self.repository}{sep}{self.reference}"


def is_registry_ref(text: str) -> bool:
    return text.startswith(PREFIX)


def tls_verify_value(text: str) -> bool:
    """--tls-verify's value, spelt as podman accepts it."""
    value = text.strip().lower()
    if value in ("true", "1", "t", "yes"):
        return True
    if value in ("false", "0", "f", "no"):
        return False
    raise CshareError(f"--tls-verify={text}: give true or false")


def parse_ref(text: str) -> RegistryRef:
    """Split docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]; a missing tag means latest."""
    from plugins.registry_http import check_address, check_repository

    rest = text.removeprefix(PREFIX)
    address, slash, path = rest.partition("/")
    if not slash or not path:
        raise CshareError(f"{text}: give docker://HOST:PORT/REPOSITORY:TAG")
    if "@" in path:
        path, _, reference = path.partition("@")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", reference):
            raise CshareError(f"{text}: the digest after @ must be sha256: and 64 hex digits")
    else:
        head, colon, tag = path.rpartition(":")
        path, reference = (head, tag) if colon and "/" not in tag else (path, "latest")
        if not _TAG.match(reference):
            raise CshareError(f"{text}: {reference!r} is not a valid tag")
    try:
        return RegistryRef(check_address(address), check_repository(path), reference)
    except ValueError as exc:
        raise CshareError(f"{text}: {exc}") from None


def resolve(ref: RegistryRef, tls_verify: bool) -> tuple[str, int]:
    """(digest of the image manifest, number of layers); an index picks this machine's platform."""
    from plugins.registry_http import RegistryClient, RegistryError

    client = RegistryClient(ref.address, tls_verify=tls_verify, timeout=10, attempts=3)
    try:
        body, media, _ = client.manifest(ref.repository, ref.reference)
        doc = json.loads(body)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.reference.startswith("sha256:") and digest != ref.reference:
            raise CshareError(f"{ref}: the registry sent a manifest that does not match its digest")
        if (doc.get("mediaType") or media) in _INDEX_TYPES:
            digest = _platform_manifest(ref, doc)
            body, _, _ = client.manifest(ref.repository, digest)
            if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                raise CshareError(f"{ref}: the manifest for this platform does not match its digest")
            doc = json.loads(body)
    except RegistryError as exc:
        hint = " (a plain-HTTP registry needs --tls-verify=false)" if tls_verify else ""
        raise CshareError(f"{ref}: {exc}{hint}") from None
    except ValueError as exc:
        raise CshareError(f"{ref}: the registry's manifest is not JSON ({exc})") from None
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise CshareError(f"{ref}: the manifest lists no layers")
    return digest, len(layers)


def _platform_manifest(ref: RegistryRef, index: dict[str, object]) -> str:
    arch = _ARCH.get(platform.machine(), platform.machine())
    entries = index.get("manifests")
    for entry in entries if isinstance(entries, list) else []:
        plat = entry.get("platform") or {}
        if plat.get("os") == "linux" and plat.get("architecture") == arch:
            return str(entry.get("digest"))
    raise CshareError(f"{ref}: the image index has no manifest for linux/{arch}")


def write_spec(state_dir: Path, ref: RegistryRef, digest: str, tls_verify: bool) -> Path:
    """The registry plugin's image description for this mount, written atomically."""
    from plugins.registry_cache import default_cache

    cache = Path(default_cache())
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    spec = state_dir / SPEC_NAME
    tmp = spec.with_suffix(".tmp")
    tmp.write_text(json.dumps({"registry": ref.address, "repository": ref.repository,
                               "manifest": digest, "tls_verify": tls_verify,
                               "cache": str(cache)}, indent=1) + "\n")
    os.replace(tmp, spec)
    return spec


def lower_entries(spec: Path, layers: int) -> list[str]:
    """lowerdir entries for every layer, the topmost first (the manifest lists the base first)."""
    return [f"//registry/{i}/{spec}" for i in reversed(range(layers))]


def registry_argv(command: list[str], entries: list[str], upper: Path, work: Path,
                  mountpoint: Path) -> list[str]:
    """The overlay command line: the registry plugin's layers under the user's upper layer."""
    from cshare_fuse.formats.optsyntax import escape

    options = [
        "plugins=registry",
        "lowerdir=" + ":".join(entries),
        f"upperdir={escape(upper)}",
        f"workdir={escape(work)}",
        "allow_other",  # as for a shared-store mount (command.overlay_argv says why)
        "default_permissions",
    ]
    return [*command, "-o", ",".join(options), str(mountpoint)]


def mount_registry_image(reference: str, mountpoint: Path, *, tls_verify: bool = True,
                         upper: Path | None = None, work: Path | None = None,
                         debug: Callable[[str], None] | None = None) -> MountRecord:
    """Mount every layer of docker://... lazily on MOUNTPOINT; return once the mount is ready."""
    from . import ops

    note = debug or (lambda _msg: None)
    ops._check_dirs(upper, work)
    ops.check_can_mount()
    ops._check_user_dirs(upper, work)
    mnt = ops.check_mountpoint(mountpoint)
    command = overlay_command()
    if not uses_plugins(command):
        raise CshareError(f"{Path(command[0]).name} has no plugins: a docker:// image needs "
                          "cshare-overlay's registry plugin (unset CSHARE_OVERLAY_CMD)")
    ref = parse_ref(reference)
    digest, layers = resolve(ref, tls_verify)
    state = mounts_dir() / mount_key(digest.removeprefix("sha256:"), mnt)
    ops._check_not_mounted_elsewhere(state, str(ref), mnt)
    upper_dir, work_dir, created = ops._prepare_state(state, upper, work)
    try:
        entries = lower_entries(write_spec(state, ref, digest, tls_verify), layers)
        argv = registry_argv(command, entries, upper_dir, work_dir, mnt)
        note("running: " + shlex.join(argv))
        ops._run_overlay(argv, state / LOG_NAME, str(ref), mnt)
    except BaseException:
        ops._remove_created(created)  # --upper/--work made for a mount that did not happen
        raise
    record = MountRecord(image_id=digest.removeprefix("sha256:"), image=str(ref),
                         mountpoint=str(mnt), upper=str(upper_dir), work=str(work_dir),
                         lowers=entries, command=argv, state_dir=str(state),
                         own_dirs=upper is None, mount_ns=namespaces.mount_namespace_id(),
                         pid=find_daemon(mnt))
    record.save()
    note(f"overlay pid {record.pid}; record {state / RECORD_NAME}; log {state / LOG_NAME}")
    return record
