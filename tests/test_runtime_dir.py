"""cshare.system.runtime_dir: a user's /run/user/UID without state podman would wrongly trust.

CI once failed with "cannot set user namespace": /run is on disk there, and a
pause.pid from an earlier boot named a live process of the user in the host
namespace, which podman 4.3 then tried to join.  These tests make that state
and others like it for a user of their own (carol, so alice's and bob's
podman namespaces in other tests are left alone) and check what is removed,
what is kept, and that podman then works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import is_root, require
from mount_support import rootless_user
from podman_support import require_podman

from cshare.system.runtime_dir import (
    PAUSE_PID_FILE,
    has_processes,
    prepare_runtime_dir,
    runtime_dir_path,
)

pytestmark = [pytest.mark.root, pytest.mark.rootless]

USER = "carol"


class Carol:
    """carol as the other tests' users are made (mount_support), and her runtime dir."""

    def __init__(self, scratch: Path) -> None:
        self.user = rootless_user(USER, scratch, data_home=False)
        self.uid, self.gid = self.user.uid, self.user.gid
        self.runtime = runtime_dir_path(self.uid)
        self.popen, self.run = self.user.popen, self.user.run

    def end_every_process(self) -> None:
        """As at the end of a boot: no process of carol's is left."""
        subprocess.run(["pkill", "-KILL", "-u", USER], check=False)
        deadline = time.monotonic() + 10
        while has_processes(self.uid):
            assert time.monotonic() < deadline, "carol's processes outlived SIGKILL"
            time.sleep(0.05)

    def pause_pid_file(self) -> Path:
        return self.runtime / PAUSE_PID_FILE

    def make_pause_dir(self) -> Path:
        """RUNTIME/libpod/tmp, owned by carol as podman makes it."""
        path = self.runtime
        for part in PAUSE_PID_FILE.parts[:-1]:
            path = path / part
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, self.uid, self.gid)
        return path


@pytest.fixture
def carol(world_tmp: Path) -> Iterator[Carol]:
    require(is_root(), "root (to make another user's /run/user directory)")
    user = Carol(world_tmp)
    user.end_every_process()
    prepare_runtime_dir(user.uid, user.gid)
    yield user
    user.end_every_process()


@pytest.mark.podman
def test_a_pause_pid_naming_a_process_in_the_host_namespace_is_removed(carol: Carol) -> None:
    """The CI failure: without the removal podman exits with "cannot set user namespace"."""
    require_podman()
    host_process = carol.popen(["sleep", "60"])  # a pid reused since the boot that wrote the file
    try:
        carol.make_pause_dir()
        carol.pause_pid_file().write_text(str(host_process.pid))  # podman writes no newline
        prepare_runtime_dir(carol.uid, carol.gid)
        assert not carol.pause_pid_file().exists()
        done = carol.run(["podman", "unshare", "cat", "/proc/self/uid_map"])
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[:3] == ["0", str(carol.uid), "1"]
    finally:
        host_process.kill()
        host_process.wait()


@pytest.mark.podman
def test_a_live_pause_process_is_kept(carol: Carol) -> None:
    require_podman()
    done = carol.run(["podman", "unshare", "true"])
    assert done.returncode == 0, done.stderr
    pid = carol.pause_pid_file().read_text()
    before = os.readlink(f"/proc/{pid}/ns/user")
    prepare_runtime_dir(carol.uid, carol.gid)
    assert carol.pause_pid_file().read_text() == pid
    # The next podman joins the same namespace: mounts made in it stay visible.
    inside = carol.run(["podman", "unshare", "readlink", "/proc/self/ns/user"])
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() == before


def test_the_directory_of_a_user_with_no_process_left_is_made_anew(carol: Carol) -> None:
    marker = carol.runtime / "left-from-an-earlier-boot"
    marker.write_text("")
    carol.make_pause_dir()
    carol.pause_pid_file().write_text(str(os.getpid()))  # a live pid, not carol's
    prepare_runtime_dir(carol.uid, carol.gid)
    assert os.listdir(carol.runtime) == []
    st = os.stat(carol.runtime)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (carol.uid, carol.gid, 0o700)


@pytest.mark.timeout(30)
def test_a_pause_pid_that_is_not_a_plain_file_is_removed_unread(carol: Carol, world_tmp: Path) -> None:
    """Carol owns everything below her runtime dir; root must not block on her FIFO or
    follow her symlinks out of it."""
    sleeper = carol.popen(["sleep", "60"])  # carol is running: only the pid file is judged
    try:
        pause_dir = carol.make_pause_dir()
        os.mkfifo(carol.pause_pid_file())
        prepare_runtime_dir(carol.uid, carol.gid)  # a blocking open would hang here
        assert not carol.pause_pid_file().exists()

        elsewhere = world_tmp / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "pause.pid").write_text(str(sleeper.pid))
        carol.pause_pid_file().symlink_to(elsewhere / "pause.pid")
        prepare_runtime_dir(carol.uid, carol.gid)
        assert not os.path.lexists(carol.pause_pid_file())
        assert (elsewhere / "pause.pid").exists()

        # A symlinked directory on the way: nothing is removed through it.
        pause_dir.rmdir()
        pause_dir.symlink_to(elsewhere)
        (elsewhere / "pause.pid").write_text("1")
        prepare_runtime_dir(carol.uid, carol.gid)
        assert (elsewhere / "pause.pid").read_text() == "1"
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
