"""cshare: share one root-owned container image store with many unprivileged users."""

__version__ = "0.1.0"
