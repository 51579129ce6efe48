"""Run inside a fresh mount (and user) namespace by tests/test_mount_server.py.

`python mount_server_scenario.py STEP BASE`: does one scenario with the real
cshare-overlay in this namespace and prints what it saw as one JSON object.
The namespace is new, so the mount server found here is the one this scenario
started, and nothing it mounts is visible outside.  Every mount is unmounted
before the script ends, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OVERLAY = str(Path(sys.executable).parent / "cshare-overlay")


def own_ns(pid: int | str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return False


def cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return []


def servers() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and own_ns(p)
            and cmdline(int(p))[:1] == [b"cshare-overlay: mount server"]]


def spares() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and own_ns(p)
            and cmdline(int(p))[:1] == [b"cshare-overlay: mount server (spare)"]]


def daemon_of(mnt: Path) -> int | None:
    needle = os.fsencode(str(mnt))
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid() and own_ns(p) and needle in cmdline(int(p)) \
                and os.path.exists(f"/proc/{p}/fd"):
            fds = os.listdir(f"/proc/{p}/fd")
            if any(_link(f"/proc/{p}/fd/{fd}") == "/dev/fuse" for fd in fds):
                return int(p)
    return None


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def daemons() -> list[int]:
    """Processes of this namespace holding /dev/fuse."""
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        if own_ns(p):
            try:
                fds = os.listdir(f"/proc/{p}/fd")
            except OSError:
                continue
            if any(_link(f"/proc/{p}/fd/{fd}") == "/dev/fuse" for fd in fds):
                found.append(int(p))
    return found


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def wait(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def mounted(mnt: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mnt) for line in f)


def mount(base: Path, name: str, env: dict[str, str], extra: str = "",
          lower: Path | None = None) -> tuple[Path, str]:
    """Mount `name`; "ok", "ok; " and what it printed, or its exit code and what it printed."""
    d = base / name
    for sub in ("upper", "work", "mnt"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([OVERLAY, "-o", f"lowerdir={lower or base / 'lower'},upperdir={d}/upper,"
                           f"workdir={d}/work{extra}", str(d / "mnt")],
                          env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode:
        return d / "mnt", f"exit {proc.returncode}: {proc.stderr.strip()}"
    return d / "mnt", f"ok; {proc.stderr.strip()}" if proc.stderr.strip() else "ok"


def read(mnt: Path) -> str:
    try:
        return (mnt / "f").read_text().strip()
    except OSError as exc:
        return f"error {exc.errno}"


def unmount_all(base: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(str(base) + "/")]
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True)


def lifecycle(base: Path) -> dict[str, Any]:
    """Mounts share one server; a killed mount leaves the others serving; umount,
    fusermount3 -u; the server leaves when idle and its mounts stay."""
    env = dict(os.environ, CSHARE_OVERLAY_SERVER_IDLE="3")
    out: dict[str, Any] = {}
    m1, out["mount1"] = mount(base, "one", env)
    out["server_started"] = wait(lambda: len(servers()) == 1)
    server = servers()[0] if servers() else None
    daemon1 = daemon_of(m1)
    out["daemon1_forked_by_server"] = daemon1 is not None and ppid(daemon1) == server
    out["server_cwd"] = _link(f"/proc/{server}/cwd")
    # The spare waiting now becomes the next mount's daemon; another takes its place.
    out["one_spare_waits"] = wait(lambda: len(spares()) == 1)
    spare = spares()[0] if spares() else None
    out["spare_is_the_servers"] = spare is not None and ppid(spare) == server
    mounts = {}
    for name in ("two", "three", "four"):
        mnt, out[f"mount_{name}"] = mount(base, name, env)
        mounts[name] = mnt
        if name == "two":
            out["spare_became_daemon_two"] = spare is not None and daemon_of(mnt) == spare
            out["a_new_spare_waits"] = wait(lambda: len(spares()) == 1 and spares()[0] != spare)
    daemons = {name: daemon_of(mnt) for name, mnt in mounts.items()}
    out["forked_by_server"] = {n: d is not None and ppid(d) == server for n, d in daemons.items()}
    out["distinct_daemons"] = len({d for d in daemons.values() if d}) == 3
    out["reads"] = {n: read(m) for n, m in [("one", m1), *mounts.items()]}
    out["cmdline_names_lowerdir"] = all(
        any(a.startswith(b"lowerdir=" + os.fsencode(str(base))) for a in cmdline(d))
        for d in daemons.values() if d)
    # Exactly the client's command line (interpreter, -S, script, then ours): nothing
    # is left of the spare's or the server's name in the area it was written over.
    out["cmdline_exact"] = all(cmdline(d)[1:] == [b"-S", os.fsencode(OVERLAY), b"-o", os.fsencode(
        f"lowerdir={base}/lower,upperdir={base / n}/upper,workdir={base / n}/work"),
        os.fsencode(str(mounts[n]))] for n, d in daemons.items() if d)
    # A crash of one mount: SIGKILL of its daemon.
    victim = daemons["two"]
    if victim:
        os.kill(victim, signal.SIGKILL)
        wait(lambda: not os.path.exists(f"/proc/{victim}"))
    out["killed_mount_reads"] = read(mounts["two"])
    out["after_kill_reads"] = {n: read(m) for n, m in [("one", m1), ("three", mounts["three"])]}
    out["server_alive_after_kill"] = server is not None and os.path.exists(f"/proc/{server}")
    # A killed spare: the server forks for the next request, and makes a new spare.
    for p in spares():
        os.kill(p, signal.SIGKILL)
    wait(lambda: not spares())
    m5, out["mount_five"] = mount(base, "five", env)
    daemon5 = daemon_of(m5)
    out["five_forked_by_server"] = daemon5 is not None and ppid(daemon5) == server
    out["five_reads"] = read(m5)
    out["spare_back_after_kill"] = wait(lambda: len(spares()) == 1 and spares()[0] != daemon5)
    # A client through the server imports only the server module of its own.
    d = base / "verbose"
    for sub in ("upper", "work", "mnt"):
        (d / sub).mkdir(parents=True)
    proc = subprocess.run([OVERLAY, "-o", f"lowerdir={base}/lower,upperdir={d}/upper,workdir={d}/work",
                           str(d / "mnt")], env=dict(env, PYTHONVERBOSE="1"), capture_output=True,
                          text=True, timeout=60)
    out["verbose_mount"] = proc.returncode
    out["client_imports"] = sorted({line.split("'")[1] for line in proc.stderr.splitlines()
                                    if line.startswith("import 'cshare_fuse")})
    # What the server leaves to a direct start shows as one: a warning, an error.
    _, out["warned_mount"] = mount(base, "warned", env, extra=",no_such_option")
    missing = base / "missing"
    _, out["refused_mount"] = mount(base, "refused", env, lower=missing)
    # umount and fusermount3 -u end their daemons as for a directly started one.
    subprocess.run(["umount", str(m1)], check=True)
    subprocess.run(["fusermount3", "-u", str(mounts["three"])], check=True)
    out["umount_daemon_exits"] = wait(lambda: not os.path.exists(f"/proc/{daemon1}"))
    out["fusermount_daemon_exits"] = wait(lambda: not os.path.exists(f"/proc/{daemons['three']}"))
    out["unmounted"] = not mounted(m1) and not mounted(mounts["three"])
    # Idle: nothing asked for 3 s; the server goes, its mounts stay.
    out["server_exits_when_idle"] = wait(lambda: server is not None and not os.path.exists(f"/proc/{server}"))
    out["spare_leaves_with_server"] = wait(lambda: not spares())
    out["after_idle_reads"] = {n: read(m) for n, m in [("four", mounts["four"]), ("five", m5)]}
    m6, out["mount_six"] = mount(base, "six", env)
    out["six_reads"] = read(m6)
    unmount_all(base)
    return out


def squatted(base: Path) -> dict[str, Any]:
    """Another user holds our server's name: we must mount directly and tell it nothing."""
    from cshare_fuse import server

    name = server.socket_name(server.installation())
    (base / "name").write_bytes(name)
    assert wait(lambda: (base / "squatting").exists(), 30), "the squatter never came"
    out: dict[str, Any] = {}
    mnt, out["mount"] = mount(base, "victim", dict(os.environ))
    out["reads"] = read(mnt)
    daemon = daemon_of(mnt)
    squatter = int((base / "squatting").read_text())
    out["daemon_is_ours"] = daemon is not None and os.stat(f"/proc/{daemon}").st_uid == os.getuid()
    out["daemon_not_from_squatter"] = daemon is not None and ppid(daemon) != squatter
    (base / "done").write_text("")
    unmount_all(base)
    return out


def serve_and_wait(base: Path) -> dict[str, Any]:
    """Start our server with a mount, publish its name, and wait while another user tries it."""
    from cshare_fuse import server

    env = dict(os.environ, CSHARE_OVERLAY_SERVER_IDLE="60")
    out: dict[str, Any] = {}
    _, out["mount1"] = mount(base, "first", env)
    out["server_started"] = wait(lambda: len(servers()) == 1)
    (base / "name").write_bytes(server.socket_name(server.installation()))
    out["daemons_before"] = len(daemons())
    (base / "served").write_text("")
    wait(lambda: (base / "done").exists(), 60)
    out["daemons_after"] = len(daemons())
    for p in servers():
        os.kill(p, signal.SIGTERM)
    unmount_all(base)
    return out


if __name__ == "__main__":
    step, where = sys.argv[1], Path(sys.argv[2])
    result = {"lifecycle": lifecycle, "squatted": squatted, "serve_and_wait": serve_and_wait}[step](where)
    print(json.dumps(result))
