"""The pure part of cshare-overlay: the on-disk and command-line formats.

Everything here only parses, formats and names things (formats.md): the
override xattr codec (`overrides`), the whiteout/opaque markers and internal
xattr names (`markers`), and the `-o` option syntax (`optsyntax`).  No module
here does I/O, touches FUSE or mounts anything, so `cshare` may import them
(an import-linter contract allows cshare no other part of cshare_fuse), and
cshare-overlay's start path may import them without slowing down.

This file imports nothing: `cshare_fuse.formats.optsyntax` is on that start path.
"""
