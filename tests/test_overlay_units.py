"""The overlay's pure logic, without FUSE: command-line parsing, the mount(2)
arguments and the light start-up path, name resolution and merged listings
across layers, node numbering, overrides on layer attributes.  Fast, and
runnable as any user (`make test-fast`)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require
from hypothesis import given
from hypothesis import strategies as st

from cshare_fuse import merge
from cshare_fuse.datasource import DataSource, Stat
from cshare_fuse.errors import ConfigError
from cshare_fuse.formats.optsyntax import escape, lowerdir_value, split_escaped, split_options
from cshare_fuse.formats.overrides import OVERRIDE_XATTR, Override
from cshare_fuse.fusemount import (
    MS_NOATIME,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MountRefused,
    mount_arguments,
)
from cshare_fuse.inodes import NodeTable
from cshare_fuse.layers import LowerLayer, UpperLayer
from cshare_fuse.options import (
    OPTIONS,
    SELINUX_LABELS,
    LowerSpec,
    MountConfig,
    parse_command_line,
)

# ------------------------------------------------------------------ options


def test_lowerdir_order_escapes_and_plugin_entries() -> None:
    config = parse_command_line(
        ["-o", r"lowerdir=/a\:b://test//rootfs://test///srv/root,upperdir=/u,workdir=/w", "/mnt"])
    assert config.lowers == (
        LowerSpec("/a:b"),
        LowerSpec(path="rootfs", plugin="test", data=""),
        LowerSpec(path="/srv/root", plugin="test", data=""),
    )
    assert (config.upperdir, config.workdir, config.mountpoint) == ("/u", "/w", "/mnt")


def test_mount_fuse3_argument_order_and_flags() -> None:
    # mount.fuse3 runs PROGRAM SOURCE MOUNTPOINT -o OPTS
    config = parse_command_line(["overlay", "/mnt", "-o", "lowerdir=/l,rw,dev,suid", "-f"])
    assert config.source == "overlay" and config.mountpoint == "/mnt" and config.foreground
    assert {"dev", "suid"} <= config.fuse_options


@pytest.mark.parametrize("argv, fragment", [
    (["/mnt"], "no lowerdir"),
    (["-o", "lowerdir=/l,upperdir=/u", "/mnt"], "workdir"),
    (["-o", "lowerdir=/l,uidmapping=x", "/mnt"], "uidmapping"),
    (["-o", "lowerdir=/l,xattr_permissions=7", "/mnt"], "xattr_permissions"),
    (["-o", "lowerdir=/l,timeout=abc", "/mnt"], "timeout"),
    (["-o", "lowerdir=//test/rootfs", "/mnt"], "//NAME/DATA/PATH"),
    (["-o", "lowerdir=/a::/b", "/mnt"], "empty layer"),
    (["-o", "lowerdir=/l"], "no mountpoint"),
])
def test_bad_command_lines_name_the_problem(argv: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_command_line(argv)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_and_unsupported_options_are_warnings() -> None:
    config = parse_command_line(["-o", "lowerdir=/l,frobnicate=1,max_write=65536", "/mnt"])
    assert any("frobnicate" in w for w in config.warnings)
    assert any("max_write" in w and "not supported" in w for w in config.warnings)


def test_volatile_turns_fsync_off_and_squash_to_root_sets_both() -> None:
    config = parse_command_line(["-o", "lowerdir=/l,volatile,squash_to_root", "/mnt"])
    assert config.fsync is False
    assert (config.squash_to_uid, config.squash_to_gid) == (0, 0)


# What podman passes to a mount_program (shared/docs/formats.md §5), form by form.
PODMAN_BASE = ("lowerdir=/s/overlay/l/A:/s/overlay/l/B,upperdir=/c/diff,workdir=/c/work")


def podman_parse(extra: str) -> MountConfig:
    return parse_command_line(["-o", f"{PODMAN_BASE},{extra}", "/c/merged"])


def test_podman_argv_with_its_empty_field_and_volatile() -> None:
    config = parse_command_line(["-o", f"{PODMAN_BASE},,volatile", "/c/merged"])
    assert [lower.path for lower in config.lowers] == ["/s/overlay/l/A", "/s/overlay/l/B"]
    assert (config.upperdir, config.workdir, config.mountpoint) == ("/c/diff", "/c/work", "/c/merged")
    assert config.fsync is False
    assert config.warnings == ()  # the empty field is nothing, not an unknown option


def test_podman_id_mappings_have_a_leading_colon() -> None:
    config = podman_parse("uidmapping=:0:1:1001:1001:0:1:1002:1002:64535,gidmapping=:0:1:1001")
    assert config.uidmapping.ranges == ((0, 1, 1001), (1001, 0, 1), (1002, 1002, 64535))
    assert config.gidmapping.ranges == ((0, 1, 1001),)
    assert config.uidmapping.to_fuse(1001) == 0
    for bad in ("::0:1:1", ":0:1", ":0:1:1:"):
        with pytest.raises(ConfigError, match="uidmapping"):
            podman_parse(f"uidmapping={bad}")


def test_podman_single_id_map_squashes() -> None:
    config = podman_parse("squash_to_uid=1000,squash_to_gid=1001")
    assert (config.squash_to_uid, config.squash_to_gid) == (1000, 1001)
    with pytest.raises(ConfigError, match="squash_to_uid"):
        podman_parse("squash_to_uid=-1")


def test_podman_selinux_context_keeps_its_commas_and_is_only_warned_about() -> None:
    label = "system_u:object_r:container_file_t:s0:c123,c456"
    config = podman_parse(f'context="{label}",volatile')
    assert config.fsync is False  # the option after the quoted value is still parsed
    assert len(config.warnings) == 1 and label in config.warnings[0]
    assert "SELinux" in config.warnings[0]
    assert not any("c456" in o for o in config.fuse_options)


def test_podman_force_mask_passes_xattr_permissions() -> None:
    assert podman_parse("xattr_permissions=2").xattr_permissions == 2
    assert podman_parse("xattr_permissions=1").xattr_permissions == 1


def test_every_option_of_the_table_is_parsed_by_its_own_handler() -> None:
    # The table is the parser: no known option may fall through to "unknown".
    for name in OPTIONS:
        value = {"lowerdir": "=/x", "upperdir": "=/u", "workdir": "=/w", "plugins": "=test",
                 "squash_to_uid": "=1", "squash_to_gid": "=1", "uidmapping": "=0:0:1",
                 "gidmapping": "=0:0:1", "xattr_permissions": "=1", "timeout": "=1",
                 "max_write": "=65536", "fsname": "=f", "subtype": "=s", "xino": "=off",
                 "redirect_dir": "=off"}.get(name, "")
        if name in SELINUX_LABELS:
            value = '="u:r:t:s0"'
        extra = ",upperdir=/u,workdir=/w" if name in ("upperdir", "workdir") else ""
        config = parse_command_line(["-o", f"lowerdir=/l,{name}{value}{extra}", "/mnt"])
        assert not any("unknown option" in w for w in config.warnings), name


@given(st.lists(st.text(alphabet="ab:\\/", min_size=1, max_size=8), min_size=1, max_size=5))
def test_escaped_colons_round_trip(parts: list[str]) -> None:
    escaped = ":".join(p.replace("\\", "\\\\").replace(":", "\\:") for p in parts)
    assert split_escaped(escaped, ":") == parts


@given(st.lists(st.text(alphabet='ab:,"=\\/', min_size=1, max_size=8), min_size=1, max_size=5),
       st.text(alphabet='ab:,"=\\/', min_size=1, max_size=8))
def test_escape_is_what_the_option_parser_undoes(parts: list[str], upper: str) -> None:
    # cshare builds command lines with optsyntax.escape; cshare-overlay must read back each path.
    options = split_options(f"lowerdir={lowerdir_value(parts)},upperdir={escape(upper)},ro")
    assert [o.partition("=")[0] for o in options] == ["lowerdir", "upperdir", "ro"]
    assert split_escaped(options[0].partition("=")[2], ":") == parts
    assert split_escaped(options[1].partition("=")[2], ":") == [upper]


# ------------------------------------------------------------------ mounting


def test_option_records_are_frozen_values() -> None:
    one = parse_command_line(["-o", "lowerdir=/l,unknown_thing", "/mnt"])
    two = parse_command_line(["-o", "lowerdir=/l", "/mnt"])
    assert one == two and hash(one) == hash(two)  # warnings do not count
    assert one.warnings and not two.warnings
    assert one != parse_command_line(["-o", "lowerdir=/other", "/mnt"])
    with pytest.raises(AttributeError):
        one.mountpoint = "/elsewhere"  # type: ignore[misc]
    spec = LowerSpec("rootfs", "test")
    assert (spec.path, spec.plugin, spec.data) == ("rootfs", "test", "")
    assert repr(spec) == "LowerSpec(path='rootfs', plugin='test', data='')"
    for bad in (lambda: LowerSpec(), lambda: LowerSpec("a", nosuch=1),  # type: ignore[call-arg]
                lambda: LowerSpec("a", path="b"), lambda: LowerSpec("a", "b", "c", "d")):  # type: ignore[call-arg, misc]
        with pytest.raises(TypeError):
            bad()


def test_mount_arguments_follow_libfuse() -> None:
    options = {"fsname=img", "subtype=cshare-overlay", "default_permissions", "allow_other",
               "suid", "dev", "ro", "noexec", "noatime"}
    source, fstype, flags, data = mount_arguments(options, 7, 0o40755, 0, 0)
    assert (source, fstype) == ("img", "fuse.cshare-overlay")
    assert flags == MS_RDONLY | MS_NOEXEC | MS_NOATIME  # suid and dev cleared the defaults
    assert data.split(",") == ["fd=7", "rootmode=40000", "user_id=0", "group_id=0",
                               "allow_other", "default_permissions"]


def test_mount_arguments_default_to_nosuid_nodev_and_the_callers_ids() -> None:
    source, fstype, flags, data = mount_arguments(set(), 3, 0o40700, 1000, 1001)
    assert (source, fstype, flags) == ("fuse", "fuse", MS_NOSUID | MS_NODEV)
    assert data == "fd=3,rootmode=40000,user_id=1000,group_id=1001"


@pytest.mark.parametrize("option", ["auto_unmount", "allow_root"])
def test_options_only_libfuse_implements_leave_mounting_to_it(option: str) -> None:
    with pytest.raises(MountRefused):
        mount_arguments({option}, 3, 0o40755, 0, 0)


def test_the_start_path_loads_nothing_heavy() -> None:
    # cshare-overlay mounts before it loads pyfuse3 and trio (~70 ms); what it
    # imports to parse, check and mount must stay light, or the wait comes back.
    heavy = ["pyfuse3", "trio", "logging", "ctypes", "importlib.metadata", "typing",
             "dataclasses", "re"]
    code = ("import sys, cshare_fuse.main; "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the start path imports {out.stdout.strip()}"


# ------------------------------------------------------------------ merge


def _layers(tmp_path: Path, spec: list[dict[str, str]]) -> list[LowerLayer]:
    """Lower layers from {path: kind} maps; kinds: file, dir, wh (.wh. file), opq."""
    layers = []
    for i, entries in enumerate(spec):
        root = tmp_path / f"l{i}"
        root.mkdir()
        for path, kind in entries.items():
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dir":
                target.mkdir(exist_ok=True)
            elif kind == "opq":
                target.mkdir(exist_ok=True)
                (target / ".wh..wh..opq").touch()
            elif kind == "wh":
                (target.parent / (".wh." + target.name)).touch()
            else:
                target.write_text(f"{path} in layer {i}\n")
        layers.append(LowerLayer(i, DataSource(str(root))))
    return layers


def test_topmost_entry_wins_and_aufs_whiteouts_hide_below(tmp_path: Path) -> None:
    layers = _layers(tmp_path, [
        {"a": "file", "gone": "wh", "d/x": "file"},
        {"a": "file", "gone": "file", "b": "file", "d/y": "file"},
    ])
    order = (0, 1)
    resolved = merge.resolve(layers, order, b"", b"a")
    assert resolved is not None and resolved.layer == 0 and resolved.has_lower
    assert merge.resolve(layers, order, b"", b"gone") is None
    d = merge.resolve(layers, order, b"", b"d")
    assert d is not None and d.dir_layers == (0, 1)
    assert sorted(merge.merged_names(layers, order, b"")) == [b"a", b"b", b"d"]
    assert sorted(merge.merged_names(layers, d.dir_layers, b"d")) == [b"x", b"y"]


def test_opaque_directory_stops_the_merge(tmp_path: Path) -> None:
    layers = _layers(tmp_path, [{"d": "opq", "d/new": "file"}, {"d/old": "file"}])
    d = merge.resolve(layers, (0, 1), b"", b"d")
    assert d is not None and d.dir_layers == (0,)
    assert merge.merged_names(layers, d.dir_layers, b"d") == [b"new"]


def test_a_file_above_a_directory_hides_it(tmp_path: Path) -> None:
    layers = _layers(tmp_path, [{"d": "file"}, {"d/inner": "file"}])
    d = merge.resolve(layers, (0, 1), b"", b"d")
    assert d is not None and stat.S_ISREG(d.stat.mode) and d.dir_layers == ()


def test_upper_whiteout_device_hides_lower(as_root: None, tmp_path: Path) -> None:
    layers = _layers(tmp_path, [{"f": "file"}])
    upper_root = tmp_path / "upper"
    upper_root.mkdir()
    os.mknod(upper_root / "f", stat.S_IFCHR, 0)
    upper = UpperLayer(0, str(upper_root), honour_overrides=False)
    lower = LowerLayer(1, layers[0].source)
    assert merge.resolve([upper, lower], (0, 1), b"", b"f") is None
    assert merge.merged_names([upper, lower], (0, 1), b"") == [b"f"]  # caller drops it


# ------------------------------------------------------------------ nodes and attributes


def _stat(ino: int, dev: int = 7) -> Stat:
    return Stat(stat.S_IFREG | 0o644, ino, dev, 1, 0, 0, 0, 0, 0, 4096, 0, 0, 0)


def test_node_numbers_are_backing_inodes_and_never_collide() -> None:
    table = NodeTable(primary_dev=7)
    assert table.number_for(_stat(1234)) == 1234
    other_fs = table.number_for(_stat(1234, dev=9))
    assert other_fs != 1234 and other_fs >> 48 == 1
    from cshare_fuse.inodes import Node

    table.add(Node(1234, None, b"x", 0, stat.S_IFREG))
    again = table.number_for(_stat(1234))
    assert again not in (1234, other_fs) and again > 1 << 62
    assert table.number_for(_stat(1)) != 1  # the root's number is never handed out


def test_converted_entry_reports_its_original_attributes(tmp_path: Path) -> None:
    f = tmp_path / "dev-null"
    f.touch()
    os.chmod(f, 0o755)
    try:
        os.setxattr(f, OVERRIDE_XATTR, Override(0, 6, 0o660, stat.S_IFCHR, 1, 3).format())
    except OSError as exc:
        require(False, f"user xattrs on {tmp_path} ({exc.strerror})")
    source = DataSource(str(tmp_path))
    assert stat.S_ISREG(source.stat(b"dev-null").mode)  # overrides not honoured yet
    source.honour_overrides = True
    shown = source.stat(b"dev-null")
    assert stat.S_ISCHR(shown.mode) and stat.S_IMODE(shown.mode) == 0o660
    assert (shown.uid, shown.gid, shown.rdev) == (0, 6, os.makedev(1, 3))


# ------------------------------------------------------------------ copy-up


def _copy_up_one(tmp_path: Path, name: str) -> tuple[Path, Path, Path, tuple[int, int] | None]:
    """Copy lower/d/NAME (data, mode 0640, times) up; (upper file, lower file, workdir, identity)."""
    from cshare_fuse import copyup

    lower_root, upper_root, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower_root / "d", upper_root / "d", work):
        d.mkdir(parents=True, exist_ok=True)
    src = lower_root / "d" / name
    src.write_bytes(b"lower data\n" * 100)
    src.chmod(0o640)
    os.utime(src, ns=(1_000_000_000, 2_000_000_000))
    source = DataSource(str(lower_root))
    real = Stat.from_os(os.lstat(src))
    upper = UpperLayer(0, str(upper_root), honour_overrides=False)
    policy = copyup.CopyPolicy(override_xattr=None, can_chown=os.geteuid() == 0)
    identity = copyup.copy_up(source, f"d/{name}".encode(), real, real, upper, os.fsencode(work), policy)
    return upper_root / "d" / name, src, work, identity


def _same_copy(up: Path, src: Path, identity: tuple[int, int] | None) -> None:
    assert up.read_bytes() == src.read_bytes()
    st = os.lstat(up)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 2_000_000_000
    assert identity == (st.st_dev, st.st_ino) and st.st_nlink == 1


def test_a_file_is_copied_up_as_an_unnamed_file_in_its_directory(tmp_path: Path) -> None:
    """The copy is an O_TMPFILE in the upper directory, linked once whole: no
    staging name in the workdir is ever made (a rename would be needed)."""
    from cshare_fuse import copyup

    renames: list[object] = []
    real_rename = os.rename

    def spy(a: object, b: object) -> None:
        renames.append(a)
        real_rename(a, b)  # type: ignore[arg-type]

    os.rename = spy  # type: ignore[assignment]
    try:
        up, src, work, identity = _copy_up_one(tmp_path, "f")
    finally:
        os.rename = real_rename
    require(copyup._unnamed_copies, f"O_TMPFILE and linkat through /proc/self/fd on {tmp_path}")
    _same_copy(up, src, identity)
    assert renames == [] and list(work.iterdir()) == []


@pytest.mark.parametrize("why", ["no-unnamed-files", "name-taken"])
def test_a_file_copy_up_falls_back_to_a_staged_copy(tmp_path: Path, why: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where unnamed files cannot be made (or the name was taken meanwhile: the
    copy replaces it, as the staged rename always did) the copy is staged in the
    workdir and renamed: the same result, and nothing left in the workdir."""
    from cshare_fuse import copyup

    if why == "no-unnamed-files":
        monkeypatch.setattr(copyup, "_unnamed_copies", False)
    else:
        (tmp_path / "upper" / "d").mkdir(parents=True)
        (tmp_path / "upper" / "d" / "f").write_bytes(b"in the way\n")
    up, src, work, identity = _copy_up_one(tmp_path, "f")
    _same_copy(up, src, identity)
    assert list(work.iterdir()) == []
