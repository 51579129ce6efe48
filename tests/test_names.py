"""Image reference resolution (cshare.store.names): pure, no store needed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cshare.store.names import ResolveError, normalize, parse, resolve


@dataclass(frozen=True)
class Img:
    id: str
    names: tuple[str, ...]


def make_id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


FEDORA = Img(make_id("fedora"), ("docker.io/library/fedora:latest", "docker.io/library/fedora:38"))
TINY = Img(make_id("tiny"), ("localhost/tinybb:latest",))
QUAY_TINY = Img(make_id("quay"), ("quay.io/someone/tinybb:latest",))
ALPINE_A = Img("abc" + make_id("a")[3:], ("docker.io/library/alpine:latest",))
ALPINE_B = Img("abd" + make_id("b")[3:], ("quay.io/x/alpine:latest",))
NONAME = Img(make_id("noname"), ())
ALL = [FEDORA, TINY, QUAY_TINY, ALPINE_A, ALPINE_B, NONAME]


@pytest.mark.parametrize(
    ("ref", "full"),
    [
        ("fedora", "docker.io/library/fedora:latest"),
        ("fedora:38", "docker.io/library/fedora:38"),
        ("docker.io/fedora", "docker.io/library/fedora:latest"),
        ("someone/tool", "docker.io/someone/tool:latest"),
        ("localhost/tinybb", "localhost/tinybb:latest"),
        ("quay.io/a/b:1.0", "quay.io/a/b:1.0"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("registry.example.com:5000/ns/x:tag", "registry.example.com:5000/ns/x:tag"),
    ],
)
def test_normalize(ref: str, full: str) -> None:
    assert normalize(ref) == full


@pytest.mark.parametrize("ref", ["", " fedora", "fedora:", "a//b", "x@", "localhost/"])
def test_invalid_references_are_errors(ref: str) -> None:
    with pytest.raises(ResolveError):
        parse(ref)


def test_exact_id_and_sha256_prefix() -> None:
    assert resolve(TINY.id, ALL, "here") is TINY
    assert resolve("sha256:" + TINY.id, ALL, "here") is TINY


def test_unique_id_prefix() -> None:
    assert resolve(FEDORA.id[:5], ALL, "here") is FEDORA
    assert resolve(ALPINE_A.id[:4], ALL, "here") is ALPINE_A


def test_ambiguous_id_prefix_lists_candidates() -> None:
    with pytest.raises(ResolveError) as err:
        resolve("ab", ALL, "the store")
    message = str(err.value)
    assert "ambiguous" in message and "\n" not in message
    assert ALPINE_A.id[:12] in message and ALPINE_B.id[:12] in message


def test_exact_name_and_missing_tag_means_latest() -> None:
    assert resolve("docker.io/library/fedora:38", ALL, "here") is FEDORA
    assert resolve("docker.io/library/fedora", ALL, "here") is FEDORA
    assert resolve("localhost/tinybb", ALL, "here") is TINY


def test_short_names() -> None:
    assert resolve("fedora", ALL, "here") is FEDORA
    assert resolve("fedora:38", ALL, "here") is FEDORA
    # localhost/ wins over other registries, as in podman
    assert resolve("tinybb", ALL, "here") is TINY
    # docker.io/library/ wins for an official name
    assert resolve("alpine", ALL, "here") is ALPINE_A
    # suffix match when neither localhost nor docker.io has it
    assert resolve("someone/tinybb", ALL, "here") is QUAY_TINY
    assert resolve("x/alpine", ALL, "here") is ALPINE_B


def test_ambiguous_short_name_lists_candidates() -> None:
    images = [
        Img(make_id("1"), ("quay.io/a/tool:latest",)),
        Img(make_id("2"), ("ghcr.io/b/tool:latest",)),
    ]
    with pytest.raises(ResolveError) as err:
        resolve("tool", images, "the store")
    message = str(err.value)
    assert "ambiguous" in message
    assert "quay.io/a/tool:latest" in message and "ghcr.io/b/tool:latest" in message


def test_unknown_lists_what_is_there() -> None:
    with pytest.raises(ResolveError) as err:
        resolve("nothere", ALL, "the store /x")
    message = str(err.value)
    assert "nothere" in message and "/x" in message and "\n" not in message
    assert "localhost/tinybb:latest" in message


def test_unknown_in_empty_store() -> None:
    with pytest.raises(ResolveError, match="holds no images"):
        resolve("x", [], "the store")


def test_wrong_tag_is_unknown() -> None:
    with pytest.raises(ResolveError):
        resolve("fedora:39", ALL, "here")


def test_digest_reference() -> None:
    digests = {FEDORA.id: "sha256:" + "1" * 64, TINY.id: "sha256:" + "2" * 64}
    assert resolve("fedora@sha256:" + "1" * 64, ALL, "here", digests) is FEDORA
    assert resolve("localhost/tinybb@sha256:" + "2" * 64, ALL, "here", digests) is TINY
    with pytest.raises(ResolveError):
        resolve("fedora@sha256:" + "2" * 64, ALL, "here", digests)


# ---------------------------------------------------------------- properties
component = st.builds(
    lambda a, b: a + b,
    st.sampled_from("abcdefxyz"),
    st.text(alphabet="abcdef0123xyz", max_size=5),
)
tag = st.text(alphabet="abc0123.", min_size=1, max_size=5).filter(lambda t: not t.startswith("."))
registry = st.sampled_from(["docker.io", "localhost", "quay.io", "example.com:5000"])


@st.composite
def image_sets(draw: st.DrawFn) -> list[Img]:
    names = draw(
        st.lists(
            st.builds(lambda r, p, t: f"{r}/{p}:{t}", registry, component, tag),
            unique=True,
            max_size=12,
        )
    )
    count = draw(st.integers(1, 6))
    images = [Img(make_id(f"{i}-{draw(st.integers())}"), ()) for i in range(count)]
    # every name belongs to exactly one image, as in a real store
    owners = [draw(st.integers(0, count - 1)) for _ in names]
    return [
        Img(img.id, tuple(n for n, o in zip(names, owners, strict=True) if o == i))
        for i, img in enumerate(images)
    ]


@settings(max_examples=60, deadline=None)
@given(image_sets())
def test_every_full_name_and_id_finds_its_owner(images: list[Img]) -> None:
    for img in images:
        assert resolve(img.id, images, "s") is img
        for name in img.names:
            assert resolve(name, images, "s") is img


@settings(max_examples=60, deadline=None)
@given(image_sets(), st.integers(1, 64))
def test_id_prefixes_are_unique_or_ambiguous(images: list[Img], length: int) -> None:
    target = images[0]
    prefix = target.id[:length]
    sharing = [i for i in images if i.id.startswith(prefix)]
    if len(sharing) == 1:
        assert resolve(prefix, images, "s") is target
    else:
        with pytest.raises(ResolveError, match="ambiguous"):
            resolve(prefix, images, "s")


@settings(max_examples=60, deadline=None)
@given(image_sets(), component)
def test_a_short_name_never_resolves_to_an_image_without_that_name(
    images: list[Img], short: str
) -> None:
    try:
        found = resolve(short, images, "s")
    except ResolveError as exc:
        assert "\n" not in str(exc)
        return
    assert any(
        n.rsplit(":", 1)[0].endswith("/" + short) and n.endswith(":latest") for n in found.names
    ) or (found.id.startswith(short))
