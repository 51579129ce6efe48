"""cshare.system: the mountinfo parser and the /proc scans, against real /proc where it can."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cshare.system.mountinfo import parse, parse_line, read
from cshare.system.procfs import (
    holds_fuse_device,
    process_argv,
    process_dirs,
    process_name,
    process_state,
    runs_overlay_program,
)


def test_mountinfo_lines_parse_with_escapes_and_optional_fields() -> None:
    line = ("36 35 98:0 /mnt\\040a /home/u/my\\040mnt rw,noatime master:1 shared:2 - "
            "overlay over\\134lay rw,lowerdir=/l/a\\054b:/l/c,upperdir=/u\n")
    entry = parse_line(line)
    assert entry is not None
    assert entry.device == "98:0"
    assert entry.root == "/mnt a"
    assert entry.mount_point == "/home/u/my mnt"
    assert (entry.fstype, entry.source) == ("overlay", "over\\lay")
    assert entry.super_options == "rw,lowerdir=/l/a,b:/l/c,upperdir=/u"
    no_optional = parse_line("22 1 0:21 / /proc rw,nosuid - proc proc rw")
    assert no_optional is not None and (no_optional.mount_point, no_optional.fstype) == ("/proc", "proc")
    assert parse(["not a mountinfo line", line]) == [entry]


def test_this_namespace_has_a_root_mount() -> None:
    assert any(entry.mount_point == "/" for entry in read())


def test_process_scan_sees_a_child_and_its_argv() -> None:
    code = "import time; print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code, "marker-arg"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert child.pid in {int(e.name) for e in process_dirs()}
        assert process_argv(child.pid)[-1] == b"marker-arg"
        assert not holds_fuse_device(f"/proc/{child.pid}")
        assert process_state(child.pid) in ("S", "R")
        assert process_name(f"/proc/{child.pid}") is not None
    finally:
        child.kill()
        child.wait()
    assert process_argv(child.pid) == []
    assert process_state(child.pid) is None
    assert os.getpid() in {int(e.name) for e in process_dirs()}


def test_an_overlay_script_is_known_by_its_name_behind_interpreter_flags(tmp_path: Path) -> None:
    """cshare-overlay runs as `python3 -S .../cshare-overlay ... MNT`: the interpreter
    and its flags come first (a check of argv[:2] alone missed it)."""
    script = tmp_path / "cshare-overlay"
    script.write_text(f"#!{sys.executable} -S\nimport time\nprint('ready', flush=True)\n"
                      "time.sleep(30)\n")
    script.chmod(0o755)
    daemon = subprocess.Popen([str(script), "-o", "lowerdir=/l", "/some/mnt"],
                              stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-S", "-c",
                              "import time; print('ready', flush=True); time.sleep(30)", "/some/mnt"],
                             stdout=subprocess.PIPE, text=True)
    try:
        for child in (daemon, other):
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        argv = process_argv(daemon.pid)
        assert argv[1] == b"-S" and argv[-1] == b"/some/mnt", argv
        assert runs_overlay_program(daemon.pid, argv)
        assert not runs_overlay_program(other.pid, process_argv(other.pid))
    finally:
        for child in (daemon, other):
            child.kill()
            child.wait()
