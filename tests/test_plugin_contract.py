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
from conftest import require, tool, unmount_all_below
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
    try:
        r = subprocess.run([tool("cshare-overlay"), "-o", f"plugins={plugins},lowerdir=layer",
                            "mnt"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    finally:
        unmount_all_below(tmp_path)  # should there be a mount after all
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
    # The project's own pyproject (cshare_fuse may be imported from an installation).
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
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


# -- bug 3: one entry that cannot be stat'ed fails alone, not its directory's listing ----------

FAILING_ENTRY = '''
class Source(DataSource):
    def stat(self, path):
        if path == b"bad":
            raise ZeroDivisionError("plugin bug for one entry")
        if path == b"eio":
            raise OSError(5, "the network is down")
        return super().stat(path)
'''


def test_one_failing_entry_fails_alone_and_its_directory_lists(root_fuse_dirs: Path) -> None:
    base = root_fuse_dirs
    layer = small_layer(base)
    (layer / "bad").write_text("x")
    (layer / "eio").write_text("x")
    plugin = write_plugin_file(base, "oneentry", FAILING_ENTRY)
    overlay = Foreground(base, f"plugins={plugin},lowerdir=//oneentry//{layer}")
    mnt = overlay.mnt
    try:
        assert sorted(os.listdir(mnt)) == ["bad", "eio", "good", "link"]
        expect_errno(errno.EIO, os.stat, mnt / "bad")
        expect_errno(errno.EIO, os.stat, mnt / "eio")
        r = subprocess.run(["ls", "-l", str(mnt)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1  # ls: one entry it cannot access
        assert "cannot access" in r.stderr and "bad" in r.stderr, r.stderr
        assert " good\n" in r.stdout and "link -> target" in r.stdout, r.stdout
        assert (mnt / "good").read_text() == "good\n"
        assert sorted(os.listdir(mnt)) == ["bad", "eio", "good", "link"]  # again, from cache
    finally:
        log = overlay.close()
    assert f"{layer}: stat('bad') raised ZeroDivisionError: plugin bug for one entry" in log, log


def test_a_malformed_override_in_a_lower_layer_fails_only_that_entry(
        root_fuse_dirs: Path) -> None:
    """Issue 12: a plain converted layer (overrides honoured by the overlay itself)."""
    from cshare_fuse.formats.overrides import OVERRIDE_XATTR

    base = root_fuse_dirs
    layer = small_layer(base)
    os.setxattr(layer, OVERRIDE_XATTR, b"0:0:0755:dir")  # the layer honours overrides
    (layer / "broken").write_text("x")
    os.setxattr(layer / "broken", OVERRIDE_XATTR, b"0:0:0999:file")
    overlay = Foreground(base, f"lowerdir={layer}")
    try:
        assert sorted(os.listdir(overlay.mnt)) == ["broken", "good", "link"]
        expect_errno(errno.EIO, os.stat, overlay.mnt / "broken")
        assert (overlay.mnt / "good").read_text() == "good\n"
    finally:
        log = overlay.close()
    assert f"{layer}: stat('broken') raised OverrideError" in log and "0999" in log, log


# -- bug 2: a slow plugin call holds up only the request that asked ---------------------------

SLOW = '''
import time

class Source(DataSource):
    def open(self, path, flags):
        if path == b"slow":
            time.sleep(2)
        return super().open(path, flags)

    def stat(self, path):
        if path == b"sub/slowstat":
            time.sleep(2)
        return super().stat(path)
'''


@pytest.mark.parametrize("slow", ["slow", "sub/slowstat"], ids=["open", "lookup"])
def test_a_slow_plugin_call_does_not_delay_other_requests(root_fuse_dirs: Path,
                                                          slow: str) -> None:
    """A slow open, or a slow first stat (in another directory: the kernel sends one
    lookup at a time per directory), holds up only the request that made it."""
    import threading
    import time

    base = root_fuse_dirs
    layer = small_layer(base)
    (layer / "sub").mkdir()
    for name in (slow, "other"):
        (layer / name).write_text(f"{name}\n")
    plugin = write_plugin_file(base, "slowplug", SLOW)
    overlay = Foreground(base, f"plugins={plugin},lowerdir=//slowplug//{layer}")
    mnt = overlay.mnt
    done: dict[str, object] = {}

    def slow_reader() -> None:
        start = time.monotonic()
        done["data"] = (mnt / slow).read_text()
        done["took"] = time.monotonic() - start

    try:
        os.stat(mnt / "good")  # the mount is serving
        if slow == "slow":
            os.stat(mnt / "slow")  # looked up: only the open is slow
        thread = threading.Thread(target=slow_reader)
        thread.start()
        time.sleep(0.3)  # the slow call is under way
        start = time.monotonic()
        assert (mnt / "other").read_text() == "other\n"  # lookup, open, read: all fresh
        assert os.stat(mnt / "good").st_size == 5
        if slow == "slow":
            assert sorted(os.listdir(mnt)) == ["good", "link", "other", "slow", "sub"]
        took = time.monotonic() - start
        thread.join(10)
        assert done.get("data") == f"{slow}\n"
        assert done["took"] >= 1.9  # the slow call really was slow ...
        assert took < 0.5, took  # ... and held up nothing else
    finally:
        overlay.close()
