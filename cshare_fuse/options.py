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
    parts = value.split(":")
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


def parse_command_line(argv: list[str]) -> MountConfig:
    """Parse `[-f] [-d] [-o OPT[,OPT...]]... [SOURCE] MOUNTPOINT` in any order."""
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
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
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

    if not positional:
        raise ConfigError(f"no mountpoint given; {USAGE}")
    if len(positional) > 2:
        raise ConfigError(f"too many arguments {positional!r}; {USAGE}")
    mountpoint = positional[-1]
    source = positional[0] if len(positional) == 2 else None

    values: dict[str, object] = {}
    fuse_opts: set[str] = set()
    warnings: list[str] = []
    lowers: tuple[LowerSpec, ...] | None = None
    for opt in opts:
        name, has_value, raw = opt.partition("=")
        value = raw if has_value else None

        def need(name: str = name, value: str | None = value) -> str:
            if value is None or value == "":
                raise ConfigError(f"option {name} needs a value ({name}=...)")
            return value

        if name == "lowerdir":
            lowers = parse_lowerdir(need())
        elif name == "upperdir":
            values["upperdir"] = split_escaped(need(), ":")[0]
        elif name == "workdir":
            values["workdir"] = split_escaped(need(), ":")[0]
        elif name == "plugins":
            values["plugins"] = tuple(p for p in split_escaped(need(), ":") if p)
        elif name == "squash_to_root":
            values["squash_to_uid"] = 0
            values["squash_to_gid"] = 0
        elif name == "squash_to_uid":
            values["squash_to_uid"] = _int_value(name, need())
        elif name == "squash_to_gid":
            values["squash_to_gid"] = _int_value(name, need())
        elif name == "uidmapping":
            values["uidmapping"] = parse_mapping(name, need())
        elif name == "gidmapping":
            values["gidmapping"] = parse_mapping(name, need())
        elif name == "xattr_permissions":
            values["xattr_permissions"] = _int_value(name, need(), 0, 2)
        elif name == "static_nlink":
            values["static_nlink"] = _bool_value(name, value)
        elif name == "timeout":
            try:
                seconds = float(need())
            except ValueError:
                raise ConfigError(f"timeout={value!r}: expected seconds") from None
            if not seconds >= 0:
                raise ConfigError(f"timeout={value!r}: must not be negative")
            values["timeout"] = seconds
        elif name == "writeback":
            values["writeback"] = _bool_value(name, value)
        elif name == "fsync":
            values["fsync"] = _bool_value(name, value)
        elif name == "noxattrs":
            values["noxattrs"] = _bool_value(name, value)
        elif name == "max_write":
            _int_value(name, need(), 4096, 2**24)  # still refuse a malformed value
            warnings.append(f"{opt} is not supported (pyfuse3 cannot negotiate it); "
                            "the kernel's default write size is used")
        elif name in FUSE_PASSTHROUGH:
            if value is not None:
                raise ConfigError(f"option {name} takes no value")
            if name == "ro":
                values["read_only"] = True
            fuse_opts.add(name)
        elif name == "volatile":
            values["fsync"] = False  # fuse-overlayfs: volatile means no fsync at all
        elif name in ACCEPTED_NOOPS:
            if name == "xino" and value not in (None, "off", "auto", "on"):
                raise ConfigError(f"xino={value!r}: expected off, auto or on")
            if name == "fast_ino":
                _bool_value(name, value)
            if name == "redirect_dir" and value not in ("off", "nofollow", None):
                warnings.append(f"redirect_dir={value} is not supported; behaving as redirect_dir=off")
        elif name in ("fsname", "subtype"):
            fuse_opts.add(f"{name}={need()}")
        else:
            warnings.append(f"unknown option {opt!r} ignored")

    if lowers is None:
        raise ConfigError("no lowerdir= given; at least one lower layer is required")
    if ("workdir" in values) != ("upperdir" in values):
        missing = "workdir" if "upperdir" in values else "upperdir"
        raise ConfigError(f"upperdir and workdir go together: {missing}= is missing")
    return MountConfig(
        mountpoint=mountpoint,
        lowers=lowers,
        source=source,
        foreground=foreground,
        debug=debug,
        fuse_options=frozenset(fuse_opts),
        warnings=tuple(warnings),
        **values,  # type: ignore[arg-type]
    )
