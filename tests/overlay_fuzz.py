"""A seeded differential fuzzer: random layers, random operations, kernel overlayfs as reference.

Each seed makes one case: two to four lower layers generated with files,
directories, symlinks (dangling ones too), hardlinks (several names, across
directories), fifos, whiteouts and opaque directories in every layer, in both
styles (the kernel copy gets the kernel's markers, the FUSE copy each marker
in the kernel's or the AUFS/tar style at random), modes with setuid, setgid
and sticky bits and several owners; then OPS operations run as root and as
other users (alice, bob, alice with a group she is not in), with paths drawn
from every name the layers mention (whited-out and hidden ones included) and
new names in every directory, so link, rename, unlink and rmdir meet lower
hardlinks, whiteouts, sticky and setgid directories and dangling symlinks.

Both mounts run the same operations; every result or errno, then the merged
trees, the names sharing an inode and the upper layers are compared
(tests/overlay_support.check_pair).  A diverging case is shrunk (operations,
then layer entries) and printed as a reproduction.

Tolerated, and stated here as in cshare-overlay(1) NOTES: names of a lower
hardlink that none of them has copied up show distinct inode numbers
(`expected_fuse_groups`); and a whiteout in a lower directory that merges with
nothing below, which the kernel lists in readdir but cannot look up, is no
entry (`overlay_support._listed_entry`; cshare-overlay does not list it).
Not generated: chown(p, -1, -1), which the kernel's overlay copies up and a
FUSE filesystem never hears of.  Nothing else is tolerated.

Run: `make fuzz SEEDS=200 [OPS=400] [FIRST=0]` as root, or
`python tests/overlay_fuzz.py --seeds N --ops N`; CSHARE_OVERLAY_CMD=fuse-overlayfs
(or --command) runs it against another FUSE overlay.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overlay_support import (  # noqa: E402
    FIXED_TIME,
    Divergence,
    LayerDirs,
    Lockstep,
    Node,
    Op,
    Pair,
    build_layer,
    check_pair,
    format_ops,
    mounted,
    overlay_program_name,
    run_op,
    run_ops_as,
)

NAMES = ["a", "b", "c", "d", "e", "f"]
FILE_MODES = [0o644, 0o644, 0o600, 0o755, 0o777, 0o666, 0o000, 0o2755, 0o4755, 0o2745, 0o6777,
              0o2767, 0o4711]
DIR_MODES = [0o755, 0o755, 0o777, 0o1777, 0o2777, 0o3777, 0o700, 0o2775, 0o711]
ROOT_MODES = [0o755, 0o777, 0o1777, 0o2777]
DATA = [b"", b"x", b"hello world\n", b"0123456789" * 20, b"z" * 4095]
TIMES = [FIXED_TIME * 10**9 + 1, FIXED_TIME * 10**9 + 777_000_123]
XNAMES = ["user.a", "user.b"]


@dataclass(frozen=True)
class Case:
    """Layers as the FUSE copy gets them (topmost first), the upper root's mode, operations."""

    layers: tuple[tuple[Node, ...], ...]
    root_mode: int
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Users:
    """The identities operations run as besides root: (uid, gid) pairs."""

    others: tuple[tuple[int, int], ...]
    owners: tuple[tuple[int, int], ...]


def local_users() -> Users:
    import pwd

    found = []
    for name in ("alice", "bob"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        found.append((pw.pw_uid, pw.pw_gid))
    if not found:
        raise SystemExit("overlay_fuzz: needs the users alice and/or bob (tests create them)")
    others = [*found, (found[0][0], 7)]  # alice in a group she is not a member of
    return Users(tuple(others), ((0, 0), *found, (0, 7)))


# ------------------------------------------------------------------ generating layers

def _symlink_target(rng: random.Random, path: str) -> str:
    """A relative target that never leaves the mount (a `..` only below the top)."""
    depth = path.count("/")
    parts = [rng.choice(NAMES) for _ in range(rng.randint(1, 2))]
    if depth and rng.random() < 0.3:
        parts.insert(0, "..")
    if rng.random() < 0.25:
        parts[-1] = rng.choice(["nowhere", "c9", "new"])  # dangling
    return "/".join(parts)


def _random_path(rng: random.Random) -> str:
    return "/".join(rng.choice(NAMES) for _ in range(rng.choices([1, 2, 3], [4, 4, 2])[0]))


def _fits(path: str, kind: str, entries: dict[str, Node]) -> bool:
    """Can `path` hold a `kind` in a layer that already has `entries`?"""
    if path in entries:
        return False
    parts = path.split("/")
    for i in range(1, len(parts)):
        above = entries.get("/".join(parts[:i]))
        if above is not None and above.kind not in ("dir", "opaque"):
            return False
    has_children = any(p.startswith(path + "/") for p in entries)
    return not has_children or kind in ("dir", "opaque")


def _entry(rng: random.Random, kind: str, path: str, files: list[str], owners: Users,
           fuse_styles: Sequence[str]) -> Node | None:
    uid, gid = rng.choice(owners.owners)
    if kind == "file":
        xattrs = ((rng.choice(XNAMES), b"v"),) if rng.random() < 0.2 else ()
        return Node("file", path, rng.choice(DATA), rng.choice(FILE_MODES), uid, gid,
                    xattrs=xattrs)
    if kind == "dir":
        return Node("dir", path, mode=rng.choice(DIR_MODES), uid=uid, gid=gid)
    if kind == "opaque":
        return Node("opaque", path, mode=rng.choice(DIR_MODES), style=rng.choice(fuse_styles))
    if kind == "symlink":
        return Node("symlink", path, target=_symlink_target(rng, path), uid=uid, gid=gid)
    if kind == "hardlink":
        return Node("hardlink", path, target=rng.choice(files)) if files else None
    if kind == "whiteout":
        return Node(rng.choice(["whiteout", "aufs_whiteout"]), path)
    return Node("fifo", path, mode=rng.choice([0o644, 0o666]), uid=uid, gid=gid)


KINDS = ["file", "dir", "symlink", "hardlink", "whiteout", "opaque", "fifo"]
KIND_WEIGHTS = [30, 14, 10, 14, 14, 7, 3]


def generate_layers(rng: random.Random, owners: Users, fuse_styles: Sequence[str]
                    ) -> tuple[tuple[Node, ...], ...]:
    layers = []
    for _ in range(rng.randint(2, 4)):
        entries: dict[str, Node] = {}
        files: list[str] = []
        for _ in range(rng.randint(6, 16)):
            kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
            path = _random_path(rng)
            if kind == "hardlink" and rng.random() < 0.5 and files:
                path = f"{rng.choice(NAMES)}{rng.randint(2, 3)}"  # a second name beside
            if not _fits(path, kind, entries):
                continue
            node = _entry(rng, kind, path, files, owners, fuse_styles)
            if node is None:
                continue
            entries[path] = node
            if kind == "file":
                files.append(path)
        layers.append(tuple(entries.values()))
    return tuple(layers)


def kernel_style(node: Node) -> Node:
    """The same entry with the kernel's markers (the kernel reads only those)."""
    if node.kind == "aufs_whiteout":
        return replace(node, kind="whiteout")
    if node.kind == "opaque" and node.style != "trusted":
        return replace(node, style="trusted")
    return node


def layer_paths(layers: Sequence[Sequence[Node]]) -> list[str]:
    """Every name the layers mention, their parents, and new names in each directory."""
    paths: set[str] = set()
    for layer in layers:
        for node in layer:
            parts = node.path.split("/")
            for i in range(1, len(parts) + 1):
                paths.add("/".join(parts[:i]))
    dirs = sorted({p.rsplit("/", 1)[0] for p in paths if "/" in p} | {""})
    for d in dirs:
        for new in ("n", "x"):
            paths.add(f"{d}/{new}" if d else new)
    return sorted(paths)


# ------------------------------------------------------------------ generating operations

OP_WEIGHTS: dict[str, int] = {
    "link": 12, "rename": 12, "unlink": 10, "rmdir": 4, "create": 6, "trunc_write": 6,
    "write": 5, "append": 3, "read": 4, "mkdir": 5, "mkfifo": 1, "symlink": 3,
    "rename_noreplace": 2, "rename_exchange": 3, "chmod": 4, "chown": 3, "truncate": 3,
    "utime": 2, "setxattr": 2, "getxattr": 1, "listxattr": 1, "removexattr": 1, "stat": 7,
    "listdir": 5, "readlink": 1, "unlinked_fd": 1, "fsync": 1,
}


def _operation(rng: random.Random, name: str, paths: Sequence[str], owners: Users,
               recent: Sequence[str]) -> Op:
    """One operation; its paths are often ones the last operations used, so that
    chains such as link, rename of the new name, unlink of the old one happen."""

    def pick() -> str:
        return rng.choice(recent) if recent and rng.random() < 0.5 else rng.choice(paths)

    p, q = pick(), pick()
    if name in ("link", "rename", "rename_noreplace", "rename_exchange"):
        return (name, p, q)
    if name == "create":
        return (name, p, rng.choice(DATA), rng.choice(FILE_MODES))
    if name == "trunc_write":
        return (name, p, rng.choice(DATA), rng.choice(FILE_MODES))
    if name == "write":
        return (name, p, rng.choice(DATA), rng.choice([0, 3, 300]))
    if name == "append":
        return (name, p, rng.choice(DATA))
    if name == "mkdir":
        return (name, p, rng.choice(DIR_MODES))
    if name == "mkfifo":
        return (name, p, 0o644)
    if name == "symlink":
        return (name, _symlink_target(rng, p), p)
    if name == "chmod":
        return (name, p, rng.choice(FILE_MODES + DIR_MODES))
    if name == "chown":
        uid, gid = rng.choice(owners.owners)
        # Never chown(p, -1, -1): the kernel's FUSE client sends no request for
        # it, so the FUSE overlay cannot copy up as the kernel's overlay does
        # (cshare-overlay(1) NOTES).
        return (name, p, *rng.choice([(uid, gid), (uid, -1), (-1, gid)]))
    if name == "truncate":
        return (name, p, rng.choice([0, 2, 5000]))
    if name == "utime":
        return (name, p, rng.choice(TIMES), rng.choice(TIMES))
    if name == "setxattr":
        return (name, p, rng.choice(XNAMES), rng.choice([b"", b"v"]))
    if name in ("getxattr", "removexattr"):
        return (name, p, rng.choice(XNAMES))
    if name == "unlinked_fd":
        return (name, p, rng.choice(DATA))
    if name == "listdir":
        return (name, rng.choice([".", *[x for x in paths if "/" not in x]]))
    return (name, p)


JUGGLE = ["link", "link", "rename", "rename", "unlink", "unlink", "rename_exchange", "rmdir",
          "stat"]


def _juggle(rng: random.Random, layers: Sequence[Sequence[Node]], paths: Sequence[str]
            ) -> list[Op]:
    """A burst of link, rename and unlink among a few names: some from the lower
    layers (hardlinked ones and whiteouts among them), some new, in several directories."""
    lower = [n.path for layer in layers for n in layer if n.kind != "dir"]
    names = [rng.choice(lower or paths) for _ in range(2)]
    names += [rng.choice(paths) for _ in range(rng.randint(1, 2))]
    ops: list[Op] = []
    for _ in range(rng.randint(3, 7)):
        name = rng.choice(JUGGLE)
        a, b = rng.choice(names), rng.choice(names)
        ops.append((name, a, b) if name in ("link", "rename", "rename_exchange") else (name, a))
    return ops


def generate_ops(rng: random.Random, layers: Sequence[Sequence[Node]], count: int,
                 owners: Users) -> tuple[Op, ...]:
    paths = layer_paths(layers)
    names, weights = list(OP_WEIGHTS), list(OP_WEIGHTS.values())
    ops: list[Op] = []
    recent: list[str] = []
    while len(ops) < count:
        if rng.random() < 0.06:
            burst = _juggle(rng, layers, paths)
        else:
            burst = [_operation(rng, rng.choices(names, weights)[0], paths, owners, recent)]
        for op in burst:
            recent = ([a for a in op[1:] if isinstance(a, str) and a in paths] + recent)[:6]
            if rng.random() < 0.35:
                uid, gid = rng.choice(owners.others)
                op = ("as_user", uid, gid, op)
            ops.append(op)
    return tuple(ops[:count])


def generate(seed: int, count: int, owners: Users, fuse_styles: Sequence[str]) -> Case:
    rng = random.Random(seed)
    layers = generate_layers(rng, owners, fuse_styles)
    return Case(layers, rng.choice(ROOT_MODES), generate_ops(rng, layers, count, owners))


# ------------------------------------------------------------------ running a case

def run_sequence(root: Path, ops: Sequence[Op]) -> list[tuple[str, Any]]:
    """Every op's result; consecutive ops of one other user share one child process."""
    results: list[tuple[str, Any]] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        if op[0] != "as_user":
            results.append(run_op(root, op))
            i += 1
            continue
        j = i
        while j < len(ops) and ops[j][0] == "as_user" and ops[j][1:3] == op[1:3]:
            j += 1
        results += run_ops_as(op[1], op[2], root, [o[3] for o in ops[i:j]])
        i = j
    return results


def _copy(base: Path, layers: Sequence[Sequence[Node]], root_mode: int) -> LayerDirs:
    base.mkdir(parents=True)
    lowers = []
    for i, nodes in enumerate(layers):
        d = base / f"lower{i}"
        build_layer(d, nodes)
        lowers.append(d)
    dirs = LayerDirs(lowers, base / "upper", base / "work", base / "mnt")
    for d in (dirs.upper, dirs.work, dirs.mnt):
        d.mkdir()
    dirs.upper.chmod(root_mode)
    return dirs


def run_case(case: Case, base: Path) -> list[str]:
    """Every disagreement of the two overlays on `case` (empty: they agree)."""
    if base.exists():
        shutil.rmtree(base)
    kernel_layers = [[kernel_style(n) for n in layer] for layer in case.layers]
    kdirs = _copy(base / "kernel", kernel_layers, case.root_mode)
    fdirs = _copy(base / "fuse", case.layers, case.root_mode)
    try:
        with ExitStack() as stack:
            stack.enter_context(mounted(kdirs, "kernel"))
            stack.enter_context(mounted(fdirs, "fuse"))
            pair = Pair(kdirs, fdirs)
            k = run_sequence(kdirs.mnt, case.ops)
            f = run_sequence(fdirs.mnt, case.ops)
            ls = Lockstep(kdirs.mnt, fdirs.mnt, ops=list(case.ops))
            ls.divergences = [Divergence(i, op, a, b)
                              for i, (op, a, b) in enumerate(zip(case.ops, k, f, strict=True))
                              if a != b]
            try:
                return check_pair(pair, [], lockstep=ls)
            except OSError as exc:  # a tree no snapshot can walk is a divergence too
                return ["operations (a reproduction):\n" + format_ops(case.ops),
                        f"merged: comparing the trees failed: {exc!r}"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ shrinking and printing

def _without_nodes(case: Case, layer: int, drop: set[str]) -> Case:
    """`case` without the entries `drop` of one layer (and hardlinks to them)."""
    kept = tuple(n for n in case.layers[layer]
                 if n.path not in drop and not (n.kind == "hardlink" and n.target in drop))
    layers = case.layers[:layer] + (kept,) + case.layers[layer + 1:]
    return replace(case, layers=layers)


def _shrink_ops(case: Case, fails: Callable[[Case], bool], out_of_time: Callable[[], bool]
                ) -> Case:
    chunk = max(1, len(case.ops) // 2)
    while chunk >= 1 and not out_of_time():
        i, shrunk = 0, False
        while i < len(case.ops) and not out_of_time():
            trial = replace(case, ops=case.ops[:i] + case.ops[i + chunk:])
            if trial.ops != case.ops and fails(trial):
                case, shrunk = trial, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return case


def _shrink_layers(case: Case, fails: Callable[[Case], bool], out_of_time: Callable[[], bool]
                   ) -> Case:
    for layer in range(len(case.layers) - 1, -1, -1):
        if out_of_time():
            break
        trial = _without_nodes(case, layer, {n.path for n in case.layers[layer]})
        if len(case.layers) > 1 and fails(replace(trial, layers=case.layers[:layer]
                                                  + case.layers[layer + 1:])):
            case = replace(trial, layers=case.layers[:layer] + case.layers[layer + 1:])
            continue
        for node in list(case.layers[layer]):
            if out_of_time():
                break
            trial = _without_nodes(case, layer, {node.path})
            if trial.layers != case.layers and fails(trial):
                case = trial
    return case


def shrink(case: Case, fails: Callable[[Case], bool], seconds: float,
           first: int | None = None) -> Case:
    """A smaller case for which `fails` still holds, within about `seconds`.

    `first` is the step of the first differing result, if known: nothing
    after it is needed.
    """
    deadline = time.monotonic() + seconds

    def out_of_time() -> bool:
        return time.monotonic() > deadline

    if first is not None:
        cut = replace(case, ops=case.ops[:first + 1])
        if fails(cut):
            case = cut
    case = _shrink_ops(case, fails, out_of_time)
    case = _shrink_layers(case, fails, out_of_time)
    return _shrink_ops(case, fails, out_of_time)


def _first_divergence(problems: Sequence[str]) -> int | None:
    for line in problems:
        if line.startswith("result: step "):
            return int(line.split()[2])
    return None


def _describe_node(node: Node) -> str:
    extra = []
    if node.kind in ("file", "dir", "opaque", "fifo"):
        extra.append(f"mode={node.mode:#o}")
    if node.uid or node.gid:
        extra.append(f"owner={node.uid}:{node.gid}")
    if node.kind == "file":
        extra.append(f"{len(node.data)} bytes")
    if node.kind in ("symlink", "hardlink"):
        extra.append(f"-> {node.target}")
    if node.kind == "opaque":
        extra.append(f"style={node.style}")
    return f"{node.kind} {node.path}" + (f" ({', '.join(extra)})" if extra else "")


def format_case(case: Case) -> str:
    lines = [f"upper root mode {case.root_mode:#o}; lower layers, l0 the top:"]
    for i, layer in enumerate(case.layers):
        lines.append(f"  l{i}: " + ("; ".join(_describe_node(n) for n in layer) or "(empty)"))
    lines.append("operations:")
    lines.append(format_ops(case.ops))
    lines.append(f"as code: Case(layers={case.layers!r}, root_mode={case.root_mode:#o}, "
                 f"ops={case.ops!r})")
    return "\n".join(lines)


# ------------------------------------------------------------------ the run

def fuse_styles() -> tuple[str, ...]:
    """Opaque marker styles the FUSE overlay under test reads besides the kernel's."""
    if overlay_program_name() == "fuse-overlayfs":
        return ("trusted", "aufs", "fuseoverlayfs")
    return ("trusted", "aufs", "user")


@dataclass
class Report:
    seeds: list[int]
    diverged: dict[int, list[str]]
    seconds: float

    def summary(self) -> str:
        return (f"{len(self.seeds)} seeds, {len(self.diverged)} diverged "
                f"({overlay_program_name()} against the kernel overlay, {self.seconds:.0f} s)"
                + (f": seeds {sorted(self.diverged)}" if self.diverged else ""))


def fuzz(seeds: Sequence[int], ops: int, base: Path, *, shrink_seconds: float = 120,
         shrink_first: int = 1, out: Callable[[str], None] = print) -> Report:
    """Run every seed; shrink and print the first `shrink_first` divergences."""
    users, styles = local_users(), fuse_styles()
    start = time.monotonic()
    diverged: dict[int, list[str]] = {}
    for seed in seeds:
        case = generate(seed, ops, users, styles)
        problems = run_case(case, base / "case")
        if not problems:
            continue
        diverged[seed] = problems
        out(f"seed {seed}: diverged")
        if len(diverged) <= shrink_first:
            small = shrink(case, lambda trial: bool(run_case(trial, base / "case")),
                           shrink_seconds, _first_divergence(problems))
            out(f"seed {seed}, shrunk reproduction:\n{format_case(small)}")
            out("\n".join(run_case(small, base / "case")[1:]))
        else:
            out("\n".join(problems[1:6]))
    return Report(list(seeds), diverged, time.monotonic() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--first", type=int, default=0, help="the first seed")
    parser.add_argument("--ops", type=int, default=400, help="operations per seed")
    parser.add_argument("--shrink", type=int, default=1,
                        help="how many divergences to shrink and print in full")
    parser.add_argument("--command", help="the FUSE overlay command (default cshare-overlay)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("overlay_fuzz: run as root (it mounts the kernel overlay)", file=sys.stderr)
        return 2
    if args.command:
        os.environ["CSHARE_OVERLAY_CMD"] = args.command
    base = Path(tempfile.mkdtemp(prefix="cshare-fuzz-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        report = fuzz(range(args.first, args.first + args.seeds), args.ops, base,
                      shrink_first=args.shrink)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(report.summary())
    return 1 if report.diverged else 0


if __name__ == "__main__":
    sys.exit(main())
