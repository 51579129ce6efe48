"""`cshare setup`: a user's (or the system's) storage.conf made to use the shared store.

The edits are checked on real files (comments, other settings and order kept,
idempotent, --undo exact, --dry-run inert, a file that does not parse never
rewritten); the pre-flight checks as a real user, through the command.  That
podman then really runs images this way is test_podman_native.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ensure_user, is_root, require, tool

from cshare.errors import CshareError
from cshare.podman import checks
from cshare.podman.setup import setup, undo
from cshare.podman.storageconf import configure_storage
from cshare.store.shared import SharedStore

USER_FILE = """# my own settings: keep them
[storage]
driver = "overlay"   # the driver I use
graphroot = "/home/me/graph"

[storage.options]
additionalimagestores = ["/srv/other-store"]
pull_options = {enable_partial_images = "false"}

[storage.options.overlay]
mountopt = "nodev"
mount_program = "/usr/bin/fuse-overlayfs"
"""


def test_configure_keeps_every_other_setting_and_is_idempotent(tmp_path: Path) -> None:
    conf = tmp_path / "storage.conf"
    conf.write_text(USER_FILE)
    change = configure_storage(conf, "/var/lib/cshare", "/usr/local/bin/cshare-overlay")
    assert change.added_store == "/var/lib/cshare"
    assert change.mount_program == ("/usr/bin/fuse-overlayfs", "/usr/local/bin/cshare-overlay")
    text = conf.read_text()
    for kept in ("# my own settings: keep them", '# the driver I use', 'graphroot = "/home/me/graph"',
                 'mountopt = "nodev"', "enable_partial_images"):
        assert kept in text
    import tomllib

    doc = tomllib.loads(text)
    assert doc["storage"]["options"]["additionalimagestores"] == ["/srv/other-store", "/var/lib/cshare"]
    assert doc["storage"]["options"]["overlay"]["mount_program"] == "/usr/local/bin/cshare-overlay"
    again = configure_storage(conf, "/var/lib/cshare", "/usr/local/bin/cshare-overlay")
    assert not again.changed and conf.read_text() == text


@pytest.mark.parametrize("body", ["[storage\ndriver = 1\n", 'a = "unterminated\n', "[storage]\nx = = 1\n"])
def test_a_file_that_does_not_parse_is_never_rewritten(tmp_path: Path, body: str) -> None:
    conf = tmp_path / "storage.conf"
    conf.write_text(body)
    with pytest.raises(CshareError, match="not valid TOML.*nothing was changed") as info:
        configure_storage(conf, "/var/lib/cshare", "/x")
    assert "\n" not in str(info.value)
    assert conf.read_text() == body and os.listdir(tmp_path) == ["storage.conf"]


def test_another_driver_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "storage.conf"
    conf.write_text('[storage]\ndriver = "vfs"\n')
    with pytest.raises(CshareError, match='driver = "vfs"'):
        configure_storage(conf, "/var/lib/cshare", "/x")
    assert conf.read_text() == '[storage]\ndriver = "vfs"\n'


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """A readable shared store and podman configuration files, in a directory users can reach."""
    require(is_root(), "root (a shared store is root-owned)")
    base = Path(tempfile.mkdtemp(prefix="cshare-setup-", dir="/var/tmp"))
    base.chmod(0o755)
    store = base / "store"
    with SharedStore(store).write_lock():
        SharedStore(store).sync_catalogues()
    containers = base / "containers.conf"
    containers.write_text('[containers]\nnetns = "none"\n')
    containers.chmod(0o644)
    paths = {"store": store, "conf": base / "storage.conf", "config": base / "config",
             "containers": containers, "base": base}
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(paths["conf"]))
    monkeypatch.setenv("CONTAINERS_CONF", str(containers))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(paths["config"]))
    yield paths
    shutil.rmtree(base, ignore_errors=True)


def test_setup_then_undo_restores_the_file_exactly(env: dict[str, Path]) -> None:
    env["conf"].write_text(USER_FILE)
    first = setup(env["store"], mount_program="/usr/bin/true")
    assert first.change.added_store == str(env["store"])
    assert any("additionalimagestores" in line for line in first.change.lines())
    assert not setup(env["store"], mount_program="/usr/bin/true").change.changed
    dry = undo(env["store"], dry_run=True)
    assert dry.diff and str(env["store"]) in "\n".join(dry.diff)
    assert str(env["store"]) in env["conf"].read_text()  # a dry run changes nothing
    done = undo(env["store"])
    assert done.change.removed_store == str(env["store"])
    assert env["conf"].read_text() == USER_FILE  # the old mount program is back, nothing else moved
    assert not (env["config"] / "cshare" / "setup.json").exists()
    assert "nothing to undo" in undo(env["store"]).change.lines()[0]


def test_setup_of_a_new_file_and_undo_removes_it(env: dict[str, Path]) -> None:
    dry = setup(env["store"], dry_run=True, mount_program="/usr/bin/true")
    assert not env["conf"].exists() and any("additionalimagestores" in ln for ln in dry.diff)
    setup(env["store"], mount_program="/usr/bin/true")
    assert 'driver = "overlay"' in env["conf"].read_text()
    undo(env["store"])
    assert not env["conf"].exists()


def test_system_setup_edits_the_system_file(env: dict[str, Path]) -> None:
    # --system edits the file podman reads for every user ($CONTAINERS_STORAGE_CONF here,
    # /etc/containers/storage.conf on a real machine).
    result = setup(env["store"], system=True, mount_program="/usr/bin/true")
    assert result.change.path == env["conf"] and str(env["store"]) in env["conf"].read_text()
    undo(env["store"], system=True)
    assert not env["conf"].exists()


def test_root_without_system_is_told_what_to_do(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONTAINERS_STORAGE_CONF")
    with pytest.raises(CshareError, match="--system"):
        setup(env["store"])


def test_network_check_names_the_fix(tmp_path: Path) -> None:
    empty = tmp_path / "containers.conf"
    empty.write_text("[engine]\n")
    problem = checks.check_network(which=lambda _n: None, files=[empty])
    assert problem is not None and 'netns = "none"' in problem and str(empty) in problem
    empty.write_text('[containers]\nnetns = "none"\n')
    assert checks.check_network(which=lambda _n: None, files=[empty]) is None
    assert checks.check_network(which=lambda n: f"/usr/bin/{n}", files=[]) is None


@pytest.mark.rootless
def test_preflight_problems_are_one_line_and_change_nothing(env: dict[str, Path]) -> None:
    alice = ensure_user("alice")
    home = env["base"] / "alice"
    home.mkdir()
    os.chown(home, alice.pw_uid, alice.pw_gid)
    user_env = {"HOME": str(home), "PATH": os.environ["PATH"], "XDG_CONFIG_HOME": str(home / "cfg"),
                "CONTAINERS_CONF": str(env["containers"])}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("cshare"), "setup", *args], capture_output=True, text=True,
                              user=alice.pw_uid, group=alice.pw_gid, extra_groups=[], env=user_env,
                              timeout=60)

    store = env["store"]
    store.chmod(0o700)
    try:
        refused = run("--store", str(store))
    finally:
        store.chmod(0o755)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "not readable by you" in lines[0] and "chmod" in lines[0], refused.stderr
    assert not (home / "cfg").exists()

    (home / "no-netns.conf").write_text("[engine]\n")
    user_env["CONTAINERS_CONF"] = str(home / "no-netns.conf")
    if shutil.which("slirp4netns") is None and shutil.which("pasta") is None:
        refused = run("--store", str(store))
        assert refused.returncode == 1 and "netns" in refused.stderr and "slirp4netns" in refused.stderr
        assert not (home / "cfg").exists()
    user_env["CONTAINERS_CONF"] = str(env["containers"])
    done = run("--store", str(store))
    assert done.returncode == 0, done.stderr
    assert "added" in done.stdout and (home / "cfg" / "containers" / "storage.conf").is_file()


def test_an_old_podman_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "podman"
    fake.write_text("#!/bin/sh\necho 'podman version 3.4.4'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    problem = checks.check_podman()
    assert problem is not None and "3.4.4 is too old" in problem
    fake.write_text("#!/bin/sh\necho 'podman version 4.3.1'\n")
    assert checks.check_podman() is None
