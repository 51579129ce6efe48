"""The fuse-overlayfs command line, parsed into one frozen `MountConfig`.

Pure: no file is touched here (checking that layers exist is `main`'s job), so
the cshare CLI can build and check a command line with the same code.  Grammar
and option names: shared/docs/formats.md §4.  Every mount parses its command
line before it mounts, so this module imports nothing heavy (cshare_fuse.records
instead of dataclasses, no re).
"""

from __future__ import annotations

from .errors import ConfigError
from .formats.optsyntax import split_escaped, split_options
from .records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    #: What an `-o` option does: handler(parsed so far, name, value or None).
    Handler = Callable[["_Parsed", str, "str | None"], None]


@record
class LowerSpec:
    """One lower layer: a directory, or `//NAME/DATA/PATH` served by plugin NAME."""

    path: str
    plugin: str | None = None
    data: str = ""

    def __str__(self) -> str:
        if self.plugin is None:
            return self.path
        return f"//{self.plugin}/{self.data}/{self.path}"


@record
class IdMapping:
    """`FILEID:FUSEID:LEN` ranges: an id stored in the layers <-> an id shown by the mount."""

    ranges: tuple[tuple[int, int, int], ...] = ()

    def to_fuse(self, file_id: int, overflow: int = 65534) -> int:
        if not self.ranges:
            return file_id
        for start_file, start_fuse, length in self.ranges:
            if start_file <= file_id < start_file + length:
                return start_fuse + file_id - start_file
        return overflow

    def to_file(self, fuse_id: int) -> int | None:
        if not self.ranges:
            return fuse_id
        for start_file, start_fuse, length in self.ranges:
            if start_fuse <= fuse_id < start_fuse + length:
                return start_file + fuse_id - start_fuse
        return None


#: FUSE options handed to the kernel/libfuse as they are.
FUSE_PASSTHROUGH = frozenset(
    {"allow_other", "allow_root", "default_permissions", "suid", "nosuid", "dev", "nodev",
     "exec", "noexec", "noatime", "atime", "relatime", "ro", "rw", "auto_unmount"}
)
#: Accepted for compatibility; they change nothing here (each says why in the man page).
ACCEPTED_NOOPS = frozenset({"noacl", "redirect_dir", "xino", "fast_ino", "nofail",
                            "_netdev", "user", "users", "auto", "noauto", "defaults"})
#: SELinux mount labels (podman passes `context="..."` on SELinux hosts): accepted, not applied.
SELINUX_LABELS = frozenset({"context", "fscontext", "defcontext", "rootcontext"})


@record
class MountConfig:
    """Everything the command line said, validated for syntax."""

    __uncompared__ = frozenset({"warnings"})

    mountpoint: str
    lowers: tuple[LowerSpec, ...]
    upperdir: str | None = None
    workdir: str | None = None
    source: str | None = None
    foreground: bool = False
    debug: bool = False
    plugins: tuple[str, ...] = ()
    squash_to_uid: int | None = None
    squash_to_gid: int | None = None
    uidmapping: IdMapping = IdMapping()
    gidmapping: IdMapping = IdMapping()
    xattr_permissions: int = 0
    static_nlink: bool = False
    timeout: float = 1e9  # lower layers are immutable while mounted: cache hard
    # Off by default: with the kernel's writeback cache, mtime/ctime of regular
    # files are kept by the kernel and drift from the kernel overlayfs's (a
    # same-size truncate keeps the old mtime); measured, small-file creation is
    # also faster without it.  writeback=1 helps streams of small writes.
    writeback: bool = False
    fsync: bool = True
    noxattrs: bool = False
    read_only: bool = False
    fuse_options: frozenset[str] = frozenset()
    warnings: tuple[str, ...] = ()


USAGE = (
    "usage: cshare-overlay [-f] [-d] -o lowerdir=A[:B...][,upperdir=U,workdir=W][,OPT...] "
    "[SOURCE] MOUNTPOINT"
)


def parse_lower(entry: str) -> LowerSpec:
    """`//NAME/DATA/PATH` (plugin) or a plain path."""
    if not entry:
        raise ConfigError("lowerdir has an empty layer (two colons in a row?)")
    if not entry.startswith("//"):
        return LowerSpec(entry)
    rest = entry[2:]
    name, sep, after_name = rest.partition("/")
    data, sep2, path = after_name.partition("/")
    if not name or not sep or not sep2 or not path:
        raise ConfigError(
            f"lowerdir entry {entry!r} is not //NAME/DATA/PATH (e.g. //test//rootfs)"
        )
    return LowerSpec(path=path, plugin=name, data=data)


def parse_lowerdir(value: str) -> tuple[LowerSpec, ...]:
    if not value:
        raise ConfigError("lowerdir= is empty; give at least one layer")
    return tuple(parse_lower(e) for e in split_escaped(value, ":"))


def parse_mapping(name: str, value: str) -> IdMapping:
    """`FILEID:FUSEID:LEN[:...]`; containers/storage writes each triple with a
    leading colon (`:0:1000:1:1:100000:65536`), so one leading colon is allowed."""
    parts = value.removeprefix(":").split(":")
    if len(parts) % 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ConfigError(f"{name}={value!r}: expected FILEID:FUSEID:LEN[:FILEID:FUSEID:LEN...]")
    nums = [int(p) for p in parts]
    ranges = tuple((nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3))
    if any(length == 0 for _, _, length in ranges):
        raise ConfigError(f"{name}={value!r}: a range has length 0")
    return IdMapping(ranges)


def _int_value(name: str, value: str, low: int = 0, high: int = 2**32 - 2) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected a whole number") from None
    if not low <= number <= high:
        raise ConfigError(f"{name}={value!r}: must be between {low} and {high}")
    return number


def _bool_value(name: str, value: str | None) -> bool:
    if value is None or value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r}: expected 0 or 1")


def _split_argv(argv: list[str]) -> tuple[list[str], list[str], bool, bool]:
    """`[-f] [-d] [-o OPT[,OPT...]]... [SOURCE] MOUNTPOINT` in any order ->
    (options, positional arguments, foreground, debug)."""
    positional: list[str] = []
    opts: list[str] = []
    foreground = debug = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o":
            if i + 1 >= len(argv):
                raise ConfigError("-o needs an argument")
            opts.extend(split_options(argv[i + 1]))
            i += 1
        elif arg.startswith("-o"):
            opts.extend(split_options(arg[2:]))
        elif arg == "-f":
            foreground = True
        elif arg == "-d" or arg == "--debug":
            debug = foreground = True
        elif arg == "-s":
            pass  # libfuse's single-thread flag: this daemon is one trio loop anyway
        elif arg == "--":
            positional.extend(argv[i + 1 :])
            break
        elif arg.startswith("-") and arg != "-":
            raise ConfigError(f"unknown flag {arg}; {USAGE}")
        else:
            positional.append(arg)
        i += 1
    return opts, positional, foreground, debug


class _Parsed:
    """What the `-o` options have said so far (the handlers below fill it in)."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.fuse_options: set[str] = set()
        self.warnings: list[str] = []
        self.lowers: tuple[LowerSpec, ...] | None = None


def _need(name: str, value: str | None) -> str:
    if value is None or value == "":
        raise ConfigError(f"option {name} needs a value ({name}=...)")
    return value


def _store(field: str, convert: Callable[[str, str], object]) -> Handler:
    """A handler for `NAME=VALUE` stored in MountConfig.`field` as convert(NAME, VALUE)."""
    def handle(p: _Parsed, name: str, value: str | None) -> None:
        p.values[field] = convert(name, _need(name, value))
    return handle


def _switch(field: str) -> Handler:
    """A handler for `NAME`, `NAME=1` or `NAME=0` stored in MountConfig.`field`."""
    def handle(p: _Parsed, name: str, value: str | None) -> None:
        p.values[field] = _bool_value(name, value)
    return handle


def _first_path(name: str, value: str) -> str:
    return split_escaped(value, ":")[0]


def _plugin_names(name: str, value: str) -> tuple[str, ...]:
    return tuple(p for p in split_escaped(value, ":") if p)


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected seconds") from None
    if not seconds >= 0:
        raise ConfigError(f"{name}={value!r}: must not be negative")
    return seconds


def _lowerdir(p: _Parsed, name: str, value: str | None) -> None:
    p.lowers = parse_lowerdir(_need(name, value))


def _squash_to_root(p: _Parsed, name: str, value: str | None) -> None:
    p.values["squash_to_uid"] = p.values["squash_to_gid"] = 0


def _volatile(p: _Parsed, name: str, value: str | None) -> None:
    p.values["fsync"] = False  # fuse-overlayfs: volatile means no fsync at all


def _max_write(p: _Parsed, name: str, value: str | None) -> None:
    _int_value(name, _need(name, value), 4096, 2**24)  # still refuse a malformed value
    p.warnings.append(f"{name}={value} is not supported (pyfuse3 cannot negotiate it); "
                      "the kernel's default write size is used")


def _passthrough(p: _Parsed, name: str, value: str | None) -> None:
    if value is not None:
        raise ConfigError(f"option {name} takes no value")
    if name == "ro":
        p.values["read_only"] = True
    p.fuse_options.add(name)


def _fuse_value(p: _Parsed, name: str, value: str | None) -> None:
    p.fuse_options.add(f"{name}={_need(name, value)}")


def _noop(p: _Parsed, name: str, value: str | None) -> None:
    pass


def _xino(p: _Parsed, name: str, value: str | None) -> None:
    if value not in (None, "off", "auto", "on"):
        raise ConfigError(f"xino={value!r}: expected off, auto or on")


def _fast_ino(p: _Parsed, name: str, value: str | None) -> None:
    _bool_value(name, value)


def _redirect_dir(p: _Parsed, name: str, value: str | None) -> None:
    if value not in ("off", "nofollow", None):
        p.warnings.append(f"redirect_dir={value} is not supported; behaving as redirect_dir=off")


def _selinux_label(p: _Parsed, name: str, value: str | None) -> None:
    label = _need(name, value)
    if len(label) >= 2 and label[0] == label[-1] == '"':
        label = label[1:-1]
    p.warnings.append(f"{name}={label} ignored: cshare-overlay does not apply SELinux labels")


#: Every `-o` option: its name -> what it does to the configuration (formats.md §4).
OPTIONS: dict[str, Handler] = {
    "lowerdir": _lowerdir,
    "upperdir": _store("upperdir", _first_path),
    "workdir": _store("workdir", _first_path),
    "plugins": _store("plugins", _plugin_names),
    "squash_to_root": _squash_to_root,
    "squash_to_uid": _store("squash_to_uid", _int_value),
    "squash_to_gid": _store("squash_to_gid", _int_value),
    "uidmapping": _store("uidmapping", parse_mapping),
    "gidmapping": _store("gidmapping", parse_mapping),
    "xattr_permissions": _store("xattr_permissions", lambda n, v: _int_value(n, v, 0, 2)),
    "static_nlink": _switch("static_nlink"),
    "timeout": _store("timeout", _seconds),
    "writeback": _switch("writeback"),
    "fsync": _switch("fsync"),
    "noxattrs": _switch("noxattrs"),
    "volatile": _volatile,
    "max_write": _max_write,
    "fsname": _fuse_value,
    "subtype": _fuse_value,
    **{name: _passthrough for name in FUSE_PASSTHROUGH},
    **{name: _noop for name in ACCEPTED_NOOPS},
    "xino": _xino,
    "fast_ino": _fast_ino,
    "redirect_dir": _redirect_dir,
    **{name: _selinux_label for name in SELINUX_LABELS},
}


def parse_command_line(argv: list[str]) -> MountConfig:
    """Parse `[-f] [-d] [-o OPT[,OPT...]]... [SOURCE] MOUNTPOINT` in any order."""
    opts, positional, foreground, debug = _split_argv(argv)
    if not positional:
        raise ConfigError(f"no mountpoint given; {USAGE}")
    if len(positional) > 2:
        raise ConfigError(f"too many arguments {positional!r}; {USAGE}")
    parsed = _Parsed()
    for opt in opts:
        name, has_value, raw = opt.partition("=")
        handler = OPTIONS.get(name)
        if handler is None:
            parsed.warnings.append(f"unknown option {opt!r} ignored")
        else:
            handler(parsed, name, raw if has_value else None)
    if parsed.lowers is None:
        raise ConfigError("no lowerdir= given; at least one lower layer is required")
    values = parsed.values
    if ("workdir" in values) != ("upperdir" in values):
        missing = "workdir" if "upperdir" in values else "upperdir"
        raise ConfigError(f"upperdir and workdir go together: {missing}= is missing")
    return MountConfig(
        mountpoint=positional[-1],
        lowers=parsed.lowers,
        source=positional[0] if len(positional) == 2 else None,
        foreground=foreground,
        debug=debug,
        fuse_options=frozenset(parsed.fuse_options),
        warnings=tuple(parsed.warnings),
        **values,  # type: ignore[arg-type]
    )
