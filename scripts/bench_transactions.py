#!/usr/bin/env python3
"""What a transaction (``atomicfs run``, docs/semantics.md §14) costs for an untar.

    sudo .venv/bin/python scripts/bench_transactions.py [--base DIR] [--reps 3] [--work DIR]

``tar -x`` of scripts/bench.py's 1,500-entry tree (``build_tarball``), targets
alternating in every repetition: ``raw`` (a plain directory on the same
filesystem), ``pyfuse3`` (scripts/passthrough.py: a plain pyfuse3 passthrough
with no atomicity at all, the floor of any pyfuse3 filesystem), atomicfs of
this checkout with every file committed as usual, and ``atomicfs run MNT --
tar -x`` of this checkout (one transaction: the tree appears at once, durable,
when the command returns).  With ``--base DIR`` (another checkout, e.g. main),
``atomicfs run`` of that checkout too, side by side.  The order of the targets
rotates from one repetition to the next.  Prints the median entries/s of each
target, its ratio to raw, and the median of the per-repetition ratios of
``atomicfs run`` to the others.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = 1500


def _build_tarball(work: Path) -> tuple[Path, str]:
    loader = importlib.machinery.SourceFileLoader("bench", str(ROOT / "scripts" / "bench.py"))
    spec = importlib.util.spec_from_loader("bench", loader)
    assert spec is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench
    loader.exec_module(bench)
    tarball, what = bench.build_tarball(work, ENTRIES)
    return Path(tarball), str(what)


class Mount:
    def __init__(self, tree: Path, work: Path, name: str, passthrough: bool = False) -> None:
        self.src, self.mnt = work / f"src-{name}", work / f"mnt-{name}"
        for d in (self.src, self.mnt):
            d.mkdir()
        self.env = dict(os.environ, PYTHONPATH=str(tree))
        cmd = ([sys.executable, str(ROOT / "scripts" / "passthrough.py")] if passthrough
               else [sys.executable, "-m", "atomicfs", "mount", "-f"])
        self.proc = subprocess.Popen(cmd + [str(self.src), str(self.mnt)], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while subprocess.run(["mountpoint", "-q", str(self.mnt)]).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"atomicfs of {tree} did not mount")
            time.sleep(0.05)

    def cpu(self) -> float:
        """CPU seconds the daemon has used so far (all its threads, user + system)."""
        with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)
        self.proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="another checkout to measure side by side")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, help="a directory on the filesystem to measure")
    ap.add_argument("--tx-only", action="store_true",
                    help="only `atomicfs run` (and its --base twin): for A/B runs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tx-", dir=args.work))
    mounts: list[Mount] = []
    try:
        tarball, what = _build_tarball(work)
        raw = work / "raw"
        raw.mkdir()
        mine = Mount(ROOT, work, "this")
        mounts.append(mine)
        peer = Mount(ROOT, work, "pyfuse3", passthrough=True)
        mounts.append(peer)
        targets: dict[str, tuple[Path, Mount | None, bool]] = {
            "raw": (raw, None, False),
            "pyfuse3": (peer.mnt, peer, False),
            "atomicfs": (mine.mnt, mine, False),
            "atomicfs run": (mine.mnt, mine, True)}
        if args.tx_only:
            del targets["raw"], targets["pyfuse3"], targets["atomicfs"]
        if args.base is not None:
            base = Mount(args.base.resolve(), work, "base")
            mounts.append(base)
            targets["atomicfs run (base)"] = (base.mnt, base, True)
        rates: dict[str, list[float]] = {name: [] for name in targets}
        cpu: dict[str, list[float]] = {name: [] for name in targets}  # daemon ms/entry
        names = list(targets)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                root, mount, tx = targets[name]
                env = mount.env if mount is not None else dict(os.environ)
                dest = root / f"t{rep}{'-tx' if tx else ''}"
                tarball.read_bytes()  # from the page cache for every target
                os.sync()
                cpu0 = mount.cpu() if mount is not None else 0.0
                t0 = time.perf_counter()
                if tx:
                    cmd = [sys.executable, "-m", "atomicfs", "run", str(root), "--", "sh",
                           "-c", f"mkdir '{dest}' && tar -xf '{tarball}' -C '{dest}'"]
                else:
                    dest.mkdir()
                    cmd = ["tar", "-xf", str(tarball), "-C", str(dest)]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                elapsed = time.perf_counter() - t0
                if res.returncode:
                    raise SystemExit(f"{name}: {' '.join(cmd)} exited {res.returncode}: "
                                     f"{res.stderr.strip()[-500:]}")
                rates[name].append(ENTRIES / elapsed)
                if mount is not None:
                    cpu[name].append((mount.cpu() - cpu0) * 1000 / ENTRIES)
                subprocess.run(["rm", "-rf", str(dest)], check=True)
        print(f"tar -x of {what}; median of {args.reps} (entries/s, each run)")
        raw_rate = statistics.median(rates["raw"]) if "raw" in rates else None
        for name, values in rates.items():
            med = statistics.median(values)
            runs = ", ".join(f"{v:.0f}" for v in values)
            vs_raw = f"{med / raw_rate:6.3f}x raw" if raw_rate else ""
            print(f"  {name:20s} {med:8.0f}  {vs_raw}   ({runs})")
        print("the daemon's CPU time per entry (ms, all threads), median:")
        for name, values in cpu.items():
            if values:
                print(f"  {name:20s} {statistics.median(values):8.3f}  "
                      f"({', '.join(f'{v:.3f}' for v in values)})")
        print("atomicfs run against each, median of the per-repetition ratios:")
        for name, values in rates.items():
            if name != "atomicfs run":
                r = [a / b for a, b in zip(rates["atomicfs run"], values, strict=True)]
                won = sum(1 for x in r if x > 1)
                print(f"  vs {name:20s} {statistics.median(r):6.3f}x  "
                      f"(faster in {won} of {len(r)})")
    finally:
        for m in mounts:
            m.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
