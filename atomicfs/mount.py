"""Mount lifecycle: checks, opening SOURCE, mounting, daemonizing, serving, unmounting.

Order matters and is kept here in one place:
1. every check that can fail with a clear message runs before anything changes;
2. SOURCE is opened before the mount (so SOURCE == MOUNTPOINT works);
3. the mount is made in the foreground process, so its errors are printed;
   only then SOURCE/.atomicfs is made and recovery runs (a failed mount changes nothing);
4. only then the process daemonizes; the parent returns once the child serves;
   READY=1 goes to $NOTIFY_SOCKET once the mount is live;
5. SIGTERM/SIGINT/SIGHUP stop reading new requests; the requests in progress
   (commits among them) finish and are answered; then the sessions whose last
   release never came are committed, staged commits persisted, the mount
   detached, fds closed, a summary line logged, and the process exits 0.
   SIGUSR1 dumps every thread's stack to the log (faulthandler).
"""

from __future__ import annotations

import errno
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

from . import logs, recovery, timing
from .mounttable import is_fuse, mount_entries, mount_table, top_fstype
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


def _check_not_dead(mountpoint: str, shown: str) -> None:
    """A FUSE mount whose daemon is gone (killed, crashed) answers ENOTCONN: say so first
    (with SOURCE == MOUNTPOINT, SOURCE is unreachable until it is detached)."""
    if not is_fuse(top_fstype(mountpoint)):
        return
    try:
        os.statvfs(mountpoint)  # always asks the daemon (stat may be answered from cache)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"MOUNTPOINT {shown!r} is a dead FUSE mount (its daemon is gone); "
                             f"detach it first: atomicfs umount {shown}") from None


def user_allow_other(conf: str = "/etc/fuse.conf") -> bool:
    """Does fuse.conf let users other than root mount with allow_other?"""
    try:
        with open(conf) as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def check_request(req: MountRequest) -> int:
    """Validate SOURCE, MOUNTPOINT and /dev/fuse; return an O_PATH fd of SOURCE."""
    _check_not_dead(os.path.realpath(req.mountpoint), req.mountpoint)
    if (os.geteuid() != 0 and "allow_other" in req.options.fuse
            and not user_allow_other()):
        raise MountError("option allow_other is for root only unless /etc/fuse.conf has a "
                         "line 'user_allow_other'")
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
    if is_fuse(fstype):
        raise MountError(f"MOUNTPOINT {req.mountpoint!r} is already mounted ({fstype})")
    if mountpoint != source and mountpoint.startswith(source.rstrip("/") + "/"):
        raise MountError(f"MOUNTPOINT {req.mountpoint!r} is inside SOURCE {req.source!r}")
    check_no_overlap(source, req.source)
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist (is the fuse kernel module loaded?)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("/dev/fuse is not readable and writable by this user")
    if req.log_file is not None:
        try:
            with open(req.log_file, "a"):
                pass
        except OSError as exc:
            raise MountError(f"cannot write the log file {req.log_file!r}: "
                             f"{exc.strerror}") from None
    return os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _locked(path: str) -> bool:
    """Does another process hold the flock a daemon holds on its SOURCE?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared lock if it was taken
    return False


def check_no_overlap(source: str, shown: str) -> None:
    """Refuse a SOURCE inside, or around, the SOURCE of a live atomicfs mount.

    Two daemons on nested trees would both commit the inner tree's files, and the
    inner daemon's SOURCE/.atomicfs (records of commits in flight) would show,
    and could be removed, through the outer mount.  A mount is atomicfs's by its
    type, or (another ``subtype=``) by the lock its daemon holds on its SOURCE
    (:func:`lock_source`); its SOURCE is the mount table's source field (the
    ``fsname``, SOURCE unless ``fsname=`` was given).  The same SOURCE is left to
    the lock, which names it better.
    """
    def under(a: str, b: str) -> bool:
        return a.startswith(b.rstrip("/") + "/")

    for entry in mount_entries():
        other = entry.source
        if not is_fuse(entry.fstype) or not other.startswith("/") or other == source:
            continue
        inside, around = under(source, other), under(other, source)
        if (inside or around) and (entry.fstype == "fuse.atomicfs" or _locked(other)):
            where = "is inside" if inside else "contains"
            raise MountError(f"SOURCE {shown!r} {where} {other!r}, the SOURCE of the atomicfs "
                             f"mount on {entry.point!r}: two daemons would commit the same files")


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
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:  # a stale NOTIFY_SOCKET inherited from elsewhere: not fatal
        log.warning("cannot notify systemd at NOTIFY_SOCKET=%s: %s",
                    os.environ.get("NOTIFY_SOCKET"), exc.strerror or exc)


def _daemonize(log_file: str | None) -> int:
    """Fork; the parent waits until the child serves, then exits. Returns the ready fd.

    The child's stdout and stderr go to the log file (so faulthandler's stack dumps
    and anything a library prints land there too), else to /dev/null.
    """
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
    out = devnull
    if log_file is not None:
        out = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    if out != devnull:
        os.close(out)
    return write_end


async def _serve(ops: AtomicOperations, ready_fd: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, nursery, ops)
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
    if ops.committer.in_flight:  # cannot happen: main() returns when its workers have
        log.error("%d commits still running after the main loop", ops.committer.in_flight)
    await ops.finish()
    nursery.cancel_scope.cancel()


async def _signals(nursery: trio.Nursery, ops: AtomicOperations) -> None:
    """SIGTERM/SIGINT/SIGHUP: stop taking requests, let those in progress finish.

    ``pyfuse3.terminate()`` ends each worker after the request it is handling
    (a commit in a worker thread included); ``pyfuse3.main()`` returns once all
    have, and :func:`run` then detaches the mount.  Later signals only log.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            busy = ops.committer.in_flight
            if stopping:
                log.info("received %s: already stopping (commits in flight: %d)", name, busy)
                continue
            stopping = True
            log.info("received %s: finishing the commits in flight (%d), then unmounting",
                     name, busy)
            notify_systemd(b"STOPPING=1\nSTATUS=finishing commits, then unmounting")
            pyfuse3.terminate()


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
    logs.setup(req.options.debug, req.log_file)
    raise_fd_limit()
    os.umask(0)
    ops = AtomicOperations(src_fd, req.options)
    ops.info.source = os.path.realpath(req.source)
    ops.info.mountpoint = mountpoint
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
    timing.install()  # scripts/bench --explain: ATOMICFS_TIMING=FILE
    log.info("mounted %s on %s (%s)", ops.info.source, mountpoint, ",".join(sorted(fuse_opts)))
    try:
        trio.run(_serve, ops, ready_fd)
    finally:
        still_mounted = is_fuse(top_fstype(mountpoint))  # any subtype= the user chose
        pyfuse3.close(unmount=still_mounted)
        ops.shutdown()
        timing.dump()
        log.info("%s", logs.summary(mountpoint, ops.committer.counters, ops.info.uptime()))
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
