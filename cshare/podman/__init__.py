"""podman's own configuration, as cshare setup reads and edits it.

`storageconf` edits a containers storage.conf (the shared store as an
additional image store, cshare-overlay as the mount program) keeping every
other setting; `checks` finds what would stop a user's `podman run` before it
fails; `setup` puts the two together for `cshare setup` (and `--undo`).
"""
