"""The hand-written pages cshare-overlay(1) and cshare-plugins(7): they render
without warnings and cshare-overlay(1) names every option the parser knows."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import require

from cshare_fuse import options, plugin_api
from cshare_fuse.datasource import DataSource

REPO = Path(__file__).resolve().parent.parent
OVERLAY_PAGE = REPO / "man" / "cshare-overlay.1"
PLUGINS_PAGE = REPO / "man" / "cshare-plugins.7"


def rendered(page: Path) -> str:
    require(shutil.which("man") is not None, "man (Debian package man-db)")
    return _render(page)


@functools.lru_cache
def _render(page: Path) -> str:
    r = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                       env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    # Undo man's hyphenation (U+2010) and breaks after real hyphens; join the lines.
    text = re.sub(r"(\w)\u2010\n\s+", r"\1", r.stdout)
    return re.sub(r"-\n\s+", "-", text).replace("\n", " ")


def parser_option_names() -> set[str]:
    return set(options.OPTIONS)  # the parser's table of every option it knows


@pytest.mark.parametrize("name", sorted(parser_option_names()))
def test_every_option_is_documented(name: str) -> None:
    text = rendered(OVERLAY_PAGE)
    assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name


def test_overlay_page_names_the_environment_and_plugin_syntax() -> None:
    text = rendered(OVERLAY_PAGE)
    for needle in ("CSHARE_OVERLAY_INJECT_FAULT", "CSHARE_OVERLAY_LOG", "//test//rootfs",
                   "//test///srv/rootfs", "mount -t fuse.cshare-overlay", "fusermount3 -u",
                   "EXIT STATUS", "-f", "-d", "CSHARE_OVERLAY_SERVER", "CSHARE_OVERLAY_SERVER_IDLE",
                   "SO_PEERCRED", "MOUNT SERVER"):
        assert needle in text, needle


def test_plugins_page_documents_every_data_source_method() -> None:
    text = rendered(PLUGINS_PAGE)
    methods = {n for n, v in vars(DataSource).items() if callable(v) and not n.startswith("_")}
    assert {"on_lookup", "stat", "open", "readdir", "readlink", "getxattr"} <= methods
    for name in sorted(methods) + ["honour_overrides", "api_version", "load(data, path)",
                                   plugin_api.ENTRY_POINT_GROUP]:
        assert name in text, name
    assert f"API_VERSION is {plugin_api.API_VERSION}" in text
