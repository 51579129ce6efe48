"""The `registry` plugin against a real registry: Debian's docker-registry on loopback, images pushed by podman.

The reference for every entry is the same image in podman's own store
(`podman image mount`), never a list in this file.  What a mount fetched is
read from the registry's own log (bytes written per answer).  Faults are real:
a blob file changed in the registry's storage, a cache file changed on disk,
the registry stopped while mounted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import is_root, require, tool, unmount_all_below
from mount_support import kill_overlays_below, rootless_user, user_dir
from podman_support import PodmanImages, PodmanStore, podman_images, podman_store
from registry_support import (
    LoopbackRegistry,
    build_test_image,
    lowerdir_for,
    push,
    require_registry,
    write_spec,
)

from plugins import registry_toc
from plugins.registry_http import RegistryClient, RegistryError

__all__ = ["podman_images", "podman_store"]

pytestmark = [pytest.mark.timeout(240)]
REPO = "cshare/test"
HERE = Path(__file__).parent


@dataclass
class Pushed:
    registry: LoopbackRegistry
    image: str
    manifest: str
    layers: list[dict[str, object]]
    base: Path

    @property
    def blob_bytes(self) -> int:
        return sum(int(layer["size"]) for layer in self.layers)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def pushed(podman_images: PodmanImages) -> Iterator[Pushed]:
    """The two-layer test image, pushed zstd:chunked to a registry of this module."""
    require(is_root(), "root (podman store, mknod, registry)")
    require_registry()
    base = Path(tempfile.mkdtemp(prefix="cshare-registry-", dir="/var/tmp"))
    base.chmod(0o755)
    registry = LoopbackRegistry(base / "registry").start()
    try:
        image = build_test_image(podman_images.store, base, "localhost/cshare-registry-test:1")
        digest = push(podman_images.store, image.name, registry, REPO)
        manifest, _ = registry.manifest(REPO, digest)
        yield Pushed(registry, image.name, digest, manifest["layers"], base)  # type: ignore[arg-type]
    finally:
        registry.stop()
        unmount_all_below(base)
        shutil.rmtree(base, ignore_errors=True)


def _mount_root(pushed: Pushed, spec: Path, mnt: Path, log: Path) -> subprocess.CompletedProcess[str]:
    """cshare-overlay as root with every layer of the image; its log in `log`."""
    for d in (mnt, mnt.parent / "upper", mnt.parent / "work"):
        d.mkdir(parents=True, exist_ok=True)
    opts = (f"plugins=registry,lowerdir={lowerdir_for(spec, len(pushed.layers))},"
            f"upperdir={mnt.parent / 'upper'},workdir={mnt.parent / 'work'}")
    return subprocess.run([tool("cshare-overlay"), "-o", opts, str(mnt)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, CSHARE_OVERLAY_LOG=str(log)))


def _podman_reference(pushed: Pushed, store: PodmanStore) -> dict[str, dict[str, object]]:
    """The image's tree as podman's own store shows it."""
    mounted = store.podman("image", "mount", pushed.image).stdout.strip()
    try:
        out = subprocess.run([sys.executable, str(HERE / "registry_walk.py"), mounted],
                             capture_output=True, text=True, check=True).stdout
    finally:
        store.podman("image", "unmount", pushed.image, check=False)
    return json.loads(out)


def test_user_mount_matches_podman_store_and_fetches_little(pushed: Pushed,
                                                          podman_images: PodmanImages) -> None:
    """alice mounts the image lazily; listing fetches nothing, one cat a tiny fraction, every entry as podman has it."""
    scratch = pushed.base / "alice"
    scratch.mkdir()
    scratch.chmod(0o755)
    alice = rootless_user("alice", scratch)
    for d in ("mnt", "upper", "work", "cache"):
        user_dir(alice, scratch / d)
    (scratch / "cache").chmod(0o700)
    walker = scratch / "registry_walk.py"
    shutil.copy(HERE / "registry_walk.py", walker)
    walker.chmod(0o644)
    spec = write_spec(scratch / "image.json", pushed.registry, REPO, pushed.manifest,
                      scratch / "cache")
    mnt = scratch / "mnt"
    log = scratch / "overlay.log"
    user_dir(alice, log.parent)
    opts = (f"plugins=registry,lowerdir={lowerdir_for(spec, len(pushed.layers))},"
            f"upperdir={scratch / 'upper'},workdir={scratch / 'work'}")
    reference = _podman_reference(pushed, podman_images.store)
    try:
        mark = pushed.registry.mark()
        up = alice.run(["podman", "unshare", "env", f"CSHARE_OVERLAY_LOG={log}",
                        tool("cshare-overlay"), "-o", opts, str(mnt)])
        assert up.returncode == 0, up.stderr
        at_mount = pushed.registry.written_since(mark)
        mark = pushed.registry.mark()
        listed = alice.run(["podman", "unshare", "ls", "-lR", str(mnt)])
        assert listed.returncode == 0, listed.stderr
        assert pushed.registry.written_since(mark) == 0, "a listing fetched file data"
        mark = pushed.registry.mark()
        small = alice.run(["podman", "unshare", "cat", f"{mnt}/data/small.txt"])
        assert small.stdout == "a small file\n", small.stderr
        for_cat = pushed.registry.written_since(mark)
        walked = alice.run(["podman", "unshare", sys.executable, str(walker), str(mnt)])
        assert walked.returncode == 0, walked.stderr
        lazy = json.loads(walked.stdout)
    finally:
        kill_overlays_below([alice], scratch, [mnt])
    # The image holds what the comparison is about.
    assert reference["etc/shadow"]["mode"] == "0o600"
    assert reference["usr/bin/setuid-tool"]["mode"] == "0o4755"
    assert reference["var/www/index.html"]["uid"] == 33
    assert reference["dev/sda"]["rdev"] == [8, 0]
    assert reference["usr/share/b"]["nlink"] == 2
    assert "f" not in reference and "d/old" not in reference and "d/new" in reference
    assert reference["etc/tagged"]["xattrs"] == {"user.test": b"registry".hex()}
    assert reference["run/fifo"]["type"] == stat.S_IFIFO and reference["tmp"]["mode"] == "0o1777"
    # The root is the mount's own (an upper directory here, podman's merged one there).
    differences = {k: (reference.get(k), lazy.get(k)) for k in reference.keys() | lazy.keys()
                   if reference.get(k) != lazy.get(k) and k != "."}
    assert not differences, json.dumps(differences, indent=1)[:3000]
    assert 0 < at_mount < pushed.blob_bytes * 0.05, (at_mount, pushed.blob_bytes)
    assert 0 < for_cat < pushed.blob_bytes * 0.02, (for_cat, pushed.blob_bytes)
    print(f"fetched: mount {at_mount}, ls -lR 0, cat {for_cat} of {pushed.blob_bytes} bytes")


def test_cshare_mount_docker_reference_runs_a_container(pushed: Pushed) -> None:
    """`cshare mount docker://...` as alice inside podman unshare, then podman run --rootfs on it."""
    scratch = pushed.base / "alice-cli"
    scratch.mkdir()
    scratch.chmod(0o755)
    alice = rootless_user("alice", scratch)
    mnt, cache = user_dir(alice, scratch / "mnt"), user_dir(alice, scratch / "cache")
    cache.chmod(0o700)
    ref = f"docker://{pushed.registry.address}/{REPO}:1"
    cshare = [tool("cshare")]
    in_ns = ["podman", "unshare", "env", f"XDG_CACHE_HOME={cache}"]
    try:
        plain = alice.run([*in_ns, *cshare, "mount", ref, str(mnt)])
        assert plain.returncode != 0 and "--tls-verify=false" in plain.stderr, plain.stderr
        assert len(plain.stderr.strip().splitlines()) == 1
        up = alice.run([*in_ns, *cshare, "mount", ref, str(mnt), "--tls-verify=false"])
        assert up.returncode == 0, up.stderr
        assert f"mounted {ref}" in up.stdout
        run = alice.run(["podman", "run", "--rm", "--network", "none", "--rootfs", str(mnt),
                         "sh", "-c", "id -u; cat /etc/shadow; stat -c %u:%g:%a /var/www/index.html"
                         " /usr/bin/setuid-tool; ls /d; test -e /f || echo no-f"])
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == ["0", "root:*:19000:0:99999:7:::", "33:33:640",
                                           "0:0:4755", "new", "no-f"], run.stdout
        down = alice.run(["podman", "unshare", *cshare, "umount", str(mnt)])
        assert down.returncode == 0, down.stderr
        specs = list((scratch / "data-alice").rglob("image.json"))
        used = cache / "cshare" / "registry"  # $XDG_CACHE_HOME/cshare/registry
        assert len(specs) == 1 and json.loads(specs[0].read_text())["cache"] == str(used)
        assert any(p.is_file() for p in (used / "files").rglob("*")), "nothing was cached"
    finally:
        kill_overlays_below([alice], scratch, [mnt])


def test_corrupted_blob_is_never_served(pushed: Pushed, tmp_path: Path) -> None:
    """A file whose frames in the registry were changed gives EIO, no byte of it, and one log line."""
    spec = write_spec(tmp_path / "image.json", pushed.registry, REPO, pushed.manifest,
                      tmp_path / "cache")
    # Find a file's frames in the base layer's blob through its TOC, and change them.
    layer = pushed.layers[0]
    blob = pushed.registry.blob_file(str(layer["digest"]))
    where = registry_toc.toc_location(layer["annotations"])  # type: ignore[arg-type]
    assert where is not None
    raw = blob.read_bytes()
    entries = registry_toc.decode_toc(raw[where.offset:where.offset + where.length], where)
    victim = next(e for e in entries if e.get("name") in ("./etc/shadow", "etc/shadow"))
    start, end = int(victim["offset"]), int(victim["endOffset"])  # type: ignore[call-overload]
    original = raw[start:end]
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    damaged[len(damaged) // 2] ^= 0x55
    mnt, log = tmp_path / "m" / "mnt", tmp_path / "overlay.log"
    try:
        with open(blob, "r+b") as f:
            f.seek(start)
            f.write(bytes(damaged))
        up = _mount_root(pushed, spec, mnt, log)
        assert up.returncode == 0, up.stderr
        shown = subprocess.run(["cat", f"{mnt}/etc/shadow"], capture_output=True)
        assert shown.returncode != 0 and shown.stdout == b""
        assert "Input/output error" in shown.stderr.decode()
        assert (mnt / "data/small.txt").read_text() == "a small file\n"  # the rest still works
        lines = [line for line in log.read_text().splitlines() if "etc/shadow" in line]
        assert len(lines) == 1 and str(layer["digest"]) in lines[0], log.read_text()
        assert not any((tmp_path / "cache/files").rglob(str(victim["digest"]).split(":")[1]))
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        with open(blob, "r+b") as f:
            f.seek(start)
            f.write(original)


def test_damaged_cache_file_is_fetched_again(pushed: Pushed, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "image.json", pushed.registry, REPO, pushed.manifest,
                      tmp_path / "cache")
    mnt, log = tmp_path / "m" / "mnt", tmp_path / "overlay.log"
    assert _mount_root(pushed, spec, mnt, log).returncode == 0
    try:
        assert (mnt / "var/www/index.html").read_bytes() == b"<p>www-data's page</p>\n"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    cached = [p for p in (tmp_path / "cache/files").rglob("*") if p.is_file()
              and p.read_bytes() == b"<p>www-data's page</p>\n"]
    assert len(cached) == 1
    cached[0].chmod(0o600)
    cached[0].write_bytes(b"<p>tampered with!!!!!</p>\n")
    mark = pushed.registry.mark()
    assert _mount_root(pushed, spec, mnt, log).returncode == 0
    try:
        assert (mnt / "var/www/index.html").read_bytes() == b"<p>www-data's page</p>\n"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert pushed.registry.written_since(mark) > 0  # fetched again, not served from the cache
    assert cached[0].read_bytes() == b"<p>www-data's page</p>\n"


def test_registry_gone_fails_only_unfetched_files(pushed: Pushed, podman_images: PodmanImages,
                                                  tmp_path: Path) -> None:
    """Stopped mid-run: fetched files still read, others EIO within the bounded timeouts."""
    own = LoopbackRegistry(tmp_path / "registry").start()
    try:
        digest = push(podman_images.store, pushed.image, own, REPO)
        spec = write_spec(tmp_path / "image.json", own, REPO, digest, tmp_path / "cache",
                          timeout=2, attempts=2)
        mnt, log = tmp_path / "m" / "mnt", tmp_path / "overlay.log"
        assert _mount_root(pushed, spec, mnt, log).returncode == 0
        try:
            assert (mnt / "etc/shadow").read_bytes().startswith(b"root:")
            own.stop()
            start = time.monotonic()
            with pytest.raises(OSError) as failed:
                (mnt / "data/random.bin").read_bytes()
            assert failed.value.errno == errno.EIO
            assert time.monotonic() - start < 15
            assert (mnt / "etc/shadow").read_bytes().startswith(b"root:")
            assert "small.txt" in os.listdir(mnt / "data")
            assert "data/random.bin" in log.read_text()
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    finally:
        own.stop()


def test_layer_without_toc_is_refused(pushed: Pushed, podman_images: PodmanImages,
                                      tmp_path: Path) -> None:
    store = podman_images.store
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/unique").write_bytes(os.urandom(64))  # a layer no push has compressed before
    store.import_rootfs(rootfs, "localhost/cshare-registry-gzip:1")
    digest = push(store, "localhost/cshare-registry-gzip:1", pushed.registry, "cshare/gzip",
                  compression="gzip")
    spec = write_spec(tmp_path / "image.json", pushed.registry, "cshare/gzip", digest,
                      tmp_path / "cache")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([tool("cshare-overlay"), "-o", f"plugins=registry,lowerdir=//registry/0/{spec}",
                           str(mnt)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--compression-format zstd:chunked" in lines[0], proc.stderr
    store.podman("rmi", "localhost/cshare-registry-gzip:1", check=False)


# -- the parts that need no registry ---------------------------------------------------


def test_toc_times_and_tree() -> None:
    assert registry_toc.parse_time_ns("2026-12-01T22:29:31.803937924Z") == \
        1796164171_803937924
    assert registry_toc.parse_time_ns("1970-01-01T01:00:00.5+01:00") == 500_000_000
    assert registry_toc.parse_time_ns("0001-01-01T00:00:00Z") == 0
    tree = registry_toc.build_tree([
        {"type": "dir", "name": "./", "mode": 0o755},
        {"type": "reg", "name": "./a/f", "mode": 0o4755, "uid": 5, "size": 3,
         "digest": "sha256:" + "0" * 64, "offset": 10, "endOffset": 20},
        {"type": "hardlink", "name": "./a/g", "linkName": "./a/f"},
        {"type": "char", "name": "./null", "mode": 0o666, "devMajor": 1, "devMinor": 3},
    ])
    assert tree[b"a"].is_dir and list(tree[b"a"].children) == [b"f", b"g"]  # implied dir
    assert tree[b"a/g"].ino == tree[b"a/f"].ino and tree[b"a/f"].nlink == 2
    assert tree[b"a/f"].mode == 0o104755 and tree[b"a/g"].uid == 5
    assert tree[b"null"].rdev == os.makedev(1, 3)
    for bad in ({"type": "reg", "name": "../x"}, {"type": "reg", "name": "/etc/x"},
                {"type": "hardlink", "name": "./h", "linkName": "./missing"},
                {"type": "reg", "name": "./big", "size": 5}):
        with pytest.raises(registry_toc.TocError):
            registry_toc.build_tree([bad])


def test_toc_checksum_is_checked() -> None:
    import zstandard

    raw = zstandard.ZstdCompressor().compress(b'{"version": 1, "entries": []}')
    where = registry_toc.TocLocation(0, len(raw), 29, registry_toc.sha256_digest(raw))
    assert registry_toc.decode_toc(raw, where) == []
    wrong = registry_toc.TocLocation(0, len(raw), 29, "sha256:" + "1" * 64)
    with pytest.raises(registry_toc.TocError, match="does not match"):
        registry_toc.decode_toc(raw, wrong)
    assert registry_toc.toc_location({"other": "x"}) is None
    with pytest.raises(registry_toc.TocError):
        registry_toc.toc_location({registry_toc.POSITION_KEYS[0]: "1:2:3:1"})  # no checksum


def test_client_never_follows_a_redirect() -> None:
    """A registry that sends blob reads elsewhere is refused; the other address is never contacted."""
    import http.server
    import threading

    contacted: list[str] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            contacted.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    class Redirecting(Elsewhere):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{other.server_port}/blob")
            self.send_header("Content-Length", "0")
            self.end_headers()

    other = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)
    first = http.server.HTTPServer(("127.0.0.1", 0), Redirecting)
    for server in (other, first):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = RegistryClient(f"127.0.0.1:{first.server_port}", tls_verify=False, timeout=2)
        with pytest.raises(RegistryError, match="only contacts"):
            client.blob_range("a/b", "sha256:" + "0" * 64, 0, 10)
        assert contacted == []
    finally:
        for server in (other, first):
            server.shutdown()
            server.server_close()


def test_man_page_renders_and_names_every_spec_key() -> None:
    import dataclasses

    from plugins.registry import ImageSpec

    require(shutil.which("man") is not None, "man (Debian package man-db)")
    page = HERE.parent / "man" / "cshare-registry.7"
    run = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                         env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert run.returncode == 0 and run.stderr == "", run.stderr
    for spec_field in dataclasses.fields(ImageSpec):
        assert f'"{spec_field.name}"' in run.stdout, spec_field.name
    assert "--compression-format zstd:chunked" in run.stdout


def test_registry_references_parse() -> None:
    from cshare.errors import CshareError
    from cshare.mount.registry_ref import RegistryRef, parse_ref

    assert parse_ref("docker://127.0.0.1:5000/team/app:v1") == RegistryRef(
        "127.0.0.1:5000", "team/app", "v1")
    assert parse_ref("docker://localhost:5000/app").reference == "latest"
    digest = "sha256:" + "ab" * 32
    assert parse_ref(f"docker://r.example/a/b@{digest}").reference == digest
    assert str(parse_ref("docker://h:1/a:t")) == "docker://h:1/a:t"
    for bad in ("docker://h:1", "docker://h:1/", "docker://h:1/UPPER:t", "docker://h:1/a:b@c",
                "docker://bad host/a:t", "docker://h:1/a@sha256:123"):
        with pytest.raises(CshareError):
            parse_ref(bad)


def test_cache_publishes_only_verified_contents(tmp_path: Path) -> None:
    import hashlib

    import zstandard

    from plugins.registry_cache import DigestMismatch, FileCache

    cache = FileCache(str(tmp_path / "cache"))
    data = b"contents " * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    frames = zstandard.ZstdCompressor().compress(data[:4000]) + \
        zstandard.ZstdCompressor().compress(data[4000:])  # two frames, as a chunked file has
    for damaged in (frames[:-3] + b"\0\0\0", zstandard.ZstdCompressor().compress(data[:-1] + b"!")):
        wrong = cache.writer(digest, len(data))
        with pytest.raises(DigestMismatch):  # when decompressing, or when hashing at the end
            wrong.feed(damaged)
            wrong.finish()
        wrong.abort()
    assert not cache.present(digest) and os.listdir(cache.tmp) == []
    right = cache.writer(digest, len(data))
    for n in range(0, len(frames), 100):
        right.feed(frames[n:n + 100])
    right.finish()
    right.abort()
    assert Path(cache.path(digest)).read_bytes() == data
    assert stat.S_IMODE(os.stat(cache.path(digest)).st_mode) == 0o400
    fd = cache.open_checked(digest, len(data))
    assert fd is not None
    os.close(fd)
    os.chmod(cache.path(digest), 0o600)
    Path(cache.path(digest)).write_bytes(data[:-1] + b"!")  # damaged on disk
    assert cache.open_checked(digest, len(data)) is None and not cache.present(digest)
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        FileCache(str(tmp_path / "open"))


def test_image_tocs_are_checked_and_fall_back_to_the_layer_fetch() -> None:
    """TOCs fetched by the image's threads are checked like a layer's own; a failed one is fetched again."""
    import zstandard

    from plugins.registry_image import ImageTocs

    texts = [b'{"version": 1, "entries": [%d]}' % n for n in range(3)]
    blobs = [zstandard.ZstdCompressor().compress(t) for t in texts]
    where = [registry_toc.TocLocation(0, len(b), len(t), registry_toc.sha256_digest(b))
             for b, t in zip(blobs, texts, strict=True)]
    layers = [{"digest": f"sha256:{n:064x}",
               "annotations": {registry_toc.POSITION_KEYS[0]: f"0:{w.length}:{w.uncompressed}:1",
                               registry_toc.CHECKSUM_KEYS[0]: w.checksum}}
              for n, w in enumerate(where)]

    class Client:
        def blob_range(self, repository: str, digest: str, start: int, end: int) -> bytes:
            n = int(digest[7:], 16)
            if n == 1:
                raise RegistryError("gone")  # layer 1's TOC fails in the threads
            return blobs[n] if n == 0 else blobs[n][:-1] + b"\0"  # layer 2's is damaged

    tocs = ImageTocs(Client(), "r", layers, 0)  # type: ignore[arg-type]
    own: list[int] = []

    def fetch(n: int) -> bytes:
        own.append(n)
        return blobs[n]

    assert tocs.take(0, str(layers[0]["digest"]), where[0], lambda: fetch(0), 5) == texts[0]
    assert tocs.take(1, str(layers[1]["digest"]), where[1], lambda: fetch(1), 5) == texts[1]
    assert tocs.take(2, str(layers[2]["digest"]), where[2], lambda: fetch(2), 5) == texts[2]
    assert own[0] == 1 and 0 not in own  # the damaged one was refused, then fetched by its load
    start = time.monotonic()  # taken again (a layer named twice): fetched at once, checked
    with pytest.raises(registry_toc.TocError, match="does not match"):
        tocs.take(0, str(layers[0]["digest"]), where[0], lambda: blobs[0][:-1] + b"\0", 5)
    assert time.monotonic() - start < 1


def _layer_spans(pushed: Pushed, client: RegistryClient) -> tuple[str, list[object]]:
    """(blob digest, Spans) of the regular files of the pushed image's largest layer, in blob order."""
    from plugins.registry_worker import Span

    layer = max(pushed.layers, key=lambda la: int(la["size"]))  # type: ignore[call-overload]
    where = registry_toc.toc_location(layer["annotations"])  # type: ignore[arg-type]
    assert where is not None
    blob = str(layer["digest"])
    tree = registry_toc.build_tree(registry_toc.decode_toc(
        client.blob_range(REPO, blob, where.offset, where.offset + where.length), where))
    spans, seen, last_end = [], set(), 0
    for _, e in registry_toc.data_entries(tree):
        if e.offset >= last_end and e.digest not in seen:
            spans.append(Span(e.digest, e.size, e.offset, e.end_offset))
            seen.add(e.digest)
            last_end = e.end_offset
    return blob, spans


def test_fetch_worker_publishes_only_verified_files_and_is_replaced_when_it_fails(
        pushed: Pushed, tmp_path: Path) -> None:
    """A window fetched ahead in a worker process: what it publishes hashes right, a wrong digest is
    reported and never published, a stopped worker is given up on in bounded time and replaced."""
    import hashlib
    import signal

    from plugins.registry_cache import FileCache
    from plugins.registry_worker import Span, WorkerFailed, WorkerPool

    client = RegistryClient(pushed.registry.address, tls_verify=False, timeout=5, attempts=2)
    blob, spans = _layer_spans(pushed, client)
    assert len(spans) >= 3
    cache = FileCache(str(tmp_path / "cache"))
    pool = WorkerPool()
    wrong = "sha256:" + "0" * 64
    plan = [Span(wrong, spans[0].size, spans[0].offset, spans[0].end_offset), *spans[1:]]  # type: ignore[attr-defined]
    published: dict[str, tuple[int, int, int]] = {}
    before = client.bytes_received
    failures = pool.fetch(client, cache.root, REPO, blob, plan, published, 30)
    assert [i for i, _ in failures] == [0] and "hash" in failures[0][1]
    assert not cache.present(wrong) and wrong not in published
    assert set(published) == {s.digest for s in plan[1:]}
    for s in plan[1:]:
        path = Path(cache.path(s.digest))
        assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == s.digest
        st = path.stat()
        assert published[s.digest] == (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    assert client.bytes_received - before == plan[-1].end_offset - plan[0].offset  # counted here
    assert os.listdir(cache.tmp) == []
    worker = pool._idle[0]
    worker.proc.send_signal(signal.SIGSTOP)  # hung: the pool gives up on it at the time limit
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match="no answer in time"):
        pool.fetch(client, cache.root, REPO, blob, spans[:1], {}, 1.0)  # type: ignore[arg-type]
    assert time.monotonic() - start < 5 and worker.proc.poll() is not None
    published = {}
    assert pool.fetch(client, cache.root, REPO, blob, spans[:1], published, 30) == []  # type: ignore[arg-type]
    assert list(published) == [spans[0].digest]  # type: ignore[attr-defined]
    replacement = pool._idle[0].proc
    assert replacement.pid != worker.proc.pid
    pool.close()
    assert replacement.poll() is not None


def test_fetch_worker_exits_when_its_pipe_closes() -> None:
    """A worker whose pipe closes (as when its daemon dies, even by SIGKILL) exits instead of lingering."""
    from plugins.registry_worker import _Worker

    worker = _Worker()
    assert worker.alive()
    assert worker.proc.stdin is not None
    worker.proc.stdin.close()
    assert worker.proc.wait(timeout=10) == 0
