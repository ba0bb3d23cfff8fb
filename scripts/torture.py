#!/usr/bin/env python3
"""Crash torture for atomicfs: the atomicity promise under crashes and load.

Each round mounts atomicfs on a SOURCE that persists across rounds, starts W
writer processes that rewrite self-checking files through the mount the ways
legacy programs do, crashes the daemon, kills the writers, detaches the dead
mount, remounts (recovery runs), unmounts cleanly and checks every file of
SOURCE.  Rounds alternate: kill -9 at a random moment (0.2-2 s), then
``ATOMICFS_FAULTS=exit:<point>`` for each commit step and each journal step in
turn (the daemon dies at the first commit reaching it); every third round
mounts with ``durability=batch`` (--batch-every).  ``--kill-writers`` also
kills one writer mid-round while the daemon lives (a program dying mid-write).

File kinds (the first letter of a file's name), every version verifiable:

- ``W`` whole file: header (magic, version, body length, sha256 of the body,
  file id) + a body generated from (file id, version).  Written by O_TRUNC
  rewrite, the shell's open/dup2/close-then-write, overwrite + ftruncate,
  ftruncate(0) + write, new file + rename over the old; sometimes unlinked.
- ``L`` log: a hash chain of records (each: version, index, previous record's
  hash, body sha256, file id).  Written by O_APPEND (one record per version,
  in several write() calls) and compacted by new file + rename.
- ``P`` fixed size: a 256-byte header (version, sha256 of the body) + 64
  records of 256 bytes, each with its own index, the version that wrote it and
  a checksum.  Patched in place: pwrite() of a few records in the middle, then
  of the header (or the same through a MAP_SHARED mapping).  A version is
  complete when every record checks and the body hashes to the header's sum.
- ``Q``: a P file with a second hard link ``<name>.lnk`` (its commits are
  journalled in place; the link must never split).  Only as root (the journal
  needs open_by_handle_at; without it such commits are documented as not
  crash-atomic).
- ``B``: a 10 MiB P file (one, shared): small patches of a large file, which
  ``commit=auto`` journals in place.

A long-lived appender holds ``applog`` open for the whole round and appends
numbered lines, one write() each, with an fsync every 25 lines (logged once it
returned): after the crash the file must be whole lines numbered from 0 (a
prefix of all it ever wrote, across rounds: checkpoints, docs/semantics.md §10)
holding at least every line fsync'ed.

Writers log to a side file outside the mount (fsync'ed): ``S`` before an
operation starts (with the digest the new version will have), ``F`` when an
fsync returned, ``K`` before closing a temporary file, ``T`` when a temporary
file was fsync'ed, ``C`` when the operation completed (close or rename
returned), ``E`` on an error.  After the crash each file must hold a complete
version, one that was started, and not older than the last version that was
durable (closed, fsync'ed or renamed) before the crash.  Temporary files may
survive only if their writer reached their close or fsync, and only complete.
Nothing else may be in the tree (no ``.atomicfs`` after the clean unmount).

Writers also check every file they read through the mount (close-to-open: an
open after a close() returned sees what it committed).

``--stress SECONDS`` runs no crash: one mount, the writers above, plus "spin"
writers, readers and a mover.  The mover renames a few directories between
places (also across parents) all the time; spin writers rewrite the files in
them (by temp + rename and in place) through a directory fd, so their commits
land wherever the directory went; readers read the rename-replaced files with
one read() each (a complete version, never older than one seen before) and
list the moving directories (exactly their files).  A worker whose log stops
growing for 30 s is a hang (the daemon's stacks go to its log).  After a
clean unmount, every file must be exactly its last committed version.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomicfs.harness import Daemon, detach

ROOT = Path(__file__).resolve().parent.parent
# The atomicfs package the daemon runs: this checkout, or ATOMICFS_CODE (a directory
# holding an ``atomicfs`` package, e.g. an exported commit) to test another version.
CODE = Path(os.environ.get("ATOMICFS_CODE") or ROOT).resolve()
PYTHON = sys.executable

# the daemon's crash points (atomicfs/faults.py), taken in turn by every other round
FAULT_POINTS = ["commit.before_fsync", "commit.after_fsync", "commit.after_link",
                "commit.after_rename", "commit.after_dir_fsync",
                "journal.before_header", "journal.before_record_fsync", "journal.after_record",
                "journal.mid_apply", "journal.after_apply", "journal.after_target_fsync",
                "journal.after_retire",
                # a log's commit by appending in place (atomicfs/appends.py): L files
                "append.after_record", "append.after_copy", "append.before_fsync",
                "append.before_retire"]
ABSENT = "-"  # the digest of "no file"
VERSION_STEP = 10**7  # versions of round r are r * VERSION_STEP + n
DEAD_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED}


class Torn(Exception):
    """A file that is not a complete version."""


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def gen(key: str, version: int, n: int) -> bytes:
    """The deterministic body of a version."""
    return random.Random(f"{key}:{version}").randbytes(n)


# -- W: whole files ------------------------------------------------------------
HW = struct.Struct("<4sQQ32sH")


def make_w(fid: str, v: int, n: int) -> tuple[bytes, str]:
    body = gen(fid, v, n)
    fidb = fid.encode()
    digest = sha(body)
    return HW.pack(b"ATFW", v, n, digest, len(fidb)) + fidb + body, digest.hex()


def parse_w(data: bytes, fid: str) -> tuple[int, str]:
    if len(data) < HW.size:
        raise Torn(f"{len(data)} bytes: shorter than a header")
    magic, v, n, digest, flen = HW.unpack_from(data)
    if magic != b"ATFW":
        raise Torn(f"bad magic {magic!r}")
    got_fid = data[HW.size:HW.size + flen]
    if got_fid != fid.encode():
        raise Torn(f"file id {got_fid!r}, want {fid!r}")
    body = data[HW.size + flen:]
    if len(body) != n:
        raise Torn(f"version {v}: body of {len(body)} bytes, header says {n}")
    if sha(body) != digest:
        raise Torn(f"version {v}: body checksum mismatch")
    if body != gen(fid, v, n):
        raise Torn(f"version {v}: body differs from the version's content")
    return v, digest.hex()


# -- L: logs -------------------------------------------------------------------
HL = struct.Struct("<4sQIIH32s32s")
ZERO32 = bytes(32)


def make_l_record(fid: str, v: int, index: int, prev: bytes, n: int) -> tuple[bytes, bytes]:
    body = gen(f"{fid}@{index}", v, n)
    fidb = fid.encode()
    rec = HL.pack(b"ATFL", v, index, n, len(fidb), prev, sha(body)) + fidb + body
    return rec, sha(rec)


def parse_l(data: bytes, fid: str) -> tuple[int, str, int, bytes]:
    """(version, digest, next index, head hash) of a complete log."""
    if not data:
        raise Torn("empty log")
    off, index, prev, last_v = 0, 0, ZERO32, -1
    fidb = fid.encode()
    while off < len(data):
        if len(data) - off < HL.size:
            raise Torn(f"record {index} at {off}: short header")
        magic, v, idx, n, flen, rprev, bsha = HL.unpack_from(data, off)
        if magic != b"ATFL":
            raise Torn(f"record {index} at {off}: bad magic {magic!r}")
        end = off + HL.size + flen + n
        if end > len(data):
            raise Torn(f"record {index} at {off} (version {v}): truncated")
        if data[off + HL.size:off + HL.size + flen] != fidb:
            raise Torn(f"record {index} at {off}: wrong file id")
        body = data[off + HL.size + flen:end]
        if idx != index or rprev != prev or sha(body) != bsha or v <= last_v:
            raise Torn(f"record {index} at {off} (version {v}): chain broken "
                       f"(index {idx}, prev ok {rprev == prev}, body ok {sha(body) == bsha}, "
                       f"after version {last_v})")
        prev = sha(data[off:end])
        last_v = v
        index += 1
        off = end
    return last_v, prev.hex(), index, prev


# -- P: fixed-size files patched in place ----------------------------------------
P_HDR = 256
P_RECLEN = 256
NREC = {"P": 64, "Q": 64, "B": 40960}  # B: 10 MiB, large enough for journalled commits
HP = struct.Struct("<4sQII32sH")
RP = struct.Struct("<IQ")
P_PAYLOAD = P_RECLEN - RP.size - 32


def make_p_record(fid: str, index: int, rv: int) -> bytes:
    head = RP.pack(index, rv) + gen(f"{fid}#{index}", rv, P_PAYLOAD)
    return head + sha(head)


def p_nrec(fid: str) -> int:
    return NREC[os.path.basename(fid)[0]]


def make_p_header(fid: str, v: int, body: bytes) -> tuple[bytes, str]:
    fidb = fid.encode()
    digest = sha(body)
    hdr = HP.pack(b"ATFP", v, p_nrec(fid), P_RECLEN, digest, len(fidb)) + fidb
    return hdr.ljust(P_HDR, b"\0"), digest.hex()


def make_p(fid: str, v: int) -> tuple[bytes, str]:
    body = b"".join(make_p_record(fid, i, v) for i in range(p_nrec(fid)))
    hdr, digest = make_p_header(fid, v, body)
    return hdr + body, digest


def parse_p(data: bytes, fid: str) -> tuple[int, str]:
    nrec = p_nrec(fid)
    size = P_HDR + nrec * P_RECLEN
    if len(data) != size:
        raise Torn(f"{len(data)} bytes, the file has {size}")
    magic, v, got_nrec, reclen, digest, flen = HP.unpack_from(data)
    if magic != b"ATFP" or got_nrec != nrec or reclen != P_RECLEN:
        raise Torn(f"bad header {magic!r} {got_nrec} {reclen}")
    if data[HP.size:HP.size + flen] != fid.encode():
        raise Torn("wrong file id")
    exact = nrec <= 64  # small files: every record is regenerated and compared
    for i in range(nrec):
        rec = data[P_HDR + i * P_RECLEN:P_HDR + (i + 1) * P_RECLEN]
        idx, rv = RP.unpack_from(rec)
        if (idx != i or sha(rec[:-32]) != rec[-32:] or rv > v
                or (exact and rec != make_p_record(fid, i, rv))):
            raise Torn(f"version {v}: record {i} bad (index {idx}, written by {rv})")
    if sha(data[P_HDR:]) != digest:
        raise Torn(f"version {v}: records do not match the header's checksum "
                   "(a mix of versions)")
    return v, digest.hex()


def parse(data: bytes, fid: str) -> tuple[int, str]:
    kind = os.path.basename(fid)[0]
    if kind == "W":
        return parse_w(data, fid)
    if kind == "L":
        v, digest, _, _ = parse_l(data, fid)
        return v, digest
    if kind in NREC:
        return parse_p(data, fid)
    raise ValueError(f"unknown file kind of {fid}")


def read_all(path: str | Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return read_fd(fd)
    finally:
        os.close(fd)


def read_fd(fd: int, offset: int = 0) -> bytes:
    parts = []
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        offset += len(chunk)


# ================================================================================
# Writers
# ================================================================================
State = tuple[int, str]  # (version, digest); digest ABSENT: no file


class Dead(Exception):
    """The mount is gone (the daemon crashed): stop writing."""


class Writer:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.wid: int = cfg["id"]
        self.rng = random.Random(cfg["seed"])
        self.mnt = Path(cfg["mnt"])
        self.log_fd = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.sync_log: bool = cfg["sync_log"]
        self.next_v: int = cfg["vbase"]
        self.own: list[str] = cfg["own"]
        self.shared: list[str] = cfg["shared"]
        # what a read of each own file may show (close-to-open)
        self.expect: dict[str, list[State]] = {f: [tuple(s)] for f, s in cfg["base"].items()}
        self.tmp_n = 0

    # -- side log ---------------------------------------------------------------
    def event(self, kind: str, fid: str, v: int = 0, sync: bool = True, **kw: Any) -> None:
        rec = {"e": kind, "f": fid, "v": v, "ts": time.monotonic(), **kw}
        os.write(self.log_fd, (json.dumps(rec) + "\n").encode())
        if sync and self.sync_log:
            os.fsync(self.log_fd)

    # -- main loop ----------------------------------------------------------------
    def run(self) -> None:
        end = time.monotonic() + self.cfg["max_seconds"]
        while time.monotonic() < end:
            if self.shared and self.rng.random() < 0.2:
                fid = self.rng.choice(self.shared)
                self.op_shared(fid)
            else:
                fid = self.rng.choice(self.own)
                v = self.next_v
                self.next_v += 1
                self.expect[fid] = self.op(fid, v, self.expect.get(fid, [(0, ABSENT)]))

    def op_shared(self, fid: str) -> None:
        lock_path = Path(self.cfg["locks"]) / (fid.replace("/", "_") + ".lock")
        fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = json.loads(os.pread(fd, 1 << 20, 0))
            st["counter"] += 1
            v = st["counter"]
            self._save_lock(fd, st)
            st["expect"] = self.op(fid, v, [tuple(s) for s in st["expect"]])
            self._save_lock(fd, st)
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _save_lock(fd: int, st: dict[str, Any]) -> None:
        data = json.dumps(st).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))

    def op(self, fid: str, v: int, expect: list[State]) -> list[State]:
        """One operation making version v of fid; returns what reads may show next."""
        path = self.mnt / fid
        kind = os.path.basename(fid)[0]
        try:
            current = self.check_read(fid, path, expect)
            if kind == "W":
                new = self.op_w(fid, path, v, current)
            elif kind == "L":
                new = self.op_l(fid, path, v, current)
            else:
                new = self.op_p(fid, path, v, current)
            return new
        except OSError as exc:
            if exc.errno in DEAD_ERRNOS:
                self.event("E", fid, v, errno=exc.errno, msg=str(exc), dead=True)
                raise Dead() from exc
            self.event("E", fid, v, errno=exc.errno, msg=f"{type(exc).__name__}: {exc}")
            return expect + [(v, ABSENT), (v, "?")]  # uncertain from here on

    def check_read(self, fid: str, path: Path, expect: list[State]) -> tuple[State, bytes | None]:
        data = read_all(path)
        if data is None:
            state: State = (0, ABSENT)
        else:
            try:
                state = parse(data, fid)
            except Torn as exc:
                self.event("X", fid, msg=f"read through the mount: torn file: {exc}",
                           expect=expect)
                return (0, "torn"), None
        ok = any(s == state or (s[1] == ABSENT and state[1] == ABSENT) or s[1] == "?"
                 for s in expect)
        if not ok:
            self.event("X", fid, v=state[0], msg="read through the mount shows a version "
                       "other than the last one committed", got=state, expect=expect)
        self.event("R", fid, v=state[0], sync=False)
        return state, data

    # -- writing helpers ------------------------------------------------------------
    def chunks(self, data: bytes) -> Iterator[bytes]:
        off = 0
        while off < len(data):
            n = self.rng.choice([1 + self.rng.randrange(512), 4096, 1 + self.rng.randrange(65536),
                                 1 << 17])
            yield data[off:off + n]
            off += n

    def write_all(self, fd: int, data: bytes, offset: int | None = None) -> None:
        pos = offset
        for chunk in self.chunks(data):
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view) if pos is None else os.pwrite(fd, view, pos)
                view = view[n:]
                if pos is not None:
                    pos += n

    def maybe_fsync(self, fd: int, fid: str, v: int, tag: str = "F") -> None:
        if self.rng.random() < 0.25:
            if tag == "T":  # a temporary file may exist from here on
                self.event("K", fid, v)
            if self.rng.random() < 0.3:
                os.fdatasync(fd)
            else:
                os.fsync(fd)
            self.event(tag, fid, v)

    def tmp_name(self, path: Path) -> Path:
        self.tmp_n += 1
        return path.with_name(f".{path.name}.tmp{self.wid}_{self.tmp_n}")

    def via_rename(self, fid: str, path: Path, v: int, content: bytes, digest: str,
                   method: str) -> None:
        tmp = self.tmp_name(path)
        tmp_fid = str(Path(fid).with_name(tmp.name))
        self.event("S", fid, v, m=method, d=digest, tmp=tmp_fid)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self.write_all(fd, content)
            self.maybe_fsync(fd, fid, v, tag="T")
            self.event("K", fid, v)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        self.event("C", fid, v)
        if self.rng.random() < 0.3:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def rewrite(self, fid: str, path: Path, v: int, content: bytes, digest: str,
                method: str) -> None:
        if method == "rename":
            self.via_rename(fid, path, v, content, digest, method)
            return
        self.event("S", fid, v, m=method, d=digest)
        if method == "trunc":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        elif method == "shell":  # cmd > f: open, dup2, close the original, then write
            first = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fd = os.dup(first)
            os.close(first)
        else:  # "overwrite" (write over, then cut) or "trunc0" (ftruncate first)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if method == "trunc0":
                os.ftruncate(fd, 0)
            self.write_all(fd, content, offset=0 if method == "overwrite" else None)
            if method == "overwrite":
                os.ftruncate(fd, len(content))
            self.maybe_fsync(fd, fid, v)
        finally:
            os.close(fd)
        self.event("C", fid, v)

    # -- kinds ------------------------------------------------------------------------
    def body_size(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randrange(0, 8192)
        if r < 0.95:
            return self.rng.randrange(8192, 1 << 17)
        return self.rng.randrange(1 << 17, 1 << 20)

    def op_w(self, fid: str, path: Path, v: int, current: tuple[State, bytes | None]
             ) -> list[State]:
        if current[0][1] != ABSENT and fid in self.own and self.rng.random() < 0.04:
            self.event("S", fid, v, m="unlink", d=ABSENT)
            os.unlink(path)
            self.event("C", fid, v)
            return [(v, ABSENT)]
        content, digest = make_w(fid, v, self.body_size())
        method = self.rng.choice(["trunc", "trunc", "shell", "overwrite", "trunc0", "rename",
                                  "rename"])
        self.rewrite(fid, path, v, content, digest, method)
        return [(v, digest)]

    def op_l(self, fid: str, path: Path, v: int, current: tuple[State, bytes | None]
             ) -> list[State]:
        data = current[1]
        if data is not None and self.rng.random() < 0.15:  # compaction: a fresh log
            rec, head = make_l_record(fid, v, 0, ZERO32, self.rng.randrange(0, 4096))
            self.via_rename(fid, path, v, rec, head.hex(), "compact")
            return [(v, head.hex())]
        if data is None:
            index, prev = 0, ZERO32
        else:
            _, _, index, prev = parse_l(data, fid)
        rec, head = make_l_record(fid, v, index, prev, self.rng.randrange(0, 12000))
        self.event("S", fid, v, m="append", d=head.hex())
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self.write_all(fd, rec)
            self.maybe_fsync(fd, fid, v)
        finally:
            os.close(fd)
        self.event("C", fid, v)
        return [(v, head.hex())]

    def op_p(self, fid: str, path: Path, v: int, current: tuple[State, bytes | None]
             ) -> list[State]:
        kind = os.path.basename(fid)[0]
        nrec = p_nrec(fid)
        size = P_HDR + nrec * P_RECLEN
        r = self.rng.random()
        if current[1] is None or r < (0.03 if kind == "B" else 0.2):
            content, digest = make_p(fid, v)
            # a hard-linked file is rewritten in place: a rename would split the link
            methods = ["trunc", "overwrite"] if kind == "Q" else ["trunc", "rename", "overwrite"]
            self.rewrite(fid, path, v, content, digest, self.rng.choice(methods))
            if kind == "Q":
                self.ensure_link(fid, path, v)
            return [(v, digest)]
        if kind == "Q":
            self.ensure_link(fid, path, v - 1)
        use_mmap = r < 0.4
        fd = os.open(path, os.O_RDWR)
        try:
            # what this handle writes over: the file as its writer sees it
            data = read_fd(fd)
            try:
                parse_p(data, fid)
            except Torn as exc:
                self.event("X", fid, v, msg=f"read through a writable handle: torn: {exc}")
                raise OSError(errno.EIO, "torn file read") from None
            body = bytearray(data[P_HDR:])
            idx = self.rng.sample(range(nrec), self.rng.randrange(1, 9))
            for i in idx:
                body[i * P_RECLEN:(i + 1) * P_RECLEN] = make_p_record(fid, i, v)
            hdr, digest = make_p_header(fid, v, bytes(body))
            self.event("S", fid, v, m="mmap" if use_mmap else "patch", d=digest)
            if use_mmap:
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                try:
                    for i in idx:
                        off = P_HDR + i * P_RECLEN
                        m[off:off + P_RECLEN] = body[i * P_RECLEN:(i + 1) * P_RECLEN]
                    m[0:P_HDR] = hdr
                    if self.rng.random() < 0.3:
                        m.flush()  # msync: an fsync of the file
                        self.event("F", fid, v)
                finally:
                    m.close()
            else:
                for i in idx:
                    off = P_HDR + i * P_RECLEN
                    os.pwrite(fd, bytes(body[i * P_RECLEN:(i + 1) * P_RECLEN]), off)
                os.pwrite(fd, hdr, 0)
                self.maybe_fsync(fd, fid, v)
        finally:
            os.close(fd)
        if use_mmap:
            # mmap writes are committed by the last release (docs/semantics.md §2.3), which
            # comes after close() returned: not a durability point of its own.
            self.event("c", fid, v)
            return [current[0], (v, digest)]
        self.event("C", fid, v)
        return [(v, digest)]

    def ensure_link(self, fid: str, path: Path, v: int) -> None:
        """Q files have a second name, ``<name>.lnk`` (commits go in place, journalled)."""
        link = path.with_name(path.name + ".lnk")
        if not os.path.lexists(link):
            os.link(path, link)
            self.event("N", fid, v)


def writer_main(cfg_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    w = Writer(cfg)
    try:
        w.run()
    except Dead:
        pass
    except Exception as exc:  # anything else is a harness bug or a broken mount
        import traceback

        w.event("E", "-", msg="writer crashed: " + "".join(
            traceback.format_exception(exc)))
        return 1
    return 0


# ================================================================================
# The harness
# ================================================================================
def start_daemon(source: Path, mnt: Path, log: Path, options: list[str],
                 faults: str | None = None) -> Daemon:
    """Mount atomicfs (CODE's) on ``mnt`` (atomicfs/harness.py), ATOMICFS_FAULTS=``faults``."""
    # the logs (L) are small: with this knob their closes commit by appending in
    # place too (atomicfs/appends.py), so the append.* crash points are reached
    env = {"ATOMICFS_FAULTS": faults,  # None: not set at all
           "ATOMICFS_APPEND_MIN": os.environ.get("ATOMICFS_APPEND_MIN", "0")}
    daemon = Daemon(source, mnt, options, log, env, code=CODE)
    daemon.start()
    return daemon


@dataclass
class Op:
    v: int
    method: str
    digest: str
    tmp: str | None = None
    events: set[str] = field(default_factory=set)


@dataclass
class Stats:
    rounds: int = 0
    crashes: int = 0
    fault_crashes: int = 0
    kill_crashes: int = 0
    files_checked: int = 0
    torn: int = 0
    versions_verified: int = 0
    live_reads: int = 0
    ops_started: int = 0
    ops_done: int = 0
    fsyncs: int = 0
    tmp_kept: int = 0
    leftovers: int = 0
    missed_faults: list[str] = field(default_factory=list)


def file_set(writers: int, own: dict[str, int], shared: dict[str, int]
             ) -> tuple[dict[int, list[str]], list[str]]:
    per = {w: [f"w{w}/{k}{i}" for k, n in own.items() for i in range(n)] for w in range(writers)}
    sh = [f"shared/{k}{i}" for k, n in shared.items() for i in range(n)]
    return per, sh


class Torture:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(args.workdir).resolve()
        self.src = self.work / "src"
        self.mnt = self.work / "mnt"
        self.locks = self.work / "locks"
        for d in (self.src, self.mnt, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        # Q (hard-linked) files need the journal, which needs root (open_by_handle_at);
        # without it their in-place commits are documented as not crash-atomic.
        self.own, self.shared = file_set(args.writers,
                                         {"W": 3, "L": 2, "P": 2, "Q": int(os.geteuid() == 0)},
                                         {"W": 2, "L": 1, "P": 1, "B": 1})
        self.all_files = [f for fs in self.own.values() for f in fs] + self.shared
        for d in {os.path.dirname(f) for f in self.all_files}:
            (self.src / d).mkdir(exist_ok=True)
        self.state: dict[str, State] = {f: (0, ABSENT) for f in self.all_files}
        self.stats = Stats()
        self.violations: list[str] = []
        self.how = ""
        self.round_violations = 0
        self.batch = False  # this round mounts with durability=batch
        self.linked: set[str] = set()  # Q files whose second name was made
        self.foreign: set[str] = {APPLOG}  # top-level names check_tree leaves to others
        self.applog_lines = 0

    def check_out(self, log: Path, who: str) -> None:
        """A writer's or worker's stdout/stderr (``.out`` beside its log) must be empty."""
        out = log.with_suffix(".out")
        text = out.read_text() if out.exists() else ""
        if text.strip():
            self.violations.append(f"{out.name}: {who} printed:\n{text[-2000:]}")

    def verdict(self, ok: str) -> int:
        """The last lines of a run: every violation (50 at most), or ``ok``; the exit code."""
        if self.violations:
            self.say(f"FAILED: {len(self.violations)} violation(s); workdir kept: {self.work}")
            for v in self.violations[:50]:
                self.say("  " + v.replace("\n", "\n    "))
            return 1
        self.say(ok)
        return 0

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def mode(self, r: int) -> str:
        if r % 2 == 0:
            return "kill"
        point = FAULT_POINTS[(r // 2) % len(FAULT_POINTS)]
        if point == "commit.before_fsync" and self.batch_round(r):
            return "kill"  # batch commits do not fsync; the group persist does
        return point

    def batch_round(self, r: int) -> bool:
        k = self.args.batch_every
        return k > 0 and r % k == k - 1

    def run(self) -> int:
        a = self.args
        self.say(f"atomicfs torture: seed {a.seed}, {a.crashes} crash rounds, {a.writers} "
                 f"writers, workdir {self.work}, atomicfs from {CODE}")
        t0 = time.monotonic()
        for r in range(a.crashes):
            try:
                self.round(r)
            except Exception as exc:
                self.violations.append(f"round {r + 1}: harness failure: "
                                       f"{type(exc).__name__}: {exc}")
                detach(self.mnt)
            if self.violations and not a.keep_going:
                break
        s = self.stats
        self.say(f"SUMMARY seed={a.seed} rounds={s.rounds} crashes_survived={s.crashes} "
                 f"(kill -9: {s.kill_crashes}, fault points: {s.fault_crashes}) "
                 f"files_checked={s.files_checked} torn_files={s.torn} "
                 f"versions_verified={s.versions_verified} live_reads_verified={s.live_reads} "
                 f"ops_started={s.ops_started} ops_completed={s.ops_done} fsyncs={s.fsyncs} "
                 f"app_tmp_files_kept={s.tmp_kept} recovery_leftovers={s.leftovers} "
                 f"applog_lines={self.applog_lines} "
                 f"violations={len(self.violations)} time={time.monotonic() - t0:.1f}s")
        if s.missed_faults:
            self.say("note: fault points not reached (killed instead): "
                     + ", ".join(s.missed_faults))
        return self.verdict("OK: no torn file, no lost commit, no debris")

    # -- one round --------------------------------------------------------------------
    def round(self, r: int) -> None:
        a = self.args
        rdir = self.work / "logs" / f"round-{r + 1:03d}"
        rdir.mkdir(parents=True, exist_ok=True)
        self.round_violations = len(self.violations)
        mode = self.mode(r)
        vbase = (r + 1) * VERSION_STEP
        self.reset_locks(vbase)
        self.batch = self.batch_round(r)
        options = a.options + (["durability=batch"] if self.batch else [])
        daemon = start_daemon(self.src, self.mnt, rdir / "daemon.log", options,
                              faults=None if mode == "kill" else f"exit:{mode}")
        writers: list[subprocess.Popen[bytes]] = []
        try:
            death = self.crash_round(r, rdir, mode, vbase, daemon, writers)
        finally:
            if daemon.proc.poll() is None:  # a harness failure mid-round
                daemon.proc.kill()
                daemon.proc.wait()
            for p in writers:
                if p.poll() is None:
                    p.kill()
            for p in writers:
                p.wait()
            detach(self.mnt)
        self.finish_round(r, rdir, death, daemon)

    def reset_locks(self, vbase: int) -> None:
        """Shared files: the version counter and what reads may show, under a lock file."""
        for f in self.shared:
            lock = self.locks / (f.replace("/", "_") + ".lock")
            lock.write_text(json.dumps({"counter": vbase + 5 * VERSION_STEP // 10,
                                        "expect": [list(self.state[f])]}))

    def spawn(self, rdir: Path, role: str, n: int, cfg: dict[str, Any]
              ) -> subprocess.Popen[bytes]:
        """Start a worker process (``_writer``, ``_spin``, ``_reader``, ``_mover``)."""
        cfg_path = rdir / f"{role}-{n}.json"
        cfg_path.write_text(json.dumps(cfg))
        with open(rdir / f"{role}-{n}.out", "wb") as out:
            return subprocess.Popen(
                [PYTHON, str(Path(__file__).resolve()), f"_{role}", str(cfg_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def start_writers(self, rdir: Path, vbase: int, max_seconds: float,
                      writers: list[subprocess.Popen[bytes]]) -> None:
        a = self.args
        for w in range(a.writers):
            cfg = {"id": w, "seed": self.rng.randrange(2**32), "mnt": str(self.mnt),
                   "log": str(rdir / f"writer-{w}.log"), "sync_log": not a.no_log_fsync,
                   "vbase": vbase + 1, "own": self.own[w], "shared": self.shared,
                   "base": {f: list(self.state[f]) for f in self.own[w]},
                   "locks": str(self.locks), "max_seconds": max_seconds}
            writers.append(self.spawn(rdir, "writer", w, cfg))

    def crash_round(self, r: int, rdir: Path, mode: str, vbase: int, daemon: Daemon,
                    writers: list[subprocess.Popen[bytes]]) -> float:
        a = self.args
        self.start_writers(rdir, vbase, 60, writers)
        writers.append(self.spawn(rdir, "appender", 0, {
            "seed": self.rng.randrange(2**32), "mnt": str(self.mnt), "seconds": 60,
            "log": str(rdir / "appender-0.log")}))
        start = time.monotonic()
        how = ""
        if mode == "kill":
            delay = self.rng.uniform(a.min_delay, a.max_delay)
            # a program dying mid-write, the daemon alive (docs/semantics.md §1.3)
            if a.kill_writers:
                time.sleep(delay / 2)
                victim = self.rng.randrange(len(writers))
                writers[victim].kill()
                how = f"writer {victim} killed at {delay / 2:.2f}s, "
                time.sleep(delay / 2)
            else:
                time.sleep(delay)
            died = daemon.proc.poll()
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            death = time.monotonic()
            how += f"kill -9 at {delay:.2f}s"
            if died is not None:
                self.violations.append(f"round {r + 1}: the daemon had already exited "
                                       f"({died}) before the kill:\n{daemon.log()[-3000:]}")
            self.stats.kill_crashes += 1
        else:
            deadline = start + a.max_delay + 1.0
            while daemon.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            death = time.monotonic()
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait()
                how = f"{mode} not reached; kill -9 at {death - start:.2f}s"
                self.stats.missed_faults.append(mode)
                self.stats.kill_crashes += 1
            else:
                rc = daemon.proc.returncode
                how = f"exit:{mode} at {death - start:.2f}s"
                if rc != 99:
                    self.violations.append(f"round {r + 1}: daemon exited with {rc}, "
                                           f"not 99 (the fault exit):\n{daemon.log()[-3000:]}")
                self.stats.fault_crashes += 1
        self.how = how + (" (batch)" if self.batch else "")
        return death

    def finish_round(self, r: int, rdir: Path, death: float, daemon: Daemon) -> None:
        a = self.args
        how = self.how
        self.check_log(r, "crashed daemon", daemon.log())
        leftovers = self.leftovers()
        self.stats.leftovers += len(leftovers)

        # recovery: mount, look through the mount, clean unmount
        rec = start_daemon(self.src, self.mnt, rdir / "recovery.log", a.options)
        through_mount = {f: read_all(self.mnt / f) for f in self.all_files}
        applog_via_mount = read_all(self.mnt / APPLOG)
        rc = rec.unmount()
        if rc != 0:
            self.violations.append(f"round {r + 1}: recovery daemon exited with {rc}")
        self.check_log(r, "recovery daemon", rec.log())

        ops, events = self.load_logs(rdir, death)
        n_violations = self.round_violations
        checked, kept = self.check_tree(r, ops, through_mount)
        self.check_applog(r, rdir, applog_via_mount)
        self.stats.rounds += 1
        if len(self.violations) == n_violations:
            self.stats.crashes += 1
        self.say(f"round {r + 1:3d}: {how:<42} ops {events['S']:4d} started "
                 f"{events['C']:4d} done {events['F']:3d} fsync | {checked} files ok | "
                 f"leftovers {len(leftovers)} | tmp kept {kept}"
                 + ("" if len(self.violations) == n_violations
                    else f" | {len(self.violations) - n_violations} VIOLATION(S)"))

    def check_applog(self, r: int, rdir: Path, via_mount: bytes | None) -> None:
        """The appender's file: whole lines, a prefix, every fsync'ed line kept."""
        data = read_all(self.src / APPLOG)
        if data is None:
            return  # the appender never got to create it
        if via_mount != data:
            self.violations.append(f"round {r + 1}: {APPLOG}: read through the recovery "
                                   "mount differs from SOURCE")
        try:
            n = applog_lines(data)
        except Torn as exc:
            self.stats.torn += 1
            self.violations.append(f"round {r + 1}: TORN {APPLOG}: {exc}")
            return
        log = rdir / "appender-0.log"
        synced = 0
        for line in (log.read_text().splitlines() if log.exists() else []):
            with contextlib.suppress(json.JSONDecodeError):
                ev = json.loads(line)
                if ev.get("e") == "F":
                    synced = max(synced, ev["n"])
        if n < synced:
            self.violations.append(f"round {r + 1}: {APPLOG} has {n} lines, but {synced} "
                                   "were fsync'ed")
        if n < self.applog_lines:
            self.violations.append(f"round {r + 1}: {APPLOG} shrank from "
                                   f"{self.applog_lines} lines to {n}")
        self.applog_lines = n
        self.check_out(log, "appender")

    def check_log(self, r: int, who: str, text: str) -> None:
        bad = [line for line in text.splitlines()
               if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]
        if bad:
            self.violations.append(f"round {r + 1}: {who} logged errors:\n" + "\n".join(bad[:10])
                                   + "\n--- log tail ---\n" + text[-3000:])

    def leftovers(self) -> list[str]:
        d = self.src / ".atomicfs"
        return sorted(os.listdir(d)) if d.is_dir() else []

    # -- logs -----------------------------------------------------------------------
    def load_logs(self, rdir: Path, death: float) -> tuple[dict[str, list[Op]], dict[str, int]]:
        ops: dict[str, dict[int, Op]] = {}
        counts = {"S": 0, "C": 0, "F": 0}
        for path in sorted(rdir.glob("writer-*.log")):
            for line in path.read_text().splitlines():
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                e, fid, v = ev["e"], ev["f"], ev["v"]
                if e == "S":
                    ops.setdefault(fid, {})[v] = Op(v, ev["m"], ev["d"], ev.get("tmp"))
                    counts["S"] += 1
                elif e == "N":
                    self.linked.add(fid)
                elif e in "CcFKT" and v in ops.get(fid, {}):
                    ops[fid][v].events.add(e)
                    counts["C"] += e == "C"
                    counts["F"] += e == "F"
                elif e == "R":
                    self.stats.live_reads += 1
                elif e == "X":
                    self.violations.append(f"{path.name}: {fid}: {ev['msg']} "
                                           f"(got {ev.get('got')}, expected {ev.get('expect')})")
                elif e == "E":
                    if ev.get("dead") or ev.get("errno") in DEAD_ERRNOS:
                        continue
                    if ev["ts"] < death - 0.05:
                        self.violations.append(f"{path.name}: {fid} v{v}: error while the "
                                               f"daemon was alive: {ev['msg']}")
            self.check_out(path, "writer")
        self.stats.ops_started += counts["S"]
        self.stats.ops_done += counts["C"]
        self.stats.fsyncs += counts["F"]
        return {f: [o[v] for v in sorted(o)] for f, o in ops.items()}, counts

    # -- the check ----------------------------------------------------------------------
    def observe(self, path: Path, fid: str) -> tuple[State | None, str | None]:
        data = read_all(path)
        if data is None:
            return (0, ABSENT), None
        try:
            return parse(data, fid), None
        except Torn as exc:
            return None, str(exc)

    def check_tree(self, r: int, ops: dict[str, list[Op]],
                   through_mount: dict[str, bytes | None]) -> tuple[int, int]:
        bad = self.violations.append
        rn = r + 1
        checked = kept = 0
        allowed_paths = {".", *{os.path.dirname(f) for f in self.all_files}, *self.all_files}
        tmp_present = []
        for fid in self.all_files:
            self.stats.files_checked += 1
            state, torn = self.observe(self.src / fid, fid)
            src_bytes = read_all(self.src / fid)
            if through_mount[fid] != src_bytes:
                bad(f"round {rn}: {fid}: read through the recovery mount differs from SOURCE")
            if state is None:
                self.stats.torn += 1
                bad(f"round {rn}: TORN {fid}: {torn}; versions started this round: "
                    + self.describe(ops.get(fid, [])))
                self.forget(fid)
                continue
            file_ops = ops.get(fid, [])
            durable = [o for o in file_ops if self.durable(o)]
            if durable:
                floor = durable[-1].v
                allowed = [(o.v, o.digest) for o in file_ops if o.v >= floor]
            else:
                allowed = [self.state[fid]] + [(o.v, o.digest) for o in file_ops]
            ok = (any(d == ABSENT for _, d in allowed) if state[1] == ABSENT
                  else state in allowed)
            if not ok:
                what = "missing" if state[1] == ABSENT else f"version {state[0]}"
                bad(f"round {rn}: {fid}: {what} is not allowed; allowed "
                    f"{[v for v, _ in allowed]} (base {self.state[fid][0]}); ops: "
                    + self.describe(file_ops))
                self.forget(fid)
                continue
            if state[1] != ABSENT:
                self.stats.versions_verified += 1
            if os.path.basename(fid)[0] == "Q":
                allowed_paths.add(fid + ".lnk")
                problem = self.check_link(rn, fid, state)
                if problem:
                    bad(problem)
                    self.forget(fid)
                    continue
            checked += 1
            for o in file_ops:  # temporary files of rename-over operations
                if o.tmp is None:
                    continue
                allowed_paths.add(o.tmp)
                tpath = self.src / o.tmp
                if not os.path.lexists(tpath):
                    continue
                tstate, ttorn = self.observe(tpath, fid)
                if tstate is None:
                    self.stats.torn += 1
                    bad(f"round {rn}: TORN temporary file {o.tmp} (version {o.v} of {fid}): "
                        f"{ttorn}")
                elif tstate != (o.v, o.digest):
                    bad(f"round {rn}: temporary file {o.tmp} holds {tstate[0]}, not {o.v}")
                elif not ({"K", "T"} & o.events):
                    bad(f"round {rn}: temporary file {o.tmp} exists although its writer never "
                        "reached close() or fsync() (a new file must not survive a crash "
                        "before its first commit)")
                elif "C" in o.events:
                    bad(f"round {rn}: temporary file {o.tmp} still exists after its "
                        "rename returned")
                elif state == (o.v, o.digest):
                    bad(f"round {rn}: version {o.v} of {fid} is both renamed and in {o.tmp}")
                else:
                    self.stats.versions_verified += 1
                    kept += 1
                tmp_present.append(tpath)
            self.state[fid] = state
        # nothing else in the tree
        if (self.src / ".atomicfs").exists():
            bad(f"round {rn}: SOURCE/.atomicfs still exists after the clean unmount: "
                f"{os.listdir(self.src / '.atomicfs')}")
        for dirpath, dirnames, filenames in os.walk(self.src):
            rel = os.path.relpath(dirpath, self.src)
            for name in dirnames + filenames:
                p = os.path.normpath(os.path.join(rel, name))
                if (p not in allowed_paths and not p.startswith(".atomicfs")
                        and p.split("/")[0] not in self.foreign):
                    bad(f"round {rn}: unexpected entry in SOURCE: {p}")
        for t in tmp_present:  # the application's leftovers: clean up for the next round
            t.unlink()
        self.stats.tmp_kept += kept
        return checked, kept

    def forget(self, fid: str) -> None:
        """After a violation: remove the file, so later rounds (--keep-going) start afresh."""
        for p in (self.src / fid, self.src / (fid + ".lnk")):
            if os.path.lexists(p):
                p.unlink()
        self.state[fid] = (0, ABSENT)
        self.linked.discard(fid)

    def durable(self, o: Op) -> bool:
        """Did the writer see version o.v made durable before the crash?

        durability=full: close() (C), fsync() (F), a rename or unlink that returned.
        durability=batch: fsync() only (and unlink, a namespace operation); a commit
        by close() may be lost with the group that had not been persisted yet.
        """
        if o.method == "unlink":
            return "C" in o.events
        if self.batch:
            return "F" in o.events
        return "C" in o.events or "F" in o.events

    def check_link(self, rn: int, fid: str, state: State) -> str | None:
        """Q files: the second name is the same file (the link never splits)."""
        link = self.src / (fid + ".lnk")
        if not os.path.lexists(link):
            if fid in self.linked:
                return f"round {rn}: {fid}.lnk, the file's second name, is gone"
            return None
        if state[1] == ABSENT:
            return f"round {rn}: {fid}.lnk exists without {fid}"
        a, b = os.stat(self.src / fid), os.stat(link)
        if (a.st_ino, a.st_nlink) != (b.st_ino, 2):
            return (f"round {rn}: the hard link {fid} / {fid}.lnk is split (inodes {a.st_ino}, "
                    f"{b.st_ino}, nlink {a.st_nlink}, {b.st_nlink})")
        self.linked.add(fid)
        return None

    @staticmethod
    def describe(file_ops: list[Op]) -> str:
        return ", ".join(f"{o.v}:{o.method}[{''.join(sorted(o.events))}]"
                         for o in file_ops[-6:]) or "none"

# ================================================================================
# Stress (--stress SECONDS): no crash; readers, directory renames and writers at once
# ================================================================================
# Spin directories move all the time (the mover renames them between these places,
# across parents too); their files are W files with an id independent of the place.
SPIN_PLACES = ["mv/{d}a", "mv/{d}b", "mv/sub/{d}a", "mv/sub/{d}b"]
SPIN_KINDS = {"WR": 3, "WI": 2}  # replaced by rename / rewritten in place, per directory
HANG_SECONDS = 30.0  # a worker without progress this long: a deadlock (or a hung mount)


def spin_dirs(n: int) -> list[str]:
    return [f"d{i}" for i in range(n)]


def spin_names() -> list[str]:
    return [f"{k}{j}" for k, n in SPIN_KINDS.items() for j in range(n)]


def spin_fid(d: str, name: str) -> str:
    return f"spin-{d}/{name}"  # basename starts with W: a whole-file version


class Worker:
    """Base of the stress workers: a JSON-lines log, a deadline, errors are events."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg["seed"])
        self.mnt = Path(cfg["mnt"])
        self.log_fd = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.end = time.monotonic() + cfg["seconds"]
        self.races = 0  # spin directories looked for while the mover had them aside

    def event(self, kind: str, **kw: Any) -> None:
        rec = {"e": kind, "ts": time.monotonic(), **kw}
        os.write(self.log_fd, (json.dumps(rec) + "\n").encode())

    def find_dir(self, d: str, tries: int = 200) -> int:
        """An fd of spin directory ``d`` through the mount, wherever the mover put it."""
        for attempt in range(tries):
            for place in SPIN_PLACES:
                try:
                    return os.open(self.mnt / place.format(d=d), os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    continue
            if attempt % 20 == 19:
                time.sleep(0.001)
            self.races += 1
        raise OSError(errno.ENOENT, f"spin directory {d} not found at any of its places")

    def main(self) -> int:
        try:
            while time.monotonic() < self.end:
                self.step()
        except OSError as exc:
            self.event("E", msg=f"{type(exc).__name__}: {exc}")
            return 1
        self.event("D", races=self.races)
        return 0

    def step(self) -> None:
        raise NotImplementedError


class SpinWriter(Worker):
    """Rewrites its spin files (by rename or in place), through a directory fd, and checks
    each one reads back as its last version first (close-to-open)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.files: list[tuple[str, str]] = [tuple(f) for f in cfg["files"]]  # type: ignore[misc]
        self.last = {f: 1 for f in self.files}
        self.tmp_n = 0

    def step(self) -> None:
        d, name = self.rng.choice(self.files)
        fid = spin_fid(d, name)
        dfd = self.find_dir(d)
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
            try:
                data = read_fd(fd)
            finally:
                os.close(fd)
            try:
                got = parse_w(data, fid)[0]
            except Torn as exc:
                self.event("X", f=fid, msg=f"own file torn: {exc}")
                got = -1
            if got != self.last[(d, name)]:
                self.event("X", f=fid, msg=f"read back version {got}, last committed "
                           f"{self.last[(d, name)]} (close-to-open)")
            v = self.last[(d, name)] + 1
            content, _ = make_w(fid, v, self.rng.randrange(0, 32768))
            if name.startswith("WR"):
                self.tmp_n += 1
                tmp = f".tmp{self.cfg['id']}_{self.tmp_n}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
                try:
                    os.write(fd, content)
                    if self.rng.random() < 0.2:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:
                trunc = self.rng.random() < 0.5
                fd = os.open(name, os.O_RDWR | (os.O_TRUNC if trunc else 0), dir_fd=dfd)
                try:
                    os.pwrite(fd, content, 0)
                    if not trunc:
                        os.ftruncate(fd, len(content))
                    if self.rng.random() < 0.2:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            self.last[(d, name)] = v
            self.event("C", f=fid, v=v)
        finally:
            os.close(dfd)


class Reader(Worker):
    """Reads spin files replaced by rename (every read a complete version, never older
    than one it saw before) and lists the moving directories (exactly their files)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.seen: dict[str, int] = {}
        self.names = set(spin_names())
        self.replaced = sorted(n for n in self.names if n.startswith("WR"))

    def step(self) -> None:
        d = self.rng.choice(self.cfg["dirs"])
        dfd = self.find_dir(d)
        try:
            if self.rng.random() < 0.2:
                listed = {n for n in os.listdir(dfd) if not n.startswith(".tmp")}
                if listed != self.names:
                    self.event("X", f=d, msg=f"directory lists {sorted(listed)}, "
                               f"want {sorted(self.names)}")
                self.event("L")
                return
            name = self.rng.choice(self.replaced)
            fid = spin_fid(d, name)
            fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
            try:
                data = os.pread(fd, 1 << 20, 0)  # one read(): small files, one version
            finally:
                os.close(fd)
            try:
                v = parse_w(data, fid)[0]
            except Torn as exc:
                self.event("X", f=fid, msg=f"torn read: {exc}")
                return
            if v < self.seen.get(fid, 0):
                self.event("X", f=fid, msg=f"read version {v} after version "
                           f"{self.seen[fid]} (went back)")
            self.seen[fid] = v
            self.event("R", f=fid, v=v)
        finally:
            os.close(dfd)


class Mover(Worker):
    """Renames the spin directories between their places, across parents too."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.where = {d: SPIN_PLACES[0].format(d=d) for d in cfg["dirs"]}

    def step(self) -> None:
        d = self.rng.choice(sorted(self.where))
        new = self.rng.choice([p.format(d=d) for p in SPIN_PLACES
                               if p.format(d=d) != self.where[d]])
        os.rename(self.mnt / self.where[d], self.mnt / new)
        self.where[d] = new
        self.event("M", f=d, to=new)
        time.sleep(self.rng.uniform(0, 0.004))


APPLOG = "applog"  # the appender's file, at the top of SOURCE
APPLOG_SYNC = 25  # lines between the appender's fsyncs


def applog_line(n: int) -> bytes:
    return b"A %d %s\n" % (n, b"x" * (n % 61))


def applog_lines(data: bytes) -> int:
    """The number of lines of the appender's file; raises Torn unless every line is
    whole and they are numbered 0, 1, 2... (a prefix of what it wrote)."""
    if data and not data.endswith(b"\n"):
        raise Torn(f"ends inside a line: ...{data[-60:]!r}")
    for n, line in enumerate(data.splitlines(keepends=True)):
        if line != applog_line(n):
            raise Torn(f"line {n} is not the appender's line {n}: {line[:60]!r}")
    return len(data.splitlines())


class Appender(Worker):
    """Holds the applog open for the whole round and appends a line per write(); every
    APPLOG_SYNC lines an fsync, logged (``F`` with the line count) once it returned."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.fd = -1
        self.n = 0

    def step(self) -> None:
        if self.fd < 0:  # in main: a daemon that died meanwhile ends it quietly (E)
            path = self.mnt / APPLOG
            self.n = applog_lines(read_all(path) or b"")  # what is committed: a prefix
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self.fd, applog_line(self.n))
        self.n += 1
        if self.n % APPLOG_SYNC == 0:
            os.fsync(self.fd)
            self.event("F", n=self.n)
            os.fsync(self.log_fd)
        time.sleep(0.01)  # light: the writers' load stays what it was


WORKERS = {"_spin": SpinWriter, "_reader": Reader, "_mover": Mover, "_appender": Appender}


def worker_main(role: str, cfg_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    try:
        return WORKERS[role](cfg).main()
    except Exception:  # a harness bug: print it (the .out file is checked)
        import traceback

        traceback.print_exc()
        return 1


class Stress(Torture):
    """One mount, no crash: writers, spin writers, readers and a mover for a while;
    then a clean unmount and an exact check of the tree."""

    def run(self) -> int:
        a = self.args
        rdir = self.work / "logs" / "stress"
        rdir.mkdir(parents=True, exist_ok=True)
        dirs = spin_dirs(a.spin_dirs)
        for d in dirs:
            place = self.src / SPIN_PLACES[0].format(d=d)
            place.mkdir(parents=True)
            for name in spin_names():
                (place / name).write_bytes(make_w(spin_fid(d, name), 1, 1000)[0])
        (self.src / "mv" / "sub").mkdir(exist_ok=True)
        self.foreign.add("mv")
        self.say(f"atomicfs stress: seed {a.seed}, {a.stress:.0f} s, {a.writers} writers, "
                 f"{a.spin_writers} spin writers, {a.readers} readers, 1 mover, "
                 f"{len(dirs)} moving directories, workdir {self.work}")
        t0 = time.monotonic()
        self.reset_locks(VERSION_STEP)
        daemon = start_daemon(self.src, self.mnt, rdir / "daemon.log", a.options)
        procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        writers: list[subprocess.Popen[bytes]] = []
        hang = None
        try:
            self.start_writers(rdir, VERSION_STEP, a.stress, writers)
            procs += [(f"writer {i}", rdir / f"writer-{i}.log", p) for i, p in enumerate(writers)]
            files = [(d, n) for d in dirs for n in spin_names()]
            base = {"mnt": str(self.mnt), "seconds": a.stress, "dirs": dirs}
            for role, n, extra in (
                    [("spin", i, {"files": files[i::a.spin_writers]})
                     for i in range(a.spin_writers)]
                    + [("reader", i, {}) for i in range(a.readers)] + [("mover", 0, {})]):
                log = rdir / f"{role}-{n}.log"
                cfg = {**base, **extra, "id": n, "seed": self.rng.randrange(2**32),
                       "log": str(log)}
                procs.append((f"{role} {n}", log, self.spawn(rdir, role, n, cfg)))
            hang = self.watch(procs, daemon, t0 + a.stress + HANG_SECONDS)
        finally:
            for _, _, p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        through_mount = {f: read_all(self.mnt / f) for f in self.all_files}
        if hang is None:
            try:
                rc = daemon.unmount()
                if rc != 0:
                    self.violations.append(f"the daemon exited with {rc} at unmount")
            except RuntimeError as exc:
                self.violations.append(f"unmount: {exc}")
                daemon.kill()
        else:
            self.violations.append(hang)
            daemon.proc.send_signal(signal.SIGUSR1)  # faulthandler: stacks into its log
            time.sleep(0.5)
            daemon.kill()
        self.check_log(0, "daemon", daemon.log())
        ops, _ = self.load_logs(rdir, time.monotonic())
        self.check_tree(0, ops, through_mount)
        counts = self.check_stress_logs(rdir, dirs)
        s = self.stats
        self.say(f"STRESS seed={a.seed} seconds={time.monotonic() - t0:.1f} "
                 f"reads_verified={counts['R']} listings_verified={counts['L']} "
                 f"dir_renames={counts['M']} spin_commits={counts['C']} "
                 f"writer_ops={s.ops_done} writer_reads_verified={s.live_reads} "
                 f"path_races={counts['races']} hangs={int(hang is not None)} "
                 f"violations={len(self.violations)}")
        return self.verdict("OK: no wrong read, no hang, the tree is exactly what was committed")

    def watch(self, procs: list[tuple[str, Path, subprocess.Popen[bytes]]], daemon: Daemon,
              deadline: float) -> str | None:
        """Wait for the workers; a worker whose log stops growing for HANG_SECONDS hangs."""
        progress = {name: (-1, time.monotonic()) for name, _, _ in procs}
        while any(p.poll() is None for _, _, p in procs):
            now = time.monotonic()
            if daemon.proc.poll() is not None:
                return f"the daemon died with {daemon.proc.returncode}:\n{daemon.log()[-3000:]}"
            for name, log, p in procs:
                if p.poll() is not None:
                    continue
                size = log.stat().st_size if log.exists() else 0
                last_size, since = progress[name]
                if size != last_size:
                    progress[name] = (size, now)
                elif now - since > HANG_SECONDS or now > deadline:
                    return (f"HANG: {name} made no progress for {now - since:.0f} s "
                            "(deadlock?); daemon stacks follow in its log")
            time.sleep(0.2)
        return None

    def check_stress_logs(self, rdir: Path, dirs: list[str]) -> dict[str, int]:
        bad = self.violations.append
        counts = dict.fromkeys(["R", "L", "M", "C", "races"], 0)
        last: dict[str, int] = {}
        for log in sorted(rdir.glob("*.log")):
            role = log.name.split("-")[0]
            if role not in ("spin", "reader", "mover"):
                continue
            done = False
            for line in log.read_text().splitlines():
                ev = json.loads(line)
                e = ev["e"]
                if e in counts:
                    counts[e] += 1
                if e == "C":
                    last[ev["f"]] = max(last.get(ev["f"], 1), ev["v"])
                elif e == "X":
                    bad(f"{log.name}: {ev.get('f')}: {ev['msg']}")
                elif e == "E":
                    bad(f"{log.name}: error while the daemon was alive: {ev['msg']}")
                elif e == "D":
                    done = True
                    counts["races"] += ev.get("races", 0)
            if not done:
                bad(f"{log.name}: the worker did not finish")
            self.check_out(log, "worker")
        # the tree: each directory at exactly one place, each file its last version
        for d in dirs:
            places = [p.format(d=d) for p in SPIN_PLACES if (self.src / p.format(d=d)).is_dir()]
            if len(places) != 1:
                bad(f"spin directory {d} is at {places} in SOURCE, want exactly one place")
                continue
            where = self.src / places[0]
            names = sorted(os.listdir(where))
            if names != sorted(spin_names()):
                bad(f"{places[0]} holds {names}, want {sorted(spin_names())}")
            for name in spin_names():
                fid = spin_fid(d, name)
                try:
                    v = parse_w((where / name).read_bytes(), fid)[0]
                except (Torn, FileNotFoundError) as exc:
                    self.stats.torn += 1
                    bad(f"{places[0]}/{name}: {exc}")
                    continue
                if v != last.get(fid, 1):
                    bad(f"{places[0]}/{name}: version {v}, the last committed is "
                        f"{last.get(fid, 1)}")
                else:
                    self.stats.versions_verified += 1
        return counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_writer"]:
        return writer_main(argv[1])
    if argv[:1] and argv[0] in WORKERS:
        return worker_main(argv[0], argv[1])
    if any(a.split("=")[0] == "--power-cuts" for a in argv):  # scripts/powercut.py
        import powercut

        return powercut.main(argv)
    p = argparse.ArgumentParser(prog="torture", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crashes", type=int, default=10, help="crash rounds (default 10)")
    p.add_argument("--writers", type=int, default=4, help="writer processes (default 4)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--workdir", default=None, help="where SOURCE, the mount point and logs go "
                   "(default: a new temporary directory, removed on success)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options for atomicfs (e.g. -o isolation=shared)")
    p.add_argument("--min-delay", type=float, default=0.2, help="earliest kill (s)")
    p.add_argument("--max-delay", type=float, default=2.0, help="latest kill (s)")
    p.add_argument("--keep-going", action="store_true", help="go on after a violation")
    p.add_argument("--kill-writers", action="store_true",
                   help="in kill -9 rounds, first kill one writer process mid-round while the "
                   "daemon runs: what it was writing must stay intact (docs/semantics.md §1.3)")
    p.add_argument("--batch-every", type=int, default=3, metavar="K",
                   help="every K-th round mounts with durability=batch (0: never; default 3)")
    p.add_argument("--stress", type=float, metavar="SECONDS", default=None,
                   help="instead of crash rounds: one mount for SECONDS with the writers, "
                   "spin writers, readers and a mover renaming directories; then check "
                   "that no read was wrong, nothing hung, and the tree is exact")
    p.add_argument("--power-cuts", type=int, metavar="N", default=None,
                   help="instead: N power cuts per filesystem on loop-mounted XFS/ext4 "
                   "images (scripts/powercut.py --help: --fs, -o, --seed...)")
    p.add_argument("--readers", type=int, default=3, help="stress: reader processes")
    p.add_argument("--spin-writers", type=int, default=2,
                   help="stress: writers of the files in the moving directories")
    p.add_argument("--spin-dirs", type=int, default=3, help="stress: moving directories")
    p.add_argument("--no-log-fsync", action="store_true",
                   help="do not fsync the writers' side logs (the harness kills processes "
                   "only, so this loses nothing)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    options = []
    for o in args.options:
        options += [x for x in o.split(",") if x]
    args.options = options
    made = args.workdir is None
    if made:
        args.workdir = tempfile.mkdtemp(prefix="atomicfs-torture-")
    rc = 1
    try:
        rc = (Torture if args.stress is None else Stress)(args).run()
    finally:
        with contextlib.suppress(Exception):
            detach(Path(args.workdir) / "mnt")
        if made and rc == 0:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
