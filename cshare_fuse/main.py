"""`cshare-overlay`: the executable.  The only place that mounts and runs the loop.

Order matters, for safety and for speed:

1. The command line is parsed and, unless -f, the process forks before
   anything opens /dev/fuse or starts trio (a fork after either is unsafe).
2. The child checks everything that can be wrong (layers, upper and work
   directories, the mountpoint, plugins) and empties the workdir, so nothing is
   mounted when a check fails; the parent prints the child's one-line reason
   and exits 1.
3. The child mounts (fusemount: mount(2) with the standard library only) and
   tells the parent the mount is ready; the parent exits 0.
4. Only then does the child load pyfuse3 and trio (~70 ms) and serve.  The
   kernel holds requests made in the meantime until the daemon answers
   FUSE_INIT, as it does for fuse-overlayfs, which also mounts before it
   serves: `cshare-overlay ... MNT && use MNT` is race-free.

Where this process may not mount(2) (an ordinary user outside a user
namespace) libfuse mounts through fusermount3 at step 4, and the parent is
told only after that.  Everything this module imports at the top is light on
purpose; the start-up path stays free of pyfuse3, trio, logging, typing,
dataclasses and re.
"""

from __future__ import annotations

import os
import sys

from . import __version__, fusemount, server
from .errors import ConfigError, fault_injected
from .options import USAGE, MountConfig, parse_command_line

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .layers import LowerLayer
    from .operations import OverlayOperations

PROG = "cshare-overlay"


def _real(path: str) -> str:
    return os.path.realpath(path)


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _check_dir(what: str, path: str) -> str:
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path} does not exist; create it or fix the path")
    if not os.path.isdir(path):
        raise ConfigError(f"{what} {path} is not a directory")
    return _real(path)


def _honours_overrides(path: str) -> bool:
    """fuse-overlayfs's rule: a layer whose root carries an override honours them all."""
    try:
        names = os.listxattr(path)
    except OSError:
        return False
    if not names:
        return False  # the common case, decided without loading the codec
    from .formats.overrides import OverrideError, read_override

    def get(name: str) -> bytes | None:
        if name not in names:
            return None
        try:
            return os.getxattr(path, name)
        except OSError:
            return None

    try:
        return read_override(get) is not None
    except OverrideError as exc:
        raise ConfigError(f"lower layer {path}: malformed override on its root: {exc}") from None


class CheckedLayout:
    """What the checks before mounting established; enough to start serving.

    A directory layer is kept as (real path, honours overrides) and opened
    only in the daemon, so that the checks need no import that the mount does
    not; a plugin layer is its LowerLayer already, its root asked (loading it
    and checking its root are among the checks).
    """

    def __init__(self, lowers: list[tuple[str, bool] | LowerLayer], upper: str | None,
                 work: str | None) -> None:
        self.lowers = lowers
        self.upper = upper
        self.work = work

    def layers(self) -> list[LowerLayer]:
        """The lower layers, top first, numbered from 1 under an upper layer, else 0."""
        from .datasource import DataSource
        from .layers import LowerLayer

        first = 0 if self.upper is None else 1
        out: list[LowerLayer] = []
        for index, lower in enumerate(self.lowers, first):
            if isinstance(lower, tuple):
                source = DataSource(lower[0])
                source.honour_overrides = lower[1]
                out.append(LowerLayer(index, source))
            else:
                out.append(lower)
        return out


def check_lowers(config: MountConfig) -> tuple[list[tuple[str, bool] | LowerLayer], list[str]]:
    """The checked lower layers, and the real directories they live in."""
    cwd = os.getcwd()
    lowers: list[tuple[str, bool] | LowerLayer] = []
    dirs: list[str] = []
    registry = None
    first = 0 if config.upperdir is None else 1
    if config.plugins or any(spec.plugin is not None for spec in config.lowers):
        # Set up before any plugin is imported, so that what plugins log while
        # loading reaches the daemon's log too.
        _setup_logging(config, daemon=not config.foreground)
        from .plugins import load_registry

        # Checked even when no layer names a plugin: `plugins=` asks for them.
        registry = load_registry(config.plugins)
    for spec in config.lowers:
        if spec.plugin is None:
            path = _check_dir("lowerdir", spec.path)
            lowers.append((path, _honours_overrides(path)))
            dirs.append(path)
        else:
            from .plugins import check_plugin_root, open_plugin_layer

            assert registry is not None
            layer = check_plugin_root(spec, open_plugin_layer(spec, registry, cwd),
                                      first + len(lowers))
            lowers.append(layer)
            root = getattr(layer.source, "root", None)
            if isinstance(root, bytes | str):
                dirs.append(_real(os.fsdecode(root)))
    return lowers, dirs


def check_layout(config: MountConfig) -> CheckedLayout:
    """Every check that can refuse a mount; also empties the workdir."""
    lowers, layer_dirs = check_lowers(config)
    mountpoint = _check_dir("mountpoint", config.mountpoint)
    upper = work = None
    if config.upperdir is not None:
        upper = _check_dir("upperdir", config.upperdir)
        assert config.workdir is not None
        work = _check_dir("workdir", config.workdir)
        if os.stat(upper).st_dev != os.stat(work).st_dev:
            raise ConfigError(
                f"workdir {config.workdir} is on another filesystem than upperdir "
                f"{config.upperdir}; put both on the same filesystem")
        if _inside(work, upper) or _inside(upper, work):
            raise ConfigError("upperdir and workdir must not be inside each other")
        if not os.access(upper, os.W_OK) or not os.access(work, os.W_OK):
            raise ConfigError(f"upperdir {config.upperdir} and workdir {config.workdir} must be writable")
        layer_dirs += [upper, work]
    for layer in layer_dirs:
        if _inside(mountpoint, layer):
            raise ConfigError(
                f"mountpoint {config.mountpoint} is a layer or inside one ({layer}); "
                "mount somewhere else")
    if work is not None:
        empty_workdir(os.fsencode(work))
    return CheckedLayout(lowers, upper, work)


def empty_workdir(workdir: bytes) -> None:
    """Empty the workdir at start: leftovers of a crash (or of another overlay
    program on the same directories) are never valid copies."""
    for entry in os.scandir(workdir):
        full = os.path.join(workdir, entry.name)
        if entry.is_dir(follow_symlinks=False):
            empty_workdir(full)
            os.rmdir(full)
        else:
            os.unlink(full)


def fuse_options(config: MountConfig) -> set[str]:
    opts = {f"fsname={config.source or PROG}", "subtype=cshare-overlay"}
    opts |= {o for o in config.fuse_options if o != "rw"}
    opts.add("default_permissions")
    if os.geteuid() == 0:
        # As fuse-overlayfs does: root (also root of a user namespace) lets every
        # uid use the mount, with the kernel checking permissions on what we report.
        opts.add("allow_other")
        if "nosuid" not in opts:
            opts.add("suid")
        if "nodev" not in opts:
            opts.add("dev")
    if config.upperdir is None or config.read_only:
        opts.add("ro")
    return opts


def operations(config: MountConfig, layout: CheckedLayout) -> OverlayOperations:
    """The filesystem's handlers; built in the daemon, once the mount exists."""
    from .operations import OverlayOperations
    from .overlay import Overlay

    if fault_injected("init"):
        raise RuntimeError("injected fault in init")
    return OverlayOperations(Overlay(config, layout.layers(), layout.upper, layout.work))


def _setup_logging(config: MountConfig, daemon: bool) -> None:
    """The daemon's log: CSHARE_OVERLAY_LOG, else stderr with -f, else syslog.

    The handler sits on the root logger, so that plugins' loggers
    (plugin_api.logger, "cshare_fuse.plugin.NAME") and the records of any
    library they use (WARNING and above) end up there too.  Called again once
    mounted: it replaces what it set up before.
    """
    import logging

    log = logging.getLogger("cshare_fuse")
    log.setLevel(logging.DEBUG if config.debug else logging.INFO)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "cshare_overlay", False)]:
        root.removeHandler(old)
        old.close()
    target = os.environ.get("CSHARE_OVERLAY_LOG")
    handler: logging.Handler
    if target:
        handler = logging.FileHandler(target)
    elif not daemon:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler

        handler = SysLogHandler("/dev/log")
    else:
        handler = logging.NullHandler()
    setattr(handler, "cshare_overlay", True)  # noqa: B010 (marks the handler as ours)
    handler.setFormatter(logging.Formatter(
        f"{PROG}[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)


class _Refusal(Exception):
    """The mount cannot start; the one-line reason for the user."""


def _refusal(exc: ConfigError | OSError) -> _Refusal:
    if isinstance(exc, ConfigError):
        return _Refusal(str(exc))
    return _Refusal(f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror or exc))


#: SIGTERM or SIGINT came before the request loop could take signals over.
_stop_requested = False


def _note_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def _hold_stop_signals() -> None:
    """Until trio takes them over, SIGTERM and SIGINT only note that they came.

    The mount exists before the daemon has loaded pyfuse3 and trio: a signal
    with its default action then would kill the daemon and leave a dead mount
    behind.  `_signal` is the C module under `signal`, which would import enum
    (~3 ms) on the way to the mount.
    """
    import _signal

    for signum in (_signal.SIGTERM, _signal.SIGINT):
        _signal.signal(signum, _note_stop)


def _mount_and_serve(config: MountConfig, ready_fd: int | None) -> int:
    """Check, mount, say so on `ready_fd` (None: -f), then serve until unmounted."""
    _hold_stop_signals()
    # The kernel already applied the caller's umask to every mode it sends us.
    os.umask(0)
    options = fuse_options(config)
    mountpoint = _real(config.mountpoint)
    fd: int | None = None
    try:
        try:
            layout = check_layout(config)
            try:
                fd = fusemount.mount_fuse(mountpoint, options)
            except fusemount.MountRefused:
                fd = None  # libfuse mounts through fusermount3, below
            except OSError as exc:
                raise ConfigError(f"cannot mount on {config.mountpoint}: {exc.filename}: "
                                  f"{exc.strerror} (is /dev/fuse usable?)") from None
        except (ConfigError, OSError) as exc:
            raise _refusal(exc) from None
        if fd is not None:
            _report_ready(ready_fd)
        _setup_logging(config, daemon=ready_fd is not None)
        import pyfuse3

        try:
            ops = operations(config, layout)
        except (ConfigError, OSError) as exc:
            raise _refusal(exc) from None
        try:
            pyfuse3.init(ops, f"/dev/fd/{fd}" if fd is not None else mountpoint, options)
        except RuntimeError as exc:
            raise _Refusal(f"cannot mount on {config.mountpoint}: {exc} (is /dev/fuse usable?)") from None
    except _Refusal as refusal:
        if fd is not None:
            # Mounted and reported ready already: take the mount away again.
            _log_error(f"cannot serve {mountpoint}: {refusal}; unmounting", traceback=False)
            fusemount.unmount_connection(fd, mountpoint)
        elif ready_fd is None:
            print(f"{PROG}: error: {refusal}", file=sys.stderr)
        else:
            os.write(ready_fd, str(refusal).encode(errors="replace"))
            os.close(ready_fd)
        return 1
    except BaseException:
        if fd is not None:
            _log_error(f"cannot serve {mountpoint}; unmounting", traceback=True)
            fusemount.unmount_connection(fd, mountpoint)
        raise
    if fd is None:
        _report_ready(ready_fd)
    return _serve(fd, mountpoint)


def _report_ready(ready_fd: int | None) -> None:
    if ready_fd is not None:
        os.write(ready_fd, server.READY)
        os.close(ready_fd)
        _detach_stdio()


def _log_error(message: str, traceback: bool) -> None:
    import logging

    logging.getLogger("cshare_fuse").error(message, exc_info=traceback)


def _serve(fd: int | None, mountpoint: str) -> int:
    """Run the request loop until the mount ends, then leave no dead mount behind."""
    import logging
    import signal

    import pyfuse3
    import trio

    from . import session
    from .deferral import MAX_TASKS

    session.install(fd)  # None: libfuse opened the descriptor, and session finds it
    log = logging.getLogger("cshare_fuse")

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    if _stop_requested:  # before the receiver was there
                        session.terminate()
                        return
                    async for _ in signals:
                        session.terminate()
                        return

            nursery.start_soon(on_signals)
            # Room for requests served on the loop while the plugin pool is busy.
            await pyfuse3.main(min_tasks=2, max_tasks=MAX_TASKS)
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    except Exception:
        log.exception("the main loop failed")
        return 1
    finally:
        if fd is not None:
            # libfuse unmounts only what it mounted itself.
            try:
                fusemount.unmount_connection(fd, mountpoint)
            except OSError:
                log.exception("cannot unmount %s", mountpoint)
        pyfuse3.close(unmount=fd is None)
    return 0


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _servable(argv: list[str]) -> str | None:
    """Why the mount server leaves this command line to a directly started
    process (None: it serves it).  The direct path then prints what it would
    have printed anyway: an error, warnings, the foreground run."""
    try:
        config = parse_command_line(argv)
    except ConfigError as exc:
        return str(exc)
    if config.warnings:
        return "the command line has warnings, which only a direct start shows"
    if config.foreground:
        return "-f runs in the foreground"
    if fusemount.needs_libfuse(config.fuse_options):
        return "these options mount through libfuse's fusermount3"
    return None


def _serve_request(argv: list[str], ready_fd: int) -> int:
    """What a daemon forked by the mount server runs: the direct path's child."""
    try:
        config = parse_command_line(argv)
    except ConfigError as exc:
        os.write(ready_fd, str(exc).encode(errors="replace"))
        os.close(ready_fd)
        return 1
    return _mount_and_serve(config, ready_fd)


#: What the mount server's warm-up made, kept for the server's lifetime (see _warm_up).
_warmed_up: list[object] = []


def _warm_up(keep: bool = True) -> None:
    """In the mount server, before any fork: a daemon's first steps, on a scratch tree.

    Parse a command line, check the layout, build the overlay and answer
    what the kernel first asks of a mount (the root's attributes, lookups),
    without FUSE.  The first run of that code specialises its bytecode and
    fills the caches it uses; done here, a forked daemon finds both made
    instead of writing them into pages it shares with the server (one more
    idle mount 4.70-4.72 MiB with this, 4.88-4.95 without; memory_bench).
    What it built is kept, not freed: freed objects leave holes among the
    shared ones, which each daemon's allocations would fill, copying those
    pages (an earlier try that freed them and collected made it worse, 5.00
    MiB).  It keeps no descriptor, no thread and no file: the scratch tree
    is removed at once.
    """
    import shutil
    import tempfile

    import pyfuse3
    import trio

    base = tempfile.mkdtemp(prefix="cshare-overlay-warm-up-")
    try:
        for d in ("lower/dir", "upper", "work", "mnt"):
            os.makedirs(os.path.join(base, d))
        with open(os.path.join(base, "lower", "dir", "file"), "wb"):
            pass
        config = parse_command_line([
            "-o", f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work",
            f"{base}/mnt",
        ])
        ops = operations(config, check_layout(config))
        answers: list[object] = []

        async def first_requests() -> None:
            # The handlers ignore the request context on these paths.
            root = await ops.getattr(pyfuse3.ROOT_INODE, None)  # type: ignore[arg-type]
            entry = await ops.lookup(root.st_ino, b"dir", None)  # type: ignore[arg-type]
            file = await ops.lookup(entry.st_ino, b"file", None)  # type: ignore[arg-type]
            answers.extend([root, entry, await ops.getattr(entry.st_ino, None), file])  # type: ignore[arg-type]
            await what_a_container_start_asks(entry.st_ino, file.st_ino)

        async def what_a_container_start_asks(dir_inode: int, file_inode: int) -> None:
            """The rest of what podman and runc ask of a new root file system
            (FUSE tracepoints over one `podman run`): a read of a lower file,
            files made in a lower directory (its copy-up), a mode set, a
            directory, a symbolic link read back, statfs, an absent xattr
            and name."""
            ctx = pyfuse3.RequestContext()  # uid 0, as podman's mount program runs
            fh = (await ops.open(file_inode, os.O_RDONLY, ctx)).fh
            await ops.read(fh, 0, 4096)
            await ops.release(fh)
            info, made = await ops.create(dir_inode, b"made", 0o644, os.O_WRONLY | os.O_CREAT, ctx)
            await ops.write(info.fh, 0, b"x")
            await ops.release(info.fh)
            made.st_mode = 0o100600
            await ops.setattr(made.st_ino, made, _ModeOnly(), None, ctx)  # type: ignore[arg-type]
            await ops.mkdir(pyfuse3.ROOT_INODE, b"made-dir", 0o755, ctx)
            link = await ops.symlink(pyfuse3.ROOT_INODE, b"made-link", b"dir/file", ctx)
            await ops.readlink(link.st_ino, ctx)
            await ops.statfs(ctx)
            for absent in (ops.getxattr(dir_inode, b"user.absent", ctx),
                           ops.lookup(pyfuse3.ROOT_INODE, b"absent", ctx)):
                try:
                    await absent
                except pyfuse3.FUSEError:
                    pass

        trio.run(first_requests)
        if keep:
            _warmed_up.extend([config, ops, answers])
    finally:
        shutil.rmtree(base, ignore_errors=True)


class _ModeOnly:
    """What a chmod's SetattrFields say (pyfuse3's own cannot be set from Python)."""

    update_mode = True
    update_uid = update_gid = update_size = False
    update_atime = update_mtime = update_ctime = False


def _rehearse() -> None:
    """In the server's spare, waiting for its request: the warm-up once more,
    its objects dropped.  The pages a daemon's first steps write are copied
    here, before the request, instead of on the way to its mount; what the
    rehearsal frees stays in pages that are already the spare's own, for
    the daemon's allocations to reuse."""
    _warm_up(keep=False)


def run(argv: list[str], server_asked: bool = False) -> int:
    """cshare-overlay with these arguments; `server_asked`: the script has
    already offered the mount to the server (server.mount_as_client)."""
    if argv[:1] == [server.SERVER_FLAG]:
        return server.serve(server.Requests(_serve_request, _servable, _rehearse), _warm_up)
    if not server_asked:
        code = server.mount_as_client(argv)
        if code is not None:
            _leave(code)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print("See cshare-overlay(1) for every option.")
        return 0
    if any(a in ("-V", "--version") for a in argv):
        print(f"{PROG} {__version__}")
        return 0
    try:
        config = parse_command_line(argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if config.foreground:
        return _mount_and_serve(config, None)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        code = 1
        try:
            code = _mount_and_serve(config, write_end)
        finally:
            os._exit(code)  # never back into the parent's code
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    answer = b"".join(chunks)
    if answer == server.READY:
        _leave(0)
    _, status = os.waitpid(pid, 0)
    reason = answer.decode(errors="replace") or f"the mount process exited with status {status >> 8}"
    print(f"{PROG}: error: {reason}", file=sys.stderr)
    return 1


def _leave(code: int) -> None:
    """Exit at once: nothing is left to tear down that the daemon needs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(server_asked: bool = False) -> None:
    sys.exit(run(sys.argv[1:], server_asked))


if __name__ == "__main__":
    main()
