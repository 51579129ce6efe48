"""Rendering of `cshare convert`, `restore` and `verify`: checks, progress, output, exit status.

The work itself is in cshare.tree.convert, cshare.tree.restore and cshare.tree.verify; this
module only checks the arguments before anything changes, drives the progress
bar, prints the report (text or `--json`) and turns per-entry errors into a
non-zero exit once the whole tree has been handled.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CshareError, error_line
from ..tree.walk import display, symlink_root_problem

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..tree.convert import ConvertReport
    from ..tree.restore import RestoreReport
    from ..tree.verify import VerifyReport

# Each command imports only its own module (in its run_* function): a start-up
# that loads the other two is time `cshare convert` spends against `chmod -R`.

#: The options of the convert family that fast_path understands (all of them today).
_FAST_OPTIONS = {
    "convert": {"--dry-run": "dry_run", "--json": "json_out", "--quiet": "quiet", "-q": "quiet"},
    "restore": {"--dry-run": "dry_run", "--json": "json_out", "--quiet": "quiet", "-q": "quiet"},
    "verify": {"--json": "json_out"},
}

_UPDATE_EVERY = 1024  # entries between two progress refreshes (a refresh costs far more than an entry)


@contextmanager
def _progress(description: str, quiet: bool) -> Iterator[Callable[[], None] | None]:
    """A per-entry callback that drives a rich bar showing entries and rate (None: no bar)."""
    if quiet:
        yield None  # without loading rich, nor a call per entry: quiet runs are timed against chmod -R
        return
    from .console import progress

    bar = progress(quiet)
    if bar.disable:
        yield None
        return
    count = 0
    start = time.monotonic()
    with bar:
        task = bar.add_task(description, total=None, rate="")

        def tick() -> None:
            nonlocal count
            count += 1
            if count % _UPDATE_EVERY == 0:
                rate = count / max(time.monotonic() - start, 1e-9)
                bar.update(task, completed=count, rate=f"{rate:,.0f} entries/s")

        yield tick
        rate = count / max(time.monotonic() - start, 1e-9)
        bar.update(task, completed=count, total=count, rate=f"{rate:,.0f} entries/s")


def _print_errors(errors: list[tuple[str, str]]) -> None:
    for path, message in errors:
        print(f"cshare: {display(path)}: {message}", file=sys.stderr)


def _print_changes(changes: list[str]) -> None:
    for line in changes:
        print(line)


def _report(rootfs: Path, report: ConvertReport | RestoreReport, *, dry_run: bool,
            json_out: bool, line: str, done: str) -> None:
    """What convert and restore print: JSON, or the changes, a summary line, skipped mounts."""
    if json_out:
        from .console import print_json

        data = report.summary()
        if dry_run:
            data["changes"] = report.changes
        print_json(data)
    else:
        if dry_run:
            _print_changes(report.changes)
        print(f"{rootfs}: {line}")
        for path in report.skipped_mounts:
            print(f"cshare: {display(path)}: another filesystem, not {done}", file=sys.stderr)
    _finish(report.errors, done)


def run_convert(rootfs: Path, *, dry_run: bool, json_out: bool, quiet: bool) -> None:
    from ..tree.convert import check_can_convert, convert_tree

    check_can_convert(rootfs, probe_write=not dry_run)
    with _progress("converting", quiet or json_out) as tick:
        report = convert_tree(rootfs, dry_run=dry_run, on_entry=tick)
    verb = "would convert" if dry_run else "converted"
    _report(rootfs, report, dry_run=dry_run, json_out=json_out, done="converted",
            line=f"{report.entries} entries, {verb} {report.converted}, "
                 f"{report.already_converted} already converted, {report.devices_replaced} "
                 f"devices/fifos/sockets replaced, {report.opaque_rewritten} opaque markers "
                 "made visible")


def run_restore(rootfs: Path, *, dry_run: bool, json_out: bool, quiet: bool) -> None:
    from ..tree.convert import check_can_convert
    from ..tree.restore import restore_tree

    check_can_convert(rootfs, probe_write=not dry_run)
    with _progress("restoring", quiet or json_out) as tick:
        report = restore_tree(rootfs, dry_run=dry_run, on_entry=tick)
    verb = "would restore" if dry_run else "restored"
    _report(rootfs, report, dry_run=dry_run, json_out=json_out, done="restored",
            line=f"{report.entries} entries, {verb} {report.restored}, "
                 f"{report.devices_recreated} devices/fifos/sockets recreated, "
                 f"{report.opaque_removed} added opaque markers removed")


def run_verify(rootfs: Path, *, json_out: bool) -> None:
    problem = symlink_root_problem(rootfs)
    if problem:
        raise CshareError(problem)
    from ..tree.verify import verify_tree

    if not rootfs.is_dir():
        raise CshareError(f"{rootfs}: no such directory")
    layer = published_layer(rootfs)
    report = verify_tree(rootfs, owners_kept=layer is None)
    if layer is not None:
        check_records_digest(report, *layer)
    if json_out:
        from .console import print_json

        print_json(report.summary())
    else:
        for f in report.findings:
            print(f"{f.kind}: {display(f.path)}: {f.detail}")
        status = "ok" if report.ok else f"{len(report.findings)} problems"
        print(f"{rootfs}: {report.entries} entries checked, {status}")
    if not report.ok:
        raise SystemExit(1)


def published_layer(rootfs: Path) -> tuple[str, dict[str, Any]] | None:
    """(layer id, its metadata) when `rootfs` is the diff of a layer in a shared store.

    A shared store keeps each layer's tree as STORE/<layers dir>/ID/diff; the
    store itself says whether that is one of its layers.
    """
    from ..store.shared import SharedStore

    real = Path(os.path.realpath(rootfs))
    layer_id, store_root = real.parent.name, real.parent.parent.parent
    try:
        store = SharedStore(store_root)
        if not store.exists() or not store.has_layer(layer_id):
            return None
        if Path(os.path.realpath(store.layer_diff(layer_id))) != real:
            return None
        return layer_id, store.layer_info(layer_id)
    except (CshareError, OSError, ValueError):
        return None


def check_records_digest(report: VerifyReport, layer_id: str, info: dict[str, Any]) -> None:
    from ..tree.verify import RECORDS_DIGEST_KEY, Finding

    """A published layer's records must be those make-shared wrote (the digest it kept)."""
    kept = info.get(RECORDS_DIGEST_KEY)
    if not isinstance(kept, str) or not kept:
        report.findings.append(Finding(
            "records-unverified", ".",
            f"layer {layer_id[:12]} was published without a digest of its records (an older "
            "cshare, which kept an image's own records): remove its images with cshare rm "
            "and run make-shared again"))
    elif kept != report.records_digest:
        report.findings.append(Finding(
            "records-changed", ".",
            f"the override records of layer {layer_id[:12]} differ from those make-shared "
            f"wrote (digest {kept[:16]}…, now {report.records_digest[:16]}…): the layer was "
            "changed after publishing; remove its images with cshare rm and run make-shared again"))


def _finish(errors: list[tuple[str, str]], verb: str) -> None:
    if errors:
        _print_errors(errors)
        raise CshareError(f"{len(errors)} entries could not be {verb} (listed above); the rest were")


def fast_path(argv: list[str]) -> bool:
    """Run `convert`, `restore` or `verify` without typer's parser, if `argv` is plain.

    Plain means: the command, its known flags, one path not starting with '-'.
    Anything else (--help, an unknown or new option, two paths) returns False
    and typer handles it, so this can only ever do what the typer command does.
    """
    command, rest = argv[0], argv[1:]
    known = _FAST_OPTIONS.get(command)
    if known is None:
        return False
    flags = {"dry_run": False, "json_out": False, "quiet": False}
    paths = []
    for arg in rest:
        if arg in known:
            flags[known[arg]] = True
        elif arg.startswith("-"):
            return False
        else:
            paths.append(arg)
    if len(paths) != 1 or not paths[0]:
        return False
    rootfs = Path(paths[0])
    try:
        if command == "convert":
            run_convert(rootfs, **flags)
        elif command == "restore":
            run_restore(rootfs, **flags)
        else:
            run_verify(rootfs, json_out=flags["json_out"])
    except CshareError as exc:
        sys.stdout.flush()
        print(error_line(str(exc)), file=sys.stderr)
        raise SystemExit(1) from None
    return True
