#!/usr/bin/env python3
"""What the prefix guarantee of docs/semantics.md §9 costs, measured side by side.

    sudo ATOMICFS_VENV=.venv .venv/bin/python scripts/bench_namespace.py \\
        [--fs ext4|xfs|DIR] [--entries 1500] [--saves 300] [--reps 3]

Targets, alternating in every repetition: ``raw`` (SOURCE itself), and atomicfs
with ``durability=full`` and ``durability=batch``, each with the §9 behaviour
(directory fsyncs of namespace operations under full, ordering behind staged
commits under batch) and without it (``ATOMICFS_PREFIX=0``, a measurement knob).

Workloads: ``tar -x`` of a tree of ``--entries`` entries (directories of 14
small files), ``rm -rf`` of it, plain saves (open O_TRUNC, write 4 KiB, close),
editor saves (write a temporary file, close, rename it over the file: no fsync)
and careful saves (temporary, fsync, rename, fsync of the directory).  Prints a
table of medians (operations per second) and the ratio with/without.

``--fs ext4``/``xfs`` puts SOURCE on a fresh loop image (root), else in DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [("raw", None, "1"), ("full", "full", "1"), ("full, no §9", "full", "0"),
           ("batch", "batch", "1"), ("batch, no §9", "batch", "0")]


def make_tarball(path: Path, entries: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        made, d = 1, 0
        while made < entries:
            sub = tree / f"d{d:03d}"
            sub.mkdir()
            made += 1
            for i in range(min(14, entries - made)):
                (sub / f"f{i:02d}.txt").write_bytes(os.urandom(1024 + 200 * i))
                made += 1
            d += 1
        with tarfile.open(path, "w") as tar:
            tar.add(tree, arcname="tree")


@contextlib.contextmanager
def mounted(source: Path, point: Path, durability: str, prefix: str) -> Iterator[Path]:
    env = dict(os.environ, ATOMICFS_PREFIX=prefix,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "atomicfs", "mount", "-f", str(source),
                             str(point), "-o", f"durability={durability}"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(point):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mount of {source} failed")
            time.sleep(0.02)
        yield point
    finally:
        for _ in range(100):
            if subprocess.run(["fusermount3", "-u", str(point)], capture_output=True
                              ).returncode == 0 or not os.path.ismount(point):
                break
            time.sleep(0.1)
        proc.wait(timeout=30)


def saves(root: Path, n: int, how: str) -> float:
    buf = os.urandom(4096)
    names = [root / f"save{i:04d}" for i in range(n)]
    for p in names:
        p.write_bytes(b"0")
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # batch: the setup's commits are persisted before the clock starts
        t0 = time.perf_counter()
        for p in names:
            if how == "plain":
                fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
                os.write(fd, buf)
                os.close(fd)
                continue
            tmp = p.with_name(p.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, buf)
            if how == "careful":
                os.fsync(fd)
            os.close(fd)
            os.rename(tmp, p)
            if how == "careful":
                os.fsync(dfd)
        return n / (time.perf_counter() - t0)
    finally:
        os.close(dfd)
        for p in names:
            p.unlink()


def workloads(root: Path, tarball: Path, entries: int, n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    dest = root / "untar"
    dest.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], check=True)
    out["untar"] = entries / (time.perf_counter() - t0)
    dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # batch: what untar staged is persisted before rm starts
    finally:
        os.close(dfd)
    t0 = time.perf_counter()
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    out["rm -rf"] = entries / (time.perf_counter() - t0)
    for how in ("plain", "editor", "careful"):
        out[f"{how} saves"] = saves(root, n, how)
    return out


@contextlib.contextmanager
def source_fs(kind: str, work: Path) -> Iterator[Path]:
    if kind not in ("ext4", "xfs"):
        yield Path(kind)
        return
    image, point = work / f"{kind}.img", work / f"{kind}-disk"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    mkfs = ["mkfs.xfs", "-q", "-f"] if kind == "xfs" else ["mkfs.ext4", "-q", "-F"]
    subprocess.run([*mkfs, str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fs", default="ext4", help="ext4, xfs (loop image) or a directory")
    ap.add_argument("--entries", type=int, default=1500)
    ap.add_argument("--saves", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nsbench-") as tmp:
        work = Path(tmp)
        tarball = work / "tree.tar"
        make_tarball(tarball, args.entries)
        results: dict[str, dict[str, list[float]]] = {t[0]: {} for t in TARGETS}
        with source_fs(args.fs, work) as base:
            for rep in range(args.reps):
                for name, durability, prefix in TARGETS:
                    src = Path(tempfile.mkdtemp(dir=base, prefix="src-"))
                    if durability is None:
                        got = workloads(src, tarball, args.entries, args.saves)
                    else:
                        point = work / "mnt"
                        point.mkdir(exist_ok=True)
                        with mounted(src, point, durability, prefix) as mnt:
                            got = workloads(mnt, tarball, args.entries, args.saves)
                    shutil.rmtree(src)
                    for k, v in got.items():
                        results[name].setdefault(k, []).append(v)
                    print(f"rep {rep}: {name}: " + ", ".join(f"{k} {v:.0f}/s"
                                                             for k, v in got.items()),
                          file=sys.stderr)
    keys = list(next(iter(results.values())))
    print(f"SOURCE on {args.fs}; {args.entries} entries; {args.saves} saves; "
          f"median of {args.reps} (operations/s)")
    print("| target | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    for name, _, _ in TARGETS:
        print(f"| {name} | " + " | ".join(f"{med[name][k]:.0f}" for k in keys) + " |")
    for mode in ("full", "batch"):
        print(f"| {mode}: with/without §9 | " + " | ".join(
            f"{med[mode][k] / med[mode + ', no §9'][k]:.2f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
