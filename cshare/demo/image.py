"""The built-in demo image: a tiny busybox root filesystem with owners and modes that matter.

It holds exactly the cases cshare exists for (issue 5):

- /etc/secret          root:root 0600  (only container root may read it)
- /root/private/       root:root 0700, with /root/private/note (0600)
- /var/www/index.html  33:33 0640 in /var/www (33:33 0750): www-data's file
- /usr/bin/su-demo     root:root 4755  a setuid copy of busybox
- /dev/null            char 1 3, 0666  a device node
- /bin/busybox plus applet symlinks, /etc/passwd and /etc/group (root,
  www-data 33, nobody 65534), /tmp 1777.

`build_demo_rootfs(dir)` creates it (as root: owners and devices need it);
`import_demo_image()` packs it with `tar --numeric-owner` and `podman import`s
it with a CMD, so the image has a run configuration.  No registry is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import CshareError

DEMO_IMAGE = "localhost/cshare-demo:latest"
DEMO_CMD = '["/bin/sh"]'
APPLETS = (
    "sh", "ls", "cat", "id", "stat", "touch", "echo", "mkdir", "rm", "cp", "mv", "ln",
    "chmod", "chown", "find", "grep", "head", "printf", "test", "[", "true", "false",
    "env", "sleep", "wc", "sed", "su", "whoami", "readlink",
)  # fmt: skip

PASSWD = """root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/var/www:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
"""
GROUP = """root:x:0:
www-data:x:33:
nogroup:x:65534:
"""

WWW_UID = 33


def busybox_path() -> Path:
    """busybox-static (a dynamic busybox would need the host's libraries inside the image)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file():
            return path
    raise CshareError("busybox is not installed; apt-get install busybox-static")


def _file(path: Path, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    path.write_text(text)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _dir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def build_demo_rootfs(root: Path) -> Path:
    """Create the demo tree in the (new or empty) directory `root`; needs root."""
    if os.geteuid() != 0:
        raise CshareError(
            "building the demo image needs root (owners and a device node); run it with sudo"
        )
    root = Path(root)
    _dir(root, 0o755)
    for d in ("bin", "etc", "usr/bin", "var", "dev", "proc", "sys", "run"):
        _dir(root / d, 0o755)
    _dir(root / "tmp", 0o1777)
    busybox = root / "bin" / "busybox"
    shutil.copyfile(busybox_path(), busybox)
    os.chmod(busybox, 0o755)
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    _file(root / "etc" / "passwd", PASSWD, 0o644)
    _file(root / "etc" / "group", GROUP, 0o644)
    _file(root / "etc" / "secret", "only root may read this\n", 0o600)
    _dir(root / "root", 0o700)
    _dir(root / "root" / "private", 0o700)
    _file(root / "root" / "private" / "note", "root's private note\n", 0o600)
    _dir(root / "var" / "www", 0o750, WWW_UID, WWW_UID)
    _file(
        root / "var" / "www" / "index.html", "<h1>served by uid 33</h1>\n", 0o640, WWW_UID, WWW_UID
    )
    su_demo = root / "usr" / "bin" / "su-demo"
    shutil.copyfile(busybox_path(), su_demo)
    os.chown(su_demo, 0, 0)
    os.chmod(su_demo, 0o4755)  # after chown: chown clears setuid
    null = root / "dev" / "null"
    os.mknod(null, 0o020666, os.makedev(1, 3))
    os.chmod(null, 0o666)
    return root


def import_demo_image(
    name: str = DEMO_IMAGE,
    podman_args: Sequence[str] = (),
    *,
    podman: str = "podman",
    env: dict[str, str] | None = None,
) -> str:
    """Build the demo tree, tar it (numeric owners) and `podman import` it as `name`; return the image id.

    `podman_args` go before `import` (e.g. `--root DIR --runroot DIR2
    --storage-driver overlay` for a private store).
    """
    with tempfile.TemporaryDirectory(prefix="cshare-demo-") as tmp:
        rootfs = build_demo_rootfs(Path(tmp) / "rootfs")
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(tarball), "."],
            check=True,
            capture_output=True,
        )
        proc = subprocess.run(
            [podman, *podman_args, "import", "--change", f"CMD={DEMO_CMD}", str(tarball), name],
            capture_output=True,
            text=True,
            env=env,
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CshareError(f"podman import of the demo image failed: {last}")
    image_id = proc.stdout.strip().splitlines()[-1]
    return image_id.removeprefix("sha256:")
