"""The mount server's rules (cshare_fuse.server), with real mounts, users and namespaces.

Each scenario runs tests/mount_server_scenario.py inside a namespace of its
own (a new mount namespace for root; alice's and bob's user namespaces as
podman gives them), so the server it finds is the one it started:

- mounts after the first are forked by one server; their daemons are
  distinct processes showing their own command lines;
- SIGKILL of one mount's daemon leaves the other mounts and the server serving;
- the server keeps one spare forked ahead, which becomes the next mount's
  daemon and is replaced (also when killed: the server then forks for the
  request), and leaves with the server; the server works in /;
- what the server leaves to a direct start (a warning, an error) shows the
  same messages;
- umount and fusermount3 -u end a daemon as before; the idle server exits
  and its mounts keep serving;
- two users never share a server: bob squatting alice's socket name gets no
  request and alice still mounts; bob's request to alice's server is refused
  and forks nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ensure_user, make_fuse_usable_for_users, require

from cshare_fuse import server

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.rootless, pytest.mark.timeout(180)]

SCENARIO = str(Path(__file__).with_name("mount_server_scenario.py"))


def in_namespace(user: str | None, step: str, base: Path, timeout: float = 120) -> subprocess.Popen[str]:
    """Start the scenario `step` as `user` (None: root) in a namespace of its own."""
    ns = ["unshare", "--mount", "--propagation", "private"]
    if user is not None:
        ns = ["runuser", "-u", user, "--", "unshare", "--map-root-user", "--mount"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSHARE_OVERLAY")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return subprocess.Popen([*ns, sys.executable, SCENARIO, step, str(base)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def result(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"scenario failed: {err[-2000:]}"
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return data


@pytest.fixture
def shared_base(world_tmp: Path) -> Path:
    """A directory alice and bob can both use, with a root-owned lower layer."""
    require(os.geteuid() == 0, "root")
    base = world_tmp / "base"
    (base / "lower").mkdir(parents=True)
    (base / "lower" / "f").write_text("lower\n")
    base.chmod(0o1777)
    make_fuse_usable_for_users()
    subprocess.run(["chmod", "-R", "a+rX", str(Path(__file__).resolve().parent.parent)], check=True)
    return base


def check_lifecycle(out: dict[str, Any]) -> None:
    everything_ok = {k: v for k, v in out.items() if k.startswith("mount")}
    assert set(everything_ok.values()) == {"ok"}, everything_ok
    assert out["server_started"]
    assert out["daemon1_forked_by_server"] is False  # the first mount started the server, and mounted itself
    assert out["server_cwd"] == "/"
    # The spare: forked ahead by the server, it serves the next mount and is replaced,
    # also when it was killed, and it leaves with the server.
    assert out["one_spare_waits"] and out["spare_is_the_servers"]
    assert out["spare_became_daemon_two"] and out["a_new_spare_waits"]
    assert out["spare_back_after_kill"]
    assert out["spare_leaves_with_server"]
    # The client hands the mount over before it imports main and the option parser.
    assert out["verbose_mount"] == 0
    assert out["client_imports"] == ["cshare_fuse", "cshare_fuse.server"]
    # Left to a direct start: the same warning and error as without a server.
    assert out["warned_mount"] == "ok; cshare-overlay: warning: unknown option 'no_such_option' ignored"
    assert out["refused_mount"].startswith("exit 1: cshare-overlay: error: lowerdir ")
    assert "does not exist" in out["refused_mount"]
    assert out["forked_by_server"] == {"two": True, "three": True, "four": True}
    assert out["distinct_daemons"]
    assert out["reads"] == {"one": "lower", "two": "lower", "three": "lower", "four": "lower"}
    assert out["cmdline_names_lowerdir"] and out["cmdline_exact"]
    assert out["killed_mount_reads"].startswith("error")  # ENOTCONN: that mount is dead
    assert out["after_kill_reads"] == {"one": "lower", "three": "lower"}
    assert out["server_alive_after_kill"]
    assert out["five_forked_by_server"] and out["five_reads"] == "lower"
    assert out["umount_daemon_exits"] and out["fusermount_daemon_exits"] and out["unmounted"]
    assert out["server_exits_when_idle"]
    assert out["after_idle_reads"] == {"four": "lower", "five": "lower"}
    assert out["six_reads"] == "lower"


def test_root_mounts_share_a_server_and_survive_each_other(shared_base: Path) -> None:
    check_lifecycle(result(in_namespace(None, "lifecycle", shared_base)))


def test_user_namespace_mounts_share_a_server_and_survive_each_other(shared_base: Path) -> None:
    ensure_user("alice")
    check_lifecycle(result(in_namespace("alice", "lifecycle", shared_base)))


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


SQUATTER = r"""
import os, socket, sys, time, json
base = sys.argv[1]
name = open(base + "/name", "rb").read()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(name)
s.listen(8)
s.settimeout(0.2)
open(base + "/squatting", "w").write(str(os.getpid()))
received = connections = 0
while not os.path.exists(base + "/done"):
    try:
        c, _ = s.accept()
    except TimeoutError:
        continue
    connections += 1
    c.settimeout(2)
    try:
        while (chunk := c.recv(65536)):
            received += len(chunk)
    except OSError:
        pass
    c.close()
print(json.dumps({"connections": connections, "received": received}))
"""

INTRUDER = r"""
import json, os, socket, sys
from cshare_fuse import server
base = sys.argv[1]
name = open(base + "/name", "rb").read()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(name)
mnt = base + "/stolen"
os.makedirs(mnt, exist_ok=True)
args = ["-o", f"lowerdir={base}/lower", mnt]
try:  # the server may refuse before it reads anything: then this fails with EPIPE
    s.sendall(server.encode_request(server.installation(), os.getcwdb(), b"x\0", args, {}))
    s.shutdown(socket.SHUT_WR)
except OSError:
    pass
answer = b""
try:
    while (chunk := s.recv(4096)):
        answer += chunk
except OSError as exc:
    answer += f" [{exc}]".encode()
open(base + "/done", "w").write("")
print(json.dumps({"answer": answer.decode(errors="replace")}))
"""


def as_bob(script: str, base: Path, userns: bool) -> subprocess.Popen[str]:
    ensure_user("bob")
    ns = ["unshare", "--map-root-user", "--mount"] if userns else []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.Popen(["runuser", "-u", "bob", "--", *ns, sys.executable, "-c", script, str(base)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_squatter_on_the_name_gets_nothing_and_the_user_still_mounts(shared_base: Path) -> None:
    ensure_user("alice")
    victim = in_namespace("alice", "squatted", shared_base)
    wait_for(shared_base / "name")
    squatter = as_bob(SQUATTER, shared_base, userns=False)
    out = result(victim)
    seen = result(squatter)
    assert out["mount"] == "ok" and out["reads"] == "lower"
    assert out["daemon_is_ours"] and out["daemon_not_from_squatter"]
    assert seen["connections"] >= 1  # alice's client did find the name taken ...
    assert seen["received"] == 0  # ... and told the stranger nothing


@pytest.mark.parametrize("userns", [False, True], ids=["bob", "bob-in-his-user-namespace"])
def test_another_users_request_is_refused_and_forks_nothing(shared_base: Path, userns: bool) -> None:
    ensure_user("alice")
    owner = in_namespace("alice", "serve_and_wait", shared_base)
    wait_for(shared_base / "served")
    intruder = as_bob(INTRUDER, shared_base, userns)
    seen = result(intruder)
    out = result(owner)
    assert out["mount1"] == "ok" and out["server_started"]
    assert not seen["answer"].startswith("+"), seen
    assert "another user" in seen["answer"]
    assert out["daemons_after"] == out["daemons_before"] == 1


def test_request_encoding_round_trips_and_rejects_garbage() -> None:
    env = {b"A": b"1", b"B": b"x=y"}
    data = server.encode_request(b"inst", b"/cwd", b"p\0-o\0x\0", ["-o", "lowerdir=/a", "/m"], env)
    assert server.decode_request(data) == (b"inst", b"/cwd", b"p\0-o\0x\0", ["-o", "lowerdir=/a", "/m"], env)
    for bad in (b"", b"garbage", data[:-1], data + b"1\nx", b"5\nabc"):
        with pytest.raises(server.Refused):
            server.decode_request(bad)


def test_the_warm_up_leaves_no_thread_descriptor_or_signal_handler_behind(tmp_path: Path) -> None:
    """The server runs trio and a daemon's first steps once before forking
    (server.warm_up_trio, main._warm_up), and each spare rehearses the
    latter (main._rehearse); the fork rules hold only if that leaves the
    process as it found it, and the scratch trees go.  The rehearsal keeps
    nothing of what it built."""
    probe = """
import json, os, signal, threading
from cshare_fuse import main, server

def state():
    handlers = {s: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    return {"threads": threading.active_count(), "fds": sorted(os.listdir("/proc/self/fd")),
            "handlers": handlers, "wakeup": signal.set_wakeup_fd(-1)}

before = state()
server.warm_up_trio()
main._warm_up()
# What the overlay answered: the scratch tree's directory and file.
kinds = sorted(oct(a.st_mode >> 12) for a in main._warmed_up[2])
kept = len(main._warmed_up)
main._rehearse()
print(json.dumps({"before": before, "after": state(), "kinds": kinds,
                  "kept": kept, "kept_after_rehearsal": len(main._warmed_up)}))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["after"] == result["before"]
    assert result["after"]["threads"] == 1
    assert result["kinds"] == ["0o10", "0o4", "0o4", "0o4"]  # the file; the root, and dir twice
    assert result["kept_after_rehearsal"] == result["kept"] == 3
    assert list(tmp_path.iterdir()) == []


def test_the_server_leaves_to_a_direct_start_what_a_direct_start_prints_for(tmp_path: Path) -> None:
    """main._servable: the server takes a plain mount, and declines (so that the
    client mounts itself and prints what it prints) errors, warnings, -f and
    the options only libfuse's fusermount3 mounts."""
    from cshare_fuse.main import _servable

    plain = ["-o", f"lowerdir={tmp_path},upperdir={tmp_path}/u,workdir={tmp_path}/w", str(tmp_path / "m")]
    assert _servable(plain) is None
    assert _servable(["-f", *plain]) is not None
    assert _servable(["-o", "no_such_option", *plain]) is not None
    assert _servable(["-o", "auto_unmount", *plain]) is not None
    assert _servable([str(tmp_path / "m")]) is not None  # no lowerdir: an error
