"""cshare-overlay: a userspace overlay filesystem on pyfuse3 and trio, with plugins."""

__version__ = "0.1.0"
