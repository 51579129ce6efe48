"""The overlay's command line, as fuse-overlayfs users and mount(8) drive it.

- it daemonizes and returns only once the mount is ready; `-f` stays in the
  foreground; `-d` logs operations; a daemon that fails after it has mounted
  takes its mount away again, and SIGTERM unmounts;
- `mount -t fuse.NAME SOURCE MNT -o ...` works (through mount.fuse3), and both
  `fusermount3 -u` and `umount` unmount it;
- bad input gets a one-line error and a non-zero exit with nothing mounted;
  unknown options get a warning and the mount works;
- an unexpected exception in a handler answers EIO and logs, and the mount
  keeps serving (CSHARE_OVERLAY_INJECT_FAULT makes named handlers raise).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import require
from overlay_support import (
    LayerDirs,
    Lockstep,
    dir_,
    file,
    fuse_options,
    is_mounted,
    make_copy,
    mount_type,
    mounted,
    overlay_command,
    overlay_program_name,
    serving_processes,
    unmount,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(60)]

LOWER = [file("hello", "hello\n", xattrs={"user.k": b"v"}), dir_("dir"), file("dir/inside", "in\n")]
BASE = [file("below", "below\n"), file("hello", "covered\n")]


@pytest.fixture
def dirs(root_fuse: None, world_tmp: Path) -> Iterator[LayerDirs]:
    d = make_copy(world_tmp / "layers", [LOWER, BASE])
    try:
        yield d
    finally:
        unmount(d.mnt, fuse=True)


def run(argv: list[str], log: Path, env: dict[str, str] | None = None,
        timeout: float = 30) -> int:
    """Run to completion with output in `log` (a daemon may keep it open: never a pipe)."""
    with open(log, "wb") as out:
        return subprocess.run(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                              timeout=timeout, env=env).returncode


def check_serves(mnt: Path) -> None:
    assert (mnt / "hello").read_text() == "hello\n"
    assert sorted(os.listdir(mnt)) == ["below", "dir", "hello"]


def test_daemonizes_and_returns_when_ready(dirs: LayerDirs, world_tmp: Path) -> None:
    log = world_tmp / "out.log"
    rc = run([*overlay_command(), "-o", fuse_options(dirs), str(dirs.mnt)], log)
    assert rc == 0, log.read_text()
    # No waiting: the command returned, so the mount must be there already.
    assert is_mounted(dirs.mnt), "the command returned before the mount was ready"
    assert (mount_type(dirs.mnt) or "").startswith("fuse")
    check_serves(dirs.mnt)
    assert serving_processes(dirs.mnt), "no daemon left serving the mount"
    r = subprocess.run(["fusermount3", "-u", str(dirs.mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(dirs.mnt)
    assert wait_until(lambda: not serving_processes(dirs.mnt), timeout=10), \
        "the daemon did not exit after fusermount3 -u"


def test_a_daemon_failing_after_the_mount_takes_it_away(dirs: LayerDirs, world_tmp: Path) -> None:
    # The command returns once mounted, before the daemon has loaded pyfuse3
    # (as fuse-overlayfs returns before it serves); if serving then fails, no
    # dead mount may stay behind, and the log says why.
    daemon_log = world_tmp / "daemon.log"
    env = dict(os.environ, CSHARE_OVERLAY_INJECT_FAULT="init", CSHARE_OVERLAY_LOG=str(daemon_log))
    rc = run([*overlay_command(), "-o", fuse_options(dirs), str(dirs.mnt)], world_tmp / "out.log", env=env)
    assert rc == 0, (world_tmp / "out.log").read_text()
    assert wait_until(lambda: not is_mounted(dirs.mnt), timeout=15), "the failed daemon left its mount"
    assert wait_until(lambda: not serving_processes(dirs.mnt), timeout=10)
    text = daemon_log.read_text(errors="replace")
    assert "cannot serve" in text and "injected fault in init" in text, text[-2000:]


def test_foreground_failing_after_the_mount_exits_nonzero(dirs: LayerDirs, world_tmp: Path) -> None:
    log = world_tmp / "fg-fail.log"
    env = dict(os.environ, CSHARE_OVERLAY_INJECT_FAULT="init")
    rc = run([*overlay_command(), "-f", "-o", fuse_options(dirs), str(dirs.mnt)], log, env=env)
    assert rc == 1
    assert "cannot serve" in log.read_text(errors="replace")
    assert not is_mounted(dirs.mnt)


@pytest.mark.parametrize("when", ["at once", "while serving"])
def test_sigterm_unmounts_and_exits(dirs: LayerDirs, world_tmp: Path, when: str) -> None:
    # "at once": the command has returned and the daemon is still loading
    # pyfuse3; a signal then must not kill it with its mount left behind.
    log = world_tmp / "term.log"
    assert run([*overlay_command(), "-o", fuse_options(dirs), str(dirs.mnt)], log) == 0, log.read_text()
    if when == "while serving":
        check_serves(dirs.mnt)
    pids = serving_processes(dirs.mnt)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGTERM)
    assert wait_until(lambda: not is_mounted(dirs.mnt), timeout=15), "SIGTERM left the mount"
    assert wait_until(lambda: not serving_processes(dirs.mnt), timeout=10)


@contextmanager
def foreground_overlay(dirs: LayerDirs, logpath: Path, flag: str = "-f",
                       env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """cshare-overlay started with `flag` (-f or -d), output to `logpath`.

    Yields once the mount is up or the process has exited (the caller asserts
    which); always unmounts and reaps the daemon afterwards.
    """
    with open(logpath, "wb") as log:
        proc = subprocess.Popen([*overlay_command(), flag, "-o", fuse_options(dirs), str(dirs.mnt)],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        try:
            assert wait_until(lambda: is_mounted(dirs.mnt) or proc.poll() is not None, 20)
            yield proc
        finally:
            if proc.poll() is None:
                unmount(dirs.mnt, fuse=True)
                proc.kill()
                proc.wait()


def test_foreground_until_unmounted(dirs: LayerDirs, world_tmp: Path) -> None:
    with foreground_overlay(dirs, world_tmp / "fg.log") as proc:
        assert proc.poll() is None, f"-f exited: {(world_tmp / 'fg.log').read_text()}"
        assert is_mounted(dirs.mnt)
        check_serves(dirs.mnt)
        assert proc.poll() is None, "-f must stay in the foreground while mounted"
        r = subprocess.run(["fusermount3", "-u", str(dirs.mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=15) == 0, (world_tmp / "fg.log").read_text()


def test_debug_logs_operations(dirs: LayerDirs, world_tmp: Path) -> None:
    logpath = world_tmp / "debug.log"
    with foreground_overlay(dirs, logpath, flag="-d") as proc:
        assert proc.poll() is None, "-d implies the foreground"
        (dirs.mnt / "dir" / "inside").read_text()
        assert wait_until(lambda: "lookup" in logpath.read_text(errors="replace").lower(), 5), \
            logpath.read_text(errors="replace")[-2000:]
        unmount(dirs.mnt, fuse=True)
        assert proc.wait(timeout=15) == 0


def test_a_missing_name_is_answered_once_and_a_later_create_shows(dirs: LayerDirs, world_tmp: Path) -> None:
    # Lookups of missing names get a negative entry the kernel keeps (shells and
    # interpreters probe many paths); creating the name through the mount must
    # still make it appear at once.
    logpath = world_tmp / "negative.log"
    missing = dirs.mnt / "dir" / "not-there"
    with foreground_overlay(dirs, logpath, flag="-d") as proc:
        assert proc.poll() is None, logpath.read_text(errors="replace")
        for _ in range(3):
            assert not missing.exists()
        asked = logpath.read_text(errors="replace").count("b'not-there'")
        assert asked == 1, f"the daemon was asked {asked} times:\n" + logpath.read_text(errors="replace")[-2000:]
        missing.write_text("now\n")
        assert missing.read_text() == "now\n"
        assert "not-there" in os.listdir(dirs.mnt / "dir")
        unmount(dirs.mnt, fuse=True)
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("how", ["fusermount3", "umount"])
def test_mount_helper_and_unmount(dirs: LayerDirs, world_tmp: Path, how: str) -> None:
    name = overlay_program_name()
    require(shutil.which(name) is not None,
            f"{name} on PATH for mount.fuse3 (scripts/install links it into /usr/local/bin)")
    require(shutil.which("mount.fuse3") is not None, "mount.fuse3 (Debian package fuse3)")
    r = subprocess.run(["mount", "-t", f"fuse.{name}", "overlay-src", str(dirs.mnt),
                        "-o", fuse_options(dirs)], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert is_mounted(dirs.mnt)
    assert mount_type(dirs.mnt) == f"fuse.{name}"
    check_serves(dirs.mnt)
    (dirs.mnt / "written").write_text("through mount(8)\n")
    assert (dirs.upper / "written").read_text() == "through mount(8)\n"
    cmd = ["fusermount3", "-u"] if how == "fusermount3" else ["umount"]
    r = subprocess.run([*cmd, str(dirs.mnt)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(dirs.mnt)
    assert wait_until(lambda: not serving_processes(dirs.mnt), timeout=10), \
        f"the daemon did not exit after {how}"


# ---------------------------------------------------------------------------
# Bad input: one line, non-zero, nothing mounted.


def _bad_cases(d: LayerDirs, tmpfs: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (options, mountpoint, what the error line must name; `|` separates choices)."""
    lower = ":".join(str(p) for p in d.lowers)
    uw = f"upperdir={d.upper},workdir={d.work}"
    mnt = str(d.mnt)
    (d.lowers[0] / "dir").mkdir(exist_ok=True)
    return {
        "no lowerdir option": ([uw], mnt, "lowerdir"),
        "missing lowerdir": ([f"lowerdir={d.lowers[0]}:/nonexistent/layer", uw], mnt,
                             "/nonexistent/layer"),
        "missing workdir": ([f"lowerdir={lower}", f"upperdir={d.upper}",
                             "workdir=/nonexistent/work"], mnt, "/nonexistent/work"),
        "workdir without upperdir": ([f"lowerdir={lower}", f"workdir={d.work}"], mnt, "upperdir"),
        "workdir on another filesystem": (
            [f"lowerdir={lower}", f"upperdir={d.upper}", f"workdir={tmpfs}"], mnt, "workdir"),
        "mountpoint is a lower layer": ([f"lowerdir={lower}", uw], str(d.lowers[1]), "layer"),
        "mountpoint inside a lower layer": ([f"lowerdir={lower}", uw],
                                            str(d.lowers[0] / "dir"), "layer"),
        "mountpoint is the upper layer": ([f"lowerdir={lower}", uw], str(d.upper), "upper|layer"),
        "malformed uidmapping": ([f"lowerdir={lower}", uw, "uidmapping=x"], mnt, "uidmapping"),
        "malformed gidmapping": ([f"lowerdir={lower}", uw, "gidmapping=0:1"], mnt, "gidmapping"),
        "xattr_permissions out of range": ([f"lowerdir={lower}", uw, "xattr_permissions=7"], mnt,
                                           "xattr_permissions"),
        "timeout not a number": ([f"lowerdir={lower}", uw, "timeout=abc"], mnt, "timeout"),
        "squash_to_uid not a number": ([f"lowerdir={lower}", uw, "squash_to_uid=abc"], mnt,
                                       "squash_to_uid"),
    }


BAD_NAMES = [
    "no lowerdir option", "missing lowerdir", "missing workdir", "workdir without upperdir",
    "workdir on another filesystem", "mountpoint is a lower layer",
    "mountpoint inside a lower layer", "mountpoint is the upper layer", "malformed uidmapping",
    "malformed gidmapping", "xattr_permissions out of range", "timeout not a number",
    "squash_to_uid not a number",
]


@pytest.fixture
def small_tmpfs(root_fuse: None, world_tmp: Path) -> Iterator[Path]:
    path = world_tmp / "tmpfs"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        (path / "work").mkdir()
        yield path / "work"
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("case", BAD_NAMES)
def test_bad_input_is_refused(dirs: LayerDirs, small_tmpfs: Path, world_tmp: Path,
                              case: str) -> None:
    opts, mnt, word = _bad_cases(dirs, small_tmpfs)[case]
    before = is_mounted(Path(mnt))
    r = subprocess.run([*overlay_command(), "-o", ",".join(opts), mnt], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    try:
        assert r.returncode != 0, f"{case}: accepted (stderr: {r.stderr!r})"
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"{case}: want one error line, got {lines!r}"
        assert any(w.lower() in lines[0].lower() for w in word.split("|")), \
            f"{case}: {lines[0]!r} does not name {word!r}"
        assert "Traceback" not in r.stderr
        assert is_mounted(Path(mnt)) == before, f"{case}: something got mounted"
        assert not is_mounted(dirs.mnt)
    finally:
        unmount(Path(mnt), fuse=True)


def test_no_usable_dev_fuse_is_refused(dirs: LayerDirs, world_tmp: Path) -> None:
    # In a private mount namespace whose /dev is an empty tmpfs.
    script = 'mount -t tmpfs tmpfs /dev && exec "$@"'
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                        *overlay_command(), "-o", fuse_options(dirs), str(dirs.mnt)],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "/dev/fuse" in lines[0] and "Traceback" not in r.stderr, lines
    assert not is_mounted(dirs.mnt)


def test_unknown_option_warns_and_mounts(dirs: LayerDirs, world_tmp: Path) -> None:
    log = world_tmp / "warn.log"
    opts = fuse_options(dirs, extra=["no_such_option_xyz=1"])
    rc = run([*overlay_command(), "-o", opts, str(dirs.mnt)], log)
    assert rc == 0, log.read_text()
    assert is_mounted(dirs.mnt)
    check_serves(dirs.mnt)
    assert "no_such_option_xyz" in log.read_text(), f"no warning: {log.read_text()!r}"


# ---------------------------------------------------------------------------
# Never dies: an exception in a handler is EIO for that call only.


@pytest.mark.parametrize("handler", ["getxattr", "listxattr"])
def test_handler_exception_gives_eio_and_mount_survives(dirs: LayerDirs, world_tmp: Path,
                                                        handler: str) -> None:
    logpath = world_tmp / "fault.log"
    env = dict(os.environ, CSHARE_OVERLAY_INJECT_FAULT=handler)
    with foreground_overlay(dirs, logpath, env=env) as proc:
        assert proc.poll() is None, logpath.read_text()

        def faulty() -> object:
            if handler == "getxattr":
                return os.getxattr(dirs.mnt / "hello", "user.k")
            return os.listxattr(dirs.mnt / "hello")

        for _ in range(2):  # twice: the first fault must not have broken anything
            with pytest.raises(OSError) as info:
                faulty()
            assert info.value.errno == errno.EIO, info.value
            check_serves(dirs.mnt)
            (dirs.mnt / "after_fault").write_text("still serving\n")
            assert (dirs.mnt / "after_fault").read_text() == "still serving\n"
            os.chmod(dirs.mnt / "after_fault", 0o600)
            os.unlink(dirs.mnt / "after_fault")
        assert wait_until(lambda: handler in logpath.read_text(errors="replace"), 5), \
            f"no log line names {handler}: {logpath.read_text(errors='replace')[-2000:]!r}"
        assert proc.poll() is None, "the daemon died"
        assert is_mounted(dirs.mnt)
        unmount(dirs.mnt, fuse=True)
        assert proc.wait(timeout=15) == 0


# ---------------------------------------------------------------------------
# Options: each one behaves as fuse-overlayfs makes it behave.

OWNERS = [file("root_file", "r\n"), file("u1000", "a\n", mode=0o640, uid=1000, gid=1000),
          file("u1234", "b\n", mode=0o600, uid=1234, gid=1234, xattrs={"user.x": b"1"}),
          dir_("d", mode=0o750, uid=1000, gid=1000), file("d/inner", "c\n")]

OPTION_GROUPS = [
    "squash_to_root",
    "squash_to_uid=5,squash_to_gid=6",
    "uidmapping=0:1000:1:1000:0:1:1234:5:1,gidmapping=0:1000:1:1000:0:1:1234:5:1",
    "static_nlink",
    "ro",
    "noxattrs=1",
    "suid,dev,exec,allow_root",
    "noacl,timeout=1,writeback=0,fsync=0,volatile,fast_ino=1,xino=off,redirect_dir=off,"
    "noatime,nodev,nosuid,max_write=131072,default_permissions,allow_other",
]


@pytest.mark.parametrize("options", OPTION_GROUPS)
def test_options_behave_like_fuse_overlayfs(root_fuse: None, world_tmp: Path,
                                            options: str) -> None:
    extra = options.split(",")
    ref = make_copy(world_tmp / "reference", [OWNERS])
    tested = make_copy(world_tmp / "tested", [OWNERS])
    ops = [("stat", n) for n in ("root_file", "u1000", "u1234", "d", "d/inner", ".")]
    ops += [("read", "u1000"), ("read", "u1234"), ("listdir", "d"), ("getxattr", "u1234", "user.x"),
            ("listxattr", "u1234"), ("create", "new", b"new\n", 0o644), ("stat", "new"),
            ("chmod", "u1000", 0o604), ("stat", "u1000"), ("chown", "root_file", 1000, 1000),
            ("stat", "root_file"), ("mkdir", "d/sub", 0o755), ("stat", "d/sub")]
    with mounted(ref, "fuse-overlayfs", extra=extra), mounted(tested, "fuse", extra=extra):
        ls = Lockstep(ref.mnt, tested.mnt)
        ls.run_all(ops)
    # Directory nlink is left out: there the kernel (1 for a merged directory)
    # is the reference, not fuse-overlayfs (which counts subdirectories).
    assert not ls.divergences, f"with -o {options} (kernel= means fuse-overlayfs):\n" + ls.report()


@pytest.mark.parametrize("level", ["1", "2"])
def test_xattr_permissions_record_overrides(root_fuse: None, world_tmp: Path,
                                            level: str) -> None:
    """chmod/chown are recorded in an override xattr and shown by the mount.

    Not compared with fuse-overlayfs: v1.10 loses a file's owner on chmod here
    and ignores the mode given to create, so it is no reference for this option.
    """
    from cshare_fuse.formats.overrides import ALL_OVERRIDE_XATTRS, OVERRIDE_XATTR, read_override

    d = make_copy(world_tmp / "layers", [OWNERS])
    with mounted(d, "fuse", extra=[f"xattr_permissions={level}"]):
        os.chmod(d.mnt / "u1000", 0o604)
        os.chown(d.mnt / "root_file", 1000, 1001)
        fd = os.open(d.mnt / "new", os.O_CREAT | os.O_WRONLY, 0o640)
        os.close(fd)
        shown = {n: os.lstat(d.mnt / n) for n in ("u1000", "root_file", "new")}
    assert (stat.S_IMODE(shown["u1000"].st_mode), shown["u1000"].st_uid) == (0o604, 1000)
    assert (shown["root_file"].st_uid, shown["root_file"].st_gid) == (1000, 1001)
    assert stat.S_IMODE(shown["new"].st_mode) == 0o640 & ~_umask()
    for name, (uid, gid, mode) in {"u1000": (1000, 1000, 0o604),
                                   "root_file": (1000, 1001, 0o644)}.items():
        backing = d.upper / name
        real = os.lstat(backing)
        found = read_override(lambda n, p=backing: _getxattr_or_none(p, n), ALL_OVERRIDE_XATTRS)
        assert found is not None, f"{name}: no override xattr in the upper layer"
        xname, override = found
        assert (override.uid, override.gid, override.mode) == (uid, gid, mode), (name, override)
        if level == "2":
            assert xname == OVERRIDE_XATTR, xname
        if name == "root_file":
            # The chown was recorded, not applied to the backing file.
            assert (real.st_uid, real.st_gid) != (uid, gid), name


def _getxattr_or_none(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_after_a_burst_of_requests_an_idle_daemon_sleeps(dirs: LayerDirs, world_tmp: Path) -> None:
    """The request loop busy-polls /dev/fuse while a client is in a burst
    (cshare_fuse/session.py); once requests stop it must go back to sleep, so
    an idle mount costs no CPU.  A spin that never ended would burn ~1 s here."""
    log = world_tmp / "out.log"
    assert run([*overlay_command(), "-o", fuse_options(dirs), str(dirs.mnt)], log) == 0, log.read_text()
    pids = serving_processes(dirs.mnt)
    assert pids, "no daemon serving the mount"
    for _ in range(2000):  # a burst: ping-pong requests with no pause between them
        os.stat(dirs.mnt / "hello")
        with open(dirs.mnt / "hello", "rb") as f:
            f.read()
    idle_from = sum(_cpu_seconds(p) for p in pids)
    time.sleep(1.0)
    idle_cpu = sum(_cpu_seconds(p) for p in pids) - idle_from
    assert idle_cpu < 0.1, f"the idle daemon used {idle_cpu:.2f} s of CPU in 1 s"
    check_serves(dirs.mnt)
