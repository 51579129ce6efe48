"""The demo's podman-native part: `cshare setup`, then plain `podman run IMAGE` as the user.

After the `cshare mount` part, the same user configures podman with `cshare
setup --store STORE` and runs the shared image directly, as container root and
as uid 33: no unshare, no mount, no --rootfs, the image's own config.  The
user's podman configuration and graph root for this are private to the demo
(XDG_CONFIG_HOME below the demo directory), so the user's real
~/.config/containers is never touched and nothing is left once the demo
directory is removed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

STORAGE_CONF = """# the demo user's podman, private to this demo run
[storage]
driver = "overlay"
graphroot = "{graph}"
runroot = "{run}"
"""


def _private_config(user: Any, workdir: Path) -> Path:
    """XDG_CONFIG_HOME for the user: containers/storage.conf with a graph root in the demo dir."""
    config = workdir / "user-config"
    graph = workdir / "user-graph"
    for d in (config, config / "containers", graph, graph / "run"):
        d.mkdir(mode=0o700)
        os.chown(d, user.uid, user.gid)
    conf = config / "containers" / "storage.conf"
    conf.write_text(STORAGE_CONF.format(graph=graph / "root", run=graph / "run"))
    os.chown(conf, user.uid, user.gid)
    return config


def run_native(user: Any, image: str, store: Path, workdir: Path, step: Callable[..., Any],
               scripts: tuple[str, str]) -> tuple[str, str, str]:
    """(setup output, container-root output, uid-33 output) of the podman-native path."""
    native = dataclasses.replace(user, config_home=_private_config(user, workdir))
    with step("setup", f"{user.name}: cshare setup (storage.conf: the shared store, cshare-overlay)"):
        setup_out = native.must(["cshare", "setup", "--store", str(store)], "cshare setup")
    as_root_script, www_script = scripts
    with step("podman_run", f"{user.name}: podman run {image} (no unshare, no mount, no --rootfs)"):
        as_root = native.must(["podman", "run", "--rm", image, "/bin/sh", "-c", as_root_script],
                              f"podman run {image}")
        as_www = native.must(["podman", "run", "--rm", "--user", "33:33", image, "/bin/sh", "-c",
                              www_script], f"podman run --user 33 {image}")
    return setup_out, as_root, as_www
