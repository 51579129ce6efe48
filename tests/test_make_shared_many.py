"""`cshare make-shared IMAGE [IMAGE…]` and `--all` (issue 13 point 1, and its bad input)."""

# ruff: noqa: F811  (fixtures imported from podman_support are parameters here)
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import is_root, require, tool
from podman_support import BASE, CHANGED, DEMO, PodmanImages, podman_images  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.podman, pytest.mark.timeout(240)]


def cshare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("cshare"), *args], capture_output=True, text=True, timeout=200)


def test_several_images_or_all_and_a_bad_name_changes_nothing(podman_images: PodmanImages) -> None:
    require(is_root(), "root")
    root = str(podman_images.store.root)
    base = Path(tempfile.mkdtemp(prefix="cshare-many-", dir="/var/tmp"))
    try:
        _several_or_all(root, base / "store")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _several_or_all(root: str, store: Path) -> None:
    # One name that matches nothing: not even the store is created.
    bad = cshare("make-shared", "tinybb", "nothere", "--storage-root", root, "--store", str(store))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "nothere" in bad.stderr
    assert not store.exists()
    both = cshare("make-shared", "tinybb", "--all", "--storage-root", root, "--store", str(store))
    assert both.returncode == 1 and "--all" in both.stderr and not store.exists()

    two = cshare("make-shared", "tinybb", "tinybb-changed", "--storage-root", root, "--store", str(store), "-q")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("shared in") == 2
    every = cshare("make-shared", "--all", "--storage-root", root, "--store", str(store), "--json")
    assert every.returncode == 0, every.stderr
    results = json.loads(every.stdout)
    assert sorted(n for r in results for n in r["names"]) == sorted([BASE, CHANGED, DEMO])
    assert [r["changed"] for r in results if DEMO not in r["names"]] == [False, False]
    listed = json.loads(cshare("images", "--store", str(store), "--json").stdout)
    assert sorted(n for i in listed for n in i["names"]) == sorted([BASE, CHANGED, DEMO])
    catalogue = json.loads((store / "overlay-images" / "images.json").read_text())
    assert len(catalogue) == 3
