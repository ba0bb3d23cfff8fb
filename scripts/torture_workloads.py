"""The torture's workloads (scripts/torture.py): self-checking file formats and
the processes that write and read them through the mount.

- The formats W, L, P/Q/B (``make_*``, ``parse_*``, ``parse``): every version of
  a file can be verified from its bytes alone; a mix of versions raises
  :class:`Torn`.
- :class:`Writer` (``_writer``): rewrites its files the ways legacy programs do
  and logs each step to a side file (see scripts/torture.py for the events).
- The stress workers (``_spin``, ``_reader``, ``_mover``) and the long-lived
  appender (``_appender``) of :data:`WORKERS`.

The driver starts each as ``scripts/torture.py _ROLE CONFIG.json``; the checker
(scripts/torture_checker.py) reads their side logs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
# The stress workers (--stress SECONDS): readers, directory renames and writers at once
# ================================================================================
# Spin directories move all the time (the mover renames them between these places,
# across parents too); their files are W files with an id independent of the place.
SPIN_PLACES = ["mv/{d}a", "mv/{d}b", "mv/sub/{d}a", "mv/sub/{d}b"]
SPIN_KINDS = {"WR": 3, "WI": 2}  # replaced by rename / rewritten in place, per directory


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

