"""Command line: ``atomicfs mount|umount|recover``, and the mount.fuse3 form.

``mount -t fuse.atomicfs SOURCE MOUNTPOINT -o OPTS`` makes mount.fuse3 run
``atomicfs SOURCE MOUNTPOINT -o OPTS``: a first argument that is not a command
name is taken as that form.  Every error is one line on stderr and exit 1
(2 for a bad command line); nothing on disk is changed by a failed command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .mount import MountError, MountRequest, recover_offline, run, unmount
from .options import OptionError, parse_options, split_option_args

COMMANDS = ("mount", "umount", "unmount", "recover")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the problem."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


MOUNT_EPILOG = """\
options (-o, comma-separated, may repeat):
  durability=full|batch     full (default): every commit is on stable storage
                            before the call that made it returns; batch: commits
                            are visible at once and made durable in groups
  isolation=committed|shared
                            committed (default): readers see the last committed
                            version; shared: readers see writes in progress
  commit=auto|rename|journal
                            how commits are made (auto chooses per file)
  allow_other, default_permissions, ro, rw, nosuid, nodev, noexec, fsname=,
  subtype=, auto_unmount, ... : standard FUSE options, passed on. As root,
  allow_other and default_permissions are on by default
  (no_allow_other / no_default_permissions turn them off).
  defaults, _netdev, nofail, x-*: fstab words, accepted and ignored.

SOURCE may be the same directory as MOUNTPOINT: the tree is then served from a
handle opened before the mount.
"""


def _mount_parser(prog: str) -> _Parser:
    p = _Parser(prog=prog, description="Mount SOURCE on MOUNTPOINT with atomic file updates.",
                epilog=MOUNT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="directory whose tree is served")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="directory to mount on")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="mount options (see below)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("--debug", action="store_true", help="log every request (implies -f)")
    p.add_argument("--log", metavar="FILE",
                   help="append the daemon's log to FILE (default: stderr in the foreground, "
                        "discarded in the background)")
    return p


def _umount_parser(prog: str) -> _Parser:
    p = _Parser(prog=prog, description="Unmount an atomicfs mount.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="detach now even if files are open (lazy unmount)")
    return p


def _recover_parser(prog: str) -> _Parser:
    p = _Parser(prog=prog, description=(
        "Resolve what an interrupted commit left in SOURCE (offline: SOURCE must not be "
        "mounted by atomicfs). Prints one line per action; mounting does the same."))
    p.add_argument("source", metavar="SOURCE")
    return p


def _top_parser() -> _Parser:
    p = _Parser(
        prog="atomicfs",
        description="A FUSE filesystem that gives every program all-or-nothing file updates.",
        epilog="commands:\n  mount SOURCE MOUNTPOINT [-o OPTS] [-f]   mount (see atomicfs mount "
               "--help)\n  umount MOUNTPOINT [--lazy]                unmount\n"
               "  recover SOURCE                            offline recovery\n\n"
               "The form 'atomicfs SOURCE MOUNTPOINT -o OPTS' (used by mount -t fuse.atomicfs)"
               " mounts too.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"atomicfs {__version__}")
    p.add_argument("command", metavar="COMMAND", nargs="?")
    return p


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def cmd_mount(prog: str, argv: Sequence[str]) -> int:
    args = _mount_parser(prog).parse_args(argv)
    try:
        options = parse_options(split_option_args(args.options), source=args.source,
                                is_root=os.geteuid() == 0)
        if args.debug:
            options.debug = True
        foreground = args.foreground or options.debug
        return run(MountRequest(args.source, args.mountpoint, options, foreground, args.log))
    except (OptionError, MountError) as exc:
        return _fail(prog, str(exc))


def cmd_umount(prog: str, argv: Sequence[str]) -> int:
    args = _umount_parser(prog).parse_args(argv)
    try:
        unmount(args.mountpoint, lazy=args.lazy)
    except MountError as exc:
        return _fail(prog, str(exc))
    return 0


def cmd_recover(prog: str, argv: Sequence[str]) -> int:
    args = _recover_parser(prog).parse_args(argv)
    try:
        for line in recover_offline(args.source):
            print(line)
    except MountError as exc:
        return _fail(prog, str(exc))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "mount":
            return cmd_mount("atomicfs mount", rest)
        if command == "recover":
            return cmd_recover("atomicfs recover", rest)
        return cmd_umount(f"atomicfs {command}", rest)
    if argv and not argv[0].startswith("-"):
        if len(argv) >= 2 and (os.path.sep in argv[0] or os.path.exists(argv[0])):
            return cmd_mount("atomicfs", argv)  # mount.fuse3 form
        _top_parser().error(f"unknown command {argv[0]!r}")
    _top_parser().parse_args(argv)
    _top_parser().print_help()
    return 2 if not argv else 0
