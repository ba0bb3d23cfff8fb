"""Parsing of ``-o`` mount options (pure logic, no FUSE needed).

Options are of three sorts:
- atomicfs's own (``durability=``, ``isolation=``, ``commit=``, ``checkpoint=``,
  ``checkpoint_bytes=``...), checked here;
- standard FUSE/mount options, passed to libfuse unchanged;
- fstab-only words that mount(8) or systemd use and that mean nothing to a
  FUSE daemon (``defaults``, ``_netdev``, ``nofail``, ``x-systemd.*``...),
  accepted and dropped.
Anything else is an error naming the option, before anything is mounted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_TIMEOUT = 3600.0  # seconds; entry_timeout= and attr_timeout= accept 0..MAX_TIMEOUT
OWN_TIMEOUTS = ("entry_timeout", "attr_timeout")
# Append sessions (docs/semantics.md §10): committed in steps every checkpoint= seconds
# and every checkpoint_bytes= bytes appended.
MAX_CHECKPOINT = 3600.0
MIN_CHECKPOINT = 0.1
MAX_CHECKPOINT_BYTES = 1 << 40
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
OWN_CHOICES: dict[str, tuple[str, ...]] = {
    "durability": ("full", "batch"),
    "isolation": ("committed", "shared"),
    "commit": ("auto", "rename", "journal"),
}

FUSE_FLAGS = frozenset({
    "allow_other", "allow_root", "default_permissions", "auto_unmount", "blkdev",
    "ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec",
    "sync", "async", "dirsync", "atime", "noatime", "relatime", "norelatime",
    "strictatime", "nostrictatime", "diratime", "nodiratime", "lazytime", "nolazytime",
})
FUSE_VALUED = frozenset({
    "fsname", "subtype", "max_read", "context", "fscontext", "defcontext", "rootcontext",
})
IGNORED = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "_netdev", "nofail", "loop",
})
IGNORED_PREFIXES = ("x-", "comment=")
# Flags that turn a default off: no_allow_other drops the root default allow_other.
NEGATIONS = frozenset({"no_allow_other", "no_default_permissions"})


class OptionError(ValueError):
    """A mount option that atomicfs does not accept; the message names it."""


@dataclass
class MountOptions:
    durability: str = "full"
    isolation: str = "committed"
    commit: str = "auto"
    # How long the kernel may trust a name (entry) or a file's attributes without
    # asking the daemon.  Every change made through the mount updates or
    # invalidates the kernel's caches; these bound how late a change made directly
    # in SOURCE shows through the mount.  A save into an existing file saves a
    # round trip (LOOKUP, or GETATTR for the permission check) while both are
    # cached (docs/performance.md).
    entry_timeout: float = 10.0
    attr_timeout: float = 10.0
    checkpoint: float = 5.0  # seconds between checkpoints of an append session
    checkpoint_bytes: int = 64 << 20  # bytes appended that make a checkpoint at once
    debug: bool = False
    fuse: set[str] = field(default_factory=set)


def split_option_args(values: Iterable[str]) -> list[str]:
    """Flatten repeated ``-o a,b -o c`` arguments into ``[a, b, c]``."""
    out: list[str] = []
    for value in values:
        out.extend(item.strip() for item in value.split(",") if item.strip())
    return out


def fsname_of(source: str) -> str:
    """SOURCE as the mount table's device name: printable ASCII (libfuse takes ASCII
    options); ``,`` (the option separator), ``\\`` (its escape) and the rest become ``_``."""
    raw = os.fsencode(source)
    return "".join(chr(b) if 32 <= b < 127 and b not in b",\\" else "_" for b in raw)


def _seconds(key: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_TIMEOUT:  # also NaN
        raise OptionError(f"bad value for option {key}: {value!r} "
                          f"(expected seconds from 0 to {MAX_TIMEOUT:g})")
    return seconds


def _checkpoint_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not MIN_CHECKPOINT <= seconds <= MAX_CHECKPOINT:  # also NaN
        raise OptionError(f"bad value for option checkpoint: {value!r} (expected seconds "
                          f"from {MIN_CHECKPOINT:g} to {MAX_CHECKPOINT:g})")
    return seconds


def _bytes(key: str, value: str) -> int:
    """``65536``, ``64k``, ``64M``, ``1G`` (binary units, case-insensitive)."""
    digits = value.rstrip("kKmMgG")
    unit = value[len(digits):].lower()
    n = int(digits) * UNITS[unit] if digits.isdigit() and unit in UNITS else 0
    if 1 <= n <= MAX_CHECKPOINT_BYTES:
        return n
    raise OptionError(f"bad value for option {key}: {value!r} (expected a number of bytes "
                      f"from 1 to 1T, with an optional unit k, M or G)")


def parse_options(items: Iterable[str], *, source: str, is_root: bool) -> MountOptions:
    opts = MountOptions()
    fuse: set[str] = set()
    negated: set[str] = set()
    for item in items:
        key, eq, value = item.partition("=")
        if key in OWN_CHOICES:
            if not eq or value not in OWN_CHOICES[key]:
                allowed = "|".join(OWN_CHOICES[key])
                raise OptionError(f"bad value for option {key}: {value!r} (expected {allowed})")
            setattr(opts, key, value)
        elif key in OWN_TIMEOUTS:
            setattr(opts, key, _seconds(key, value if eq else ""))
        elif key == "checkpoint":
            opts.checkpoint = _checkpoint_seconds(value if eq else "")
        elif key == "checkpoint_bytes":
            opts.checkpoint_bytes = _bytes(key, value if eq else "")
        elif key == "debug" and not eq:
            opts.debug = True
        elif item in NEGATIONS:
            negated.add(item[3:])
        elif key in FUSE_FLAGS and not eq:
            fuse.add(key)
        elif key in FUSE_VALUED and eq and value:
            if not item.isascii():  # libfuse takes its options as ASCII
                raise OptionError(f"option {key} must be ASCII: {value!r}")
            if key == "max_read" and not value.isdigit():
                raise OptionError(f"bad value for option max_read: {value!r} "
                                  "(expected a number of bytes)")
            fuse = {o for o in fuse if not o.startswith(key + "=")}
            fuse.add(item)
        elif item in IGNORED or item.startswith(IGNORED_PREFIXES):
            continue
        else:
            raise OptionError(f"unknown mount option: {item!r}")
    if "ro" in fuse and "rw" in fuse:
        raise OptionError("options ro and rw contradict each other")
    defaults = {"default_permissions"}
    if is_root:
        defaults.add("allow_other")
    fuse |= defaults - negated
    if not any(o.startswith("fsname=") for o in fuse):
        fuse.add("fsname=" + fsname_of(source))
    if not any(o.startswith("subtype=") for o in fuse):
        fuse.add("subtype=atomicfs")
    opts.fuse = fuse
    return opts
