"""Operations on one layer's directory tree: walk, convert, restore, verify, copy.

walk (the iterative, fd-based walker that never follows a symlink),
parallel (the same walk over several processes), convert / restore / verify
(the three `cshare` tree commands), marks (what convert and restore leave
in a tree so a killed run can be finished) and copy (a layer copied exactly).
They know nothing of stores or mounts: a tree is just a directory.
"""
