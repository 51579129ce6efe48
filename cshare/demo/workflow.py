"""`cshare demo`: the whole workflow on the built-in image, shown as one table.

Root builds the demo image (cshare.demo.image) into a private podman store,
makes it shared into a demo shared store, then an ordinary user (alice by
default, created if missing) does what users do: `podman unshare cshare mount`,
`podman run --rootfs`, `podman unshare cshare umount`, then the podman-native
path (cshare.demo.native): `cshare setup` and plain `podman run IMAGE`.  Every fact in the
table is observed, not assumed: the host column is `stat` on root's own image
layer, the "without cshare" column is the user trying to reach that same file,
and the container column is `stat` and `cat` run inside the user's container.
Everything the demo creates lives in one directory under /var/tmp that is
removed at the end (unless --keep); a user it had to create is kept and named.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cli.console import CshareError, print_json, stderr, stdout
from ..system.mountinfo import points_below
from ..system.runtime_dir import prepare_runtime_dir, runtime_dir_path

#: containers.conf for the demo user's rootless podman.  runc: crun refuses some
#: cgroup setups ("hybrid mode"); cgroupfs and a file event log: the user has no
#: systemd session when started from root's shell.
USER_CONTAINERS_CONF = """[containers]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
#: Root's podman for the private store: its default open-files limit is refused
#: on some machines (machine-notes.md), so give explicit ones.
ROOT_CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""
PODMAN_RUN = ["podman", "run", "--rm", "--network", "none", "--runtime", "runc"]
MIN_ORDINARY_UID = 1000
COMMAND_TIMEOUT = 180


@dataclass(frozen=True)
class Probe:
    """A path of the demo image whose owner and mode the table shows."""

    path: str
    what: str


PROBES = (
    Probe("/etc/secret", "root's file, 0600"),
    Probe("/root/private", "root's directory, 0700"),
    Probe("/var/www/index.html", "www-data's file (uid 33), 0640"),
    Probe("/usr/bin/su-demo", "setuid root program"),
    Probe("/dev/null", "device node"),
)
SECRET = "/etc/secret"
PRIVATE_DIR = "/root/private"
WWW_FILE = "/var/www/index.html"
WWW_UID = 33


@dataclass
class Row:
    """One line of a result table: an inode's owner and mode, or an access check."""

    kind: str  # "owner" or "access"
    item: str
    host: str
    without_cshare: str
    with_cshare: str
    ok: bool


@dataclass
class DemoResult:
    user: str
    image: str
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)


# ------------------------------------------------------------------ running as the user
@dataclass
class DemoUser:
    """An ordinary user set up for rootless podman (runtime dir, containers.conf)."""

    name: str
    uid: int
    gid: int
    home: Path
    containers_conf: Path
    data_home: Path
    created: bool = False
    config_home: Path | None = None  # XDG_CONFIG_HOME (the podman-native part's own podman)

    @property
    def runtime_dir(self) -> Path:
        return runtime_dir_path(self.uid)

    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_DATA_HOME": str(self.data_home),
            "CONTAINERS_CONF": str(self.containers_conf),
            "LANG": "C.UTF-8",
        } | ({"XDG_CONFIG_HOME": str(self.config_home)} if self.config_home else {})

    def run(self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            env=self.env(),
            cwd=str(self.home) if self.home.is_dir() else "/",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def must(self, argv: Sequence[str], what: str) -> str:
        done = self.run(argv)
        if done.returncode != 0:
            raise CshareError(f"{what} failed as {self.name}: {_last_line(done)}")
        return done.stdout


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [
        ln
        for ln in (done.stderr + "\n" + done.stdout).splitlines()
        if ln.strip() and "level=warning" not in ln
    ]
    return lines[-1].strip() if lines else f"exit status {done.returncode}"


def has_subordinate_ids(name: str, uid: int) -> bool:
    for table in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(table).read_text().splitlines()
        except FileNotFoundError:
            return False
        if not any(ln.split(":")[0] in (name, str(uid)) for ln in lines if ":" in ln):
            return False
    return True


def prepare_user(name: str, workdir: Path) -> DemoUser:
    """The demo user (created with useradd -m if missing), ready for rootless podman."""
    created = False
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        done = subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], capture_output=True, text=True)
        if done.returncode != 0:
            raise CshareError(f"could not create the demo user {name}: {_last_line(done)}") from None
        entry = pwd.getpwnam(name)
        created = True
    if entry.pw_uid < MIN_ORDINARY_UID:
        raise CshareError(
            f"{name} (uid {entry.pw_uid}) is not an ordinary user; choose one with --user"
        )
    if not has_subordinate_ids(name, entry.pw_uid):
        raise CshareError(
            f"{name} has no subordinate ids in /etc/subuid and /etc/subgid: "
            f"usermod --add-subuids 200000-265535 --add-subgids 200000-265535 {name}"
        )
    # What logind would make at login; the demo user has no session.
    prepare_runtime_dir(entry.pw_uid, entry.pw_gid)
    conf = workdir / "user-containers.conf"
    conf.write_text(USER_CONTAINERS_CONF)
    conf.chmod(0o644)
    data_home = workdir / "user-data"
    data_home.mkdir(mode=0o700)
    os.chown(data_home, entry.pw_uid, entry.pw_gid)
    return DemoUser(
        name=name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=Path(entry.pw_dir),
        containers_conf=conf,
        data_home=data_home,
        created=created,
    )


@contextmanager
def fuse_for_users(notes: list[str]) -> Iterator[None]:
    """/dev/fuse usable by ordinary users (0666, as distributions ship it) for the demo's duration."""
    try:
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    except FileNotFoundError:
        raise CshareError("/dev/fuse does not exist: modprobe fuse (Debian package fuse3)") from None
    if mode & 0o006 == 0o006:
        yield
        return
    os.chmod("/dev/fuse", 0o666)
    notes.append(f"/dev/fuse was mode {mode:04o}; set to 0666 for the demo, then restored")
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


# ------------------------------------------------------------------ observations
def describe_stat(st: os.stat_result) -> str:
    """`0600 0:0`, `dir 0700 0:0`, `char 1,3 0666 0:0`: the way the table shows an inode."""
    mode = f"{stat.S_IMODE(st.st_mode):04o} {st.st_uid}:{st.st_gid}"
    if stat.S_ISDIR(st.st_mode):
        return f"dir {mode}"
    if stat.S_ISCHR(st.st_mode):
        return f"char {os.major(st.st_rdev)},{os.minor(st.st_rdev)} {mode}"
    if stat.S_ISBLK(st.st_mode):
        return f"block {os.major(st.st_rdev)},{os.minor(st.st_rdev)} {mode}"
    return mode


#: busybox stat: the same shape as describe_stat, parsed back by parse_stat_line.
STAT_FORMAT = "%n|%F|%a|%u|%g|%t|%T"


def parse_stat_line(line: str) -> tuple[str, str]:
    """A `STAT_FORMAT` line -> (path, description like describe_stat)."""
    name, kind, perm, uid, gid, major, minor = line.split("|")
    mode = f"{int(perm, 8):04o} {uid}:{gid}"
    if kind == "directory":
        return name, f"dir {mode}"
    if kind.startswith("character"):
        return name, f"char {int(major, 16)},{int(minor, 16)} {mode}"
    if kind.startswith("block"):
        return name, f"block {int(major, 16)},{int(minor, 16)} {mode}"
    return name, mode


def tree_digest(root: Path) -> str:
    """A digest of every entry's name, type, owner, mode, size, mtime, xattrs and content."""
    import xattr

    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            h.update(f"{os.path.relpath(path, root)}|{st.st_mode}|{st.st_uid}|{st.st_gid}|"
                     f"{st.st_size}|{st.st_mtime_ns}|{st.st_rdev}\n".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
                continue
            for key in sorted(xattr.listxattr(path, symlink=True)):
                h.update(key.encode() + b"=" + xattr.getxattr(path, key, symlink=True))
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()


def _container_script() -> str:
    paths = " ".join(p.path for p in PROBES if not p.path.startswith("/dev/"))
    return "; ".join(
        [
            f"stat -c '{STAT_FORMAT}' {paths}",
            f"cat {SECRET} >/dev/null 2>&1 && echo read-secret:yes || echo read-secret:no",
            f"ls {PRIVATE_DIR} >/dev/null 2>&1 && echo list-private:yes || echo list-private:no",
            f"echo written-by-the-container > /demo-{os.getpid()}",
        ]
    )


WWW_SCRIPT = (
    f"cat {WWW_FILE} >/dev/null 2>&1 && echo www-read:yes || echo www-read:no; "
    f"cat {SECRET} >/dev/null 2>&1 && echo www-refused:no || echo www-refused:yes"
)


def _flags(output: str) -> dict[str, bool]:
    flags = {}
    for line in output.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and value in ("yes", "no") and "|" not in key:
            flags[key] = value == "yes"
    return flags


def _stats(output: str) -> dict[str, str]:
    seen = {}
    for line in output.splitlines():
        if line.count("|") == 6:
            path, desc = parse_stat_line(line.strip())
            seen[path] = desc
    return seen


# ------------------------------------------------------------------ the workflow
class _Steps:
    """Prints one line per step with its duration (on stderr: stdout is the result)."""

    def __init__(self, result: DemoResult, quiet: bool):
        self.result = result
        self.quiet = quiet

    @contextmanager
    def step(self, key: str, text: str) -> Iterator[None]:
        start = time.monotonic()
        if self.quiet:
            yield
        else:
            with stderr.status(text + " ..."):
                yield
        took = time.monotonic() - start
        self.result.timings[key] = round(took, 3)
        if not self.quiet:
            stderr.print(f"[green]✓[/] {text} [dim]({took:.1f} s)[/]")


def _check_tools() -> None:
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("newuidmap", "uidmap"),
                          ("fusermount3", "fuse3"), ("tar", "tar")):
        if shutil.which(tool) is None:
            raise CshareError(f"{tool} is not installed: apt-get install {package} (or run scripts/install)")


def _unmount_below(path: Path) -> None:
    for point in points_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _root_builds_and_shares(workdir: Path, steps: _Steps) -> tuple[Path, Path]:
    """Root imports the demo image into a private podman store and makes it shared:
    (the shared store, the image's layer in podman's store)."""
    from ..store.make_shared import make_shared
    from .image import DEMO_IMAGE, import_demo_image

    podman_dir = workdir / "podman"
    podman_dir.mkdir(mode=0o700)
    (podman_dir / "containers.conf").write_text(ROOT_CONTAINERS_CONF)
    podman_args = ["--root", str(podman_dir / "root"), "--runroot", str(podman_dir / "runroot"),
                   "--storage-driver", "overlay"]
    root_env = dict(os.environ, CONTAINERS_CONF=str(podman_dir / "containers.conf"))
    store = workdir / "store"
    with steps.step("import", f"root builds {DEMO_IMAGE} and imports it with podman"):
        import_demo_image(DEMO_IMAGE, podman_args, env=root_env)
        inspect = subprocess.run(
            ["podman", *podman_args, "image", "inspect", "--format",
             "{{.GraphDriver.Data.UpperDir}}", DEMO_IMAGE],
            capture_output=True, text=True, env=root_env, check=False,
        )
        if inspect.returncode != 0:
            raise CshareError(f"podman image inspect failed: {_last_line(inspect)}")
        layer = Path(inspect.stdout.strip())
    with steps.step("make_shared", "root runs cshare make-shared (copy + convert the layers)"):
        make_shared(DEMO_IMAGE, storage_root=podman_dir / "root", store_root=store)
    return store, layer


def _what_the_user_sees_without(user: DemoUser, layer: Path) -> dict[str, str]:
    """The user, without cshare, trying to reach the same files of root's image."""
    without: dict[str, str] = {}
    for p in PROBES:
        done = user.run(["stat", "-c", "%a", str(layer) + p.path], timeout=30)
        without[p.path] = "readable" if done.returncode == 0 else (
            "permission denied" if "denied" in done.stderr.lower() else _last_line(done))
    return without


def _user_mounts_and_runs(user: DemoUser, mnt: Path, store: Path, steps: _Steps) -> tuple[str, str, str]:
    """The user mounts the image, runs two containers on it and unmounts it:
    (output as container root, output as uid 33, stat of the device nodes on the mount)."""
    from .image import DEMO_IMAGE

    with steps.step("mount", f"{user.name}: podman unshare cshare mount"):
        user.must(["podman", "unshare", "cshare", "mount", DEMO_IMAGE, str(mnt), "--store", str(store)],
                  "cshare mount")
    unmounted = False
    try:
        with steps.step("run", f"{user.name}: podman run --rootfs (as container root, then as uid 33)"):
            as_root = user.must([*PODMAN_RUN, "--rootfs", str(mnt), "/bin/sh", "-c", _container_script()],
                                "podman run")
            as_www = user.must([*PODMAN_RUN, "--user", f"{WWW_UID}:{WWW_UID}", "--rootfs", str(mnt),
                                "/bin/sh", "-c", WWW_SCRIPT], "podman run --user 33")
            # Containers get podman's own /dev: look at the image's device node on the mount.
            on_mount = user.must(["podman", "unshare", "stat", "-c", STAT_FORMAT,
                                  *(str(mnt) + p.path for p in PROBES if p.path.startswith("/dev/"))],
                                 "stat on the mount")
        with steps.step("umount", f"{user.name}: podman unshare cshare umount"):
            user.must(["podman", "unshare", "cshare", "umount", str(mnt)], "cshare umount")
            unmounted = True
    finally:
        if not unmounted:
            # The mount lives in the user's podman namespace, out of root's reach.
            user.run(["podman", "unshare", "umount", "-l", str(mnt)], timeout=30)
    return as_root, as_www, on_mount


def run_workflow(user_name: str, workdir: Path, result: DemoResult, steps: _Steps) -> None:
    """Everything between the set-up and the clean-up; fills `result`."""
    store, layer = _root_builds_and_shares(workdir, steps)
    with steps.step("user", f"preparing the ordinary user {user_name}"):
        user = prepare_user(user_name, workdir)
        if user.created:
            result.notes.append(f"created user {user.name} for the demo (remove with: userdel -r {user.name})")
        mnt = workdir / "mnt"
        mnt.mkdir()
        os.chown(mnt, user.uid, user.gid)
        host = {p.path: describe_stat(os.lstat(str(layer) + p.path)) for p in PROBES}
        without = _what_the_user_sees_without(user, layer)
    digest_before = tree_digest(store)
    as_root, as_www, on_mount = _user_mounts_and_runs(user, mnt, store, steps)
    from .image import DEMO_IMAGE
    from .native import run_native

    _setup_out, native_root, native_www = run_native(
        user, DEMO_IMAGE, store, workdir, steps.step, (_container_script(), WWW_SCRIPT))
    digest_after = tree_digest(store)
    _native_rows(result, host, without, native_root, native_www)

    seen = _stats(as_root)
    seen.update({path.removeprefix(str(mnt)): desc for path, desc in _stats(on_mount).items()})
    _owner_rows(result, user, host, without, seen)
    _access_rows(result, user, without, _flags(as_root) | _flags(as_www))
    result.rows.append(Row("access", "shared store unchanged afterwards", "", "",
                           "yes" if digest_before == digest_after else "no",
                           ok=digest_before == digest_after))


def _owner_rows(result: DemoResult, user: DemoUser, host: dict[str, str], without: dict[str, str],
                seen: dict[str, str]) -> None:
    for p in PROBES:
        got = seen.get(p.path, "not seen")
        mark = "*" if p.path.startswith("/dev/") else ""
        result.rows.append(Row("owner", p.path + mark, host[p.path], _short(without[p.path]), got,
                               ok=got == host[p.path]))
    if all(row.without_cshare == "denied" for row in result.rows):
        result.notes.append(f"without cshare, {user.name} cannot reach root's image at all: "
                            "podman's store is readable by root only")
    if any(p.path.startswith("/dev/") for p in PROBES):
        result.notes.append("* containers get podman's own /dev: the image's device node "
                            f"is shown as {user.name} sees it on the mount")


def _access_rows(result: DemoResult, user: DemoUser, without: dict[str, str],
                 flags: dict[str, bool]) -> None:
    def check(item: str, flag: str, expect: bool, without_text: str) -> None:
        value = flags.get(flag)
        shown = "not run" if value is None else ("yes" if value else "no")
        result.rows.append(Row("access", item, "", _short(without_text), shown, ok=value is expect))

    check(f"root reads {SECRET} (0600)", "read-secret", True, without[SECRET])
    check(f"root lists {PRIVATE_DIR} (0700)", "list-private", True, without[PRIVATE_DIR])
    check(f"uid 33 reads {WWW_FILE}", "www-read", True, without[WWW_FILE])
    check(f"uid 33 is refused {SECRET}", "www-refused", True, without[SECRET])
    upper_files = list(user.data_home.glob(f"cshare/mounts/*/upper/demo-{os.getpid()}"))
    result.rows.append(Row("access", f"write /demo-{os.getpid()}: in {user.name}'s upper dir",
                           "", "", "yes" if upper_files else "no", ok=bool(upper_files)))


def _native_rows(result: DemoResult, host: dict[str, str], without: dict[str, str],
                 as_root: str, as_www: str) -> None:
    """The rows of plain `podman run IMAGE` (podman's own /dev hides the image's device)."""
    seen, flags = _stats(as_root), _flags(as_root) | _flags(as_www)
    for p in PROBES:
        if not p.path.startswith("/dev/"):
            got = seen.get(p.path, "not seen")
            result.rows.append(Row("podman", p.path, host[p.path], _short(without[p.path]), got,
                                   ok=got == host[p.path]))
    for item, flag in ((f"root reads {SECRET}", "read-secret"), (f"uid 33 reads {WWW_FILE}", "www-read"),
                       (f"uid 33 is refused {SECRET}", "www-refused")):
        value = flags.get(flag)
        result.rows.append(Row("podman", item, "", "", "not run" if value is None else
                               ("yes" if value else "no"), ok=value is True))


def _short(text: str) -> str:
    return "denied" if "denied" in text else text


def render(result: DemoResult) -> None:
    from rich.table import Table

    def mark(ok: bool) -> str:
        return "[green]✓[/]" if ok else "[red]✗[/]"

    def red_denied(text: str) -> str:
        return f"[red]{text}[/]" if text == "denied" else text

    owners = Table(title=f"{result.image}: owners and modes", title_justify="left")
    owners.add_column("path")
    owners.add_column("root's image")
    owners.add_column(f"{result.user},\nno cshare")
    owners.add_column(f"{result.user}'s container,\nwith cshare")
    owners.add_column("")
    access = Table(title=f"inside {result.user}'s container", title_justify="left")
    access.add_column("check")
    access.add_column(f"{result.user},\nno cshare")
    access.add_column("with cshare")
    access.add_column("")
    native = Table(title=f"{result.user}: cshare setup, then plain podman run {result.image}",
                   title_justify="left")
    native.add_column("path or check")
    native.add_column("root's image")
    native.add_column("with cshare")
    native.add_column("")
    for row in result.rows:
        if row.kind == "podman":
            native.add_row(row.item, row.host, row.with_cshare, mark(row.ok))
        elif row.kind == "owner":
            owners.add_row(row.item, row.host, red_denied(row.without_cshare), row.with_cshare,
                           mark(row.ok))
        else:
            access.add_row(row.item, red_denied(row.without_cshare), row.with_cshare, mark(row.ok))
    stdout.print(owners)
    stdout.print(access)
    stdout.print(native)
    for note in result.notes:
        stdout.print(f"[dim]{note}[/]")
    passed = sum(r.ok for r in result.rows)
    total = sum(result.timings.values())
    if result.ok:
        stdout.print(
            f"[bold green]✓ {passed}/{len(result.rows)} checks passed[/]: {result.user}'s container "
            f"saw root's image with its original owners and modes, {result.user}'s writes stayed "
            f"private and the shared store was untouched ({total:.1f} s)"
        )
    else:
        failed = [r.item for r in result.rows if not r.ok]
        stdout.print(f"[bold red]✗ {len(failed)} of {len(result.rows)} checks failed[/]: " + "; ".join(failed))


def run_demo(user: str = "alice", keep: bool = False, json_out: bool = False) -> DemoResult:
    """The `cshare demo` command: run the workflow, show the table, exit 1 if a check failed."""
    if os.geteuid() != 0:
        raise CshareError("cshare demo must run as root (it builds an image and acts as a user): sudo cshare demo")
    _check_tools()
    from .image import DEMO_IMAGE

    result = DemoResult(user=user, image=DEMO_IMAGE)
    steps = _Steps(result, quiet=json_out)
    workdir = Path(tempfile.mkdtemp(prefix="cshare-demo-", dir="/var/tmp"))
    workdir.chmod(0o755)  # the user reaches the store and the mountpoint below it
    try:
        with fuse_for_users(result.notes):
            run_workflow(user, workdir, result, steps)
    finally:
        _unmount_below(workdir)
        if keep:
            result.notes.append(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if json_out:
        print_json({"ok": result.ok, **asdict(result)})
    else:
        render(result)
    if not result.ok:
        raise SystemExit(1)
    return result
