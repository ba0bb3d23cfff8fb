"""Command line: ``atomicfs mount|umount|status|recover|install|run``, and the mount.fuse3 form.

``mount -t fuse.atomicfs SOURCE MOUNTPOINT -o OPTS`` makes mount.fuse3 run
``atomicfs SOURCE MOUNTPOINT -o OPTS``: a first argument that is not a command
name is taken as that form.  Every error is one line on stderr and exit 1
(2 for a bad command line); nothing on disk is changed by a failed command.
``--help`` prints the command's manual page (:mod:`atomicfs.manual`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, control, launcher, manual, runner, status
from .mount import MountError, MountRequest, recover_offline, run
from .options import OptionError, parse_options, split_option_args

COMMANDS = ("mount", "umount", "unmount", "status", "recover", "install", "run")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the problem, whose help is a manual page."""

    def __init__(self, prog: str, page: str, **kwargs: Any) -> None:
        super().__init__(prog=prog, add_help=False, **kwargs)
        self.page = page
        self.add_argument("-h", "--help", action="store_true", help=argparse.SUPPRESS)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: None = None) -> argparse.Namespace:
        if args is not None and any(a == "-h" or (len(a) >= 3 and "--help".startswith(a))
                                    for a in args):
            self.print_page()  # before checking the other arguments, as argparse does
        parsed = super().parse_args(args)
        if parsed.help:  # an abbreviation (--he)
            self.print_page()
        return parsed

    def print_page(self) -> NoReturn:
        sys.stdout.write(manual.PAGES[self.page])
        self.exit(0)


def _mount_parser(prog: str) -> _Parser:
    p = _Parser(prog, "mount")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    p.add_argument("-f", "--foreground", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--log", metavar="FILE")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _umount_parser(prog: str) -> _Parser:
    p = _Parser(prog, "umount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-z", "--lazy", action="store_true")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS")
    p.add_argument("--if-dead", action="store_true")
    return p


def _status_parser(prog: str) -> _Parser:
    p = _Parser(prog, "status")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true")
    return p


def _recover_parser(prog: str) -> _Parser:
    p = _Parser(prog, "recover")
    p.add_argument("source", metavar="SOURCE")
    return p


def _install_parser(prog: str) -> _Parser:
    p = _Parser(prog, "install")
    p.add_argument("--bindir", metavar="DIR", default=launcher.DEFAULT_BINDIR)
    p.add_argument("--if-missing", action="store_true")
    return p


def _run_parser(prog: str) -> _Parser:
    p = _Parser(prog, "run")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("command", metavar="CMD", nargs=argparse.REMAINDER)
    return p


def _top_parser() -> _Parser:
    p = _Parser("atomicfs", "atomicfs")
    p.add_argument("--version", action="version", version=f"atomicfs {__version__}")
    p.add_argument("command", metavar="COMMAND", nargs="?")
    return p


PARSERS = {"mount": _mount_parser, "umount": _umount_parser, "status": _status_parser,
           "recover": _recover_parser, "install": _install_parser, "run": _run_parser}


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def cmd_mount(prog: str, argv: Sequence[str]) -> int:
    args = _mount_parser(prog).parse_args(argv)
    try:
        # the mount table shows SOURCE absolute (findmnt, mount, the fstab generator)
        options = parse_options(split_option_args(args.options),
                                source=os.path.abspath(args.source), is_root=os.geteuid() == 0)
        if args.debug:
            options.debug = True
        foreground = args.foreground or options.debug
        return run(MountRequest(args.source, args.mountpoint, options, foreground, args.log))
    except (OptionError, MountError) as exc:
        return _fail(prog, str(exc))


def cmd_umount(prog: str, argv: Sequence[str]) -> int:
    args = _umount_parser(prog).parse_args(argv)
    if args.if_dead and (args.lazy or args.timeout is not None):
        return _fail(prog, "--if-dead takes no --lazy or --timeout")

    def notice(line: str) -> None:
        print(f"{prog}: {line}", file=sys.stderr, flush=True)

    try:
        done = control.unmount(args.mountpoint, lazy=args.lazy, if_dead=args.if_dead,
                               timeout=args.timeout, notice=notice)
    except MountError as exc:
        return _fail(prog, str(exc))
    if done:
        print(done)
    return 0


def cmd_status(prog: str, argv: Sequence[str]) -> int:
    args = _status_parser(prog).parse_args(argv)
    try:
        doc = control.read_status(args.mountpoint)
    except MountError as exc:
        return _fail(prog, str(exc))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        sys.stdout.write(status.format_text(doc))
    return 0


def cmd_recover(prog: str, argv: Sequence[str]) -> int:
    args = _recover_parser(prog).parse_args(argv)
    try:
        for line in recover_offline(args.source):
            print(line)
    except MountError as exc:
        return _fail(prog, str(exc))
    return 0


def cmd_install(prog: str, argv: Sequence[str]) -> int:
    args = _install_parser(prog).parse_args(argv)
    try:
        done = launcher.install(args.bindir, if_missing=args.if_missing)
    except launcher.LauncherError as exc:
        return _fail(prog, str(exc))
    if done:
        print(done)
    return 0


def cmd_run(prog: str, argv: Sequence[str]) -> int:
    args = list(argv)
    if args and args[0] in ("-h", "--help"):
        _run_parser(prog).print_page()
    if len(args) < 2 or (args[1] == "--" and len(args) < 3):
        _run_parser(prog).error("want MOUNTPOINT [--] CMD [ARGS...]")
    mountpoint, command = args[0], args[1:]
    if command[0] == "--":
        command = command[1:]
    try:
        return runner.run(mountpoint, command)
    except runner.RunError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return runner.FAILED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
        prog = f"atomicfs {command}"
        if command == "mount":
            return cmd_mount(prog, rest)
        if command == "status":
            return cmd_status(prog, rest)
        if command == "recover":
            return cmd_recover(prog, rest)
        if command == "install":
            return cmd_install(prog, rest)
        if command == "run":
            return cmd_run(prog, rest)
        return cmd_umount(prog, rest)
    if argv and not argv[0].startswith("-"):
        if len(argv) >= 2 and (os.path.sep in argv[0] or os.path.exists(argv[0])):
            return cmd_mount("atomicfs", argv)  # mount.fuse3 form
        _top_parser().error(f"unknown command {argv[0]!r}")
    _top_parser().parse_args(argv)
    synopsis = manual.TOP.split("SYNOPSIS\n", 1)[1].split("\n\n", 1)[0]
    print("usage:\n" + synopsis + "\n(see atomicfs --help)", file=sys.stderr)
    return 2
