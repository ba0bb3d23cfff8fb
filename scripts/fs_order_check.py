#!/usr/bin/env python3
"""Does a power cut keep a prefix of a filesystem's metadata operations?

    sudo python3 scripts/fs_order_check.py xfs|ext4 [CUTS] [--renames]

The property durability=batch relies on (docs/semantics.md §9.2), checked on
the raw filesystem: one thread creates ``d{i%4}/f{i}`` and renames the file
made four steps earlier to ``g...`` (800 operations spread over 4 directories,
a directory fsync'ed every 50 steps, as a journal's own timer would commit),
while the filesystem is shut down without flushing its log
(``XFS_IOC_GOINGDOWN``/``EXT4_IOC_SHUTDOWN``, flag 2) at a random moment.
After log recovery the operations kept must be a prefix of the order they were
made in.  Prints the number of cuts that kept a prefix and of violations.

``--renames`` checks plain durability instead: a thread saves a file the
careful way in a loop (temporary file, fsync, rename over, fsync of the
directory) and notes each version whose last fsync returned; after the cut the
file must hold that version or a later one.  Prints the cuts that lost an
acknowledged version and how long after its acknowledgement the cut came.
"""

from __future__ import annotations

import fcntl
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time

GOINGDOWN, NOLOGFLUSH = 0x8004587D, 2
STEPS, DIRS = 400, 4


def sh(*argv: str) -> None:
    for _ in range(50):
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


def work(mnt: str) -> None:
    try:
        for i in range(STEPS):
            os.close(os.open(f"{mnt}/d{i % DIRS}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
            if i >= DIRS:
                j = i - DIRS
                os.rename(f"{mnt}/d{j % DIRS}/f{j}", f"{mnt}/d{j % DIRS}/g{j}")
            if i % 50 == 49:
                fd = os.open(f"{mnt}/d{(i + 1) % DIRS}", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    except OSError:  # the filesystem was shut down
        pass


def kept_prefix(mnt: str) -> tuple[int, bool]:
    """(operations kept as a prefix, whether anything later was kept too)."""
    flags = []
    for i in range(STEPS):
        d = f"{mnt}/d{i % DIRS}"
        flags.append(os.path.exists(f"{d}/f{i}") or os.path.exists(f"{d}/g{i}"))
        if i >= DIRS:
            j = i - DIRS
            flags.append(os.path.exists(f"{mnt}/d{j % DIRS}/g{j}"))
    k = flags.index(False) if False in flags else len(flags)
    return k, any(flags[k:])


def saves(mnt: str, acked: list[float]) -> None:
    """Careful saves of d0/f; ``acked`` = [last acknowledged version, its time]."""
    dfd = os.open(f"{mnt}/d0", os.O_RDONLY)
    try:
        v = 0
        while True:
            v += 1
            fd = os.open(f"{mnt}/d0/tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"%d\n" % v + os.urandom(100000))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(f"{mnt}/d0/tmp", f"{mnt}/d0/f")
            os.fsync(dfd)
            acked[:] = [v, time.monotonic()]
    except OSError:  # the filesystem was shut down
        pass
    finally:
        os.close(dfd)


def saved_version(mnt: str) -> int:
    try:
        with open(f"{mnt}/d0/f", "rb") as f:
            return int(f.readline())
    except (OSError, ValueError):
        return 0


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--renames"]
    renames = "--renames" in sys.argv
    fs = args[0] if args else "xfs"
    cuts = int(args[1]) if len(args) > 1 else 20
    mkfs = {"xfs": ["mkfs.xfs", "-q", "-f"], "ext4": ["mkfs.ext4", "-q", "-F"]}[fs]
    good = bad = 0
    lengths = []
    with tempfile.TemporaryDirectory(prefix="fs-order-") as tmp:
        img, mnt = f"{tmp}/{fs}.img", f"{tmp}/mnt"
        os.mkdir(mnt)
        for _ in range(cuts):
            with open(img, "wb") as f:
                f.truncate(320 << 20)
            sh(*mkfs, img)
            sh("mount", "-o", "loop", img, mnt)
            try:
                for d in range(DIRS):
                    os.mkdir(f"{mnt}/d{d}")
                os.sync()
                acked = [0.0, 0.0]
                writer = threading.Thread(target=saves if renames else work,
                                          args=(mnt, acked) if renames else (mnt,))
                writer.start()
                time.sleep(random.uniform(0.3, 1.5) if renames else random.uniform(0.0, 0.08))
                fd = os.open(mnt, os.O_RDONLY)
                try:
                    fcntl.ioctl(fd, GOINGDOWN, struct.pack("I", NOLOGFLUSH))
                finally:
                    os.close(fd)
                cut = time.monotonic()
                writer.join()
                sh("umount", mnt)
                sh("mount", "-o", "loop", img, mnt)
                if renames:
                    have = saved_version(mnt)
                    later = have < acked[0]
                    k = round((cut - acked[1]) * 1000, 1) if later else -1
                else:
                    k, later = kept_prefix(mnt)
            finally:
                sh("umount", mnt)
            if renames:
                if later:
                    lengths.append(k)
            else:
                lengths.append(k)
            bad += later
            good += not later
    if renames:
        print(f"{fs}: {cuts} cuts, acknowledged save kept in {good}, lost in {bad}; "
              f"the losing cuts came this many ms after the acknowledgement: {lengths}")
        return 1 if bad else 0
    print(f"{fs}: {cuts} cuts, a prefix kept in {good}, violations {bad}; "
          f"operations kept: {sorted(lengths)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
