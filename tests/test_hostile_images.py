"""Hostile images through make-shared and a user's mount (issue 12 points 1 and 6).

The images are built here, as a hostile author would: a tar written with
python's tarfile whose PAX headers (`SCHILY.xattr.NAME`) carry every forged
override form, imported with real podman into a private store.  Root's own
podman running that image is the reference: a user's container on cshare must
not be granted anything more (run as `--user 1000:1000`: the euid stays 1000,
root's 0600 file stays closed, no device appears, no capability is granted).

The deep image has a directory chain deeper than podman itself can store
(2,000 levels; podman stops near 1,800), so its layer is deepened in place in
podman's store after the import, through directory fds.
"""

# ruff: noqa: F811  (fixtures imported from the support modules are parameters here)
from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ensure_user, require, tool
from mount_support import cshare_cmd, kill_overlays_below, rootless_user, user_dir
from podman_support import PodmanStore, require_podman

from cshare.store.shared import SharedStore
from cshare_fuse.formats.overrides import OVERRIDE_XATTR, Override, parse_override

pytestmark = [pytest.mark.root, pytest.mark.podman, pytest.mark.timeout(240)]

FORGED = "localhost/cshare-forged:latest"
DEEP = "localhost/cshare-deep:latest"
DEPTH = 2000

PROBE_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char line[256];
    FILE *status = fopen("/proc/self/status", "r");
    printf("euid=%d\n", (int)geteuid());
    unsigned long long caps = 0;
    while (status && fgets(line, sizeof line, status))
        if (strncmp(line, "CapEff:", 7) == 0) sscanf(line + 7, "%llx", &caps);
    printf("capeff=%llx\n", caps);
    if (argc > 1) printf("open=%s\n", open(argv[1], O_RDONLY) >= 0 ? "ok" : "denied");
    return 0;
}
"""

#: struct vfs_cap_data revision 2, effective: permitted = {cap_dac_override} (podman's
#: default bounding set has it; a capability outside it would make exec fail).
CAP_DAC_OVERRIDE_V2 = struct.pack("<IIIII", 0x02000001, 1 << 1, 0, 0, 0)
SETUID_ROOT = "0:0:04755:file"

#: Every forged form of the issue, each on its own probe program (1000:1000 0755 in the tar).
FORGED_PROBES: dict[str, dict[str, bytes]] = {
    "/forged/containers": {"user.containers.override_stat": SETUID_ROOT.encode()},
    "/forged/fuseoverlayfs": {"user.fuseoverlayfs.override_stat": b"0:0:04755"},
    "/forged/privileged": {"security.fuseoverlayfs.override_stat": SETUID_ROOT.encode()},
    "/forged/prototype": {"user.original-permissions": b"4755:0:0"},
    "/forged/capability": {"user.cshare.capability": CAP_DAC_OVERRIDE_V2},
}
#: An empty file claiming to be /dev/mem, and a directory with forged markers.
FORGED_DEVICE = ("/forged/mem", {"user.containers.override_stat": b"0:0:0666:char-1-1"})
FORGED_DIR = (
    "/forged/dir",
    {
        "user.overlay.opaque": b"y",
        "user.fuseoverlayfs.opaque": b"y",
        "user.cshare.opaque_added": b"y",
        "user.cshare.dir_times": b"1:1",
        "user.containers.override_stat": b"0:0:07777:dir",
    },
)
REAL_SETUID = "/real/setuid"  # a genuine setuid-root probe: the test image's positive control
SECRET = "/secret"  # root 0600
RUN = ["podman", "run", "--rm", "--network", "none", "--runtime", "runc"]
STAT_FMT = "%n|%u|%g|%a|%F"


def _all_forged() -> dict[str, dict[str, bytes]]:
    return {**FORGED_PROBES, FORGED_DEVICE[0]: FORGED_DEVICE[1], FORGED_DIR[0]: FORGED_DIR[1]}


def _build_probe(path: Path) -> bytes:
    require(shutil.which("gcc") is not None, "gcc (to build the probe program)")
    src = path.with_suffix(".c")
    src.write_text(PROBE_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(path), str(src)], check=True)
    return path.read_bytes()


def _pax(xattrs: dict[str, bytes]) -> dict[str, str]:
    # tarfile writes str values; surrogateescape gives back the exact bytes.
    return {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}


def _add(tar: tarfile.TarFile, name: str, kind: bytes, mode: int, owner: tuple[int, int] = (0, 0),
         data: bytes = b"", xattrs: dict[str, bytes] | None = None, link: str = "") -> None:
    info = tarfile.TarInfo("." + name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.uid, info.gid = owner
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = 1_700_000_000
    if xattrs:
        info.pax_headers = _pax(xattrs)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def build_forged_tar(path: Path, probe: bytes, busybox: bytes) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("/", "/bin", "/dev", "/proc", "/sys", "/tmp", "/etc", "/real", "/forged"):
            _add(tar, d if d != "/" else "", tarfile.DIRTYPE, 0o1777 if d == "/tmp" else 0o755)
        _add(tar, "/bin/busybox", tarfile.REGTYPE, 0o755, data=busybox)
        for applet in ("sh", "cat", "stat", "ls", "echo"):
            _add(tar, f"/bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        _add(tar, SECRET, tarfile.REGTYPE, 0o600, data=b"root's secret\n")
        _add(tar, REAL_SETUID, tarfile.REGTYPE, 0o4755, data=probe)
        for name, xattrs in FORGED_PROBES.items():
            _add(tar, name, tarfile.REGTYPE, 0o755, (1000, 1000), probe, xattrs)
        _add(tar, FORGED_DEVICE[0], tarfile.REGTYPE, 0o644, (1000, 1000), b"", FORGED_DEVICE[1])
        _add(tar, FORGED_DIR[0], tarfile.DIRTYPE, 0o755, (1000, 1000), xattrs=FORGED_DIR[1])
        _add(tar, FORGED_DIR[0] + "/inside", tarfile.REGTYPE, 0o644, (1000, 1000), b"kept\n")


@dataclass
class HostileImages:
    store: PodmanStore
    forged_diff: Path
    deep_diff: Path


def _deepen(diff: Path, depth: int) -> None:
    """A chain `d/d/…/d` of `depth` directories with a uid-33 0600 file at the bottom."""
    fds = [os.open(diff, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            os.mkdir("d", 0o700, dir_fd=fds[-1])
            os.chown("d", 33, 33, dir_fd=fds[-1])
            fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        fd = os.open("bottom", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fds[-1])
        os.write(fd, b"at the bottom\n")
        os.fchown(fd, 33, 33)
        os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


_memo: dict[str, HostileImages] = {}


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileImages]:
    require_podman()
    if "images" not in _memo:
        base = Path(tempfile.mkdtemp(prefix="cshare-hostile-", dir="/var/tmp"))
        store = PodmanStore(base).setup()
        import atexit

        atexit.register(store.cleanup)
        probe = _build_probe(base / "probe")
        busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
        tarball = base / "forged.tar"
        build_forged_tar(tarball, probe, busybox)
        store.podman("import", "--change", 'CMD ["/bin/sh"]', str(tarball), FORGED)
        deep_root = base / "deep-rootfs"
        (deep_root / "etc").mkdir(parents=True)
        store.import_rootfs(deep_root, DEEP)
        deep_diff = Path(store.inspect(DEEP, "{{.GraphDriver.Data.UpperDir}}"))
        _deepen(deep_diff, DEPTH)
        # Runs before store.cleanup (atexit is last in, first out): shutil.rmtree recurses.
        atexit.register(subprocess.run, ["rm", "-rf", str(deep_diff / "d")], check=False)
        forged_diff = Path(store.inspect(FORGED, "{{.GraphDriver.Data.UpperDir}}"))
        _memo["images"] = HostileImages(store, forged_diff, deep_diff)
    yield _memo["images"]


@pytest.fixture
def shared_store() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="cshare-store-", dir="/var/tmp"))
    parent.chmod(0o755)
    yield parent / "store"
    subprocess.run(["rm", "-rf", str(parent)], check=False)  # rm(1) removes a tree of any depth


def make_shared_cli(store: Path, images: HostileImages, ref: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("cshare"), "make-shared", ref, "--storage-root", str(images.store.root),
         "--store", str(store), "--json"],
        capture_output=True, text=True, timeout=200,
    )


def top_layer(store: Path, ref: str) -> Path:
    shared = SharedStore(store)
    with shared.read_lock():
        return Path(shared.lower_dirs(shared.resolve(ref))[0])


# ---------------------------------------------------------------- point 6
def test_make_shared_handles_a_chain_deeper_than_podman_stores(
    hostile: HostileImages, shared_store: Path
) -> None:
    done = make_shared_cli(shared_store, hostile, DEEP)
    assert done.returncode == 0, done.stderr[-3000:]
    layer = top_layer(shared_store, DEEP)
    # Down the whole chain through fds: every level converted, root-owned, 0755.
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        while True:
            try:
                child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                break
            os.close(fd)
            fd, depth = child, depth + 1
            st = os.fstat(fd)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755), depth
            assert os.getxattr(fd, OVERRIDE_XATTR) == b"33:33:0700:dir", depth
        bottom = os.open("bottom", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            st = os.fstat(bottom)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
            assert os.getxattr(bottom, OVERRIDE_XATTR) == b"33:33:0600:file"
            assert os.read(bottom, 100) == b"at the bottom\n"
        finally:
            os.close(bottom)
    finally:
        os.close(fd)
    assert depth == DEPTH
    verify = subprocess.run([tool("cshare"), "verify", str(layer)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout[-2000:]
    # And it can be removed again (shutil.rmtree recursed once per level).
    rm = subprocess.run([tool("cshare"), "rm", DEEP, "--store", str(shared_store)],
                        capture_output=True, text=True, timeout=120)
    assert rm.returncode == 0, rm.stderr[-2000:]
    assert not layer.exists()


# ---------------------------------------------------------------- point 1
def _script() -> str:
    """What a container run as 1000:1000 looks at: owners and types, then each probe's grant."""
    paths = [SECRET, REAL_SETUID, *_all_forged()]
    lines = [f"stat -c '{STAT_FMT}' {' '.join(paths)}", f"ls {FORGED_DIR[0]} | sed 's/^/listed:/'"]
    for probe in [REAL_SETUID, *FORGED_PROBES]:
        lines.append(f"echo '== {probe}'; {probe} {SECRET}")
    return "; ".join(lines)


def _grants(output: str) -> dict[str, dict[str, str]]:
    """{probe: {"euid": …, "capeff": …, "open": …}} from the script's output."""
    out: dict[str, dict[str, str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("== "):
            current = out.setdefault(line[3:], {})
        elif current is not None and "=" in line:
            key, _, value = line.partition("=")
            current[key] = value
    return out


def test_forged_records_in_an_image_grant_nothing(
    hostile: HostileImages, shared_store: Path, world_tmp: Path, root_fuse: None
) -> None:
    diff = hostile.forged_diff
    # The image really carries every forged form into root's podman store.
    for name, xattrs in _all_forged().items():
        for attr, value in xattrs.items():
            assert os.getxattr(f"{diff}{name}", attr, follow_symlinks=False) == value, (name, attr)

    done = make_shared_cli(shared_store, hostile, FORGED)
    assert done.returncode == 0, done.stderr[-3000:]
    dropped = json.loads(done.stdout)["layers"][0]["dropped_xattrs"]
    assert {a for x in _all_forged().values() for a in x} <= set(dropped), dropped

    # In the shared layer each forged entry has exactly one record: its real metadata's.
    layer = top_layer(shared_store, FORGED)
    for name in _all_forged():
        st = os.lstat(f"{diff}{name}")
        assert os.listxattr(f"{layer}{name}", follow_symlinks=False) == [OVERRIDE_XATTR], name
        record = parse_override(os.getxattr(f"{layer}{name}", OVERRIDE_XATTR))
        assert record == Override.from_stat(st.st_mode, st.st_uid, st.st_gid), name
    verify = subprocess.run([tool("cshare"), "verify", "--json", str(layer)],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout

    # Root's own podman on the image: the reference for what a container may get.
    reference = hostile.store.podman(
        "run", "--rm", "--network", "none", "--user", "1000:1000", FORGED, "/bin/sh", "-c", _script()
    ).stdout
    ref = _grants(reference)
    assert ref[REAL_SETUID]["euid"] == "0", reference  # the probe does detect a real setuid bit
    for probe in FORGED_PROBES:
        assert ref[probe] == {"euid": "1000", "capeff": "0", "open": "denied"}, reference

    # alice, through cshare, on the shared layer.
    alice = rootless_user("alice", world_tmp)
    mnt = user_dir(alice, world_tmp / "mnt")
    m, store = shlex.quote(str(mnt)), shlex.quote(str(shared_store))
    try:
        run = alice.sh(f"""
            set -e
            podman unshare {cshare_cmd()} mount {FORGED} {m} --store {store} >&2
            {shlex.join([*RUN, "--user", "1000:1000", "--rootfs", str(mnt), "/bin/sh", "-c", _script()])}
            podman unshare {cshare_cmd()} umount {m} >&2
        """, timeout=150)
    finally:
        kill_overlays_below([alice], world_tmp, [mnt])
    assert run.returncode == 0, run.stderr[-3000:]
    seen = _grants(run.stdout)
    for probe in FORGED_PROBES:
        assert seen[probe] == {"euid": "1000", "capeff": "0", "open": "denied"}, run.stdout
    assert f"{FORGED_DEVICE[0]}|1000|1000|644|regular empty file" in run.stdout
    # Everything the container saw is what root's podman shows.
    assert run.stdout == reference


def test_verify_reports_records_changed_after_publishing(
    hostile: HostileImages, shared_store: Path
) -> None:
    """make-shared keeps a digest of each layer's records; verify of a published layer compares it."""
    done = make_shared_cli(shared_store, hostile, FORGED)
    assert done.returncode == 0, done.stderr[-3000:]
    layer = top_layer(shared_store, FORGED)

    def verify() -> tuple[int, dict[str, object]]:
        run = subprocess.run([tool("cshare"), "verify", "--json", str(layer)],
                             capture_output=True, text=True)
        return run.returncode, json.loads(run.stdout)

    code, data = verify()
    assert code == 0 and data["ok"] and data["records_digest"], data
    # An ordinary user gets the same answer (the digest leaves out trusted.*, which only root reads).
    ensure_user("alice")
    as_alice = subprocess.run(["runuser", "-u", "alice", "--", tool("cshare"), "verify", "--json",
                               str(layer)], capture_output=True, text=True)
    assert as_alice.returncode == 0, as_alice.stdout + as_alice.stderr
    assert json.loads(as_alice.stdout)["records_digest"] == data["records_digest"]
    target = f"{layer}/forged/containers"
    honest = os.getxattr(target, OVERRIDE_XATTR)
    try:
        # A record changed after publishing, in the converted form: only the digest can tell.
        os.setxattr(target, OVERRIDE_XATTR, SETUID_ROOT.encode())
        code, data = verify()
        assert code == 1
        assert [(f["kind"], f["path"]) for f in data["findings"]] == [  # type: ignore[attr-defined]
            ("records-changed", ".")], data
        # The record moved under a name make-shared never writes.
        os.removexattr(target, OVERRIDE_XATTR)
        os.setxattr(target, "user.fuseoverlayfs.override_stat", honest)
        kinds = {(f["kind"], f["path"]) for f in verify()[1]["findings"]}  # type: ignore[attr-defined]
        assert kinds == {("records-changed", "."), ("mismatched-record", "forged/containers")}, kinds
    finally:
        for name in os.listxattr(target):
            os.removexattr(target, name)
        os.setxattr(target, OVERRIDE_XATTR, honest)
    assert verify()[0] == 0
