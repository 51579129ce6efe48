"""Image references: turn what a user typed into one image, as podman users expect.

Pure: it works on any sequence of objects with an `id` and `names` (the images
of podman's store and those of the shared store alike), does no I/O, and says
"unknown" or "ambiguous" in one line that lists the candidates.

The rules, in order (shared/docs/formats.md §3):

1. an exact id (`sha256:` prefix allowed);
2. a unique id prefix (hex only);
3. an exact name, after normalising it the way containers/image does: a name
   without a tag means `:latest`, `docker.io/fedora` means
   `docker.io/library/fedora`;
4. a short name (no registry): `localhost/NAME` first, then
   `docker.io/library/NAME` (`docker.io/NAME` for `ns/NAME`), then any image
   whose name ends in `/NAME:TAG`; more than one such image is ambiguous.

`NAME@sha256:...` picks the image with that manifest digest (and, when a
repository is given, one of whose names is in that repository).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..errors import CshareError

DEFAULT_DOMAIN = "docker.io"
OFFICIAL_NAMESPACE = "library"
LOCAL_DOMAIN = "localhost"
DEFAULT_TAG = "latest"

_HEX_RE = re.compile(r"[0-9a-f]+")
_FULL_ID_LEN = 64
_MAX_LISTED = 8  # candidates named in an error line; the rest are counted


class ResolveError(CshareError):
    """An image reference that names no image, or more than one."""


class Named(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def names(self) -> Sequence[str]: ...


T = TypeVar("T", bound=Named)


@dataclass(frozen=True)
class Reference:
    """A parsed reference: `domain/path:tag` or `domain/path@digest` (domain may be None)."""

    domain: str | None
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """`domain/path` with the default domain and namespace filled in."""
        domain = self.domain or DEFAULT_DOMAIN
        path = self.path
        if domain == DEFAULT_DOMAIN and "/" not in path:
            path = f"{OFFICIAL_NAMESPACE}/{path}"
        return f"{domain}/{path}"

    def full_name(self) -> str:
        """The name as images.json stores it: `domain/path:tag` (tag defaults to latest)."""
        return f"{self.repository}:{self.tag or DEFAULT_TAG}"

    def short_tagged(self) -> str:
        """`path:tag` as the user wrote the path (for suffix matching)."""
        return f"{self.path}:{self.tag or DEFAULT_TAG}"


def parse(ref: str) -> Reference:
    """Split a reference into domain, path, tag and digest.  No validation of characters."""
    if not ref or ref != ref.strip():
        raise ResolveError(f"invalid image reference {ref!r}")
    name, digest = ref, None
    if "@" in ref:
        name, digest = ref.split("@", 1)
        if not digest:
            raise ResolveError(f"invalid image reference {ref!r}: empty digest")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not tag:
            raise ResolveError(f"invalid image reference {ref!r}: empty tag")
    domain = None
    first, sep, rest = name.partition("/")
    # containers/image: the first component is a registry when it looks like a
    # host name (has a dot or a port) or is exactly "localhost".
    if sep and ("." in first or ":" in first or first == LOCAL_DOMAIN):
        domain, name = first, rest
    if not name or name.startswith("/") or name.endswith("/") or "//" in name:
        raise ResolveError(f"invalid image reference {ref!r}")
    return Reference(domain=domain, path=name, tag=tag, digest=digest)


def normalize(ref: str) -> str:
    """The full name (`domain/path:tag`) a reference stands for."""
    return parse(ref).full_name()


def _short_id(image_id: str) -> str:
    return image_id[:12]


def _describe(image: Named) -> str:
    names = list(image.names)
    return f"{names[0]} ({_short_id(image.id)})" if names else _short_id(image.id)


def _listing(images: Sequence[Named]) -> str:
    shown = ", ".join(_describe(i) for i in images[:_MAX_LISTED])
    more = len(images) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _unique(ref: str, matches: list[T], where: str) -> T | None:
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ResolveError(f"image {ref!r} is ambiguous in {where}: it matches {_listing(matches)}")
    return None


def _strip_algorithm(ref: str) -> str:
    return ref[len("sha256:") :] if ref.startswith("sha256:") else ref


def resolve(
    ref: str, images: Sequence[T], where: str, digest_of: dict[str, str] | None = None
) -> T:
    """The one image `ref` names among `images` (see the module docstring for the rules).

    `where` names the store in error messages.  `digest_of` maps image id to
    manifest digest, for `NAME@sha256:...` references.
    """
    candidate_id = _strip_algorithm(ref)
    if _HEX_RE.fullmatch(candidate_id):
        exact = [i for i in images if i.id == candidate_id]
        if exact:
            return exact[0]
        if len(candidate_id) < _FULL_ID_LEN:
            found = _unique(ref, [i for i in images if i.id.startswith(candidate_id)], where)
            if found is not None:
                return found
    parsed = parse(ref)
    if parsed.digest is not None:
        return _resolve_digest(ref, parsed, images, where, digest_of or {})
    full = parsed.full_name()
    found = _unique(ref, [i for i in images if full in i.names or ref in i.names], where)
    if found is not None:
        return found
    if parsed.domain is None:
        found = _resolve_short(ref, parsed, images, where)
        if found is not None:
            return found
    known = [i for i in images]
    hint = f"; images there: {_listing(known)}" if known else f"; {where} holds no images"
    raise ResolveError(f"no image {ref!r} in {where}{hint}")


def _resolve_short(ref: str, parsed: Reference, images: Sequence[T], where: str) -> T | None:
    tag = parsed.tag or DEFAULT_TAG
    # podman looks in localhost/ first, then the default registry.
    for preferred in (f"{LOCAL_DOMAIN}/{parsed.path}:{tag}", parsed.full_name()):
        found = _unique(ref, [i for i in images if preferred in i.names], where)
        if found is not None:
            return found
    suffix = "/" + parsed.short_tagged()
    return _unique(ref, [i for i in images if any(n.endswith(suffix) for n in i.names)], where)


def _resolve_digest(
    ref: str, parsed: Reference, images: Sequence[T], where: str, digest_of: dict[str, str]
) -> T:
    matches = [i for i in images if digest_of.get(i.id) == parsed.digest]
    if parsed.path:
        repo = parsed.repository
        local_repo = f"{LOCAL_DOMAIN}/{parsed.path}"
        suffix = "/" + parsed.path
        in_repo = [
            i
            for i in matches
            if any(
                n.rsplit(":", 1)[0] in (repo, local_repo)
                or (parsed.domain is None and n.rsplit(":", 1)[0].endswith(suffix))
                for n in i.names
            )
        ]
        matches = in_repo
    found = _unique(ref, matches, where)
    if found is None:
        raise ResolveError(f"no image {ref!r} in {where}")
    return found
