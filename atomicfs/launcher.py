"""``atomicfs install``: a launcher on the system PATH, for mount(8), fstab and systemd.

``mount -t fuse.atomicfs SOURCE MOUNTPOINT`` makes mount(8) run mount.fuse3
with an empty environment PATH; mount.fuse3 runs ``atomicfs SOURCE MOUNTPOINT
-o OPTS`` through ``/bin/sh``, whose default PATH includes ``/usr/local/bin``.
The launcher put there is a short sh script that names everything by absolute
path: it execs the ``atomicfs`` program of the virtualenv that installed it
(``$ATOMICFS_VENV``, the variable scripts/bootstrap.sh also reads, selects
another one).  mount(8) keeps the rest of the environment, so that works
through ``mount -t`` too.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

MARKER = "# atomicfs launcher"
DEFAULT_BINDIR = "/usr/local/bin"
CHECKOUT = Path(__file__).resolve().parent.parent

TEMPLATE = """#!/bin/sh
{marker}, written by `atomicfs install`: re-run that to change it.
# mount(8) and mount.fuse3 run this with no PATH, so every name here is absolute.
# ATOMICFS_VENV selects another virtualenv (one made by {checkout}/scripts/bootstrap.sh).
default={venv}
venv=${{ATOMICFS_VENV:-$default}}
if [ ! -x "$venv/bin/atomicfs" ]; then
    echo "atomicfs: error: $venv/bin/atomicfs is missing (run {hint})" >&2
    exit 1
fi
if [ "$venv/bin/atomicfs" -ef "$0" ]; then
    echo "atomicfs: error: $venv/bin/atomicfs is this launcher, not a virtualenv's" >&2
    exit 1
fi
exec "$venv/bin/atomicfs" "$@"
"""


class LauncherError(Exception):
    """A refused install; the message is one line."""


def render(venv: str) -> str:
    script = CHECKOUT / "scripts" / "atomicfs"
    hint = f"{script} install" if script.exists() else "atomicfs install"
    return TEMPLATE.format(marker=MARKER, venv=shlex.quote(venv), checkout=CHECKOUT,
                           hint=hint)


def installed_venv(path: str) -> str | None:
    """The default virtualenv of an existing launcher (None: not an atomicfs launcher)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read(4096)
    except OSError:
        return None
    if MARKER not in text:
        return None
    for line in text.splitlines():
        if line.startswith("default="):
            words = shlex.split(line[len("default="):])
            return words[0] if words else ""
    return ""


def install(bindir: str = DEFAULT_BINDIR, if_missing: bool = False,
            venv: str | None = None) -> str | None:
    """Write ``BINDIR/atomicfs``. Returns what was done (None: nothing needed)."""
    venv = os.path.abspath(venv or sys.prefix)
    program = os.path.join(venv, "bin", "atomicfs")
    if not os.access(program, os.X_OK):
        raise LauncherError(f"{program} does not exist: run the install from the virtualenv "
                            "that has atomicfs (./scripts/atomicfs install)")
    if not os.path.isdir(bindir):
        raise LauncherError(f"BINDIR {bindir!r} is not a directory")
    target = os.path.join(bindir, "atomicfs")
    if os.path.lexists(target):
        current = installed_venv(target)
        if current is None:
            raise LauncherError(f"{target} exists and is not an atomicfs launcher; "
                                "remove it or choose another --bindir")
        if if_missing and os.access(os.path.join(current, "bin", "atomicfs"), os.X_OK):
            return None  # a working launcher is there (maybe of another checkout): keep it
        if current == venv and Path(target).read_text() == render(venv):
            return None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".atomicfs-launcher-", dir=bindir)
    except OSError as exc:
        raise LauncherError(f"cannot write to {bindir!r}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render(venv))
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return f"installed {target} (runs {program})"
