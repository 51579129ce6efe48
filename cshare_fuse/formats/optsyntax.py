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
    """A path (str or Path) as it goes into an `-o` value: `\\`, `,`, `:` and `"` escaped."""
    text = str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")
    return text.replace('"', '\\"')  # a value may not start a quoted string (split_options)


def lowerdir_value(paths: Iterable[object]) -> str:
    """`lowerdir=`'s value for these layer paths, top layer first."""
    return ":".join(escape(p) for p in paths)


def _split(text: str, sep: str, unescape: str, quotes: bool) -> list[str]:
    """Split `text` on unescaped `sep`.  A backslash before a character of `unescape`
    gives that character; any other escape stays as it is (for a later split).
    With `quotes`, a double-quoted value right after `=` is kept whole."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted or (quotes and ch == '"' and current and current[-1] == "="):
            quoted = (ch != '"') if quoted else True
            current.append(ch)
        elif ch == "\\" and i + 1 < len(text):
            following = text[i + 1]
            current.append(following if following in unescape else ch + following)
            i += 1
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on `sep` except where it is escaped with a backslash; unescape `\\sep`, `\\\\`,
    `\\,` and `\\"`."""
    return _split(text, sep, sep + '\\,"', quotes=False)


def split_options(text: str) -> list[str]:
    """Split an `-o` string on commas, keeping `\\,` and the `\\:` escapes intact.

    A value in double quotes right after `=` keeps its commas: podman passes
    an SELinux label as `context="...:s0:c1,c2"`.  Empty fields (podman's `,,`)
    are dropped.  `\\,` becomes a comma; other escapes stay for lowerdir's own split.
    """
    return [o for o in _split(text, ",", ",", quotes=True) if o]
