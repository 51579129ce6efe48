"""The mount server: each mount starts from a process that has pyfuse3 and trio loaded.

Why: a container start waits for the mount program to return and then for the
daemon's first answers (runc looks up the rootfs at once).  A fresh daemon
answers only after importing pyfuse3, trio and the overlay (~65 ms warm, far
more cold), which is most of what `podman run` loses against fuse-overlayfs.
So the first `cshare-overlay` in a namespace also starts a server that
imports all of that once and then waits; every later `cshare-overlay` there
hands its command line to the server, which forks a daemon that checks,
mounts and serves exactly as a directly started one would, minus the imports.

The rules, and how they are kept:

- *The caller's user and mount namespace, the caller's user.*  The server is
  started by a `cshare-overlay` of that user in those namespaces, and its
  socket's name carries the euid, both namespaces and the installation
  (interpreter, package directory, newest module mtime), so a new version of
  the code is never served by an old server.  Names in the abstract socket
  namespace are visible to every process of the network namespace, so neither
  side trusts the name: both read the other's pid, uid and gid with
  SO_PEERCRED and compare its credentials (`fingerprint`: ids, groups,
  capabilities, no_new_privs, seccomp, LSM label, namespaces) with their own.  A client
  that finds a stranger on the name mounts directly; a server refuses a
  stranger's request.  The request also names the installation, checked again.
- *On demand, exits when idle.*  A client that finds no server starts one
  (fork, exec of the same program with `--mount-server`) and mounts directly
  itself; the server exits after `CSHARE_OVERLAY_SERVER_IDLE` seconds (default
  60) without a request.  Mounts are not its children in any sense that
  matters: each runs in its own session and outlives it.
- *Fork with no loop running.*  The server runs trio once at start, and a
  daemon's first steps on a scratch tree, to warm them up (`warm_up_trio`,
  main's `_warm_up`), and never again; it starts no thread (it checks: a
  second thread means it stops serving); only its children call
  pyfuse3.init and run the request loop.
- *Forked ahead.*  Each request is served by the spare, a child forked after
  the previous one (`_Server`: the fork and a daemon's first page copies
  cost ~2 ms of a container start when paid on its way), which has
  rehearsed a daemon's first steps meanwhile (main's `_rehearse`); with no
  spare the server forks for the request.
- *A crash of one mount takes nothing else down.*  One process per mount, as
  before; the server itself never touches a mount.
- *umount and fusermount3 -u behave as now*, and so does every check and
  message: the forked daemon runs the same code as a directly started one,
  with the client's working directory, environment and command line.  Its
  command line (what ps and `cshare rm`'s in-use check read) is rewritten to
  the client's: the server was exec'd with a reserved argument area for that.

The protocol, one connection per mount: the client sends the request
(`encode_request`) and shuts down its sending side; the daemon-to-be answers
`+` once it has taken the request (anything else before that, or nothing,
means no mount was attempted and the client mounts directly: a stranger, a
server leaving, a command line main's `_servable` leaves to a direct start);
then it writes what it writes to a direct parent: `\\0ready`, or the
one-line reason it refused.  The client side (`mount_as_client`) is the
cshare-overlay script's first step, before main and the option parser are
imported, and imports no more than the standard library's C modules: every
mount waits for it.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

#: The hidden first argument that makes cshare-overlay the server (cshare-overlay(1), NOTES).
SERVER_FLAG = "--mount-server"
#: The command lines of the server and of its spare (what ps shows).
SERVER_NAME = b"cshare-overlay: mount server\0"
SPARE_NAME = b"cshare-overlay: mount server (spare)\0"
#: Bytes reserved for the forked daemons' command lines; a longer one mounts directly.
ARGV_AREA = 65536
#: Seconds a new spare waits for the CPUs to calm down before its rehearsal.
REHEARSAL_DELAY = 0.05
#: Seconds without a request before the server exits.
DEFAULT_IDLE = 60.0
#: A client that sends nothing for this long is dropped (it cannot stall the server).
REQUEST_TIMEOUT = 2.0
MAX_REQUEST = 4 * ARGV_AREA
_MAGIC = b"cshare-overlay-server 1"
_ACCEPTED = b"+"
#: What a daemon writes once mounted (main's _report_ready); anything else is its reason.
READY = b"\0ready"
_SOL_SOCKET = 1
_SO_PEERCRED = 17


class Refused(Exception):
    """The server will not take this request; the reason is sent back."""


# ------------------------------------------------------------------ who is who
def _status_lines(proc: str) -> list[bytes]:
    with open(f"{proc}/status", "rb") as f:
        text = f.read()
    keep = (b"Uid:", b"Gid:", b"Groups:", b"CapInh:", b"CapPrm:", b"CapEff:", b"CapBnd:",
            b"CapAmb:", b"NoNewPrivs:", b"Seccomp:")
    return [line for line in text.split(b"\n") if line.startswith(keep)]


def _namespace(proc: str, kind: str) -> bytes:
    st = os.stat(f"{proc}/ns/{kind}")
    return b"%d:%d" % (st.st_dev, st.st_ino)


def fingerprint(pid: int | str = "self") -> bytes:
    """What must be equal for two processes to serve each other's mounts.

    Raises OSError when the process is gone or not ours to inspect (another
    user's /proc/PID/ns is not readable).
    """
    proc = f"/proc/{pid}"
    parts = _status_lines(proc)
    parts += [_namespace(proc, "user"), _namespace(proc, "mnt"), _security_label(proc)]
    return b"\n".join(parts)


def _security_label(proc: str) -> bytes:
    """The LSM label (SELinux, AppArmor), when the kernel has one to show."""
    try:
        with open(f"{proc}/attr/current", "rb") as f:
            return f.read().rstrip(b"\0\n")
    except OSError:
        return b""


def installation() -> bytes:
    """The code a server runs: interpreter, package directory, newest module."""
    package = os.path.dirname(os.path.abspath(__file__))
    newest = 0
    folders = [package]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    newest = max(newest, entry.stat().st_mtime_ns)
                elif entry.name != "__pycache__" and entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
    return b"\0".join([os.fsencode(sys.executable), os.fsencode(package), b"%d" % newest])


def socket_name(install: bytes) -> bytes:
    """The abstract socket name of this user's server in these namespaces for this code."""
    import zlib

    return b"\0cshare-overlay/%d/%s/%s/%08x" % (
        os.geteuid(), _namespace("/proc/self", "user").split(b":")[1],
        _namespace("/proc/self", "mnt").split(b":")[1], zlib.crc32(install))


def peer_is_us(sock: object, own: bytes) -> bool:
    """Whether the process at the other end of `sock` has our credentials and namespaces."""
    import _struct

    raw = sock.getsockopt(_SOL_SOCKET, _SO_PEERCRED, 12)  # type: ignore[attr-defined]
    pid, uid, gid = _struct.unpack("3i", raw)
    if uid != os.geteuid() or gid != os.getegid() or pid <= 0:
        return False
    try:
        return fingerprint(pid) == own
    except OSError:
        return False


# ------------------------------------------------------------------ the request
def encode_request(install: bytes, cwd: bytes, cmdline: bytes, args: list[str],
                   environ: dict[bytes, bytes]) -> bytes:
    """The request: the installation, where the client runs, its raw command line
    (/proc/self/cmdline, shown by the daemon), the arguments to parse, its environment."""
    env = b"".join(k + b"=" + v + b"\0" for k, v in environ.items())
    fields = [_MAGIC, install, cwd, cmdline, b"\0".join(os.fsencode(a) for a in args), env]
    return b"".join(b"%d\n" % len(f) + f for f in fields)


def decode_request(data: bytes) -> tuple[bytes, bytes, bytes, list[str], dict[bytes, bytes]]:
    """(installation, cwd, raw command line, arguments, environment); Refused when malformed."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        if newline < 0 or not data[pos:newline].isdigit():
            raise Refused("malformed request")
        size = int(data[pos:newline])
        fields.append(data[newline + 1:newline + 1 + size])
        pos = newline + 1 + size
    if len(fields) != 6 or fields[0] != _MAGIC or pos != len(data):
        raise Refused("malformed request")
    env: dict[bytes, bytes] = {}
    for item in fields[5].split(b"\0"):
        if item:
            key, _, value = item.partition(b"=")
            env[key] = value
    args = [os.fsdecode(a) for a in fields[4].split(b"\0")] if fields[4] else []
    return fields[1], fields[2], fields[3], args, env


# ------------------------------------------------------------------ the client
#: Arguments that are never a mount for the server (help, version, foreground):
#: the client does not ask.  Only an economy: the server declines -f itself.
_NOT_SERVED = frozenset({"-h", "--help", "-V", "--version", "-f", "-d"})


def usable() -> bool:
    """Whether this process may ask a server at all (root, or root of a user namespace)."""
    return os.environ.get("CSHARE_OVERLAY_SERVER", "1") != "0" and os.geteuid() == 0


def mount_as_client(args: list[str]) -> int | None:
    """cshare-overlay's first step, before it imports anything else of its own:
    hand the mount to the server.  The exit code (0 mounted; 1, the reason
    printed), or None: this process mounts directly (no server to use, which
    is then started for the next mount; or the server declined, as it does
    for what it would not mount as a direct start would, main's `_servable`)."""
    if not usable() or any(a in _NOT_SERVED for a in args):
        return None
    result = mount_through_server(args)
    if result is None:
        return None
    code, answer = result
    if code:
        reason = answer.decode(errors="replace") or "the mount process ended without an answer"
        print(f"cshare-overlay: error: {reason}", file=sys.stderr)
    return code


def mount_through_server(args: list[str]) -> tuple[int, bytes] | None:
    """Hand this process's command line to the server: (0 or 1, its answer), or
    None when there is no server to use (one is started for the next mount) and
    the caller mounts directly."""
    import _socket

    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read()
    if len(cmdline) >= ARGV_AREA:
        return None
    try:
        install = installation()
        own = fingerprint()
        name = socket_name(install)
    except OSError:
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(name)
        except OSError:
            start_server()
            return None
        if not peer_is_us(sock, own):
            return None  # a stranger holds the name: never tell it anything
        sock.sendall(encode_request(install, os.getcwdb(), cmdline, args, dict(os.environb)))
        sock.shutdown(_socket.SHUT_WR)
        return _answer(sock)
    except OSError:
        return None
    finally:
        sock.close()


def _answer(sock: object) -> tuple[int, bytes] | None:
    answer = b""
    while chunk := sock.recv(4096):  # type: ignore[attr-defined]
        answer += chunk  # a few bytes: "+", then "\0ready" or one line
        if answer == _ACCEPTED + READY:
            break  # the last word; no need to wait for the daemon to close
    if not answer.startswith(_ACCEPTED):
        return None  # refused before forking, or the server was leaving: nothing was tried
    answer = answer[1:]
    return (0, answer) if answer == READY else (1, answer)


def start_server() -> None:
    """Start a server in the background, in this process's namespaces and session-less."""
    pid = os.fork()
    if pid:
        return  # the child is reparented when we exit; its stdio is not ours
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)
        os.execv(*_server_command())
    finally:
        os._exit(127)


def _server_command() -> tuple[str, list[str]]:
    # The reserved area is the argument after the flag: spaces, as NUL cannot be passed.
    area = " " * ARGV_AREA
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script and os.access(script, os.X_OK) and not script.endswith(".py"):
        return script, [script, SERVER_FLAG, area]
    return sys.executable, [sys.executable, "-m", "cshare_fuse.main", SERVER_FLAG, area]


# ------------------------------------------------------------------ the server
#: How much of the reserved area may hold something other than NUL (None: all
#: of it, as exec left it).  The server clears it once; its children inherit
#: the count, so a daemon writes its command line and as many NULs as the
#: spare's name needs, not 64 KiB (16 pages to copy on its way to a mount).
_area_used: int | None = None


def set_cmdline(cmdline: bytes) -> bool:
    """Show `cmdline` (NUL-separated) as this process's command line, in the reserved area."""
    global _area_used
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # Fields 48 and 49 of stat (1-based, counted from the pid), i.e. after "pid (comm)".
    arg_start, arg_end = int(fields[45]), int(fields[46])
    size = arg_end - arg_start
    if len(cmdline) >= size:
        return False
    used = size if _area_used is None else min(_area_used, size)
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(arg_start)
        mem.write(cmdline + b"\0" * max(0, used - len(cmdline)))
    _area_used = len(cmdline)
    return True


class Requests:
    """What the server runs for the requests it takes (main provides each)."""

    def __init__(self, mount: Callable[[list[str], int], int],
                 servable: Callable[[list[str]], str | None] | None = None,
                 rehearse: Callable[[], None] | None = None) -> None:
        #: `mount(argv, ready_fd)`: main's mount path, in the daemon; its exit code.
        self.mount = mount
        #: `servable(argv)`: why a command line is left to a direct start, else None.
        self.servable = servable
        #: `rehearse()`: a daemon's first steps without a mount, run by the spare.
        self.rehearse = rehearse


def serve(requests: Requests, warm_up: Callable[[], None] | None = None) -> int:
    """Run the server until it has been idle long enough.  `warm_up()` runs a
    daemon's first steps here once, before any fork (main's `_warm_up`;
    `warm_up_trio` says why)."""
    import gc
    import signal
    import socket
    import threading

    # Not the first client's directory: it may go away (the spare's rehearsal
    # asks for its cwd), and a server there would keep its filesystem busy.
    os.chdir("/")
    preload()
    try:
        warm_up_trio()
        if warm_up is not None:
            warm_up()
    except Exception:  # noqa: S110 (only an economy: the daemons work the same without it)
        pass
    install = installation()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(socket_name(install))
    except OSError:
        return 0  # another server was started at the same moment: it serves
    listener.listen(64)
    set_cmdline(SERVER_NAME)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the forked daemons
    # What the daemons share with us stays shared: the collector would touch
    # (and so copy) every page of these objects in each child.
    gc.freeze()
    idle = _idle_seconds()
    server = _Server(listener, install, requests)
    server.start_spare()
    while True:
        if threading.active_count() != 1:
            return 1  # a thread would not survive fork: stop serving, clients mount directly
        listener.settimeout(idle)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return 0
        with conn:
            spent = server.hand_over(conn)
        # Only now, with our copy of the connection closed: a spare forked
        # while we held it would keep the client from ever seeing its end.
        if spent:
            server.start_spare()


def _idle_seconds() -> float:
    try:
        return max(0.1, float(os.environ.get("CSHARE_OVERLAY_SERVER_IDLE", DEFAULT_IDLE)))
    except ValueError:
        return DEFAULT_IDLE


def preload() -> None:
    """Import what every daemon imports, so that a forked one does not."""
    import array  # noqa: F401 (socket.send_fds and recv_fds import it: the server's hand-over)
    import logging.handlers  # noqa: F401

    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from . import datasource, operations, overlay, session  # noqa: F401


def warm_up_trio() -> None:
    """Run trio once here, the way a daemon's loop uses it, so that no daemon does it first.

    The first run of Python code specialises its bytecode in place, and trio
    makes some objects on first use; done in each forked daemon, that writes
    to pages it shares with the server, and each daemon gets its own copies.
    A bare trio.run costs a child 0.5 MB less when its parent has run one
    before.  The run starts no thread, and what it changes while it runs
    (signal handlers, the wakeup descriptor) it puts back.  main's warm-up
    does the same for the overlay's own first steps.
    """
    import signal

    import trio

    readable, writable = os.pipe()

    async def like_a_daemon() -> None:
        lot = trio.lowlevel.ParkingLot()
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                await trio.lowlevel.wait_readable(readable)
                lot.unpark_all()

            nursery.start_soon(reader)
            nursery.start_soon(lot.park)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT):
                await trio.lowlevel.checkpoint()
            os.write(writable, b"x")

    try:
        trio.run(like_a_daemon)
    finally:
        os.close(readable)
        os.close(writable)


class _Server:
    """The listening server's state: its socket, its code, and the spare.

    Forking costs the request it serves: the fork itself, and then a copy of
    every page the child writes (~700 on the way to a mount, a few µs each
    on these virtual machines).  A spare, forked after the previous request,
    pays the fork and its first copies before the next request comes, and
    waits for a connection on its control socket.  It holds neither the
    listener nor a connection, so it never answers on the name; when the
    server goes, its control socket reads end-of-file and it leaves.
    """

    def __init__(self, listener: socket.socket, install: bytes, requests: Requests) -> None:
        self.listener = listener
        self.install = install
        self.own = fingerprint()
        self.requests = requests
        self.spare: socket.socket | None = None  # our end of the spare's control socket

    def hand_over(self, conn: socket.socket) -> bool:
        """Give `conn` to the spare (with none, to a child forked for it).
        True when the spare was used up, or found gone: start the next."""
        import socket

        if not peer_is_us(conn, self.own):
            _send(conn, b"this mount server belongs to another user or namespace")
            return False
        had_spare = self.spare is not None
        if self.spare is not None:
            try:
                socket.send_fds(self.spare, [b"c"], [conn.fileno()])
                return True
            except OSError:
                pass  # the spare is gone (killed): fork for this one
        self._fork_child(lambda: self.take(conn))
        return had_spare

    def start_spare(self) -> None:
        import socket

        if self.spare is not None:
            self.spare.close()
            self.spare = None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except OSError:
            return
        self._fork_child(lambda: self._wait_as_spare(theirs), ours)
        theirs.close()
        self.spare = ours

    def _fork_child(self, run: Callable[[], int], *also_ours: socket.socket) -> None:
        """Fork a child that closes what belongs to the server (the listener,
        the spare's control socket, `also_ours`), runs `run` and exits with
        its code, never returning into the server's loop."""
        if os.fork() == 0:
            code = 1
            try:
                for sock in (self.listener, self.spare, *also_ours):
                    if sock is not None:
                        sock.close()
                code = run()
            finally:
                os._exit(code)

    def _wait_as_spare(self, control: socket.socket) -> int:
        import select
        import socket

        set_cmdline(SPARE_NAME)
        # The rehearsal waits until the mount that made this spare has had
        # its start: the CPUs are busy with it now.
        if self.requests.rehearse is not None and not select.select([control], [], [], REHEARSAL_DELAY)[0]:
            try:
                self.requests.rehearse()
            except Exception:  # noqa: S110 (only an economy, as the warm-up)
                pass
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return 0
        control.close()
        if not fds:
            return 0  # the server has gone
        return self.take(socket.socket(fileno=fds[0]))

    def take(self, conn: socket.socket) -> int:
        """In a child of the server: read the request on `conn` and become its
        daemon, or decline it before answering (the client then mounts itself)."""
        try:
            request = _read_request(conn)
            their_install, cwd, cmdline, args, env = decode_request(request)
            if their_install != self.install:
                raise Refused("this mount server runs another installation of cshare-overlay")
            reason = self.requests.servable(args) if self.requests.servable is not None else None
            if reason is not None:
                raise Refused(reason)
        except Refused as exc:
            _send(conn, str(exc).encode())
            return 1
        except OSError:
            return 1
        return _daemon(conn, cwd, cmdline, args, env, self.requests.mount)


def _read_request(conn: object) -> bytes:
    conn.settimeout(REQUEST_TIMEOUT)  # type: ignore[attr-defined]
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = conn.recv(65536)  # type: ignore[attr-defined]
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REQUEST:
            raise Refused("request too large")
        chunks.append(chunk)


def _send(conn: object, data: bytes) -> None:
    try:
        conn.sendall(data)  # type: ignore[attr-defined]
    except OSError:
        pass


def _daemon(conn: object, cwd: bytes, cmdline: bytes, args: list[str],
            env: dict[bytes, bytes], mount: Callable[[list[str], int], int]) -> int:
    """In the forked child: become the client's daemon, then run main's mount path."""
    import signal

    from . import errors

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    conn.setblocking(True)  # type: ignore[attr-defined]
    set_cmdline(cmdline)
    sys.argv = [sys.argv[0], *args]
    os.chdir(cwd)
    os.environb.clear()
    os.environb.update(env)
    errors.read_injected_faults()
    fd = os.dup(conn.fileno())  # type: ignore[attr-defined]
    conn.close()  # type: ignore[attr-defined]
    os.write(fd, _ACCEPTED)
    return mount(args, fd)
