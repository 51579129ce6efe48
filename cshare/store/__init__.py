"""Image stores: the shared store cshare publishes, and podman's it reads.

shared (the shared store: layout, locks, atomic publishing, removal),
containers (reading podman's containers/storage), names (image references),
make_shared (podman image -> shared, converted, root-owned layers) and
inuse (who holds a layer right now, before `cshare rm` deletes it).  Built
on cshare.tree for the layer work and cshare.system for /proc.
"""
