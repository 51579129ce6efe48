"""Loading plugins (cshare_fuse.plugins): from .py files, module names, entry points,
and the one-line error for each way it can go wrong.  No FUSE needed."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from cshare_fuse.datasource import DataSource
from cshare_fuse.errors import ConfigError
from cshare_fuse.options import LowerSpec, parse_command_line, parse_lower
from cshare_fuse.plugin_api import API_VERSION
from cshare_fuse.plugins import load_registry, open_plugin_layer

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = Path(__file__).resolve().parent / "thirdparty_plugin_example.py"

PLUGIN_SOURCE = """
from cshare_fuse.plugin_api import API_VERSION, DataSource

class P:
    name = {name!r}
    api_version = {version}
    def load(self, data, path):
        {load_body}

plugin = P()
"""


def write_plugin(directory: Path, filename: str, name: str, *, version: str = "API_VERSION",
                 load_body: str = "return DataSource(path)", prelude: str = "") -> Path:
    path = directory / filename
    path.write_text(textwrap.dedent(prelude) + PLUGIN_SOURCE.format(
        name=name, version=version, load_body=load_body))
    return path


def config_error(func, *args) -> str:  # type: ignore[no-untyped-def]
    """The message of the ConfigError `func(*args)` raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        func(*args)
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    return message


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# -- successful loading ---------------------------------------------------------------------

def test_no_specs_offers_every_entry_point_including_the_bundled_ones() -> None:
    registry = load_registry(())
    assert {"test", "tar"} <= set(registry)
    assert registry["test"].name == "test" and registry["tar"].name == "tar"
    assert all(p.api_version == API_VERSION for p in registry.values())
    assert not getattr(registry, "broken", {}), registry.broken


def test_entry_point_names_load_only_what_is_named() -> None:
    registry = load_registry(("test",))
    assert list(registry) == ["test"]
    message = config_error(open_plugin_layer, parse_lower("//tar//x"), registry, "/")
    assert message == "lowerdir //tar//x: no plugin tar loaded; loaded: test"


def test_a_py_file_loads_and_serves_a_layer(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "f").write_text("data")
    name = unique("file")
    path = write_plugin(tmp_path, "myplugin.py", name)
    registry = load_registry((str(path),))
    assert list(registry) == [name]
    source = open_plugin_layer(LowerSpec(path="layer", plugin=name), registry, str(tmp_path))
    assert isinstance(source, DataSource)
    assert source.readdir(b"") == [b"f"]
    assert source.stat(b"f").size == 4


def test_a_relative_py_path_is_taken_from_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("rel")
    write_plugin(tmp_path, "rel.py", name)
    monkeypatch.chdir(tmp_path)
    assert list(load_registry(("rel.py",))) == [name]
    assert list(load_registry(("./rel.py",))) == [name]


def test_two_files_with_the_same_basename_do_not_collide(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = unique("one"), unique("two")
    write_plugin(tmp_path / "a", "plugin.py", first)
    write_plugin(tmp_path / "b", "plugin.py", second)
    registry = load_registry((str(tmp_path / "a/plugin.py"), str(tmp_path / "b/plugin.py")))
    assert set(registry) == {first, second}


def test_an_importable_module_name_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = unique("cshare_thirdparty")
    write_plugin(tmp_path, f"{module}.py", "modplug")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry = load_registry((module, "test"))
        assert set(registry) == {"modplug", "test"}
    finally:
        sys.modules.pop(module, None)


def test_a_module_can_be_its_own_plugin_object(tmp_path: Path) -> None:
    path = tmp_path / "selfplug.py"
    path.write_text(textwrap.dedent("""
        import sys
        from cshare_fuse.plugin_api import API_VERSION, DataSource
        name = "selfplug"
        api_version = API_VERSION
        def load(data, path):
            return DataSource(path)
        plugin = sys.modules[__name__]
    """))
    registry = load_registry((str(path),))
    source = open_plugin_layer(parse_lower(f"//selfplug//{tmp_path}"), registry, "/")
    assert b"selfplug.py" in source.readdir(b"")


def test_plugins_option_feeds_the_loader(tmp_path: Path) -> None:
    config = parse_command_line(["-o", f"plugins=test:{EXAMPLE},lowerdir=//test//rootfs", "mnt"])
    registry = load_registry(config.plugins)
    assert set(registry) == {"test", "hide"}
    assert config.lowers[0].plugin == "test" and config.lowers[0].path == "rootfs"


def test_relative_and_absolute_layer_paths(tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "rootfs" / "marker").touch()
    registry = load_registry(("test",))
    relative = open_plugin_layer(parse_lower("//test//rootfs"), registry, str(tmp_path))
    absolute = open_plugin_layer(parse_lower(f"//test//{tmp_path}/rootfs"), registry, "/nowhere")
    assert parse_lower(f"//test//{tmp_path}/rootfs").path == f"{tmp_path}/rootfs"
    assert relative.root == absolute.root == os.fsencode(str(tmp_path / "rootfs"))
    assert relative.readdir(b"") == [b"marker"]


# -- errors: each one line, before anything is mounted --------------------------------------

def test_unknown_name() -> None:
    name = unique("nosuchplugin")
    message = config_error(load_registry, (name,))
    assert name in message and "unknown plugin" in message
    assert "test" in message and "tar" in message  # names what is installed


def test_missing_py_file(tmp_path: Path) -> None:
    message = config_error(load_registry, (str(tmp_path / "absent.py"),))
    assert "absent.py" in message and "no such file" in message


def test_a_plugin_that_fails_to_import_names_the_exception(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('the plugin is broken\\nsecond line')\n")
    message = config_error(load_registry, (str(path),))
    assert "failed to import" in message
    assert "RuntimeError: the plugin is broken" in message
    assert str(path) in message


def test_a_module_missing_one_of_its_own_imports_is_not_called_unknown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = unique("cshare_needs_dep")
    missing = unique("no_such_dependency")
    (tmp_path / f"{module}.py").write_text(f"import {missing}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = config_error(load_registry, (module,))
    assert "failed to import" in message and "ModuleNotFoundError" in message
    assert missing in message


def test_syntax_error_in_a_plugin(tmp_path: Path) -> None:
    path = tmp_path / "syntax.py"
    path.write_text("def broken(:\n")
    message = config_error(load_registry, (str(path),))
    assert "failed to import" in message and "SyntaxError" in message


@pytest.mark.parametrize("version", ["API_VERSION + 1", "0", "'1'", "None", "True", "1.0"])
def test_api_version_mismatch(tmp_path: Path, version: str) -> None:
    path = write_plugin(tmp_path, "old.py", "oldplugin", version=version)
    message = config_error(load_registry, (str(path),))
    assert "oldplugin" in message and "plugin API version" in message
    assert f"provides version {API_VERSION}" in message


def test_duplicate_name(tmp_path: Path) -> None:
    first = write_plugin(tmp_path, "first.py", "same")
    second = write_plugin(tmp_path, "second.py", "same")
    message = config_error(load_registry, (str(first), str(second)))
    assert "two plugins are named same" in message
    assert "first.py" in message and "second.py" in message


def test_duplicate_of_a_bundled_name(tmp_path: Path) -> None:
    impostor = write_plugin(tmp_path, "impostor.py", "test")
    message = config_error(load_registry, ("test", str(impostor)))
    assert "two plugins are named test" in message


@pytest.mark.parametrize("source, expected", [
    ("x = 1\n", "no top-level `plugin`"),
    ("plugin = object()\n", "no `name`"),
    ("class P:\n    name = 'a/b'\n    api_version = 1\nplugin = P()\n", "may not contain"),
    ("class P:\n    name = 'noload'\n    api_version = 1\nplugin = P()\n", "no callable load"),
])
def test_malformed_plugin_objects(tmp_path: Path, source: str, expected: str) -> None:
    path = tmp_path / "malformed.py"
    path.write_text(source)
    assert expected in config_error(load_registry, (str(path),))


def test_layer_naming_a_plugin_that_is_not_loaded() -> None:
    registry = load_registry(("test", "tar"))
    message = config_error(open_plugin_layer, parse_lower("//nope/x/y"), registry, "/")
    assert message == "lowerdir //nope/x/y: no plugin nope loaded; loaded: tar, test"


def test_load_that_raises_oserror_or_valueerror_gives_its_message(tmp_path: Path) -> None:
    registry = load_registry(("test",))
    message = config_error(open_plugin_layer, parse_lower("//test//missing"), registry,
                           str(tmp_path))
    assert message.startswith("lowerdir //test//missing: plugin test cannot load the layer: ")
    assert f"{tmp_path}/missing" in message
    message = config_error(open_plugin_layer, parse_lower("//test/nonempty/x"), registry, "/")
    assert "DATA must be empty" in message


def test_load_with_a_bug_names_the_exception_type(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "buggy.py", "buggy", load_body="return {}['missing']")
    registry = load_registry((str(path),))
    message = config_error(open_plugin_layer, parse_lower("//buggy//x"), registry, "/")
    assert "plugin buggy cannot load the layer: KeyError" in message


def test_load_returning_something_else(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "wrong.py", "wrong", load_body="return path")
    registry = load_registry((str(path),))
    message = config_error(open_plugin_layer, parse_lower("//wrong//x"), registry, "/")
    assert message == "lowerdir //wrong//x: plugin wrong load() returned str, not a DataSource"


# -- entry points of another installed distribution -----------------------------------------

def make_distribution(site: Path, dist: str, entry_points: dict[str, str]) -> None:
    """A real installed distribution (dist-info on sys.path), as pip would leave it."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = ["[cshare.plugins]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def test_a_third_party_entry_point_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = unique("cshare_ep_plugin")
    write_plugin(tmp_path, f"{module}.py", "epplug")
    make_distribution(tmp_path, unique("epdist"), {"epplug": f"{module}:plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert {"epplug", "test", "tar"} <= set(load_registry(()))
        assert list(load_registry(("epplug",))) == ["epplug"]
    finally:
        sys.modules.pop(module, None)


def test_a_broken_installed_plugin_fails_only_the_mounts_that_name_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = unique("cshare_vanished_module")
    make_distribution(tmp_path, unique("brokendist"), {"brokenplug": f"{missing}:plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load_registry(())
    assert {"test", "tar"} <= set(registry) and "brokenplug" not in registry
    message = config_error(open_plugin_layer, parse_lower("//brokenplug//x"), registry, "/")
    assert "brokenplug" in message and "failed to import" in message and missing in message
    # Named explicitly, it is an error at once.
    message = config_error(load_registry, ("brokenplug",))
    assert "failed to import" in message and missing in message


def test_entry_point_named_unlike_its_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = unique("cshare_misnamed")
    write_plugin(tmp_path, f"{module}.py", "realname")
    make_distribution(tmp_path, unique("misnamed"), {"othername": f"{module}:plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        message = config_error(load_registry, ("othername",))
        assert "calls itself 'realname'" in message
    finally:
        sys.modules.pop(module, None)


# -- the third-party plugin written from cshare-plugins(7) alone ----------------------------

def test_the_plugin_written_from_the_man_page_works(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "keep.txt").write_text("kept")
    (tree / "key.secret").write_text("hidden")
    (tree / "sub" / "deep.secret").write_text("hidden")
    (tree / "sub" / "ok").write_text("ok")
    registry = load_registry((str(EXAMPLE),))
    source = open_plugin_layer(parse_lower("//hide/*.secret/tree"), registry, str(tmp_path))
    assert source.describe() == f"//hide/*.secret/{tree}"
    assert sorted(source.readdir(b"")) == [b"keep.txt", b"sub"]
    assert source.readdir(b"sub") == [b"ok"]
    assert source.exists(b"keep.txt") and not source.exists(b"key.secret")
    with pytest.raises(FileNotFoundError):
        source.stat(b"sub/deep.secret")
    assert stat.S_ISREG(source.stat(b"keep.txt").mode)
    fd = source.open(b"keep.txt", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"kept"
    finally:
        os.close(fd)


def test_the_man_page_example_plugin_runs(tmp_path: Path) -> None:
    """The complete example printed in cshare-plugins(7) loads and behaves as described."""
    page = (REPO / "man" / "cshare-plugins.7").read_text()
    example = page.split(".SH EXAMPLE", 1)[1].split(".EX\n", 1)[1].split(".EE\n", 1)[0]
    code = example.replace("\\-", "-").replace("\\e", "\\")
    path = tmp_path / "owner.py"
    path.write_text(code)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").touch()
    registry = load_registry((str(path),))
    source = open_plugin_layer(parse_lower("//owner/4242.77/tree"), registry, str(tmp_path))
    st = source.stat(b"f")
    assert (st.uid, st.gid) == (4242, 77)
    assert "is not UID.GID" in config_error(open_plugin_layer, parse_lower("//owner/x/tree"),
                                            registry, str(tmp_path))


@pytest.mark.parametrize("module", ["plugins/test.py", "plugins/tar.py", "plugins/index_tree.py",
                                    "tests/thirdparty_plugin_example.py"])
def test_plugins_use_only_the_public_api(module: str) -> None:
    # A bundled helper module (plugins/index_tree.py) counts as part of the plugin:
    # what it imports is followed, and it too may reach only the public API.
    ours: set[str] = set()
    pending, seen = [REPO / module], set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
        for name in imported:
            if name.startswith("plugins."):
                helper = REPO / (name.replace(".", "/") + ".py")
                assert helper.is_file(), f"{path.name} imports {name}, which is no plugins/ file"
                pending.append(helper)
            elif name.split(".")[0] in ("cshare", "cshare_fuse", "plugins"):
                ours.add(name)
    assert ours == {"cshare_fuse.plugin_api"}


# -- the same errors from the command line: one line, exit 1, nothing mounted ----------------

@pytest.mark.parametrize("case", ["unknown", "import", "version", "duplicate", "layer"])
def test_cshare_overlay_reports_plugin_errors_in_one_line(tmp_path: Path, case: str) -> None:
    from conftest import tool

    (tmp_path / "mnt").mkdir()
    (tmp_path / "layer").mkdir()
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('cannot find libfoo')\n")
    old = write_plugin(tmp_path, "old.py", "old", version="99")
    dup = write_plugin(tmp_path, "dup.py", "test")
    plugins, expected = {
        "unknown": ("nosuchplugin", "unknown plugin"),
        "import": (str(broken), "failed to import: ImportError: cannot find libfoo"),
        "version": (str(old), "written for plugin API version 99"),
        "duplicate": (f"test:{dup}", "two plugins are named test"),
        "layer": ("tar", "no plugin test loaded; loaded: tar"),
    }[case]
    r = subprocess.run(
        [tool("cshare-overlay"), "-o", f"plugins={plugins},lowerdir=//test//layer",
         str(tmp_path / "mnt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cshare-overlay: error: "), r.stderr
    assert expected in lines[0]
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path / "mnt") not in f.read()


# -- what the overlay refuses to report (layers.stat_problem) ------------------------------

@pytest.mark.parametrize("change, expected", [
    ({}, None),
    ({"mtime_ns": -5}, None),  # before 1970 is fine
    ({"size": -1}, "impossible size"),
    ({"mode": 0o644}, "no file type"),
    ({"mode": 0o1170644}, "no file type"),
    ({"uid": 1 << 32}, "outside"),
    ({"size": 1.5}, "field of type float"),
    ({"ino": "7"}, "field of type str"),
])
def test_impossible_stats_are_named(tmp_path: Path, change: dict, expected: str | None) -> None:
    from cshare_fuse.datasource import Stat
    from cshare_fuse.layers import stat_problem

    st = Stat.from_os(os.lstat(tmp_path)).replace(**change)
    problem = stat_problem(st)
    assert problem is None if expected is None else expected in (problem or ""), problem
