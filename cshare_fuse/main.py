"""`cshare-overlay`: the executable.  The only place that mounts and runs the loop.

Order matters: the command line is parsed and, unless -f, the process forks
before anything opens /dev/fuse or starts trio (a fork after either is unsafe).
The child checks the layers, loads plugins, mounts, and only then tells the
parent over a pipe that the mount is ready; the parent exits 0, or prints the
child's one-line reason and exits 1.  So `cshare-overlay ... MNT && use MNT` is
race-free, and nothing is mounted when a check fails.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from . import __version__
from .copyup import clean_workdir
from .datasource import DataSource
from .errors import ConfigError
from .operations import OverlayOperations
from .options import USAGE, MountConfig, parse_command_line
from .overlay import Overlay
from .overrides import OverrideError, read_override

log = logging.getLogger("cshare_fuse")
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


def _root_has_override(source: DataSource) -> bool:
    """fuse-overlayfs's rule: a layer whose root carries an override honours them all."""
    def get(name: str) -> bytes | None:
        try:
            return source.getxattr(b"", name)
        except OSError:
            return None

    try:
        return read_override(get) is not None
    except OverrideError as exc:
        raise ConfigError(f"lower layer {source.describe()}: malformed override on its root: {exc}") from None


def open_lowers(config: MountConfig) -> list[DataSource]:
    cwd = os.getcwd()
    sources: list[DataSource] = []
    registry = None
    for spec in config.lowers:
        if spec.plugin is None:
            path = _check_dir("lowerdir", spec.path)
            source = DataSource(path)
            source.honour_overrides = _root_has_override(source)
        else:
            from .plugins import load_registry, open_plugin_layer

            if registry is None:
                registry = load_registry(config.plugins)
            source = open_plugin_layer(spec, registry, cwd)
        sources.append(source)
    return sources


def check_layout(config: MountConfig, lowers: list[DataSource]) -> tuple[str | None, str | None]:
    """Validate upper/work/mountpoint; returns the real upper and work paths."""
    mountpoint = _check_dir("mountpoint", config.mountpoint)
    layer_dirs = [os.fsdecode(_real(os.fsdecode(s.root))) for s in lowers]
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
    return upper, work


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


def prepare(config: MountConfig) -> OverlayOperations:
    lowers = open_lowers(config)
    upper, work = check_layout(config, lowers)
    if work is not None:
        clean_workdir(os.fsencode(work))
    overlay = Overlay(config, lowers, upper, work)
    return OverlayOperations(overlay)


def _setup_logging(config: MountConfig, daemon: bool) -> None:
    level = logging.DEBUG if config.debug else logging.INFO
    log.setLevel(level)
    log.handlers.clear()
    target = os.environ.get("CSHARE_OVERLAY_LOG")
    handler: logging.Handler
    if target:
        handler = logging.FileHandler(target)
    elif not daemon:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        # Imported here: only a daemon needs it, and every import delays the mount.
        from logging.handlers import SysLogHandler

        handler = SysLogHandler("/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}[%(process)d]: %(levelname)s %(message)s"))
    log.addHandler(handler)


def _mount_and_serve(config: MountConfig, ready_fd: int | None) -> int:
    import pyfuse3
    import trio

    # The kernel already applied the caller's umask to every mode it sends us.
    os.umask(0)
    try:
        ops = prepare(config)
        try:
            pyfuse3.init(ops, config.mountpoint, fuse_options(config))
        except RuntimeError as exc:
            raise ConfigError(f"cannot mount on {config.mountpoint}: {exc} (is /dev/fuse usable?)") from None
    except (ConfigError, OSError) as exc:
        message = str(exc) if isinstance(exc, ConfigError) else f"{exc.strerror}: {exc.filename}"
        if ready_fd is None:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        else:
            os.write(ready_fd, message.encode(errors="replace"))
            os.close(ready_fd)
        return 1
    if ready_fd is not None:
        os.write(ready_fd, b"\0ready")
        os.close(ready_fd)
        _detach_stdio()

    from . import session

    session.install()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        session.terminate()
                        return

            nursery.start_soon(on_signals)
            await pyfuse3.main(min_tasks=2, max_tasks=8)
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    except Exception:
        log.exception("the main loop failed")
        return 1
    finally:
        # However the loop ended, leave no dead mount behind.
        pyfuse3.close(unmount=True)
    return 0


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def run(argv: list[str]) -> int:
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
        _setup_logging(config, daemon=False)
        return _mount_and_serve(config, None)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        _setup_logging(config, daemon=True)
        code = _mount_and_serve(config, write_end)
        os._exit(code)
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    answer = b"".join(chunks)
    if answer == b"\0ready":
        # Leave at once: tearing down the interpreter (trio and pyfuse3 are
        # loaded) would add tens of milliseconds to a mount's start.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    reason = answer.decode(errors="replace") or f"the mount process exited with status {status >> 8}"
    print(f"{PROG}: error: {reason}", file=sys.stderr)
    return 1


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
