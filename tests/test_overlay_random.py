"""Randomized differential test: hypothesis drives both overlays in lockstep.

A hypothesis state machine applies random operations (create, write, rename,
unlink, chmod, xattrs, ...) to the kernel overlay and to the FUSE overlay
under test, and fails at the first step whose result or errno differs; at the
end of each example it compares the merged trees and the upper layers.  A
rule switches between root and alice, so permission checks are compared too.  A
failure is shrunk to a minimal sequence, printed as the state machine steps
and as the list of operations.

Mounting twice per example would eat the budget, so each build of the layers
holds many identical "arenas" (a000, a001, ...); every example works inside a
fresh arena of the same two mounts, and the layers are rebuilt and remounted
only when the arenas run out.  Budget: CSHARE_RANDOM_EXAMPLES examples
(default 150) of up to 30 steps: 20-90 s with cshare-overlay on 2 cores,
and within the CI budget for a slower overlay.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import ensure_user
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from overlay_support import (
    FIXED_TIME,
    Lockstep,
    Node,
    Pair,
    chardev,
    check_pair,
    dir_,
    fifo,
    file,
    hardlink,
    make_copy,
    mounted,
    opaque,
    symlink,
    whiteout,
)

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.slow, pytest.mark.timeout(240)]

EXAMPLES = int(os.environ.get("CSHARE_RANDOM_EXAMPLES", "150"))
STEPS = 30
#: Shrinking a failure replays examples on live mounts; cap it so that a
#: failing run still reports (with its minimal case) within the test timeout.
SHRINK_SECONDS = 60
ARENAS_PER_BUILD = 120

# One arena, per layer (topmost first), kernel-style markers only: the kernel
# must understand the layers it is the reference for.
BOTTOM = [
    dir_("d"), file("d/a", "bottom a\n"), file("d/b", "bottom b\n"), file("d/s/x", "x\n"),
    file("f", "bottom f\n"), file("g", "g\n", mode=0o600, uid=7, gid=7,
                                  xattrs={"user.a": b"1"}),
    dir_("e", xattrs={"user.b": b"dir"}), file("e/old", "old\n"), file("w", "whited out\n"),
    fifo("p"), dir_("k", mode=0o750), file("k/deep/er", "deeper\n", mode=0o444),
    file("h1", "linked\n"), hardlink("h2", "h1"), chardev("c", 1, 3),
]
MIDDLE = [
    whiteout("d/a"), file("d/c", "middle c\n"), opaque("e"), file("e/new", "new\n"),
    whiteout("w"), file("f", "middle f\n", mode=0o640),
]
TOP = [file("d/b", "top b\n"), file("t", "top t\n"), symlink("s", "f"), dir_("z")]

PATHS = ["d", "d/a", "d/b", "d/c", "d/s", "d/s/x", "d/n", "e", "e/old", "e/new", "f", "g",
         "p", "s", "t", "w", "z", "z/q", "k", "k/deep", "k/deep/er", "n1", "n2", "nd", "nd/n1",
         "h1", "h2", "c"]
DATA = [b"", b"x", b"hello world\n", b"0123456789" * 20]
MODES = [0o644, 0o600, 0o755, 0o777, 0o1777, 0o4711, 0o000]
TIMES = [FIXED_TIME * 10**9 + 1, FIXED_TIME * 10**9 + 777_000_123]
XNAMES = ["user.a", "user.b", "user.c"]

path = st.sampled_from(PATHS)
data = st.sampled_from(DATA)
mode = st.sampled_from(MODES)


def arena_layers(count: int) -> list[list[Node]]:
    layers = []
    for template in (TOP, MIDDLE, BOTTOM):
        nodes = []
        for i in range(count):
            prefix = f"a{i:03d}/"
            nodes.append(dir_(prefix.rstrip("/")))
            for n in template:
                target = prefix + n.target if n.kind == "hardlink" else n.target
                nodes.append(Node(n.kind, prefix + n.path, n.data, n.mode, n.uid, n.gid,
                                  target, n.xattrs, n.style))
        layers.append(nodes)
    return layers


class ArenaPool:
    """Hands out fresh arenas of a mounted pair, rebuilding when they run out."""

    def __init__(self, base: Path, alice: pwd.struct_passwd) -> None:
        self.base = base
        self.alice = alice
        self.builds = 0
        self.stack: ExitStack | None = None
        self.pair: Pair | None = None
        self.next = ARENAS_PER_BUILD

    def take(self) -> tuple[Pair, str]:
        if self.next >= ARENAS_PER_BUILD or self.pair is None:
            self._rebuild()
        arena = f"a{self.next:03d}"
        self.next += 1
        assert self.pair is not None
        return self.pair, arena

    def _rebuild(self) -> None:
        self.close()
        base = self.base / f"build{self.builds}"
        self.builds += 1
        layers = arena_layers(ARENAS_PER_BUILD)
        kdirs = make_copy(base / "kernel", layers)
        fdirs = make_copy(base / "fuse", layers)
        self.stack = ExitStack()
        self.stack.enter_context(mounted(kdirs, "kernel"))
        self.stack.enter_context(mounted(fdirs, "fuse"))
        self.pair = Pair(kdirs, fdirs)
        self.next = 0

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
            self.stack = None
            if self.pair is not None:
                shutil.rmtree(self.pair.kernel.mnt.parent.parent, ignore_errors=True)
        self.pair = None


@pytest.fixture
def pool(root_fuse: None, world_tmp: Path) -> Iterator[ArenaPool]:
    p = ArenaPool(world_tmp, ensure_user("alice"))
    try:
        yield p
    finally:
        p.close()


def machine_for(pool: ArenaPool) -> type[RuleBasedStateMachine]:
    class OverlayMachine(RuleBasedStateMachine):
        """Each rule is one operation run on both mounts; results must agree."""

        @initialize()
        def start(self) -> None:
            self.pair, self.arena = pool.take()
            self.ls = Lockstep(self.pair.kernel.mnt / self.arena, self.pair.fuse.mnt / self.arena)
            self.user: tuple[int, int] | None = None

        def do(self, *op: object) -> None:
            step = op if self.user is None else ("as_user", *self.user, op)
            k, f = self.ls.run(tuple(step))
            assert k == f, "\n" + self.ls.report()

        @rule(who=st.sampled_from(["root", "alice"]))
        def switch_user(self, who: str) -> None:
            """Later operations run as root or as alice: permission checks are compared too."""
            self.user = None if who == "root" else (pool.alice.pw_uid, pool.alice.pw_gid)

        @rule(p=path, d=data, m=mode)
        def create(self, p: str, d: bytes, m: int) -> None:
            self.do("create", p, d, m)

        @rule(p=path, d=data)
        def trunc_write(self, p: str, d: bytes) -> None:
            self.do("trunc_write", p, d)

        @rule(p=path, d=data, off=st.sampled_from([0, 3, 300]))
        def write(self, p: str, d: bytes, off: int) -> None:
            self.do("write", p, d, off)

        @rule(p=path, d=data)
        def append(self, p: str, d: bytes) -> None:
            self.do("append", p, d)

        @rule(p=path)
        def read(self, p: str) -> None:
            self.do("read", p)

        @rule(p=path, m=st.sampled_from([0o755, 0o700, 0o1777]))
        def mkdir(self, p: str, m: int) -> None:
            self.do("mkdir", p, m)

        @rule(p=path)
        def mkfifo(self, p: str) -> None:
            self.do("mkfifo", p, 0o644)

        @rule(to=st.sampled_from(["f", "../f", "d/b", "nowhere", "d"]), p=path)
        def symlink(self, to: str, p: str) -> None:
            self.do("symlink", to, p)

        @rule(a=path, b=path)
        def link(self, a: str, b: str) -> None:
            self.do("link", a, b)

        @rule(p=path)
        def unlink(self, p: str) -> None:
            self.do("unlink", p)

        @rule(p=path)
        def rmdir(self, p: str) -> None:
            self.do("rmdir", p)

        @rule(a=path, b=path, how=st.sampled_from(["rename", "rename_noreplace",
                                                     "rename_exchange"]))
        def rename(self, a: str, b: str, how: str) -> None:
            self.do(how, a, b)

        @rule(p=path, m=mode)
        def chmod(self, p: str, m: int) -> None:
            self.do("chmod", p, m)

        @rule(p=path, uid=st.sampled_from([0, 7, 1000, -1]), gid=st.sampled_from([0, 7, -1]))
        def chown(self, p: str, uid: int, gid: int) -> None:
            self.do("chown", p, uid, gid)

        @rule(p=path, size=st.sampled_from([0, 2, 5000]))
        def truncate(self, p: str, size: int) -> None:
            self.do("truncate", p, size)

        @rule(p=path, a=st.sampled_from(TIMES), m=st.sampled_from(TIMES))
        def utime(self, p: str, a: int, m: int) -> None:
            self.do("utime", p, a, m)

        @rule(p=path, n=st.sampled_from(XNAMES), v=st.sampled_from([b"", b"v", b"\x00\xff"]))
        def setxattr(self, p: str, n: str, v: bytes) -> None:
            self.do("setxattr", p, n, v)

        @rule(p=path, n=st.sampled_from(XNAMES))
        def getxattr(self, p: str, n: str) -> None:
            self.do("getxattr", p, n)

        @rule(p=path)
        def listxattr(self, p: str) -> None:
            self.do("listxattr", p)

        @rule(p=path, n=st.sampled_from(XNAMES))
        def removexattr(self, p: str, n: str) -> None:
            self.do("removexattr", p, n)

        @rule(p=path)
        def stat(self, p: str) -> None:
            self.do("stat", p)

        @rule(p=st.sampled_from([".", "d", "d/s", "e", "z", "k", "k/deep", "nd"]))
        def listdir(self, p: str) -> None:
            self.do("listdir", p)

        @rule(p=path)
        def readlink(self, p: str) -> None:
            self.do("readlink", p)

        @rule(p=path, d=data)
        def unlinked_fd(self, p: str, d: bytes) -> None:
            self.do("unlinked_fd", p, d)

        @rule(p=path)
        def fsync(self, p: str) -> None:
            self.do("fsync", p)

        def teardown(self) -> None:
            if not hasattr(self, "ls") or self.ls.divergences:
                return  # no example ran, or a step already failed with its report
            problems = check_pair(self.pair, [], below=self.arena, lockstep=self.ls)
            assert not problems, "\n".join(problems)

    return OverlayMachine


def test_random_operations_match_kernel(pool: ArenaPool, monkeypatch: pytest.MonkeyPatch) -> None:
    from hypothesis.internal.conjecture import engine

    if hasattr(engine, "MAX_SHRINKING_SECONDS"):  # internal knob; harmless if it moves
        monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS)
    run_state_machine_as_test(
        machine_for(pool),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert pool.builds >= 1 and pool.next > 0, "no example ran"
