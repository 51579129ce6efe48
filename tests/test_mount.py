"""`cshare mount` / `cshare umount`: as an ordinary user inside `unshare`, as root, and their errors.

The user side runs as alice inside `unshare --map-auto --map-root-user
--mount`, which gives the same id mapping as `podman unshare` (machine-notes.md)
at a fraction of the cost; tests/test_e2e_podman.py covers podman itself.  The
expected owners and modes come from the image's original layer in podman's
store, never from a list in this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import is_root, require, unmount_all_below
from mount_support import (
    SharedDemo,
    cshare_cmd,
    kill_overlays_below,
    rootless_user,
    shared_demo,
    user_dir,
)
from podman_support import DEMO, PodmanImages, podman_images

from cshare.system.namespaces import in_user_namespace, is_identity_map, parse_id_map

__all__ = ["podman_images", "shared_demo"]  # fixtures used here, defined in the support modules

UNSHARE = ["unshare", "--map-auto", "--map-root-user", "--mount"]
PROBES = ["/etc/secret", "/root/private", "/var/www/index.html", "/usr/bin/su-demo", "/dev/null"]
STAT_FMT = "%n|%u|%g|%a|%F"


def _key(image_id: str, mnt: Path) -> str:
    return f"{image_id[:12]}-{hashlib.sha256(str(mnt).encode()).hexdigest()[:12]}"


def _original(podman_images: PodmanImages) -> dict[str, str]:
    """`uid|gid|mode|type` of each probe in the image's own (unconverted) layer."""
    diff = Path(podman_images.store.inspect(DEMO, "{{.GraphDriver.Data.UpperDir}}"))
    out = {}
    for p in PROBES:
        st = os.lstat(str(diff) + p)
        kind = {stat.S_IFDIR: "directory", stat.S_IFREG: "regular file",
                stat.S_IFCHR: "character special file"}[stat.S_IFMT(st.st_mode)]
        out[p] = f"{st.st_uid}|{st.st_gid}|{stat.S_IMODE(st.st_mode):o}|{kind}"
    # The image must hold the cases the test is about, or the comparison proves little.
    assert out["/etc/secret"].startswith("0|0|600|")
    assert out["/root/private"] == "0|0|700|directory"
    assert out["/var/www/index.html"].startswith("33|33|640|")
    assert out["/usr/bin/su-demo"].startswith("0|0|4755|")
    assert out["/dev/null"].endswith("character special file")
    return out


def _seen(output: str, mnt: Path) -> dict[str, str]:
    seen = {}
    for line in output.splitlines():
        if line.count("|") == 4:
            name, rest = line.split("|", 1)
            seen[name.removeprefix(str(mnt))] = rest
    return seen


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cshare: error: "), done.stderr
    return lines[0]


# ------------------------------------------------------------------ pure
def test_identity_map_means_the_initial_namespace() -> None:
    assert is_identity_map(parse_id_map("         0          0 4294967295\n"))
    assert not is_identity_map(parse_id_map("0 1001 1\n1 100000 65536\n"))
    assert not is_identity_map(parse_id_map("0 0 4294967294\n"))
    with pytest.raises(ValueError):
        parse_id_map("0 0\n")


@pytest.mark.parametrize("command", ["mount", "umount", "demo"])
def test_every_parameter_has_help(command: str) -> None:
    """The man pages are generated from the help texts: none may be missing."""
    import typer

    from cshare.cli.app import app

    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    assert click_command.help and len(click_command.help.split()) > 20
    for param in click_command.params:
        assert getattr(param, "help", None), f"{command}: {param.name} has no help text"


# ------------------------------------------------------------------ as alice
@pytest.fixture
def alice(world_tmp: Path, fuse: None):  # type: ignore[no-untyped-def]
    require(is_root(), "root (to act as the test user alice)")
    return rootless_user("alice", world_tmp)


@pytest.mark.root
@pytest.mark.rootless
@pytest.mark.timeout(60)
def test_namespace_detection(alice) -> None:  # type: ignore[no-untyped-def]
    probe = ("from cshare.system import namespaces as n; s = n.current(); "
             "print(n.in_user_namespace(), s.mount_problem())")
    inside = alice.run([*UNSHARE, sys.executable, "-c", probe])
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.split()[:2] == ["True", "None"]
    outside = alice.run([sys.executable, "-c", probe])
    assert outside.returncode == 0, outside.stderr
    if not in_user_namespace():  # the machine itself is not in a container's namespace
        assert outside.stdout.startswith("False ")
    assert "podman unshare" in outside.stdout


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.rootless
@pytest.mark.timeout(120)
def test_user_mounts_writes_and_remounts(
    alice, world_tmp: Path, shared_demo: SharedDemo, podman_images: PodmanImages  # type: ignore[no-untyped-def]
) -> None:
    """alice (default data dir under her home) sees original owners; her change survives a remount."""
    original = _original(podman_images)
    alice.data_home = None  # cshare's default: ~/.local/share/cshare
    mnt = user_dir(alice, world_tmp / "mnt")
    state = alice.home / ".local/share/cshare/mounts" / _key(shared_demo.image_id, mnt)
    cshare, store = cshare_cmd(), shlex.quote(str(shared_demo.store))
    m = shlex.quote(str(mnt))
    probes = " ".join(shlex.quote(str(mnt) + p) for p in PROBES)
    try:
        first = alice.run([*UNSHARE, "sh", "-c", f"""
            set -e
            {cshare} mount {DEMO} {m} --store {store}
            stat -c '{STAT_FMT}' {probes}
            cat {m}/etc/secret >/dev/null && echo read-secret:yes
            ls {m}/root/private >/dev/null && echo list-private:yes
            echo from-alice > {m}/alice-file
            test -f {state}/mount.json && echo record:yes
            {cshare} umount {m}
            grep -q " {m} " /proc/self/mountinfo && echo still-mounted || echo unmounted:yes
        """])
        assert first.returncode == 0, first.stderr
        assert _seen(first.stdout, mnt) == original
        for flag in ("read-secret", "list-private", "record", "unmounted"):
            assert f"{flag}:yes" in first.stdout.splitlines(), first.stdout
        assert (state / "upper" / "alice-file").read_text() == "from-alice\n"
        assert not (state / "mount.json").exists()  # umount dropped the record
        assert not any(state.joinpath("work").glob("*"))  # and emptied the scratch dir
        # The change lives in the upper layer, so a new mount (new namespace) sees it again.
        second = alice.run([*UNSHARE, "sh", "-c", f"""
            set -e
            {cshare} mount {DEMO} {m} --store {store}
            cat {m}/alice-file
            {cshare} umount {m}
        """])
        assert second.returncode == 0, second.stderr
        assert "from-alice" in second.stdout
        # Nothing of alice's reached the shared store.
        for layer in shared_demo.layers:
            assert not (layer / "alice-file").exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.rootless
@pytest.mark.timeout(120)
def test_user_mount_errors_are_one_line(
    alice, world_tmp: Path, shared_demo: SharedDemo  # type: ignore[no-untyped-def]
) -> None:
    cshare, store = cshare_cmd(), str(shared_demo.store)
    mnt = user_dir(alice, world_tmp / "mnt")

    def in_ns(*args: str) -> subprocess.CompletedProcess[str]:
        return alice.run([*UNSHARE, cshare, *args])

    outside = alice.run([cshare, "mount", DEMO, str(mnt), "--store", store])
    assert "podman unshare" in _one_line_error(outside)
    assert "no-such-image" in _one_line_error(in_ns("mount", "no-such-image", str(mnt), "--store", store))
    assert "no shared store" in _one_line_error(
        in_ns("mount", DEMO, str(mnt), "--store", str(world_tmp / "nostore")))
    assert "does not exist" in _one_line_error(
        in_ns("mount", DEMO, str(world_tmp / "missing"), "--store", store))
    full = user_dir(alice, world_tmp / "full")
    (full / "something").write_text("x")
    assert "not an empty directory" in _one_line_error(in_ns("mount", DEMO, str(full), "--store", store))
    busy = alice.run([*UNSHARE, "sh", "-c",
                      f"mount -t tmpfs tmp {shlex.quote(str(mnt))} && exec {cshare} mount {DEMO} "
                      f"{shlex.quote(str(mnt))} --store {shlex.quote(store)}"])
    assert "already mounted" in _one_line_error(busy)
    assert "together" in _one_line_error(
        in_ns("mount", DEMO, str(mnt), "--store", store, "--upper", str(world_tmp / "u")))
    assert "not mounted" in _one_line_error(in_ns("umount", str(mnt)))
    # None of the refusals left anything behind.
    assert alice.data_home is not None
    assert not any(alice.data_home.glob("cshare/mounts/*"))
    assert list(mnt.iterdir()) == []


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.rootless
@pytest.mark.timeout(120)
def test_bad_upper_or_work_is_one_line_naming_the_path(
    alice, world_tmp: Path, shared_demo: SharedDemo  # type: ignore[no-untyped-def]
) -> None:
    """Issue 12 point 5: --upper/--work alice cannot create or write, or an existing file."""
    cshare, store = cshare_cmd(), str(shared_demo.store)
    mnt = user_dir(alice, world_tmp / "mnt")
    roots = world_tmp / "roots"  # root's 0755 directory: not alice's, even as namespace root
    roots.mkdir(mode=0o755)
    afile = world_tmp / "a-file"
    afile.write_text("x")
    os.chown(afile, alice.uid, alice.gid)
    mine = user_dir(alice, world_tmp / "mine")
    cases = [
        (roots / "new" / "upper", mine / "work", "cannot be created", roots),
        (afile, mine / "work", "is not a directory", afile),
        (mine / "upper", roots / "work", "cannot be created", roots),
        (roots, mine / "work", "not writable by you", roots),
        (mine / "upper", afile / "work", "cannot be created", afile),
        (mine / "same", mine / "same", "both", mine / "same"),
    ]
    for upper, work, says, names in cases:
        done = alice.run([*UNSHARE, cshare, "mount", DEMO, str(mnt), "--store", store,
                          "--upper", str(upper), "--work", str(work)])
        line = _one_line_error(done)
        assert says in line and str(names) in line, (upper, work, line)
        # Nothing left behind: no state, no half-made directories, the mountpoint untouched.
        assert alice.data_home is not None
        assert not any(alice.data_home.glob("cshare/mounts/*")), line
        assert list(mine.iterdir()) == [] and list(roots.iterdir()) == [], line
        assert list(mnt.iterdir()) == []


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.rootless
@pytest.mark.timeout(60)
def test_unusable_dev_fuse_is_reported(alice, world_tmp: Path, shared_demo: SharedDemo) -> None:  # type: ignore[no-untyped-def]
    """A private mount namespace where /dev/fuse is a root-only node: alice gets a clear line."""
    node = world_tmp / "fuse-0600"
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(10, 229))
    mnt = user_dir(alice, world_tmp / "mnt")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in alice.env().items())
    inner = " ".join(shlex.quote(a) for a in [*UNSHARE, cshare_cmd(), "mount", DEMO, str(mnt),
                                              "--store", str(shared_demo.store)])
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount --bind {node} /dev/fuse && cd / && exec setpriv --reuid={alice.uid} "
         f"--regid={alice.gid} --clear-groups env -i {env} {inner}"],
        capture_output=True, text=True, timeout=60,
    )
    line = _one_line_error(done)
    assert "/dev/fuse" in line and "0600" in line


# ------------------------------------------------------------------ as root
@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_root_mounts_without_a_namespace(
    root_fuse: None, world_tmp: Path, shared_demo: SharedDemo, podman_images: PodmanImages
) -> None:
    """Root of the initial namespace needs no namespace; --upper/--work put the changes where asked."""
    original = _original(podman_images)
    mnt, upper, work = world_tmp / "mnt", world_tmp / "upper", world_tmp / "work"
    mnt.mkdir()
    env = dict(os.environ, XDG_DATA_HOME=str(world_tmp / "data"))
    try:
        done = subprocess.run(
            [cshare_cmd(), "mount", DEMO, str(mnt), "--store", str(shared_demo.store),
             "--upper", str(upper), "--work", str(work), "--debug", "--json"],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert (record["mountpoint"], record["upper"], record["work"]) == (str(mnt), str(upper), str(work))
        assert record["image_id"] == shared_demo.image_id
        assert record["lowers"] == [str(p) for p in shared_demo.layers]
        if not os.environ.get("CSHARE_OVERLAY_CMD"):
            assert "plugins=test" in done.stderr and "//test///" in done.stderr
        seen = subprocess.run(["stat", "-c", STAT_FMT, *(str(mnt) + p for p in PROBES)],
                              capture_output=True, text=True, check=True).stdout
        assert _seen(seen, mnt) == original
        (mnt / "etc" / "by-root").write_text("root was here\n")
        again = subprocess.run(
            [cshare_cmd(), "mount", DEMO, str(mnt), "--store", str(shared_demo.store)],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert "busy" in _one_line_error(again)
        off = subprocess.run([cshare_cmd(), "umount", str(mnt)], capture_output=True, text=True,
                             env=env, timeout=60)
        assert off.returncode == 0, off.stderr
        assert not os.path.ismount(mnt)
        assert (upper / "etc" / "by-root").read_text() == "root was here\n"
        assert work.is_dir()  # --work was given: cshare leaves the caller's directory alone
    finally:
        unmount_all_below(world_tmp)


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.rootless
@pytest.mark.timeout(90)
def test_second_namespace_cannot_mount_the_same_upper(
    alice, world_tmp: Path, shared_demo: SharedDemo  # type: ignore[no-untyped-def]
) -> None:
    """Two live mounts must never share one upper directory, even from different namespaces."""
    cshare, store = cshare_cmd(), shlex.quote(str(shared_demo.store))
    mnt = user_dir(alice, world_tmp / "mnt")
    m = shlex.quote(str(mnt))
    first = alice.popen(
        [*UNSHARE, "sh", "-c", f"{cshare} mount {DEMO} {m} --store {store} && echo ready && "
                               f"read answer && {cshare} umount {m}"],
        stdin=subprocess.PIPE,
    )
    try:
        assert first.stdout is not None and first.stdin is not None
        lines = [first.stdout.readline() for _ in range(2)]  # "mounted ...", then "ready"
        assert lines[-1] == "ready\n", lines
        second = alice.run([*UNSHARE, cshare, "mount", DEMO, str(mnt), "--store", str(shared_demo.store)])
        assert "another mount namespace" in _one_line_error(second)
        first.stdin.write("go\n")
        first.stdin.flush()
        _out, err = first.communicate(timeout=30)
        assert first.returncode == 0, err
        # Unmounted there, the same mount is allowed again.
        third = alice.run([*UNSHARE, "sh", "-c", f"{cshare} mount {DEMO} {m} --store {store} && "
                                                 f"{cshare} umount {m}"])
        assert third.returncode == 0, third.stderr
    finally:
        if first.poll() is None:
            first.kill()
        kill_overlays_below([alice], world_tmp, [mnt])


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.rootless
@pytest.mark.timeout(60)
def test_umount_refuses_while_another_namespace_uses_the_mount(
    alice, world_tmp: Path, shared_demo: SharedDemo  # type: ignore[no-untyped-def]
) -> None:
    """Like a running container: a child mount namespace holds the mount; umount must not pull it away."""
    cshare, store = cshare_cmd(), shlex.quote(str(shared_demo.store))
    mnt = user_dir(alice, world_tmp / "mnt")
    m = shlex.quote(str(mnt))
    ready = shlex.quote(str(user_dir(alice, world_tmp / "flags") / "holder-ready"))
    try:
        done = alice.run([*UNSHARE, "sh", "-c", f"""
            {cshare} mount {DEMO} {m} --store {store} || exit 9
            unshare --mount sh -c 'cat {m}/etc/secret >/dev/null && echo holder-read:yes &&
                                   touch {ready}; exec sleep 30' &
            holder=$!
            for i in $(seq 200); do [ -e {ready} ] && break; sleep 0.05; done
            {cshare} umount {m} 2>&1 && echo first-umount:ok
            kill $holder; wait $holder
            {cshare} umount {m} && echo second-umount:ok
        """])
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert "holder-read:yes" in lines
        assert "first-umount:ok" not in lines
        refusal = [ln for ln in lines if ln.startswith("cshare: error:")]
        assert len(refusal) == 1 and "busy" in refusal[0] and "another mount namespace" in refusal[0]
        assert "second-umount:ok" in lines
    finally:
        kill_overlays_below([alice], world_tmp, [mnt])


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.rootless
@pytest.mark.podman
@pytest.mark.timeout(120)
def test_rm_refuses_an_image_a_user_has_mounted(
    alice, world_tmp: Path, podman_images: PodmanImages  # type: ignore[no-untyped-def]
) -> None:
    """root's `cshare rm` sees alice's mount in her namespace and leaves her layers alone."""
    from cshare.store.make_shared import make_shared

    store = world_tmp / "rm-store"
    make_shared(DEMO, storage_root=podman_images.store.root, store_root=store)
    cshare = cshare_cmd()
    mnt = user_dir(alice, world_tmp / "mnt")
    m, s = shlex.quote(str(mnt)), shlex.quote(str(store))
    session = alice.popen([*UNSHARE, "sh", "-c", f"""
        {cshare} mount {DEMO} {m} --store {s} >/dev/null || exit 9
        echo mounted; read line
        cat {m}/etc/secret >/dev/null && echo still-reads:yes
        {cshare} umount {m}
    """], stdin=subprocess.PIPE)
    try:
        assert session.stdout is not None and session.stdout.readline() == "mounted\n"
        refused = subprocess.run([cshare, "rm", DEMO, "--store", str(store)],
                                 capture_output=True, text=True, timeout=60)
        line = _one_line_error(refused)
        assert "in use" in line and "user alice" in line and "cshare-overlay" in line, line
        listed = subprocess.run([cshare, "images", "--store", str(store), "--json"],
                                capture_output=True, text=True, timeout=60)
        assert DEMO in listed.stdout, "the refused rm removed the image anyway"
        out, err = session.communicate("go\n", timeout=60)
        assert session.returncode == 0, err
        assert "still-reads:yes" in out.splitlines()
        removed = subprocess.run([cshare, "rm", DEMO, "--store", str(store)],
                                 capture_output=True, text=True, timeout=60)
        assert removed.returncode == 0, removed.stderr
        assert os.listdir(store / "layers") == []
    finally:
        if session.poll() is None:
            session.kill()
        kill_overlays_below([alice], world_tmp, [mnt])

