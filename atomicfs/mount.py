"""Mount lifecycle: checks, opening SOURCE, mounting, daemonizing, serving, unmounting.

Order matters and is kept here in one place:
1. every check that can fail with a clear message runs before anything changes;
2. SOURCE is opened before the mount (so SOURCE == MOUNTPOINT works);
3. the mount is made in the foreground process, so its errors are printed;
   only then SOURCE/.atomicfs is made and recovery runs (a failed mount changes nothing);
4. only then the process daemonizes; the parent returns once the child serves;
5. SIGTERM/SIGINT end the main loop; the daemon then unmounts and closes fds.
"""

from __future__ import annotations

import faulthandler
import fcntl
import logging
import os
import resource
import signal
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass

import pyfuse3
import trio

from . import recovery
from .operations import AtomicOperations
from .options import MountOptions

log = logging.getLogger(__name__)


class MountError(Exception):
    """A problem found before mounting; the message is one line for the user."""


@dataclass
class MountRequest:
    source: str
    mountpoint: str
    options: MountOptions
    foreground: bool = False
    log_file: str | None = None


def mount_table() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount, in mount order."""
    entries = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            point = fields[4].decode("unicode_escape").encode("latin-1").decode(
                "utf-8", "surrogateescape")
            entries.append((point, fields[sep + 1].decode()))
    return entries


def top_fstype(path: str) -> str | None:
    """The filesystem type mounted at ``path`` (the topmost mount), or None."""
    found = None
    for point, fstype in mount_table():
        if point == path:
            found = fstype
    return found


def check_request(req: MountRequest) -> int:
    """Validate SOURCE, MOUNTPOINT and /dev/fuse; return an O_PATH fd of SOURCE."""
    source = os.path.realpath(req.source)
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise MountError(f"SOURCE {req.source!r} does not exist") from None
    except OSError as exc:
        raise MountError(f"SOURCE {req.source!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"SOURCE {req.source!r} is not a directory")
    try:
        probe = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.listdir(probe)
        os.close(probe)
    except OSError as exc:
        raise MountError(f"SOURCE {req.source!r} is not readable: {exc.strerror}") from None
    if not os.access(source, os.W_OK | os.X_OK):
        raise MountError(f"SOURCE {req.source!r} is not writable (atomicfs keeps its "
                         "journal in SOURCE/.atomicfs)")
    mountpoint = os.path.realpath(req.mountpoint)
    if not os.path.lexists(req.mountpoint):
        raise MountError(f"MOUNTPOINT {req.mountpoint!r} does not exist")
    if not os.path.isdir(mountpoint):
        raise MountError(f"MOUNTPOINT {req.mountpoint!r} is not a directory")
    fstype = top_fstype(mountpoint)
    if fstype is not None and (fstype == "fuse" or fstype.startswith("fuse.")):
        raise MountError(f"MOUNTPOINT {req.mountpoint!r} is already mounted ({fstype})")
    if mountpoint != source and mountpoint.startswith(source.rstrip("/") + "/"):
        raise MountError(f"MOUNTPOINT {req.mountpoint!r} is inside SOURCE {req.source!r}")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist (is the fuse kernel module loaded?)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("/dev/fuse is not readable and writable by this user")
    return os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def lock_source(source: str, shown: str, busy: str) -> int:
    """Hold SOURCE for this process (flock on the directory itself); returns the fd.

    Two daemons on one SOURCE would share SOURCE/.atomicfs: the first to unmount
    removes it from under the other, and each one's recovery would resolve the
    other's commits in flight.  ``busy`` is the message if another process holds it.
    """
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(f"SOURCE {shown!r} {busy}") from None
    return fd


def setup_logging(debug: bool, log_file: str | None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if log_file is not None:
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def notify_systemd(message: bytes) -> None:
    """sd_notify without a dependency: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message)


def _daemonize(log_file: str | None) -> int:
    """Fork; the parent waits until the child serves, then exits. Returns the ready fd."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        ready = os.read(read_end, 1)
        if ready == b"1":
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("atomicfs: error: the daemon ended before serving the mount"
              + (f"; see {log_file}" if log_file else ""), file=sys.stderr)
        os._exit(1)
    os.close(read_end)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return write_end


async def _serve(ops: AtomicOperations, ready_fd: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, nursery)
        nursery.start_soon(_main_loop, nursery, ops)
        nursery.start_soon(ops.background)
        await trio.sleep(0)
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        notify_systemd(b"READY=1\nSTATUS=serving")
        log.info("serving")


async def _main_loop(nursery: trio.Nursery, ops: AtomicOperations) -> None:
    await pyfuse3.main(min_tasks=2)
    await ops.finish()
    nursery.cancel_scope.cancel()


async def _signals(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            notify_systemd(b"STOPPING=1")
            pyfuse3.terminate()
            return


def _fuse_init(ops: AtomicOperations, mountpoint: str, fuse_opts: set[str]) -> None:
    """pyfuse3.init, with what libfuse and fusermount3 print folded into the error.

    They write their reasons straight to fd 2; a failure must stay one line, so
    fd 2 is captured during the call and the text joins the RuntimeError.
    """
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            pyfuse3.init(ops, mountpoint, fuse_opts)
            failure = None
        except RuntimeError as exc:
            failure = exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        said = [line.strip() for line in captured.read().decode(errors="replace").splitlines()]
    said = [line for line in said if line]
    if failure is not None:
        raise RuntimeError("; ".join(said + [str(failure)]))
    if said:  # not an error (e.g. what -o debug prints): pass it on
        print("\n".join(said), file=sys.stderr)


def run(req: MountRequest) -> int:
    """Mount and serve until unmounted. Raises MountError for problems found first."""
    src_fd = check_request(req)
    # held until the daemon exits (the fork that daemonizes shares the lock)
    lock_source(os.path.realpath(req.source), req.source,
                "is already mounted by another atomicfs daemon")
    mountpoint = os.path.realpath(req.mountpoint)
    setup_logging(req.options.debug, req.log_file)
    raise_fd_limit()
    os.umask(0)
    ops = AtomicOperations(src_fd, req.options)
    fuse_opts = set(req.options.fuse)
    if req.options.debug:
        fuse_opts.add("debug")
    try:
        _fuse_init(ops, mountpoint, fuse_opts)
    except RuntimeError as exc:
        raise MountError(f"could not mount on {req.mountpoint!r}: {exc}") from None
    try:
        ops.prepare()  # SOURCE/.atomicfs and recovery, before the first request is read
    except OSError as exc:
        pyfuse3.close(unmount=True)
        what = f"{os.fsdecode(exc.filename)}: {exc.strerror}" if exc.filename else str(exc)
        raise MountError(f"cannot prepare SOURCE {req.source!r}: {what}") from None
    ready_fd = None if req.foreground else _daemonize(req.log_file)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log.info("mounted %s on %s (%s)", req.source, mountpoint, ",".join(sorted(fuse_opts)))
    try:
        trio.run(_serve, ops, ready_fd)
    finally:
        still_mounted = top_fstype(mountpoint) in ("fuse.atomicfs", "fuse")
        pyfuse3.close(unmount=still_mounted)
        ops.shutdown()
        log.info("unmounted %s", mountpoint)
    return 0


def recover_offline(source: str) -> list[str]:
    """``atomicfs recover SOURCE``: the recovery a mount does, without mounting."""
    path = os.path.realpath(source)
    if not os.path.isdir(path):
        raise MountError(f"SOURCE {source!r} is not a directory")
    for point, fstype in mount_table():
        if fstype == "fuse.atomicfs" and point == path:
            raise MountError(f"{source!r} is mounted by atomicfs; recovery runs at mount")
    held = lock_source(path, source, "is mounted by atomicfs; recovery runs at mount")
    root = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        daemon_dir = recovery.open_daemon_dir(root)
        done = recovery.recover(root, daemon_dir)
        recovery.close_daemon_dir(root, daemon_dir)
    except OSError as exc:
        raise MountError(f"recovery of {source!r} failed: {exc}") from None
    finally:
        os.close(root)
        os.close(held)
    return done or ["nothing to recover"]


def unmount(mountpoint: str, lazy: bool = False) -> None:
    path = os.path.realpath(mountpoint)
    fstype = top_fstype(path)
    if fstype is None or not fstype.startswith("fuse"):
        raise MountError(f"{mountpoint!r} is not a FUSE mount")
    import subprocess

    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise MountError(f"unmount of {mountpoint!r} failed: {msg}")

