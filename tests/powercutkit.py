"""Power cuts on loop-mounted XFS/ext4 images, always torn down (issue 12).

A power cut is simulated the way xfstests' "godown" does it: SOURCE lives on a
loop-mounted image, and the image's filesystem is shut down without flushing
its log (``ioctl(GOINGDOWN, NOLOGFLUSH)``; XFS_IOC_GOINGDOWN and
EXT4_IOC_SHUTDOWN have the same number).  Every later call on it fails with
EIO; what was not durable is gone once the image is unmounted and mounted
again (log recovery).  Then atomicfs recovers (``atomicfs recover`` or a new
mount) and the caller checks the tree.

:func:`powercut_fs` makes the image (tests/scratchfs.py) and yields a
:class:`PowerCutFs`; :meth:`PowerCutFs.cycle` is one cut: mount atomicfs (or
nothing: ``raw``), start the workload, cut at the given moment, kill the
workload and the wedged daemon, remount the image, recover.  Whatever happens,
the workload processes and daemons it started are killed (by pid), the FUSE
mount detached, the image unmounted and its loop device detached.

Used by tests/test_powercut.py and by ``scripts/torture --power-cuts``
(scripts/powercut.py).  Outside pytest, what cannot be made here raises
``pytest.skip.Exception`` (scratchfs's skip) with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import scratchfs
from conftest import Mount, run_cli

GOINGDOWN = 0x8004587D  # _IOR('X', 125, __u32): XFS_IOC_GOINGDOWN == EXT4_IOC_SHUTDOWN
NOLOGFLUSH = 2  # XFS_FSOP_GOING_FLAGS_NOLOGFLUSH / EXT4_GOING_FLAGS_NOLOGFLUSH
MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
FS_KINDS = tuple(MKFS)
IMAGE_SIZE = 512 << 20  # sparse; XFS refuses images under 300 MiB
REMOUNT_WAIT = 60.0  # seconds for a lazily unmounted filesystem to go

Workload = Callable[[Path], Sequence[subprocess.Popen[bytes]]]


def shutdown(path: Path | str, flag: int = NOLOGFLUSH) -> None:
    """Shut down the filesystem holding ``path`` (a power cut for NOLOGFLUSH)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, GOINGDOWN, struct.pack("I", flag))
    finally:
        os.close(fd)


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """kill -9 the processes this harness started (by pid) and reap them."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


@dataclass
class Cut:
    """What one cut cycle did."""

    delay: float  # seconds from the workload's start (its callable returned) to the cut
    recovered_by: str  # "recover", "mount" or "raw"
    at: float = 0.0  # time.monotonic() just before the cut
    daemon_log: str = ""  # the daemon's log of this cycle (mount and recovery)
    recovery: str = ""  # what ``atomicfs recover`` said
    early_exits: list[int] = field(default_factory=list)  # workload exit codes before the cut


@dataclass
class PowerCutFs:
    kind: str  # "xfs" or "ext4"
    image: Path
    point: Path  # where the image is mounted
    work: Path  # logs and the FUSE mount point
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    cycles: int = 0

    @property
    def source(self) -> Path:
        return self.point / "src"

    @property
    def mnt(self) -> Path:
        return self.work / "mnt"

    def sync(self) -> None:
        scratchfs.sh("sync", "-f", str(self.point), check=True)

    # -- the steps ---------------------------------------------------------------
    def mount_atomicfs(self, options: Sequence[str] = (), log: Path | None = None,
                       env: dict[str, str] | None = None) -> Mount:
        """Mount atomicfs over SOURCE (``env``: extra environment, e.g. ATOMICFS_FAULTS)."""
        self.mnt.mkdir(parents=True, exist_ok=True)
        m = Mount(self.source, self.mnt, list(options),
                  log or self.work / f"daemon-{self.cycles}.log", env)
        self.mounts.append(m)
        m.start()
        return m

    def cut(self) -> None:
        shutdown(self.point)

    def remount(self) -> None:
        """Unmount the (shut down) image and mount it again: the filesystem's log recovery."""
        scratchfs.unmount(self.point)
        for dev in scratchfs.loop_devices_of(self.image):
            scratchfs.sh("losetup", "-d", dev)
        # A file still held open on the dead filesystem (a process not yet gone) makes
        # the unmount lazy: the filesystem and its loop device live on until it goes.
        # A mount of the image meanwhile reuses that loop device and shares the dead
        # filesystem (every read EIO, nothing recovered): wait for it to go.
        deadline = time.monotonic() + REMOUNT_WAIT
        while scratchfs.loop_devices_of(self.image):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.image}: its shut-down filesystem is still in use "
                                   f"{REMOUNT_WAIT:.0f} s after its unmount; cannot recover it")
            time.sleep(0.05)
        scratchfs.sh("mount", "-o", "loop", str(self.image), str(self.point), check=True)

    def recover(self) -> str:
        res = run_cli(["recover", str(self.source)], timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"atomicfs recover failed ({res.returncode}): "
                               f"{res.stderr.strip()} {res.stdout.strip()}")
        return res.stdout + res.stderr

    def restart(self) -> str:
        """After a cut: stop what this harness started, remount the image (its log
        recovery) and run ``atomicfs recover``; returns the recovery's output."""
        self.release()
        self.remount()
        return self.recover()

    def release(self) -> None:
        """Kill what this harness started and detach the FUSE mounts (idempotent)."""
        stop(self.procs)
        self.procs.clear()
        for m in self.mounts:
            m.kill()
            m.force_cleanup()
        self.mounts.clear()

    def cycle(self, workload: Workload, delay: float, options: Sequence[str] | None = (),
              recovered_by: str = "recover", settle: float = 0.2,
              env: dict[str, str] | None = None) -> Cut:
        """One power cut: mount atomicfs with ``options`` over SOURCE (``None``: raw,
        the workload runs on SOURCE itself), start ``workload(dir)``, cut after
        ``delay`` s, kill the workload and the daemon, remount the image and recover
        (``recovered_by``: "recover" runs ``atomicfs recover``, "mount" mounts and
        unmounts atomicfs, "none" leaves the remounted image as the cut left it).
        The tree is then in :attr:`source`.  ``env``: extra environment of the mount
        the cut hits (e.g. ATOMICFS_FAULTS), not of the recovery."""
        self.cycles += 1
        cut = Cut(delay, "raw" if options is None else recovered_by)
        m = None
        try:
            if options is not None:
                m = self.mount_atomicfs(options, env=env)
            started = workload(self.source if m is None else self.mnt)
            self.procs.extend(started)
            time.sleep(delay)
            cut.early_exits = [rc for rc in (p.poll() for p in started) if rc is not None]
            cut.at = time.monotonic()
            self.cut()
            time.sleep(settle)  # the workload meets EIO: nothing it does now may count
        finally:
            self.release()
            if m is not None:
                cut.daemon_log = m.log()
        self.remount()
        if cut.recovered_by == "recover":
            cut.recovery = self.recover()
        elif cut.recovered_by == "mount":
            m = self.mount_atomicfs(options or (), self.work / f"daemon-{self.cycles}-recovery.log")
            try:
                m.unmount()
            finally:
                self.release()
            cut.daemon_log += m.log()
        return cut


@contextlib.contextmanager
def powercut_fs(work: Path, kind: str, size: int = IMAGE_SIZE) -> Iterator[PowerCutFs]:
    """A ``kind`` image mounted below ``work`` with an empty ``src`` directory."""
    if kind not in MKFS:
        raise ValueError(f"unknown filesystem {kind!r} (expected one of {', '.join(MKFS)})")
    work.mkdir(parents=True, exist_ok=True)
    with scratchfs.loop_fs(work / f"{kind}.img", work / kind, MKFS[kind], size=size) as point:
        pc = PowerCutFs(kind, work / f"{kind}.img", point, work)
        try:
            probe = point / ".probe"
            probe.mkdir()
            pc.source.mkdir()
            pc.sync()
            try:
                shutdown(probe)
            except OSError as exc:
                import pytest

                pytest.skip(f"{kind} here cannot be shut down (GOINGDOWN ioctl): {exc}")
            pc.remount()
            probe.rmdir()
            yield pc
        finally:
            pc.release()
