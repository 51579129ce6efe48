"""Print a JSON listing of a tree: every entry's type, mode, owner, size, device, mtime, link, xattrs, content digest.

Run as a script (`python registry_walk.py ROOT [SKIP...]`) so that it can walk a
mount as another user inside that user's namespace; imports nothing of cshare
or pytest.  Directory sizes, nlink of directories, atime and ctime are left
out: they depend on how a tree was unpacked, not on what it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys


def describe(path: str) -> dict[str, object]:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    meta: dict[str, object] = {
        "type": kind, "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
    }
    if not stat.S_ISDIR(st.st_mode):
        meta["size"], meta["nlink"] = st.st_size, st.st_nlink
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        meta["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    if stat.S_ISLNK(st.st_mode):
        meta["link"] = os.readlink(path)
    else:
        names = sorted(n for n in os.listxattr(path, follow_symlinks=False)
                       if n.startswith("user."))
        meta["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False).hex() for n in names}
    if stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        meta["sha256"] = h.hexdigest()
    return meta


def walk(root: str, skip: set[str]) -> dict[str, dict[str, object]]:
    out = {".": describe(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(rel_dir, d)) not in skip]
        for name in [*dirnames, *filenames]:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel not in skip:
                out[rel] = describe(os.path.join(dirpath, name))
    return out


if __name__ == "__main__":
    json.dump(walk(sys.argv[1], set(sys.argv[2:])), sys.stdout, sort_keys=True)
