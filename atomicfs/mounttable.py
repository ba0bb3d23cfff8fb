"""The mount table (``/proc/self/mountinfo``): one reader for the daemon, its
commands, the tests and the scripts."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (the fields atomicfs uses)."""

    mount_id: int
    dev: int  # st_dev of files in this mount
    point: str
    fstype: str
    source: str
    super_options: str


def _unescape(field: bytes) -> str:
    return field.decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")


def mount_entries() -> list[MountEntry]:
    """Every mount of this process's namespace, in mount order."""
    entries = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            major, minor = fields[2].split(b":")
            entries.append(MountEntry(int(fields[0]), os.makedev(int(major), int(minor)),
                                      _unescape(fields[4]), fields[sep + 1].decode(),
                                      _unescape(fields[sep + 2]),
                                      fields[sep + 3].decode(errors="replace")))
    return entries


def mount_table() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount, in mount order."""
    return [(e.point, e.fstype) for e in mount_entries()]


def top_mount(path: str) -> MountEntry | None:
    """The topmost mount exactly at ``path`` (a real path), or None."""
    found = None
    for entry in mount_entries():
        if entry.point == path:
            found = entry
    return found


def top_fstype(path: str) -> str | None:
    """The filesystem type mounted at ``path`` (the topmost mount), or None."""
    entry = top_mount(path)
    return None if entry is None else entry.fstype


def is_fuse(fstype: str | None) -> bool:
    return fstype is not None and (fstype == "fuse" or fstype.startswith("fuse."))


def filesystem_of(path: str) -> str:
    """fstype of the filesystem that holds ``path`` (the longest mount-point prefix)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    for entry in mount_entries():
        point = entry.point
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, entry.fstype
    return kind


def mounts_below(*roots: str) -> list[str]:
    """Mount points at or below any of ``roots`` (real paths), in mount order."""
    prefixes = [os.path.realpath(r) for r in roots]
    return [e.point for e in mount_entries()
            if any(e.point == p or e.point.startswith(p.rstrip("/") + "/") for p in prefixes)]
