"""A shared-store image mounted for one user: records, the overlay command line, mount/umount.

records (mount.json and the XDG paths of each user's upper layers),
command (which overlay program, its `-o` command line, finding its daemon)
and ops (`cshare mount` / `cshare umount`).  It reads the shared store
(cshare.store) and never the other way round.
"""
