"""The generated man pages (scripts/gen_man.py) match the command line: regenerate
and compare, so `--help` and `man cshare-COMMAND` cannot drift apart.

When this fails after a change to cshare/cli.py: run `make man` and commit man/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # scripts/ is not an installed package
    sys.path.insert(0, str(REPO))
from scripts import gen_man  # noqa: E402

MAN = REPO / "man"


def committed_generated_pages() -> dict[str, str]:
    pages = {}
    for path in MAN.glob("cshare*.1"):
        text = path.read_text()
        if text.startswith(gen_man.GENERATED_MARK):
            pages[path.name] = text
    return pages


def test_committed_pages_equal_freshly_generated_ones(tmp_path: Path) -> None:
    assert gen_man.main([str(tmp_path)]) == 0
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = committed_generated_pages()
    assert set(fresh) == set(committed), "run `make man` and commit man/"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert stale == [], f"stale pages {stale}: run `make man` and commit man/"


def test_every_command_and_option_has_a_page() -> None:
    pages = gen_man.pages()
    assert {"cshare.1", "cshare-convert.1", "cshare-restore.1", "cshare-verify.1"} <= set(pages)
    convert = pages["cshare-convert.1"]
    for option in ("\\-\\-dry\\-run", "\\-\\-json", "\\-\\-quiet", "ROOTFS"):
        assert option in convert
    assert "user.containers.override_stat" in convert  # the docstring is the DESCRIPTION
    top = pages["cshare.1"]
    for name in pages:
        if name != "cshare.1":
            assert f"\\fB{gen_man.escape(name[:-2])}\\fR(1)" in top


def test_roff_escaping() -> None:
    assert gen_man.escape(".starts with a dot\n'quote") == "\\&.starts with a dot\n\\&'quote"
    assert gen_man.escape("a-b\\c") == "a\\-b\\ec"


@pytest.mark.parametrize("page", sorted(committed_generated_pages()))
def test_page_renders_without_warnings(page: str) -> None:
    require(shutil.which("man") is not None, "man (Debian package man-db)")
    run = subprocess.run(
        ["man", "--warnings", "-l", str(MAN / page)],
        capture_output=True,
        text=True,
        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    assert run.returncode == 0
    assert run.stderr == "", run.stderr
    assert "NAME" in run.stdout and "OPTIONS" in run.stdout
