"""The syntax of `-o` option strings: splitting, unescaping and escaping.

An overlay's options are one comma-separated string; `lowerdir=` separates
its layers with colons.  A path that contains either separator (or a
backslash) is escaped with a backslash.  cshare-overlay parses that syntax
here, and everything in cshare that builds an overlay command line escapes
its paths with `escape`, so the two sides cannot drift apart.  Pure and
light: cshare-overlay's start path imports it.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable


def escape(path: object) -> str:
    """A path (str or Path) as it goes into an `-o` value: `\\`, `,` and `:` escaped."""
    return str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def lowerdir_value(paths: Iterable[object]) -> str:
    """`lowerdir=`'s value for these layer paths, top layer first."""
    return ":".join(escape(p) for p in paths)


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on `sep` except where it is escaped with a backslash; unescape `\\sep`, `\\\\`."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in (sep, "\\", ","):
            current.append(text[i + 1])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def split_options(text: str) -> list[str]:
    """Split an `-o` string on commas, keeping `\\,` and the `\\:` escapes intact."""
    out: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            if text[i + 1] == ",":
                current.append(",")
            else:
                current.append(text[i : i + 2])  # keep \: for lowerdir's own split
            i += 2
            continue
        if ch == ",":
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    out.append("".join(current))
    return [o for o in out if o]
