"""End to end: root runs `cshare make-shared`; alice and bob, after `cshare setup`, run plain `podman run IMAGE`.

The shared store is an additional image store of each user's podman, reached
through a read-only bind mount (as a network export would be), and podman
mounts each container with cshare-overlay as its mount_program.  Both users
work at the same time.  Expected owners and modes are those root built the
image with (native_support); the shared store is checksummed before and after.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import is_root, require
from mount_support import cshare_cmd, overlay_pids_below, store_checksum
from native_support import IMAGE, SECOND, NativeImages, PodmanUser, native_images, podman_user

__all__ = ["native_images"]

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.rootless, pytest.mark.podman,
              pytest.mark.slow]

STAT_FMT = "%n|%u|%g|%a|%F"
PROBES = {
    "/etc/secret": "0|0|600|regular file",
    "/root/private": "0|0|700|directory",
    "/var/www/index.html": "33|33|640|regular file",
    "/usr/bin/suid-probe": "0|0|4755|regular file",
    "/opt/null": "0|0|666|character special file",
    "/run/fifo": "0|0|640|fifo",
    "/etc/secret-link": "0|0|777|symbolic link",
}


@dataclass
class Shared:
    store: Path  # root's path
    ro: Path  # the read-only bind mount users are given
    users: dict[str, PodmanUser]


@pytest.fixture
def shared(native_images: NativeImages, world_tmp: Path, root_fuse: None) -> Iterator[Shared]:
    require(is_root(), "root (make-shared, a bind mount, two users)")
    store = world_tmp / "store"
    for image in (IMAGE, SECOND):
        done = subprocess.run([cshare_cmd(), "make-shared", image, "--storage-root",
                               str(native_images.store.root), "--store", str(store), "-q"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    ro = world_tmp / "ro-store"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(store), str(ro)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    users = {name: podman_user(name, world_tmp) for name in ("alice", "bob")}
    try:
        yield Shared(store, ro, users)
    finally:
        for user in users.values():
            user.stop()
        for pid in overlay_pids_below(world_tmp):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def _all(procs: dict[str, subprocess.Popen[str]], timeout: float = 240) -> dict[str, str]:
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{stderr}\n{stdout}"
        out[name] = stdout
    return out


def _flags(output: str) -> dict[str, str]:
    flags = {}
    for line in output.splitlines():
        if "=" in line and "|" not in line:
            key, _, value = line.partition("=")
            flags.setdefault(key.strip(), value.strip())
    return flags


def _user_script(name: str, ro: Path) -> str:
    store = shlex.quote(str(ro))
    as_root = "; ".join([
        f"stat -c '{STAT_FMT}' {' '.join(PROBES)}",
        "cat /etc/secret >/dev/null && echo root-secret=yes || echo root-secret=no",
        "ls /root/private | grep -qx note && echo root-private=yes || echo root-private=no",
        "test -e /etc/gone && echo gone=back || echo gone=gone",
        "ls -a /opt/d | tr '\\n' ' ' | sed 's/^/opaque=/'; echo",
        "ls -a / | grep -qx '[.][.]' && echo dotdot=yes || echo dotdot=no",
        f"echo {name} > /owner-{name} && echo wrote=yes",
        # copy-up keeps owner and mode; chmod/chown are what the next stat shows
        "echo more >> /var/www/index.html && echo copyup=$(stat -c %u:%g:%a /var/www/index.html)",
        "chmod 0604 /etc/secret && chown 33:33 /etc/secret && echo changed=$(stat -c %u:%g:%a /etc/secret)",
    ])
    as_www = "; ".join([
        "cat /var/www/index.html >/dev/null && echo www-own=yes || echo www-own=no",
        "cat /etc/secret >/dev/null 2>&1 && echo www-secret=yes || echo www-secret=no",
        "/usr/bin/suid-probe /etc/secret | sed 's/^/suid-/'",
        "/usr/bin/cap-probe /etc/secret | sed 's/^/cap-/'",
    ])
    return "\n".join([
        "set -e",
        f"cshare setup --store {store}",
        f"cshare setup --store {store} | sed 's/^/again: /'",
        "podman images --format 'image={{.Repository}}:{{.Tag}} ro={{.ReadOnly}}'",
        # cshare's own readers need no write access either (the store is mounted read-only)
        f"cshare images --store {store} --json >/dev/null && echo cshare-images=ok",
        f"cshare inspect {IMAGE} --store {store} >/dev/null && echo cshare-inspect=ok",
        f"podman run --rm {IMAGE}",
        f"podman run --rm --user 0 {IMAGE} {shlex.quote(as_root)}",
        f"podman run --rm {IMAGE} {shlex.quote(as_www)}",
        f"podman run --rm --userns=keep-id --user $(id -u) {IMAGE} 'echo keepid-uid=$(id -u)'",
        f"podman run --rm --userns=keep-id --user 0 {IMAGE} "
        "'cat /etc/secret >/dev/null && echo keepid-secret=yes; echo keepid-owner=$(stat -c %u /var/www/index.html)'",
        f"podman run --rm --user 0 --uidmap 0:1:1000 {IMAGE} "
        "'cat /etc/secret >/dev/null && echo uidmap-secret=yes; echo uidmap-owner=$(stat -c %u /var/www/index.html)'",
        # a one-id map: podman passes squash_to_uid=0,squash_to_gid=0
        f"podman run --rm --user 0 --uidmap 0:0:1 --gidmap 0:0:1 {IMAGE} "
        "'cat /etc/secret >/dev/null && echo squash-secret=yes; echo squash-owner=$(stat -c %u:%g /var/www/index.html)'",
        f"podman rmi {IMAGE} >/dev/null 2>&1 && echo rmi=removed || echo rmi=refused",
    ])


@pytest.mark.timeout(400)
def test_alice_and_bob_run_the_shared_image_with_plain_podman(shared: Shared, native_images: NativeImages) -> None:
    native = native_images
    before = store_checksum(shared.store)
    procs = {name: user.popen(["sh", "-c", _user_script(name, shared.ro)])
             for name, user in shared.users.items()}
    for name, output in _all(procs).items():
        user = shared.users[name]
        lines = output.splitlines()
        assert any(ln.startswith(f"{user.storage_conf}: added {shared.ro}") for ln in lines), output
        assert not any(ln.startswith("again: ") and "nothing changed" not in ln for ln in lines), output
        conf = user.storage_conf.read_text()
        assert "# alice's own storage settings" in conf and f"{user.base}/graph" in conf
        assert f"image={IMAGE} ro=true" in lines, output
        # The image's own entrypoint, cmd, env, workdir and user.
        cmd_at = lines.index("cmd-ran")
        assert lines[cmd_at + 1:cmd_at + 4] == ["33", "/var/www", "greeting=hello"], output
        stats = {ln.split("|", 1)[0]: ln.split("|", 1)[1] for ln in lines if ln.count("|") == 4}
        assert stats == PROBES, f"{name}: {stats}"
        flags = _flags(output)
        assert flags["root-secret"] == "yes" and flags["root-private"] == "yes", output
        assert flags["gone"] == "gone", f"{name}: a deleted file came back"
        assert flags["opaque"].split() == [".", "..", "new"], f"{name}: opaque dir shows {flags['opaque']}"
        assert flags["dotdot"] == "yes", f"{name}: readdir has no '..'"
        assert flags["copyup"] == "33:33:640" and flags["changed"] == "33:33:604", output
        assert flags["www-own"] == "yes" and flags["www-secret"] == "no", output
        assert flags["suid-euid"] == "0" and flags["suid-open"] == "ok", f"{name}: setuid not effective"
        assert flags["cap-euid"] == "33" and flags["cap-open"] == "ok", f"{name}: capability not effective"
        assert flags["keepid-uid"] == str(user.uid), output
        assert flags["keepid-secret"] == "yes" and flags["keepid-owner"] == "33", output
        assert flags["uidmap-secret"] == "yes" and flags["uidmap-owner"] == "33", output
        assert flags["squash-secret"] == "yes" and flags["squash-owner"] == "0:0", output
        assert flags["rmi"] == "refused"
        assert flags["cshare-images"] == "ok" and flags["cshare-inspect"] == "ok", output

    # podman image inspect as a user shows what root's podman shows in its own store.
    fmt = "{{json .Config}}|{{json .RootFS.Layers}}|{{.Digest}}|{{json .Labels}}"
    mine = native.store.inspect(IMAGE, fmt)
    for name, user in shared.users.items():
        theirs = user.run(["podman", "image", "inspect", "--format", fmt, IMAGE])
        assert theirs.returncode == 0, theirs.stderr
        assert theirs.stdout.strip() == mine, f"{name} sees another config than root"
    assert '"org.example.e2e":"yes"' in mine and '"WorkingDir":"/var/www"' in mine

    # A file written in one user's container: absent from the other's and from the store.
    for name, user in shared.users.items():
        done = user.run(["podman", "run", "--name", f"keep-{name}", "--user", "0", IMAGE,
                         f"echo {name} > /owner-{name}"])
        assert done.returncode == 0, done.stderr
    for name, user in shared.users.items():
        other = "bob" if name == "alice" else "alice"
        listing = user.run(["podman", "run", "--rm", IMAGE, "ls /"]).stdout.split()
        assert f"owner-{other}" not in listing and f"owner-{name}" not in listing
        # It is in the user's own upper layer, in the user's own graph root.
        assert [p.read_text() for p in (user.base / "graph" / "overlay").glob(f"*/diff/owner-{name}")] \
            == [f"{name}\n"]
    assert not any(p.name.startswith("owner-") for p in shared.store.rglob("owner-*"))

    # The shared store did not change: data, modes, owners, times, xattrs.
    after = store_checksum(shared.store)
    assert after.keys() == before.keys()
    assert [p for p in before if before[p] != after[p]] == []


def test_the_base_layer_is_stored_once(shared: Shared, native_images: NativeImages) -> None:
    records = {json.loads(p.read_text())["id"]: json.loads(p.read_text())
               for p in (shared.store / "images").glob("*.json")}
    first, second = records[native_images.image_id], records[native_images.second_id]
    assert first["layers"][-1] == second["layers"][-1]
    assert len(first["layers"]) == 2 and len(second["layers"]) == 2
    assert sorted(os.listdir(shared.store / "overlay")) == sorted({*first["layers"], *second["layers"], "l"})
    catalogue = json.loads((shared.store / "overlay-layers" / "layers.json").read_text())
    assert sorted(e["id"] for e in catalogue) == sorted({*first["layers"], *second["layers"]})


@pytest.mark.timeout(300)
def test_rm_of_an_image_a_running_container_uses_names_the_user(shared: Shared) -> None:
    alice = shared.users["alice"]
    assert alice.run(["cshare", "setup", "--store", str(shared.ro)]).returncode == 0
    started = alice.run(["podman", "run", "-d", "--name", "sleeper", "--user", "0", SECOND, "sleep 300"])
    assert started.returncode == 0, started.stderr
    refused = subprocess.run([cshare_cmd(), "rm", SECOND, "--store", str(shared.store)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "in use" in refused.stderr and "user alice" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert alice.run(["podman", "rm", "-f", "-t", "0", "sleeper"]).returncode == 0
    done = subprocess.run([cshare_cmd(), "rm", SECOND, "--store", str(shared.store)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    images = alice.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout.split()
    assert SECOND not in images and IMAGE in images


@pytest.mark.timeout(300)
def test_the_same_store_with_fuse_overlayfs_as_mount_program(shared: Shared) -> None:
    """What fuse-overlayfs shows of the store, and what only cshare-overlay shows (cshare-setup(1))."""
    require(shutil.which("fuse-overlayfs") is not None, "fuse-overlayfs (Debian package fuse-overlayfs)")
    bob = shared.users["bob"]
    done = bob.run(["cshare", "setup", "--store", str(shared.ro), "--mount-program",
                    shutil.which("fuse-overlayfs") or ""])
    assert done.returncode == 0, done.stderr
    script = "; ".join([
        f"stat -c '{STAT_FMT}' {' '.join(PROBES)}",
        "cat /etc/secret >/dev/null && echo root-secret=yes || echo root-secret=no",
        "test -e /etc/gone && echo gone=back || echo gone=gone",
    ])
    ran = bob.run(["podman", "run", "--rm", "--user", "0", IMAGE, script])
    assert ran.returncode == 0, ran.stderr
    stats = {ln.split("|", 1)[0]: ln.split("|", 1)[1] for ln in ran.stdout.splitlines() if ln.count("|") == 4}
    flags = _flags(ran.stdout)
    # What fuse-overlayfs supports: owners and modes of files and directories, deletions.
    for path in ("/etc/secret", "/root/private", "/var/www/index.html", "/usr/bin/suid-probe"):
        assert stats[path] == PROBES[path], (path, stats[path])
    assert flags["root-secret"] == "yes" and flags["gone"] == "gone"
    # What only cshare-overlay shows: the types of converted devices and fifos, symlinks as root's.
    assert stats["/run/fifo"] != PROBES["/run/fifo"] and stats["/opt/null"] != PROBES["/opt/null"]
    assert stats["/etc/secret-link"] != PROBES["/etc/secret-link"]
    caps = bob.run(["podman", "run", "--rm", IMAGE, "/usr/bin/cap-probe /etc/secret"])
    assert "open=ok" not in caps.stdout  # the capability make-shared set aside is not restored
