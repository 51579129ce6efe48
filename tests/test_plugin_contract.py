"""The plugin contract holds (issue 15): a plugin can neither kill nor stall a mount.

Each case mounts a deliberately broken plugin, written as a third party would,
through a real cshare-overlay, and checks that only the request that met the
fault fails (EIO), that the log names the plugin, the method and the path,
and that the mount keeps serving.  Also: the checks before a mount is reported
ready (the plugin root, every item of `plugins=`), the plugin logger, and the
typed contract (py.typed).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import require, tool
from plugin_support import Foreground, is_mounted, root_fuse_dirs, write_plugin_file

__all__ = ["root_fuse_dirs"]  # a fixture used here, defined in plugin_support

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(60)]


def small_layer(base: Path) -> Path:
    """`l/` of the issue: a file `good` and a symlink `link -> target`."""
    layer = base / "layer"
    layer.mkdir()
    (layer / "good").write_text("good\n")
    (layer / "link").symlink_to("target")
    return layer


def expect_errno(err: int, func, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        func(*args)
    assert info.value.errno == err, info.value


# -- bug 1: a wrong return type is that request's EIO, not the end of the mount ---------------

WRONG_TYPES = '''
import os

class Source(DataSource):
    def readlink(self, path):
        return os.readlink(os.fsdecode(self.root + b"/" + path))  # str, as os.readlink(str)

    def getxattr(self, path, name):
        if name == "user.text":
            return "a str"
        return super().getxattr(path, name)
'''


def test_a_wrong_return_type_is_eio_and_the_mount_keeps_serving(root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    layer = small_layer(base)
    plugin = write_plugin_file(base, "wrongtype", WRONG_TYPES)
    overlay = Foreground(base, f"plugins={plugin},lowerdir=//wrongtype//{layer}")
    mnt = overlay.mnt
    try:
        assert (mnt / "good").read_text() == "good\n"
        expect_errno(errno.EIO, os.readlink, mnt / "link")
        expect_errno(errno.EIO, os.getxattr, mnt / "good", "user.text")
        # Asked again: still EIO, and the mount is still there and serving.
        expect_errno(errno.EIO, os.readlink, mnt / "link")
        assert is_mounted(mnt) and overlay.proc.poll() is None
        assert (mnt / "good").read_text() == "good\n"
        assert sorted(os.listdir(mnt)) == ["good", "link"]
    finally:
        log = overlay.close()
    assert "the main loop failed" not in log
    assert f"{layer}: readlink('link') returned str" in log, log
    assert f"{layer}: getxattr[user.text]('good') returned str" in log, log


# -- bug 6: an impossible Stat is EIO and logged ------------------------------------------------

BAD_STATS = '''
class Source(DataSource):
    def describe(self):
        return "//badstat//" + self.root.decode()

    def stat(self, path):
        st = super().stat(path)
        if path == b"negative":
            return st.replace(size=-1)
        if path == b"typeless":
            return st.replace(mode=0o644)  # no file-type bits
        if path == b"notastat":
            return (st.mode, st.size)
        return st
'''


def test_an_impossible_stat_is_eio_and_logged(root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    layer = small_layer(base)
    for name in ("negative", "typeless", "notastat"):
        (layer / name).write_text("x")
    plugin = write_plugin_file(base, "badstat", BAD_STATS)
    overlay = Foreground(base, f"plugins={plugin},lowerdir=//badstat//{layer}")
    try:
        for name in ("negative", "typeless", "notastat"):
            expect_errno(errno.EIO, os.stat, overlay.mnt / name)
        assert (overlay.mnt / "good").read_text() == "good\n"
    finally:
        log = overlay.close()
    described = f"//badstat//{layer}"
    assert f"{described}: stat('negative') returned an impossible size" in log, log
    assert f"{described}: stat('typeless') returned mode 0o644, which is no file type" in log
    assert f"{described}: stat('notastat') returned tuple, not a Stat" in log


# -- bug 4: the plugin's root is asked before the mount is reported ready ----------------------

SYNOPSIS = '''
class Source(DataSource):
    pass
'''


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_a_plugin_layer_whose_root_is_missing_is_refused_before_mounting(
        root_fuse_dirs: Path, foreground: bool) -> None:
    base = root_fuse_dirs
    plugin = write_plugin_file(base, "synopsis", SYNOPSIS)
    missing = base / "no-such-layer"
    argv = [tool("cshare-overlay"), *(["-f"] if foreground else []), "-o",
            f"plugins={plugin},lowerdir=//synopsis//{missing},upperdir={base / 'up'},"
            f"workdir={base / 'work'}", str(base / "mnt")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == (f"cshare-overlay: error: lowerdir //synopsis//{missing}: plugin "
                        "synopsis cannot serve the layer root: No such file or directory")
    assert not is_mounted(base / "mnt")


def test_the_root_is_looked_up_first_and_once(root_fuse_dirs: Path) -> None:
    """on_lookup(b"") comes before any other call, and only once."""
    base = root_fuse_dirs
    layer = small_layer(base)
    calls = base / "calls"
    plugin = write_plugin_file(base, "firstcall", f'''
        class Source(DataSource):
            def _note(self, what):
                with open({str(calls)!r}, "a") as f:
                    f.write(what + "\\n")

            def on_lookup(self, path):
                self._note("on_lookup " + path.decode())

            def readdir(self, path):
                self._note("readdir " + path.decode())
                return super().readdir(path)

            def getxattr(self, path, name):
                self._note("getxattr " + path.decode())
                return super().getxattr(path, name)
        ''')
    overlay = Foreground(base, f"plugins={plugin},lowerdir=//firstcall//{layer}")
    try:
        assert sorted(os.listdir(overlay.mnt)) == ["good", "link"]
    finally:
        overlay.close()
    seen = calls.read_text().splitlines()
    assert seen[0] == "on_lookup ", seen
    assert seen.count("on_lookup ") == 1, seen


# -- bug 5: plugins= is checked even when no layer names a plugin ------------------------------

@pytest.mark.parametrize("case", ["unknown", "missing-file", "import", "version", "bool-version",
                                  "duplicate"])
def test_plugins_are_checked_when_no_layer_names_one(tmp_path: Path, case: str) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "layer").mkdir()
    (tmp_path / "broken.py").write_text("raise ImportError('cannot find libfoo')\n")
    for name, version in (("old", "99"), ("truthy", "True")):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
            from cshare_fuse.plugin_api import DataSource
            class P:
                name = {name!r}
                api_version = {version}
                def load(self, data, path):
                    return DataSource(path)
            plugin = P()
            """))
    (tmp_path / "dup.py").write_text((tmp_path / "old.py").read_text().replace(
        "'old'", "'test'").replace("99", "1"))
    plugins, expected = {
        "unknown": ("no-such-plugin", "unknown plugin"),
        "missing-file": ("./missing.py", "plugins=./missing.py: no such file"),
        "import": ("./broken.py", "failed to import: ImportError: cannot find libfoo"),
        "version": ("./old.py", "written for plugin API version 99"),
        "bool-version": ("./truthy.py", "written for plugin API version True"),
        "duplicate": ("test:./dup.py", "two plugins are named test"),
    }[case]
    r = subprocess.run([tool("cshare-overlay"), "-o", f"plugins={plugins},lowerdir=layer",
                        "mnt"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cshare-overlay: error: "), r.stderr
    assert expected in lines[0]
    assert not is_mounted(tmp_path / "mnt")


# -- logging: a plugin's logger reaches the daemon's log, also once it is in the background ---

LOGGING = '''
import logging
from cshare_fuse.plugin_api import logger

log = logger("chatty")

class Source(DataSource):
    def open(self, path, flags):
        log.info("opening %s", path.decode())
        logging.getLogger("some.library").warning("a library warns")
        return super().open(path, flags)
'''


def test_a_plugins_logger_reaches_the_daemons_log(root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    layer = small_layer(base)
    plugin = base / "chatty.py"
    plugin.write_text(write_plugin_file(base, "chatty", LOGGING).read_text().replace(
        "        return Source(path)", "        log.info('loading %s', path)\n"
        "        return Source(path)"))
    daemon_log = base / "daemon.log"
    env = dict(os.environ, CSHARE_OVERLAY_LOG=str(daemon_log))
    mnt = base / "mnt"
    r = subprocess.run([tool("cshare-overlay"), "-o",
                        f"plugins={plugin},lowerdir=//chatty//{layer},upperdir={base / 'up'},"
                        f"workdir={base / 'work'}", str(mnt)],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "good").read_text() == "good\n"  # served by the daemon, detached
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    text = daemon_log.read_text()
    assert f"INFO cshare_fuse.plugin.chatty: loading {layer}" in text, text
    assert "INFO cshare_fuse.plugin.chatty: opening good" in text, text
    assert "WARNING some.library: a library warns" in text, text


# -- the typed contract: py.typed ships, and a plugin author's mypy checks against it --------

def test_the_contract_is_typed_for_plugin_authors(tmp_path: Path) -> None:
    """mypy, given cshare_fuse as an installed package (a .pth entry in a site-packages
    directory, as a plain installation would be), checks a plugin against the contract:
    without py.typed it would skip the package as untyped."""
    import tomllib

    import cshare_fuse

    package = Path(cshare_fuse.__file__).parent
    assert (package / "py.typed").is_file()
    project = tomllib.loads((package.parent / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["cshare_fuse"]
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True,
                   timeout=60)
    (next(env.glob("lib/python3*/site-packages")) / "cshare.pth").write_text(
        f"{package.parent}\n")
    plugin = tmp_path / "typed_plugin.py"
    plugin.write_text(textwrap.dedent("""
        from cshare_fuse.plugin_api import DataSource

        class Source(DataSource):
            def readlink(self, path: bytes) -> str:
                return "target"
        """))
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--python-executable",
                        str(env / "bin" / "python"), str(plugin)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    require("No module named mypy" not in out, "mypy (the [test] extra)")
    assert r.returncode == 1, out
    assert 'Return type "str" of "readlink" incompatible with return type "bytes"' in out, out
