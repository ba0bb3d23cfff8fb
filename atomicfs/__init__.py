"""atomicfs: a FUSE filesystem that makes every file update all-or-nothing."""

__version__ = "0.1.0"
