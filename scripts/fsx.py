#!/usr/bin/env python3
"""fsx for atomicfs: a long random sequence of I/O on one file, checked byte for byte.

In the spirit of fsx (the classic file system exerciser): one file is opened
O_RDWR through the mount and driven with random pwrite, pread, ftruncate,
mmap writes, mmap reads, fsync, close + reopen, and reads by a fresh read-only
handle, against a reference bytearray.  Besides every read and every size
(fstat), it checks the atomicfs promises along the way:

- after fsync(), SOURCE holds exactly the content so far (the commit is
  synchronous); so it does after a close() (with ``-o durability=batch``: soon
  after, when the group commit is persisted);
- after close() the last release commits (also mmap writes), so SOURCE must
  reach the content (waiting up to a few seconds for the asynchronous release);
- a fresh read-only handle opened while the file is open for writing reads the
  last committed version (``isolation=committed``; with ``--isolation shared``
  it reads the current content); when the session only appended since its last
  commit (a log, docs/semantics.md §10), the reader's open first commits those
  appends, up to the last write known to be whole (``atomicfs.appends``);
- at the end, after unmounting, SOURCE holds the reference.

Usage:
    scripts/fsx.py [--ops N] [--seed S] [--maxlen BYTES] [--link] [-o OPT] [--workdir DIR]
    scripts/fsx.py --mountpoint MNT --source SRC ...   (an existing atomicfs mount)

The seed is printed first; on a failure the tail of the operation log is
printed with it, and ``--seed S --ops N`` replays the same sequence.
"""

from __future__ import annotations

import argparse
import collections
import mmap
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from atomicfs.appends import IDLE_WHOLE, is_whole
from atomicfs.harness import ReaderProcess

SETTLE = 5.0  # seconds an asynchronous release commit may take to reach SOURCE
PAGE = mmap.PAGESIZE


class FsxError(AssertionError):
    pass


class Fsx:
    def __init__(self, mountpoint: Path, source: Path, seed: int, ops: int,
                 maxlen: int = 256 * 1024, maxop: int = 64 * 1024, name: str = "fsx.dat",
                 isolation: str = "committed", durability: str = "full",
                 link: bool = False, log_tail: int = 40) -> None:
        self.mnt_path = Path(mountpoint) / name
        self.src_path = Path(source) / name
        # link: the file gets a second name (hard link) at the start, so its commits
        # are in place (journalled); both names must always hold the same file
        self.link = link
        self.mnt_link = Path(mountpoint) / (name + ".lnk")
        self.src_link = Path(source) / (name + ".lnk")
        self.seed = seed
        self.rng = random.Random(seed)
        self.nops = ops
        self.maxlen = maxlen
        self.maxop = maxop
        self.isolation = isolation
        self.batch = durability == "batch"  # commits by close() reach SOURCE a little later
        self.ref = bytearray()  # the content, as the writer sees it
        self.committed: bytes | None = None  # the last committed content (None: no file)
        self.log: collections.deque[str] = collections.deque(maxlen=log_tail)
        self.counts: collections.Counter[str] = collections.Counter()
        self.fd = -1
        self.opno = 0
        self.appending = False  # the session is a log (docs/semantics.md §10)
        self.boundary = 0  # the end of its last whole append
        self.last_write = 0.0

    # -- reporting ----------------------------------------------------------------
    def fail(self, msg: str) -> None:
        tail = "\n".join(self.log)
        raise FsxError(f"fsx seed {self.seed}, op {self.opno}: {msg}\n"
                       f"last operations:\n{tail}\n"
                       f"replay: scripts/fsx.py --seed {self.seed} --ops {self.opno}"
                       f" --maxlen {self.maxlen}")

    def note(self, text: str) -> None:
        self.log.append(f"{self.opno:6d} {text}")

    @staticmethod
    def diff(got: bytes, want: bytes) -> str:
        head = f"length {len(got)}, want {len(want)}" if len(got) != len(want) else "same length"
        for i, (a, b) in enumerate(zip(got, want, strict=False)):
            if a != b:
                return (f"{head}; first difference at +{i:#x}: got {got[i:i + 16].hex()} "
                        f"want {want[i:i + 16].hex()}")
        return head

    # -- checks ----------------------------------------------------------------------
    def check_size(self) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.ref):
            self.fail(f"fstat size {size}, want {len(self.ref)}")

    def source(self) -> bytes | None:
        try:
            data = self.src_path.read_bytes()
        except FileNotFoundError:
            return None
        if self.link and self.committed is not None:
            a = os.stat(self.src_path)
            try:
                b = os.stat(self.src_link)
            except FileNotFoundError:
                self.fail("the second name of the file is gone from SOURCE")
            if (a.st_ino, a.st_nlink) != (b.st_ino, 2):
                self.fail(f"the hard link is split in SOURCE: inodes {a.st_ino} {b.st_ino}, "
                          f"nlink {a.st_nlink} {b.st_nlink}")
        return data

    def check_source(self, want: bytes | None, wait: bool) -> None:
        got = self.source()
        deadline = time.monotonic() + (SETTLE if wait else 0)
        while got != want and time.monotonic() < deadline:
            time.sleep(0.01)
            got = self.source()
        if got != want:
            if got is None or want is None:
                self.fail(f"SOURCE file: {'absent' if got is None else len(got)} bytes, "
                          f"want {'absent' if want is None else len(want)}")
            self.fail("SOURCE differs from the committed content: " + self.diff(got, want))

    # -- operations --------------------------------------------------------------------
    def open(self) -> None:
        # a new file written without O_APPEND is no log; an existing one starts as one
        self.appending = self.committed is not None
        self.boundary = len(self.committed or b"")
        self.fd = os.open(self.mnt_path, os.O_RDWR | os.O_CREAT, 0o644)

    def commit_point(self) -> None:
        """The model of a whole commit: the committed content, a log again from it."""
        self.committed = bytes(self.ref)
        self.appending = True
        self.boundary = len(self.ref)

    def rand_range(self, limit: int) -> tuple[int, int]:
        off = self.rng.randrange(0, max(1, limit))
        n = self.rng.randrange(1, self.maxop + 1)
        return off, n

    def op_read(self) -> None:
        if not self.ref:
            return self.op_write()
        off, n = self.rand_range(len(self.ref))
        self.note(f"read     {off:#x} +{n:#x}")
        got = os.pread(self.fd, n, off)
        want = bytes(self.ref[off:off + n])
        if got != want:
            self.fail(f"read {off:#x} +{n:#x}: " + self.diff(got, want))

    def op_write(self) -> None:
        off, n = self.rand_range(self.maxlen - 1)
        n = min(n, self.maxlen - off)
        data = self.rng.randbytes(n)
        self.note(f"write    {off:#x} +{n:#x}" + (" (past EOF)" if off > len(self.ref) else ""))
        done = os.pwrite(self.fd, data, off)
        if done != n:
            self.fail(f"pwrite returned {done}, want {n}")
        if off < len(self.ref):  # an overwrite: no log until the next commit
            self.appending = False
        elif is_whole(off, n):  # (one FUSE request: n <= 1 MiB)
            self.boundary = off + n
        self.last_write = time.monotonic()
        if off > len(self.ref):
            self.ref.extend(bytes(off - len(self.ref)))
        self.ref[off:off + n] = data

    def op_truncate(self) -> None:
        size = self.rng.randrange(0, self.maxlen + 1)
        self.note(f"truncate {len(self.ref):#x} -> {size:#x}")
        os.ftruncate(self.fd, size)
        self.appending = False
        if size < len(self.ref):
            del self.ref[size:]
        else:
            self.ref.extend(bytes(size - len(self.ref)))

    def op_mapwrite(self) -> None:
        off, n = self.rand_range(self.maxlen - 1)
        n = min(n, self.maxlen - off)
        if off + n > len(self.ref):  # as fsx: extend the file first, a mapping cannot
            self.note(f"truncate {len(self.ref):#x} -> {off + n:#x} (for mapwrite)")
            os.ftruncate(self.fd, off + n)
            self.appending = False
            self.ref.extend(bytes(off + n - len(self.ref)))
        data = self.rng.randbytes(n)
        start = off - off % PAGE
        sync = self.rng.random() < 0.3
        self.note(f"mapwrite {off:#x} +{n:#x}" + (" msync" if sync else ""))
        m = mmap.mmap(self.fd, off + n - start, mmap.MAP_SHARED,
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        try:
            m[off - start:off - start + n] = data
            if sync:
                m.flush()
        finally:
            m.close()
        self.ref[off:off + n] = data
        self.appending = False  # written back as WRITEs inside the file
        self.mmap_closed()

    def mmap_closed(self) -> None:
        """Python's mmap holds a dup() of the descriptor and closes it with the map:
        a close() of the written file (FLUSH, after the kernel wrote the dirty
        pages back), so a commit point like any other close()."""
        self.commit_point()
        self.check_source(self.committed, wait=self.batch)

    def op_mapread(self) -> None:
        if not self.ref:
            return self.op_mapwrite()
        off, n = self.rand_range(len(self.ref))
        n = min(n, len(self.ref) - off)
        start = off - off % PAGE
        self.note(f"mapread  {off:#x} +{n:#x}")
        m = mmap.mmap(self.fd, off + n - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
        try:
            got = m[off - start:off - start + n]
        finally:
            m.close()
        self.mmap_closed()
        want = bytes(self.ref[off:off + n])
        if got != want:
            self.fail(f"mapread {off:#x} +{n:#x}: " + self.diff(got, want))

    def op_fsync(self) -> None:
        data = self.rng.random() < 0.3
        self.note("fdatasync" if data else "fsync")
        (os.fdatasync if data else os.fsync)(self.fd)
        self.commit_point()
        self.check_source(self.committed, wait=False)  # fsync commits before returning

    def op_closeopen(self) -> None:
        self.note("close + open")
        os.close(self.fd)
        self.fd = -1
        self.commit_point()
        self.check_source(self.committed, wait=True)  # the last release commits
        self.open()

    def op_peek(self) -> None:
        """A fresh read-only handle while the file is open for writing: in this
        process, which writes the file, it reads the session (docs/semantics.md
        §4.1); in another process, the committed version (isolation=committed)."""
        if self.rng.random() < 0.5:
            self.note("peek     (fresh reader in this process: session view)")
            fd = os.open(self.mnt_path, os.O_RDONLY)
            try:
                got = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            finally:
                os.close(fd)
            if got != self.ref:
                self.fail(f"fresh reader in the writing process: {self.diff(got, self.ref)}")
            return
        if self.committed is None and self.isolation == "committed":
            return  # a new file not yet committed: its reader sees an empty file
        want = bytes(self.ref) if self.isolation == "shared" else self.committed
        also = want
        checkpoints = self.isolation == "committed" and self.appending
        if checkpoints and self.committed is not None:
            # the open checkpoints the appends, up to the last whole write (or, once
            # that last write has been alone IDLE_WHOLE seconds, through it)
            if self.boundary > len(self.committed):
                want = bytes(self.ref[:self.boundary])
            also = want
            if (len(self.ref) > len(want)
                    and time.monotonic() - self.last_write > IDLE_WHOLE * 0.9):
                also = bytes(self.ref)
        self.note(f"peek     (fresh reader in another process, {self.isolation} view)")
        got = self.reader.read(self.mnt_path)
        if got != want and got != also:
            self.fail(f"fresh reader in another process: {self.diff(got, want or b'')}")
        if checkpoints:
            self.committed = got  # a checkpoint: the committed version now
            self.boundary = max(self.boundary, len(got))
            self.check_source(self.committed, wait=self.batch)

    OPS = {"read": 20, "write": 20, "mapread": 10, "mapwrite": 12, "truncate": 8,
           "fsync": 6, "closeopen": 4, "peek": 6}

    def run(self) -> dict[str, int]:
        for p in (self.src_path, self.src_link):
            if p.exists():
                p.unlink()
        names = list(self.OPS)
        weights = [self.OPS[n] for n in names]
        self.reader = ReaderProcess()  # before the file is open: it inherits no descriptor of it
        try:
            self.open()
            if self.link:
                self.note("link     (a second name: commits go in place)")
                os.link(self.mnt_path, self.mnt_link)  # publishes the new, empty file
                self.committed = b""
            for opno in range(1, self.nops + 1):
                self.opno = opno
                op = self.rng.choices(names, weights)[0]
                self.counts[op] += 1
                try:
                    getattr(self, "op_" + op)()
                except OSError as exc:
                    self.fail(f"{op}: {exc}")
                self.check_size()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            self.reader.close()
        self.committed = bytes(self.ref)
        self.note("final close")
        self.check_source(self.committed, wait=True)
        return dict(self.counts)

    def check_final(self) -> None:
        """After the unmount: SOURCE holds the reference."""
        self.note("after unmount")
        self.check_source(bytes(self.ref), wait=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fsx.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=10000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--maxlen", type=int, default=256 * 1024, help="largest file size")
    p.add_argument("--maxop", type=int, default=64 * 1024, help="largest I/O size")
    p.add_argument("--mountpoint", help="an existing atomicfs mount (with --source)")
    p.add_argument("--source", help="its SOURCE directory")
    p.add_argument("--workdir", help="where to mount (default: a temporary directory)")
    p.add_argument("-o", dest="options", action="append", default=[], help="mount options")
    p.add_argument("--link", action="store_true",
                   help="give the file a second name (hard link): journalled in-place commits")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    options = [x for o in args.options for x in o.split(",") if x]
    isolation = "shared" if "isolation=shared" in options else "committed"
    durability = "batch" if "durability=batch" in options else "full"
    print(f"fsx: seed {seed}, {args.ops} operations, file up to {args.maxlen} bytes", flush=True)
    t0 = time.monotonic()
    if args.mountpoint:
        if not args.source:
            p.error("--mountpoint needs --source")
        fsx = Fsx(Path(args.mountpoint), Path(args.source), seed, args.ops, args.maxlen,
                  args.maxop, isolation=isolation, durability=durability, link=args.link)
        try:
            counts = fsx.run()
        except FsxError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from torture import start_daemon  # the torture's mount (atomicfs/harness.py)

        made = args.workdir is None
        work = Path(args.workdir or tempfile.mkdtemp(prefix="atomicfs-fsx-")).resolve()
        (work / "src").mkdir(parents=True, exist_ok=True)
        (work / "mnt").mkdir(exist_ok=True)
        daemon = start_daemon(work / "src", work / "mnt", work / "daemon.log", options)
        fsx = Fsx(work / "mnt", work / "src", seed, args.ops, args.maxlen, args.maxop,
                  isolation=isolation, durability=durability, link=args.link)
        try:
            try:
                counts = fsx.run()
            finally:
                rc = daemon.unmount()
            fsx.check_final()
        except FsxError as exc:
            print(f"FAILED: {exc}\n(workdir kept: {work})", file=sys.stderr)
            return 1
        if rc != 0 or "Traceback" in daemon.log():
            print(f"FAILED: the daemon exited with {rc}; log:\n{daemon.log()[-4000:]}",
                  file=sys.stderr)
            return 1
        if made:
            shutil.rmtree(work, ignore_errors=True)
    print(f"fsx: OK, {args.ops} operations in {time.monotonic() - t0:.1f}s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
