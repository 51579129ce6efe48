"""End to end with real podman: root shares the demo image, alice and bob run containers on it at once.

Root has built and imported the demo image (podman_support) and made it
shared (mount_support.shared_demo).  Then alice and bob, two real users, each
at the same time: `podman unshare cshare mount`, `podman run --rootfs` as
container root and as uid 33, a second run to look for the other's file, and
`podman unshare cshare umount`.  `podman unshare` joins the user's long-lived
podman namespaces (the pause process keeps them), so a mount made in one
`podman unshare` is there for the next `podman run` and `podman unshare`.

Expected owners and modes come from the image's original layer in root's
podman store.  The shared store is checksummed (content and metadata of every
entry) before and after.  `cshare demo` is run here too, as root, and must be
refused to anyone else.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import is_root, require
from mount_support import (
    RootlessUser,
    SharedDemo,
    cshare_cmd,
    kill_overlays_below,
    rootless_user,
    shared_demo,
    store_checksum,
    user_dir,
)
from podman_support import DEMO, PodmanImages, podman_images, require_podman

__all__ = ["podman_images", "shared_demo"]  # fixtures used here, defined in the support modules

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.rootless, pytest.mark.podman,
              pytest.mark.slow]

PROBES = ["/etc/secret", "/root/private", "/var/www/index.html", "/usr/bin/su-demo"]
STAT_FMT = "%n|%u|%g|%a|%F"
RUN = ["podman", "run", "--rm", "--network", "none", "--runtime", "runc"]


def _original(podman_images: PodmanImages) -> dict[str, str]:
    diff = Path(podman_images.store.inspect(DEMO, "{{.GraphDriver.Data.UpperDir}}"))
    out = {}
    for p in PROBES:
        st = os.lstat(str(diff) + p)
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "regular file"
        out[p] = f"{st.st_uid}|{st.st_gid}|{stat.S_IMODE(st.st_mode):o}|{kind}"
    assert out["/etc/secret"] == "0|0|600|regular file"
    assert out["/root/private"] == "0|0|700|directory"
    assert out["/var/www/index.html"] == "33|33|640|regular file"
    assert out["/usr/bin/su-demo"] == "0|0|4755|regular file"
    return out


def _parse(output: str) -> tuple[dict[str, str], dict[str, str]]:
    """(stat lines by path, `key:value` flags) from a container's output."""
    stats, flags = {}, {}
    for line in output.splitlines():
        if line.count("|") == 4:
            name, rest = line.split("|", 1)
            stats[name] = rest
        elif ":" in line:
            key, _, value = line.partition(":")
            flags[key.strip()] = value.strip()
    return stats, flags


def _all(procs: dict[str, subprocess.Popen[str]], timeout: float = 120) -> dict[str, str]:
    """Wait for every user's process; each must succeed; their stdout by user."""
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{stderr}\n{stdout}"
        out[name] = stdout
    return out


@pytest.fixture
def two_users(world_tmp: Path, root_fuse: None) -> Iterator[dict[str, tuple[RootlessUser, Path]]]:
    require_podman()
    require(is_root(), "root (to act as alice and bob)")
    users = {}
    for name in ("alice", "bob"):
        user = rootless_user(name, world_tmp)
        users[name] = (user, user_dir(user, world_tmp / f"mnt-{name}"))
    try:
        yield users
    finally:
        kill_overlays_below([u for u, _ in users.values()], world_tmp,
                            [m for _, m in users.values()])


@pytest.mark.timeout(170)
def test_alice_and_bob_share_one_image(
    two_users: dict[str, tuple[RootlessUser, Path]],
    shared_demo: SharedDemo,
    podman_images: PodmanImages,
) -> None:
    original = _original(podman_images)
    before = store_checksum(shared_demo.store)
    cshare, store = cshare_cmd(), shlex.quote(str(shared_demo.store))

    # 1. Both at once: mount, run as container root and as uid 33, write a file.
    procs = {}
    for name, (user, mnt) in two_users.items():
        m = shlex.quote(str(mnt))
        inside_root = "; ".join([
            f"stat -c '{STAT_FMT}' {' '.join(PROBES)}",
            "cat /etc/secret >/dev/null && echo read-secret:yes || echo read-secret:no",
            "ls /root/private | grep -qx note && echo list-private:yes || echo list-private:no",
            f"echo {name} > /owner-{name} && echo wrote:yes",
            "id -u | sed 's/^/uid:/'",
        ])
        inside_www = "; ".join([
            "cat /var/www/index.html >/dev/null && echo www-read:yes || echo www-read:no",
            "cat /etc/secret >/dev/null 2>&1 && echo www-secret:yes || echo www-secret:no",
            "id -u | sed 's/^/www-uid:/'",
        ])
        procs[name] = user.popen(["sh", "-c", f"""
            set -e
            podman unshare {cshare} mount {DEMO} {m} --store {store}
            {shlex.join([*RUN, "--rootfs", str(mnt), "/bin/sh", "-c", inside_root])}
            {shlex.join([*RUN, "--user", "33:33", "--rootfs", str(mnt), "/bin/sh", "-c", inside_www])}
        """])
    first = _all(procs)
    for name, output in first.items():
        stats, flags = _parse(output)
        assert stats == original, f"{name} saw other owners or modes: {output}"
        assert flags.get("uid") == "0" and flags.get("www-uid") == "33", output
        assert flags.get("read-secret") == "yes", f"{name}: container root cannot read /etc/secret"
        assert flags.get("list-private") == "yes", f"{name}: container root cannot list /root/private"
        assert flags.get("www-read") == "yes", f"{name}: uid 33 cannot read its own file"
        assert flags.get("www-secret") == "no", f"{name}: uid 33 read root's 0600 file"
        assert flags.get("wrote") == "yes"

    # 2. Both at once, each in a new container: its own file is there, the other's is not.
    procs = {
        name: user.popen([*RUN, "--rootfs", str(mnt), "/bin/sh", "-c", "ls /"])
        for name, (user, mnt) in two_users.items()
    }
    listings = {name: out.split() for name, out in _all(procs).items()}
    assert "owner-alice" in listings["alice"] and "owner-bob" not in listings["alice"]
    assert "owner-bob" in listings["bob"] and "owner-alice" not in listings["bob"]
    for name, (user, _mnt) in two_users.items():
        assert user.data_home is not None
        uppers = list(user.data_home.glob("cshare/mounts/*/upper"))
        assert len(uppers) == 1
        assert (uppers[0] / f"owner-{name}").read_text() == f"{name}\n"
        assert not any(uppers[0].glob("owner-alice" if name == "bob" else "owner-bob"))

    # 3. Both at once: unmount; the mount is gone from their podman namespace.
    procs = {
        name: user.popen(["sh", "-c", f"podman unshare {cshare} umount {shlex.quote(str(mnt))} && "
                          f"podman unshare cat /proc/self/mountinfo"])
        for name, (user, mnt) in two_users.items()
    }
    for name, mountinfo in _all(procs).items():
        assert f" {two_users[name][1]} " not in mountinfo

    # The shared store did not change, not one byte or mode or timestamp.
    after = store_checksum(shared_demo.store)
    assert after.keys() == before.keys()
    changed = [path for path in before if before[path] != after[path]]
    assert changed == []


@pytest.mark.timeout(170)
def test_cshare_demo(world_tmp: Path, root_fuse: None) -> None:
    """The README's main command: every check passes, and it leaves no directory behind."""
    require_podman()
    rootless_user("alice", world_tmp)  # the demo's user exists with a subordinate id range
    demos_before = set(Path("/var/tmp").glob("cshare-demo-*"))
    done = subprocess.run([cshare_cmd(), "demo", "--json"], capture_output=True, text=True,
                          timeout=110)
    assert done.returncode == 0, done.stderr + done.stdout
    result = json.loads(done.stdout)
    assert result["ok"] is True
    rows = {row["item"]: row for row in result["rows"]}
    assert rows["/etc/secret"]["with_cshare"] == rows["/etc/secret"]["host"] == "0600 0:0"
    assert rows["/usr/bin/su-demo"]["with_cshare"] == "4755 0:0"
    assert all(row["ok"] for row in result["rows"]), result["rows"]
    assert set(Path("/var/tmp").glob("cshare-demo-*")) == demos_before

    # The table form, as a person runs it: ends with the ✓ summary line.
    table = subprocess.run([cshare_cmd(), "demo"], capture_output=True, text=True, timeout=110,
                           env=dict(os.environ, COLUMNS="100"))
    assert table.returncode == 0, table.stderr + table.stdout
    summary = [ln for ln in table.stdout.splitlines() if "checks passed" in ln or "failed" in ln]
    total = len(result["rows"])
    assert summary and summary[0].startswith(f"✓ {total}/{total} checks passed"), table.stdout
    assert "✗" not in table.stdout

    # Anyone but root gets one line saying so.
    refused = rootless_user("bob", world_tmp).run([cshare_cmd(), "demo"])
    assert refused.returncode != 0
    assert refused.stderr.strip().startswith("cshare: error: cshare demo must run as root")
