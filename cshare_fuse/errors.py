"""Errors of the overlay filesystem, and the one boundary where they become replies.

Inside the filesystem an operation fails by raising `OverlayError(errno)` or by
letting an `OSError` from the backing filesystem propagate.  `fuse_boundary`
wraps every pyfuse3 handler: it turns both into `pyfuse3.FUSEError`, and turns
anything else (a bug; a plugin that raised or broke the contract, which the
layers report as `PluginFault`) into EIO plus a log line, because pyfuse3
ends the whole mount on any exception that is not a FUSEError.

Light at import (no pyfuse3, trio, logging or typing): `cshare-overlay` raises
ConfigError while it checks a command line and mounts, before it loads
pyfuse3 (see fusemount).  pyfuse3 and logging are bound when the first
handler is wrapped, which happens only in the daemon.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from typing import Any, ParamSpec, TypeVar

    P = ParamSpec("P")
    R = TypeVar("R")


class OverlayError(Exception):
    """An operation fails with this errno; the message is for the log only."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.errno = err


class PluginFault(Exception):
    """A layer's data source broke the contract: it raised something other than
    OSError, or answered with a wrong type or impossible attributes.  That one
    request fails with EIO; the message names the layer, the method and the path."""


class ConfigError(Exception):
    """The mount cannot start: bad options, missing layers.  One line, for the user."""


#: Test hook: "OPNAME" makes that handler raise RuntimeError, to prove the boundary;
#: "init" makes the daemon fail after it has mounted (main.operations).
#: Read at start from CSHARE_OVERLAY_INJECT_FAULT (comma separated names), and
#: again by a daemon forked from the mount server, for its client's environment.
_injected_faults: frozenset[str] = frozenset()


def read_injected_faults() -> None:
    """(Re)read the test hook above from the environment."""
    global _injected_faults
    _injected_faults = frozenset(
        n for n in os.environ.get("CSHARE_OVERLAY_INJECT_FAULT", "").split(",") if n)


read_injected_faults()


def fault_injected(name: str) -> bool:
    """Whether the test hook above asks `name` to fail."""
    return name in _injected_faults


def fuse_boundary(func: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Make `func` a safe pyfuse3 handler: every failure becomes a FUSEError."""
    import functools
    import logging

    import pyfuse3

    log = logging.getLogger("cshare_fuse")
    name = func.__name__
    context_type = pyfuse3.RequestContext

    @functools.wraps(func)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            if name in _injected_faults:
                raise RuntimeError(f"injected fault in {name}")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s%s", name, _short(args[1:], context_type))
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OverlayError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            err = exc.errno
            raise pyfuse3.FUSEError(err if type(err) is int and err > 0 else errno.EIO) from None
        except PluginFault as exc:
            # The plugin's own exception, if any, is in the traceback as the cause.
            log.error("%s; answering EIO to %s%s", exc, name, _short(args[1:], context_type),
                      exc_info=exc.__cause__ is not None)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s%s failed unexpectedly; answering EIO", name, _short(args[1:], context_type))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


def _short(args: tuple[Any, ...], context_type: type) -> str:
    text = ", ".join(repr(a) for a in args if not isinstance(a, context_type))
    return f"({text[:200]})"
