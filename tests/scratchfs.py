"""Scratch filesystems for fault tests: tmpfs and loop-device images, always torn down.

Every helper is a context manager that mounts on a directory the test owns and,
whatever happens, unmounts it (lazily if it is busy) and detaches the loop
device.  What cannot be made here (not root, no loop device, a tool or a kernel
feature missing) skips the test with the reason.  ``detach_leftovers(base)``
detaches and lists mounts and loop devices that a run left below ``base``
(conftest calls it at the end of the session).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from atomicfs.mounttable import mount_table

TIMEOUT = 60


def sh(*argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
    return res


def need(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount scratch filesystems")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/bootstrap.sh installs them)")


def is_mounted(point: Path) -> bool:
    real = os.path.realpath(point)
    return any(p == real for p, _ in mount_table())


def unmount(point: Path) -> None:
    """Unmount everything stacked on ``point``; lazily if it stays busy."""
    for _ in range(20):
        if not is_mounted(point):
            return
        if sh("umount", str(point)).returncode != 0:
            sh("umount", "-l", str(point))
    if is_mounted(point):
        raise RuntimeError(f"could not unmount {point}")


def _loops() -> Iterator[tuple[str, str]]:
    """``(/dev/loopN, backing file)`` of every loop device in use (from /sys, no tool)."""
    try:
        devs = os.listdir("/sys/block")
    except FileNotFoundError:
        return
    for dev in devs:
        try:
            name = Path("/sys/block", dev, "loop", "backing_file").read_text().strip()
        except OSError:
            continue
        yield f"/dev/{dev}", name


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices backed by ``image``."""
    real = os.path.realpath(image)
    return [dev for dev, name in _loops() if name.removesuffix(" (deleted)") == real]


def detach_leftovers(base: Path | str) -> list[str]:
    """Detach the mounts at or below ``base`` (``umount -l``) and the loop devices
    backed by files below it (``losetup -d``); returns what was found, a line each."""
    base = os.path.realpath(base)
    found = []
    for point, fstype in mount_table():
        if point == base or point.startswith(base + os.sep):
            found.append(f"mount {point} ({fstype})")
            sh("umount", "-l", point)
    for dev, name in _loops():
        if name.startswith(base + os.sep):
            found.append(f"loop device {dev} on {name}")
            sh("losetup", "-d", dev)
    return found


@contextlib.contextmanager
def tmpfs(point: Path, size: str = "16m") -> Iterator[Path]:
    need("mount", "umount")
    point.mkdir(parents=True, exist_ok=True)
    res = sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "atomicfs-test", str(point))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield point
    finally:
        unmount(point)


@contextlib.contextmanager
def loop_fs(image: Path, point: Path, mkfs: list[str], options: str = "",
            size: int = 256 << 20) -> Iterator[Path]:
    """A filesystem made by ``mkfs + [image]`` on a sparse image, loop-mounted on ``point``."""
    need(mkfs[0], "mount", "umount")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices here (/dev/loop-control is missing)")
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    for _ in range(5):  # mkfs.btrfs fails while any FUSE mount on the machine is dead
        made = sh(*mkfs, str(image))
        if made.returncode == 0 or "mount status" not in made.stderr:
            break
        time.sleep(0.5)
    if made.returncode != 0:
        pytest.skip(f"{mkfs[0]} failed: {made.stderr.strip()}")
    point.mkdir(parents=True, exist_ok=True)
    res = sh("mount", "-o", ",".join(filter(None, ["loop", options])), str(image), str(point))
    if res.returncode != 0:
        for dev in loop_devices_of(image):
            sh("losetup", "-d", dev)
        said = (res.stderr.strip().splitlines() or ["?"])[0]
        pytest.skip(f"cannot loop-mount {mkfs[0]} with '{options}': {said} "
                    f"(kernel: {dmesg_tail()})")
    try:
        yield point
    finally:
        try:
            unmount(point)
        finally:
            for dev in loop_devices_of(image):  # autoclear missed it (lazy unmount...)
                sh("losetup", "-d", dev)


def dmesg_tail() -> str:
    res = sh("dmesg")
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    return lines[-1].split("] ", 1)[-1] if lines else "no kernel log"


@dataclass
class QuotaFs:
    """A directory under a space quota that also binds root (the daemon's user)."""

    kind: str
    root: Path  # the directory to use as SOURCE
    set_limit: Callable[[int | None], None]  # bytes; None: no limit
    daemon_prefix: list[str]  # run the daemon under this (drops what would bypass quota)


NO_SYS_RESOURCE = ["setpriv", "--bounding-set", "-sys_resource", "--inh-caps", "-sys_resource",
                   "--"]


@contextlib.contextmanager
def btrfs_qgroup(work: Path, limit: int) -> Iterator[QuotaFs]:
    """A btrfs subvolume with a qgroup limit (enforced for root too)."""
    need("mkfs.btrfs", "btrfs")
    with loop_fs(work / "btrfs.img", work / "btrfs", ["mkfs.btrfs", "-q", "-f"]) as point:
        vol = point / "vol"
        for argv in (["btrfs", "quota", "enable", str(point)],
                     ["btrfs", "subvolume", "create", str(vol)]):
            res = sh(*argv)
            if res.returncode != 0:
                pytest.skip(f"{' '.join(argv[:3])}: {res.stderr.strip()}")

        def set_limit(n: int | None) -> None:
            sh("sync")  # qgroup usage is accounted at transaction commit
            sh("btrfs", "qgroup", "limit", "none" if n is None else str(n), str(vol), check=True)

        set_limit(limit)
        yield QuotaFs("btrfs-qgroup", vol, set_limit, [])


PROJECT = 4242


@contextlib.contextmanager
def ext4_prjquota(work: Path, limit: int) -> Iterator[QuotaFs]:
    """ext4 with project quota on a directory; root is bound once CAP_SYS_RESOURCE is gone."""
    need("mkfs.ext4", "setquota", "chattr", "setpriv")
    mkfs = ["mkfs.ext4", "-q", "-F", "-O", "quota,project", "-E", "quotatype=prjquota"]
    with loop_fs(work / "ext4.img", work / "ext4", mkfs, "prjquota") as point:
        src = point / "src"
        src.mkdir()
        sh("chattr", "-p", str(PROJECT), "+P", str(src), check=True)

        def set_limit(n: int | None) -> None:
            kib = 0 if n is None else max(1, n // 1024)
            sh("setquota", "-P", str(PROJECT), "0", str(kib), "0", "0", str(point), check=True)

        set_limit(limit)
        yield QuotaFs("ext4-prjquota", src, set_limit, NO_SYS_RESOURCE)


QUOTA_KINDS = {"btrfs-qgroup": btrfs_qgroup, "ext4-prjquota": ext4_prjquota}
