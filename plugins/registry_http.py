"""A small client for the registry HTTP API (distribution v2): manifests and blob ranges.

Only ever talks to the one address it was given: a redirect elsewhere (some
registries send blob reads to a CDN) is refused, not followed.  Every request
has a connect/read timeout and is retried a bounded number of times on a
network failure or a 5xx answer, so a registry that went away makes a request
fail within about `attempts * timeout` seconds instead of hanging.  Authentication
(bearer tokens) is not spoken: a 401 is refused with a message saying so.

With `tls_verify` (the default, as in podman) the registry is spoken to over
HTTPS with certificate checks; `tls_verify=False` speaks plain HTTP, which is
what a registry on loopback serves.  One connection per thread, kept open.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_ADDRESS = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                      r"(?::[0-9]{1,5})?$")
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_BLOCK = 1 << 20
#: Largest manifest accepted (they are a few KiB).
MAX_MANIFEST_BYTES = 4 << 20


class RegistryError(OSError):
    """The registry could not be reached or gave an answer that cannot be used."""


class Transient(RegistryError):
    """A failure worth retrying: the network, a timeout, a 5xx answer."""


def check_address(address: str) -> str:
    if not _ADDRESS.match(address):
        raise ValueError(f"registry address {address!r} is not HOST or HOST:PORT")
    return address


def check_repository(name: str) -> str:
    if not _REPOSITORY.match(name):
        raise ValueError(f"repository name {name!r} is not valid (lower-case path components)")
    return name


class RegistryClient:
    """GETs on one registry, with timeouts, bounded retries and a count of bytes received."""

    def __init__(self, address: str, *, tls_verify: bool = True, timeout: float = 10.0,
                 attempts: int = 3) -> None:
        self.address = check_address(address)
        self.tls_verify = tls_verify
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self._local = threading.local()
        self._count_lock = threading.Lock()
        self.bytes_received = 0

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls_verify else 'http'}://{self.address}"

    # -- connections -------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.tls_verify:
                import ssl

                conn = http.client.HTTPSConnection(self.address, timeout=self.timeout,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(self.address, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def count_received(self, n: int) -> None:
        """Add n to bytes_received (also for bytes a fetch worker received for this client)."""
        with self._count_lock:
            self.bytes_received += n

    # -- requests ----------------------------------------------------------------
    def _with_retries(self, what: str, attempt: Callable[[], T]) -> T:
        delay = 0.2
        for n in range(self.attempts):
            try:
                return attempt()
            except Transient as exc:
                self._drop_connection()
                if n + 1 == self.attempts:
                    raise RegistryError(f"{what}: {exc.strerror or exc} (after {self.attempts} "
                                        "attempts)") from None
                time.sleep(delay)
                delay *= 2.5
            except BaseException:
                self._drop_connection()  # a half-read answer leaves it unusable
                raise
        raise AssertionError("unreachable")

    def _open(self, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """Send one GET; a network failure or 5xx is Transient, other errors are final."""
        conn = self._connection()
        try:
            conn.request("GET", path, headers={"Host": self.address, **headers})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise Transient(f"cannot reach {self.base_url}: {_reason(exc)}") from None
        if response.status >= 500:
            response.read()
            raise Transient(f"{self.base_url}{path}: HTTP {response.status} {response.reason}")
        if response.status in (301, 302, 303, 307, 308):
            response.read()
            raise RegistryError(f"{self.base_url}{path} redirects to "
                                f"{response.getheader('Location')!r}: the registry plugin only "
                                f"contacts {self.address}")
        if response.status == 401:
            response.read()
            raise RegistryError(f"{self.base_url}{path}: the registry asks for authentication, "
                                "which the registry plugin does not support")
        return response

    def _body(self, response: http.client.HTTPResponse, limit: int) -> bytes:
        try:
            body = response.read(limit + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise Transient(f"reading from {self.base_url}: {_reason(exc)}") from None
        self.count_received(len(body))
        if len(body) > limit:
            self._drop_connection()
            raise RegistryError(f"answer from {self.base_url} is larger than {limit} bytes")
        return body

    def manifest(self, repository: str, reference: str) -> tuple[bytes, str, str | None]:
        """(body, media type, Docker-Content-Digest) of a manifest by tag or digest."""
        path = f"/v2/{check_repository(repository)}/manifests/{reference}"

        def attempt() -> tuple[bytes, str, str | None]:
            response = self._open(path, {"Accept": ", ".join(MANIFEST_TYPES)})
            body = self._body(response, MAX_MANIFEST_BYTES)
            if response.status == 404:
                raise RegistryError(f"{self.base_url}: no manifest {repository}:{reference}"
                                    if ":" not in reference else
                                    f"{self.base_url}: no manifest {repository}@{reference}")
            if response.status != 200:
                raise RegistryError(f"{self.base_url}{path}: HTTP {response.status} "
                                    f"{response.reason}")
            media = (response.getheader("Content-Type") or "").split(";")[0].strip()
            return body, media, response.getheader("Docker-Content-Digest")

        return self._with_retries(f"manifest {repository}:{reference}", attempt)

    def blob_range(self, repository: str, digest: str, start: int, end: int) -> bytes:
        """Bytes start..end (exclusive) of a blob, by one range request."""
        return self.stream_range(repository, digest, start, end,
                                 lambda chunks: b"".join(chunks))

    def stream_range(self, repository: str, digest: str, start: int, end: int,
                     consume: Callable[[Iterator[bytes]], T]) -> T:
        """Feed bytes start..end of a blob to `consume`, in blocks.

        On a network failure `consume` is called again from the start with a
        fresh iterator (it must start over cleanly); the result of the call that
        saw every byte is returned.
        """
        if end <= start:
            raise ValueError("empty range")
        path = f"/v2/{check_repository(repository)}/blobs/{digest}"

        def attempt() -> T:
            response = self._open(path, {"Range": f"bytes={start}-{end - 1}"})
            if response.status != 206:
                response.read()
                if response.status == 404:
                    raise RegistryError(f"{self.base_url}: no blob {digest} in {repository}")
                raise RegistryError(f"{self.base_url}{path}: HTTP {response.status} to a range "
                                    "request (the registry must answer ranges with 206)")
            expected = f"bytes {start}-{end - 1}/"
            if not (response.getheader("Content-Range") or "").startswith(expected):
                response.read()
                raise RegistryError(f"{self.base_url}{path}: answered another range than "
                                    f"{start}-{end - 1}")
            return consume(self._blocks(response, end - start))

        return self._with_retries(f"blob {digest} bytes {start}-{end - 1}", attempt)

    def _blocks(self, response: http.client.HTTPResponse, length: int) -> Iterator[bytes]:
        left = length
        while left:
            try:
                block = response.read(min(left, _BLOCK))
            except (OSError, http.client.HTTPException) as exc:
                raise Transient(f"reading from {self.base_url}: {_reason(exc)}") from None
            if not block:
                raise Transient(f"{self.base_url} closed the connection {left} bytes early")
            self.count_received(len(block))
            left -= len(block)
            yield block


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
