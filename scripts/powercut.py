#!/usr/bin/env python3
"""Power-cut torture for atomicfs (``scripts/torture --power-cuts N``; issue 12).

SOURCE lives on a loop-mounted XFS or ext4 image (tests/powercutkit.py).  Each
cut mounts atomicfs over it with the given options, starts W workers that
change their own directory through the mount, shuts the image's filesystem
down without flushing its log at a random moment (a power cut), kills the
workers and the wedged daemon, mounts the image again (log recovery), lets
atomicfs recover (``atomicfs recover``, or a new mount, chosen per cut) and
checks every worker's directory on the raw filesystem.

Workload, per worker (directory ``wN``): creates (``W*``), rewrites with
O_TRUNC, in place (pwrite + ftruncate), through a MAP_SHARED mapping, and the
program's own tmp + fsync + rename (``T*`` renamed over the target); renames
(``R*``), unlinks, mkdir/rmdir/rename of directories (``D*``), hard links
(``H*``), chmod, setxattr (``user.pc``), in-place patches of a 10 MiB file
(``B0``: the journal path, the reflink path on XFS) and an appender (``L0``,
opened once with O_APPEND and held open, fsync'ed now and then).  Every
version is self-checking: the content names its file id and version and
carries checksums (the formats of scripts/torture_workloads.py).

Each worker writes a side log on /tmp (outside the image; written after the
call returned): ``s`` with the operation before it starts, ``a`` once it is
acknowledged, ``e`` on an error.  Acknowledged is, under ``durability=full``,
every call that returned (close() for contents, the call itself for namespace
and metadata operations); under ``durability=batch``, an fsync() that
returned.  The appender's writes are acknowledged by its fsync() only (docs/
semantics.md §10).  After each cut, per worker, the tree must equal the state
after some prefix of its operations (docs/semantics.md §9) that includes every
acknowledged one: the verdict names what does not fit — ``torn`` (a file that
is no complete version), ``older`` (a file older than its last acknowledged
version, mode or xattr), ``lost`` (an acknowledged create, unlink or rename
that does not hold), ``out_of_order`` (every file fits some prefix, but no
single prefix fits them all: a later operation survived an earlier one),
``split_links`` (hard links of one file that became two files), ``debris``
(anything of the daemon's or unknown left after recovery), ``log`` (the
appender's log torn or shorter than its last fsync) and ``early_errors`` (an
error before the cut).

``--tx`` adds a transaction worker (directory ``x0``): ``atomicfs run`` of a
program that, in one transaction, rewrites files, unlinks committed files (two
links of one), creates a file and a hard link to it, moves a committed file and
a committed symlink, saves a file by rename over a committed one, removes a
committed directory with its files and makes a new one, and sets the mode and
an xattr of a committed file and the xattr and mtime of a committed directory,
each naming the transaction's number; after a cut they must all name one
number and the directory must have exactly that transaction's shape (else
``mixed``), not older than the last transaction whose ``atomicfs run`` exited 0
(else ``older``).  ``--tx-plain`` runs the program without ``atomicfs run``: the
check must see mixed states there.

The seed fixes every choice (delays, recovery kind, the workers' operations);
timing still decides where each cut lands.  Exit status: 0 clean, 1 a
violation, 77 this machine cannot run it (no root, loop device or mkfs).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests", ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torture_workloads as torture  # noqa: E402 - the torture's file formats
from torture_workloads import (  # noqa: E402
    HP,
    HW,
    Torn,
    make_l_record,
    make_p_header,
    make_p_record,
    make_w,
)

PYTHON = sys.executable
XATTR = "user.pc"
MODES = (0o600, 0o640, 0o644, 0o664)
B_NAME = "B0"
L_NAME = "L0"
MAX_FILES = 14
MAX_DIRS = 4
VSTEP = 10**6  # versions of cut r are r * VSTEP + n
KINDS = ("torn", "older", "lost", "out_of_order", "split_links", "debris", "log",
         "early_errors", "mixed")
NAME_RE = re.compile(r"^[WRHTDBL]\d+$")


# ================================================================================
# The model of a worker's directory
# ================================================================================
NameState = tuple[Any, ...]  # ("d",) or ("f", fid, version, mode, xattr)


@dataclass
class Model:
    names: dict[str, str] = field(default_factory=dict)  # name -> fid, or "/" (directory)
    inodes: dict[str, list[Any]] = field(default_factory=dict)  # fid -> [version, mode, xattr]
    log_count: int = 0  # records in L0

    def to_json(self) -> dict[str, Any]:
        return {"names": self.names, "inodes": self.inodes, "log_count": self.log_count}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Model:
        return cls(dict(d["names"]), {k: list(v) for k, v in d["inodes"].items()},
                   d["log_count"])

    def copy(self) -> Model:
        return Model(dict(self.names), {k: list(v) for k, v in self.inodes.items()},
                     self.log_count)

    def files(self) -> list[str]:
        return sorted(n for n, f in self.names.items() if f != "/")

    def dirs(self) -> list[str]:
        return sorted(n for n, f in self.names.items() if f == "/")

    def state(self) -> dict[str, NameState]:
        out: dict[str, NameState] = {}
        for name, fid in self.names.items():
            out[name] = ("d",) if fid == "/" else ("f", fid, *self.inodes[fid])
        return out

    def apply(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "create":
            self.names[op["name"]] = op["fid"]
            self.inodes[op["fid"]] = [op["v"], 0o644, None]
        elif kind in ("write", "patch"):
            self.inodes[self.names[op["name"]]][0] = op["v"]
        elif kind == "rename":
            if self.names.get(op["dst"]) != self.names[op["src"]]:  # links of one file:
                self.names[op["dst"]] = self.names.pop(op["src"])  # rename does nothing
        elif kind in ("unlink", "rmdir"):
            del self.names[op["name"]]
        elif kind == "mkdir":
            self.names[op["name"]] = "/"
        elif kind == "link":
            self.names[op["dst"]] = self.names[op["src"]]
        elif kind == "chmod":
            self.inodes[self.names[op["name"]]][1] = op["mode"]
        elif kind == "setxattr":
            self.inodes[self.names[op["name"]]][2] = op["value"]
        elif kind == "append":
            self.log_count = op["index"] + 1
        elif kind != "logsync":
            raise ValueError(f"unknown operation {kind}")


# ================================================================================
# Reading files back
# ================================================================================
def identify(data: bytes) -> tuple[str, int]:
    """(file id, version) of a complete W or B version; Torn otherwise."""
    magic = data[:4]
    if magic == b"ATFW" and len(data) >= HW.size:
        flen = HW.unpack_from(data)[4]
        fid = data[HW.size:HW.size + flen].decode(errors="replace")
    elif magic == b"ATFP" and len(data) >= HP.size:
        flen = HP.unpack_from(data)[5]
        fid = data[HP.size:HP.size + flen].decode(errors="replace")
    else:
        raise Torn(f"{len(data)} bytes, no known header ({magic!r})")
    if os.path.basename(fid)[:1] not in ("W", "T", "B"):
        raise Torn(f"unknown file id {fid!r}")
    return fid, parse_any(data, fid)[0]


def parse_any(data: bytes, fid: str) -> tuple[int, str]:
    return torture.parse_w(data, fid) if os.path.basename(fid)[0] == "T" else \
        torture.parse(data, fid)


def get_xattr(path: Path | int) -> str | None:
    try:
        return os.getxattr(path, XATTR).decode()
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


@dataclass
class Seen:
    state: dict[str, NameState] = field(default_factory=dict)
    ino: dict[str, int] = field(default_factory=dict)
    torn: dict[str, str] = field(default_factory=dict)  # name -> why
    debris: list[str] = field(default_factory=list)
    log: tuple[int, str] | None = None  # (records, error or "")


def observe(d: Path, wid: int) -> Seen:
    """The state of a worker's directory as it is on disk."""
    seen = Seen()
    for name in sorted(os.listdir(d)):
        path = d / name
        st = os.lstat(path)
        if not NAME_RE.match(name):
            seen.debris.append(f"w{wid}/{name}")
            continue
        if os.path.isdir(path):
            inside = os.listdir(path)
            if inside:
                seen.debris.append(f"w{wid}/{name}/: {sorted(inside)[:5]}")
            seen.state[name] = ("d",)
            continue
        data = path.read_bytes()
        if name == L_NAME:
            try:
                count = torture.parse_l(data, f"w{wid}/{L_NAME}")[2] if data else 0
                seen.log = (count, "")
            except Torn as exc:
                seen.log = (0, str(exc))
            continue
        try:
            fid, v = identify(data)
        except Torn as exc:
            seen.torn[name] = str(exc)
            continue
        seen.state[name] = ("f", fid, v, st.st_mode & 0o7777, get_xattr(path))
        seen.ino[name] = st.st_ino
    return seen


# ================================================================================
# The worker (a process writing through the mount)
# ================================================================================
class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.wid: int = cfg["id"]
        self.dir = Path(cfg["dir"])
        self.batch = cfg["mode"] == "batch"
        self.rng = random.Random(cfg["seed"])
        self.vbase: int = cfg["vbase"]
        self.model = Model.from_json(cfg["model"])
        self.log_fd = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.n = 0
        self.big: bytearray | None = None
        self.applog: int | None = None
        self.log_prev = b""
        self.pending: dict[str, Any] | None = None

    def record(self, **rec: Any) -> None:
        rec["t"] = time.monotonic()
        os.write(self.log_fd, (json.dumps(rec) + "\n").encode())

    def fid(self, prefix: str) -> str:
        return f"w{self.wid}/{prefix}{self.vbase + self.n}"

    def run(self) -> int:
        os.umask(0)
        self.record(ready=0)  # the cut's delay counts from here (see PowerCuts.run_fs)
        while True:
            self.n += 1
            op, self.pending = self.pending or self.choose(), None
            self.record(s=self.n, op=op)
            try:
                acked = self.do(op)
            except OSError as exc:
                self.record(e=self.n, errno=exc.errno, msg=f"{op['op']}: {exc}")
                return 0
            self.model.apply(op)
            if acked:
                self.record(a=self.n)

    # -- choosing ------------------------------------------------------------------
    def choose(self) -> dict[str, Any]:
        m, rng, v = self.model, self.rng, self.vbase + self.n
        files = [f for f in m.files() if f not in (B_NAME, L_NAME)]
        plain = [f for f in files if not f.startswith("T")]
        dirs = m.dirs()
        menu: list[tuple[float, str]] = [(10, "append")]
        if len(files) < MAX_FILES:
            menu += [(14, "create"), (8, "tmprename")]
        if plain:
            menu += [(14, "trunc"), (9, "inplace"), (5, "mmap"), (6, "rename"), (5, "chmod"),
                     (5, "setxattr"), (4, "link")]
        if len(files) > 3:
            menu += [(7, "unlink")]
        if B_NAME in m.names:
            menu += [(4, "patch")]
        if len(dirs) < MAX_DIRS:
            menu += [(4, "mkdir")]
        if dirs:
            menu += [(3, "rmdir"), (2, "dirrename")]
        what = rng.choices([w for _, w in menu], [p for p, _ in menu])[0]
        sync = rng.random() < 0.3
        size = rng.choice([rng.randrange(0, 4096), rng.randrange(4096, 65536)])
        if what == "create":
            return {"op": "create", "name": f"W{v}", "fid": self.fid("W"), "v": v,
                    "size": size, "sync": sync}
        if what == "tmprename":  # the rename follows as the next operation
            target = rng.choice(plain) if plain and rng.random() < 0.7 else f"R{v}"
            return {"op": "create", "name": f"T{v}", "fid": self.fid("T"), "v": v,
                    "size": size, "sync": True, "then": target}
        if what in ("trunc", "inplace", "mmap"):
            return {"op": "write", "how": what, "name": rng.choice(plain), "v": v,
                    "size": size, "sync": sync}
        if what == "patch":
            return {"op": "patch", "name": B_NAME, "v": v, "sync": sync,
                    "recs": sorted(rng.sample(range(40960), 4))}
        if what == "rename":
            over = [f for f in plain if rng.random() < 0.3]
            src = rng.choice(plain)
            dst = over[0] if over and over[0] != src else f"R{v}"
            return {"op": "rename", "src": src, "dst": dst}
        if what == "dirrename":
            return {"op": "rename", "src": rng.choice(dirs), "dst": f"D{v}"}
        if what == "unlink":  # a program's leftover temporary file too
            return {"op": "unlink", "name": rng.choice(files)}
        if what == "mkdir":
            return {"op": "mkdir", "name": f"D{v}"}
        if what == "rmdir":
            return {"op": "rmdir", "name": rng.choice(dirs)}
        if what == "link":
            return {"op": "link", "src": rng.choice(plain), "dst": f"H{v}"}
        if what == "chmod":
            return {"op": "chmod", "name": rng.choice(plain), "mode": rng.choice(MODES)}
        if what == "setxattr":
            return {"op": "setxattr", "name": rng.choice(plain), "value": str(v)}
        return {"op": "append", "index": m.log_count, "sync": rng.random() < 0.25, "v": v}

    # -- doing ---------------------------------------------------------------------
    def do(self, op: dict[str, Any]) -> bool:
        """Perform ``op``; True if it is acknowledged (see the module's docstring)."""
        kind = op["op"]
        p = self.dir
        if kind == "create":
            content, _ = make_w(op["fid"], op["v"], op["size"])
            fd = os.open(p / op["name"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, content)
                if op["sync"]:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if "then" in op:  # the program's own tmp + fsync + rename: the rename is next
                self.pending = {"op": "rename", "src": op["name"], "dst": op["then"]}
            return not self.batch or op["sync"]
        if kind == "write":
            fid = self.model.names[op["name"]]
            path = p / op["name"]
            if op["how"] == "mmap":
                size = os.stat(path).st_size
                n = max(0, size - HW.size - len(fid.encode()))
                content, _ = make_w(fid, op["v"], n)
                if len(content) != size or size == 0:
                    op["how"] = "inplace"
                    op["size"] = n
            if op["how"] != "mmap":
                content, _ = make_w(fid, op["v"], op["size"])
            if op["how"] == "trunc":
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            else:
                fd = os.open(path, os.O_RDWR)
            try:
                if op["how"] == "trunc":
                    os.write(fd, content)
                elif op["how"] == "inplace":
                    os.pwrite(fd, content, 0)
                    os.ftruncate(fd, len(content))
                else:
                    with mmap.mmap(fd, len(content), mmap.MAP_SHARED) as mm:
                        mm[:] = content
                        mm.flush()
                if op["sync"]:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return not self.batch or op["sync"]
        if kind == "patch":
            return self.patch(op)
        if kind == "rename":
            os.rename(p / op["src"], p / op["dst"])
        elif kind == "unlink":
            os.unlink(p / op["name"])
        elif kind == "mkdir":
            os.mkdir(p / op["name"], 0o755)
        elif kind == "rmdir":
            os.rmdir(p / op["name"])
        elif kind == "link":
            os.link(p / op["src"], p / op["dst"])
        elif kind == "chmod":
            os.chmod(p / op["name"], op["mode"])
        elif kind == "setxattr":
            os.setxattr(p / op["name"], XATTR, op["value"].encode())
        elif kind == "append":
            return self.append(op)
        return not self.batch

    def patch(self, op: dict[str, Any]) -> bool:
        fid = self.model.names[B_NAME]
        fd = os.open(self.dir / B_NAME, os.O_RDWR)
        try:
            if self.big is None:
                self.big = bytearray(torture.read_fd(fd))
            body = memoryview(self.big)[torture.P_HDR:]
            for i in op["recs"]:
                rec = make_p_record(fid, i, op["v"])
                off = i * torture.P_RECLEN
                body[off:off + len(rec)] = rec
                os.pwrite(fd, rec, torture.P_HDR + off)
            hdr, _ = make_p_header(fid, op["v"], bytes(body))
            self.big[:torture.P_HDR] = hdr
            os.pwrite(fd, hdr, 0)
            if op["sync"]:
                os.fsync(fd)
        finally:
            os.close(fd)
        return not self.batch or op["sync"]

    def append(self, op: dict[str, Any]) -> bool:
        fid = f"w{self.wid}/{L_NAME}"
        if self.applog is None:
            self.applog = os.open(self.dir / L_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                  0o644)
            data = torture.read_all(self.dir / L_NAME) or b""
            self.log_prev = torture.parse_l(data, fid)[3] if data else torture.ZERO32
        rec, self.log_prev = make_l_record(fid, op["v"], op["index"], self.log_prev,
                                           self.rng.randrange(16, 2048))
        os.write(self.applog, rec)
        if op["sync"]:
            os.fsync(self.applog)
            return True
        return False


def worker_main(cfg_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    try:
        return tx_worker(cfg) if cfg.get("kind") == "tx" else Worker(cfg).run()
    except Exception:
        import traceback

        traceback.print_exc()
        return 1


# ================================================================================
# The transaction worker (``--tx``): ``atomicfs run MNT -- _txprog``, over and over
# ================================================================================
# Directory ``x0`` as transaction t leaves it; every object names t, by its
# content, its name or an attribute, and t changes each of them:
#
#   X0..X3  committed files rewritten with O_TRUNC           content (Xi, t)
#   N<t>    a new file (N<previous> unlinked)                content (N<t>, t)
#   L<t>    a hard link to N<t> (L<previous> unlinked)       N<t>'s inode
#   M<t>    a committed file moved from M<previous>          (its content: once made)
#   K<t>    a committed symlink moved from K<previous>       (its target: "Y")
#   R       a new file R.new renamed over the committed R    content (R, t)
#   D<t>/   a new directory holding f0 and f1, made after    content (D/fi, t)
#           D<previous>/ was removed (unlinks, then rmdir)
#   Y       a committed file: chmod and setxattr             mode tx_mode(t), user.tx=t
#   E/      a committed directory: setxattr and utimes       user.tx=t, mtime TX_EPOCH+t s
#
# After a cut every one of them must name one t and the tree must have exactly
# this shape (else ``mixed``: no name of another transaction left, none of t
# missing, nothing torn), t must be >= the last transaction whose ``atomicfs
# run`` exited 0 (else ``older``), and t must be one that was begun (else
# ``lost``); anything else in x0 is ``debris``.  ``--tx-plain`` runs the same
# program without ``atomicfs run`` (each change committed on its own): the check
# must see mixed states there.
TX_DIR = "x0"
TX_FILES = 4
TX_MAGIC = b"ATFTX1 "
TX_XATTR = "user.tx"
TX_EPOCH = 1_500_000_000  # E's mtime is TX_EPOCH + t seconds
TX_SYMLINK_TARGET = "Y"
TX_DIR_FILES = ("f0", "f1")
TX_STEPS = TX_FILES + 5  # of tx_program: the rewrites, then the rest in the table's order
TX_FIGURES = ("tx_begun", "tx_acked", "tx_unacked_kept", "tx_replayed", "tx_discarded")
TX_NAME_RE = re.compile(r"^(X\d+|[NLMKD]\d+|R|Y|E)$")
# what a whole transaction t shows, each fact naming t
TX_FACTS = (*(f"X{i}" for i in range(TX_FILES)), "N", "N content", "L", "M", "K", "R", "D",
            *(f"D/{f}" for f in TX_DIR_FILES), "Y xattr", "E xattr", "E mtime")


def tx_mode(t: int) -> int:
    """Y's mode as transaction ``t`` sets it (neighbouring transactions differ)."""
    return 0o600 | (t % 8) << 3


def make_tx(name: str, t: int) -> bytes:
    """The content of file ``name`` as transaction ``t`` writes it (self-checking)."""
    rng = random.Random(f"{name}/{t}")
    payload = rng.randbytes(rng.randrange(64, 24576))
    head = f"{name} {t} {len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
    return TX_MAGIC + head + payload


def parse_tx(data: bytes, name: str) -> int:
    """The transaction number in a complete ``name``; Torn otherwise."""
    if not data.startswith(TX_MAGIC) or b"\n" not in data:
        raise Torn(f"{len(data)} bytes, no transaction header")
    head, payload = data[len(TX_MAGIC):].split(b"\n", 1)
    try:
        fname, t, size, digest = head.decode().split(" ")
        tnum, nbytes = int(t), int(size)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Torn(f"bad header {head[:80]!r}") from exc
    if fname != name:
        raise Torn(f"written for {fname}, not {name}")
    if len(payload) != nbytes or hashlib.sha256(payload).hexdigest() != digest:
        raise Torn(f"transaction {tnum}: {len(payload)} of {nbytes} bytes or bad checksum")
    return tnum


def _write_file(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def tx_program(d: str, t: int, stop: int | None = None, ready: str = "") -> int:
    """One transaction (run inside ``atomicfs run``, or plainly for ``--tx-plain``): x0
    as the last transaction left it becomes x0 as ``t`` leaves it (the table above).
    With ``stop`` (tests): after ``stop`` of its TX_STEPS steps, create ``ready`` and
    sleep until killed (``stop`` == TX_STEPS: create ``ready`` and end)."""
    top = Path(d)
    before = os.listdir(top)

    def old(prefix: str) -> list[str]:
        return sorted(n for n in before if re.fullmatch(rf"{prefix}\d+", n)
                      and n != f"{prefix}{t}")

    def rewrite(i: int) -> None:
        _write_file(top / f"X{i}", make_tx(f"X{i}", t), os.O_TRUNC)

    def new_file_and_link() -> None:  # unlinks of committed files (two links of one)
        for name in old("N") + old("L"):
            os.unlink(top / name)
        _write_file(top / f"N{t}", make_tx(f"N{t}", t), os.O_EXCL)
        os.link(top / f"N{t}", top / f"L{t}")

    def moves() -> None:  # a committed file and a committed symlink to new names
        for prefix in ("M", "K"):
            for name in old(prefix):
                os.rename(top / name, top / f"{prefix}{t}")

    def save_by_rename() -> None:  # over a committed file
        _write_file(top / "R.new", make_tx("R", t), os.O_EXCL)
        os.rename(top / "R.new", top / "R")

    def directories() -> None:  # rm -r of a committed directory, a new one with files
        for name in old("D"):
            for child in sorted(os.listdir(top / name)):
                os.unlink(top / name / child)
            os.rmdir(top / name)
        os.mkdir(top / f"D{t}", 0o755)
        for f in TX_DIR_FILES:
            _write_file(top / f"D{t}" / f, make_tx(f"D/{f}", t), os.O_EXCL)

    def attributes() -> None:  # of a committed file and of a committed directory
        os.chmod(top / "Y", tx_mode(t))
        os.setxattr(top / "Y", TX_XATTR, str(t).encode())
        os.setxattr(top / "E", TX_XATTR, str(t).encode())
        mtime = (TX_EPOCH + t) * 10**9
        os.utime(top / "E", ns=(mtime, mtime))

    steps = [*(lambda i=i: rewrite(i) for i in range(TX_FILES)), new_file_and_link, moves,
             save_by_rename, directories, attributes]
    assert len(steps) == TX_STEPS
    for i, step in enumerate(steps):
        if i == stop:
            Path(ready).touch()
            while True:
                time.sleep(60)
        step()
    if stop == TX_STEPS:
        Path(ready).touch()
    return 0


def tx_setup(d: Path, t: int) -> None:
    """``d`` (on SOURCE) as transaction ``t`` left it."""
    d.mkdir(exist_ok=True)
    for name in os.listdir(d):
        if (d / name).is_dir() and not (d / name).is_symlink():
            shutil.rmtree(d / name)
        else:
            os.unlink(d / name)
    # what t only moves or changes the attributes of, then t itself
    _write_file(d / f"M{t}", make_tx("M", t), os.O_EXCL)
    os.symlink(TX_SYMLINK_TARGET, d / f"K{t}")
    _write_file(d / "R", make_tx("R", t), os.O_EXCL)
    _write_file(d / "Y", make_tx("Y", t), os.O_EXCL)
    os.mkdir(d / "E", 0o755)
    tx_program(str(d), t)


def tx_worker(cfg: dict[str, Any]) -> int:
    log_fd = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(**rec: Any) -> None:
        rec["t"] = time.monotonic()
        os.write(log_fd, (json.dumps(rec) + "\n").encode())

    prog = [PYTHON, str(Path(__file__).resolve()), "_txprog", cfg["dir"]]
    runner = [PYTHON, "-m", "atomicfs", "run", cfg["mnt"], "--"]
    record(ready=0)
    n = 0
    while True:
        n += 1
        t = cfg["vbase"] + n
        record(s=n, tx=t)
        res = subprocess.run([*([] if cfg["plain"] else runner), *prog, str(t)],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            record(e=n, tx=t, msg=f"transaction {t}: exit {res.returncode}: "
                   f"{(res.stderr or res.stdout).strip()[-400:]}")
            return 0
        record(a=n, tx=t)


def load_tx_log(path: Path) -> tuple[list[int], int | None, dict[str, Any] | None]:
    """(transactions begun, the last acknowledged one or None, the error record)."""
    begun: list[int] = []
    acked, err = None, None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "s" in rec:
                begun.append(rec["tx"])
            elif "a" in rec:
                acked = rec["tx"]
            elif "e" in rec:
                err = rec
    return begun, acked, err


def get_xattr_of(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False).decode(errors="replace")
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


@dataclass
class TxSeen:
    """What x0 shows after a cut: the transaction numbers each fact of TX_FACTS names
    (one, in a whole transaction), Y's mode, and what is wrong with objects."""

    facts: dict[str, list[int]] = field(default_factory=dict)
    mode: int | None = None
    torn: dict[str, str] = field(default_factory=dict)  # name -> why
    odd: list[str] = field(default_factory=list)  # a name of the wrong kind, a bad value
    split: list[str] = field(default_factory=list)  # L<t> not the inode of N<t>
    debris: list[str] = field(default_factory=list)

    def fact(self, key: str, t: int | None) -> None:
        if t is not None:
            self.facts.setdefault(key, []).append(t)

    def shape(self) -> str:
        out = [f"{k}={','.join(map(str, ts))}" for k, ts in sorted(self.facts.items())]
        if self.mode is not None:
            out.append(f"Y mode={self.mode:o}")
        return " ".join(out)


def observe_tx(d: Path) -> TxSeen:
    """The state of the transaction worker's directory as it is on disk."""
    seen = TxSeen()
    inos: dict[str, int] = {}

    def content(rel: str, cname: str) -> int | None:
        try:
            return parse_tx((d / rel).read_bytes(), cname)
        except Torn as exc:
            seen.torn[rel] = str(exc)
            return None

    def number(rel: str, value: str | None) -> int | None:
        try:
            return int(value or "")
        except ValueError:
            seen.odd.append(f"{rel}: {TX_XATTR}={value!r}")
            return None

    for name in sorted(os.listdir(d)):
        path = d / name
        st = os.lstat(path)
        if not TX_NAME_RE.match(name):
            seen.debris.append(f"{TX_DIR}/{name}")
            continue
        kind, n = name[0], int(name[1:]) if name[1:].isdigit() else None
        want = stat.S_IFDIR if kind in "DE" else stat.S_IFLNK if kind == "K" else stat.S_IFREG
        if stat.S_IFMT(st.st_mode) != want:
            seen.odd.append(f"{name}: not a {stat.filemode(want)[0]} (mode "
                            f"{stat.filemode(st.st_mode)})")
            continue
        if kind == "X":
            seen.fact(name, content(name, name))
        elif kind == "N":
            seen.fact("N", n)
            seen.fact("N content", content(name, name))
            inos[name] = st.st_ino
        elif kind == "L":
            seen.fact("L", n)
            inos[name] = st.st_ino
        elif kind == "M":
            seen.fact("M", n)
            content(name, "M")  # made once, moved since: complete is all it must be
        elif kind == "K":
            seen.fact("K", n)
            if os.readlink(path) != TX_SYMLINK_TARGET:
                seen.odd.append(f"{name} -> {os.readlink(path)!r}")
        elif kind == "R":
            seen.fact("R", content(name, "R"))
        elif kind == "D":
            seen.fact("D", n)
            inside = sorted(os.listdir(path))
            seen.debris += [f"{TX_DIR}/{name}/{c}" for c in inside if c not in TX_DIR_FILES]
            for f in TX_DIR_FILES:
                if f in inside:
                    seen.fact(f"D/{f}", content(f"{name}/{f}", f"D/{f}"))
        elif kind == "Y":
            content(name, "Y")
            seen.mode = st.st_mode & 0o7777
            seen.fact("Y xattr", number("Y", get_xattr_of(path, TX_XATTR)))
        else:  # E
            seen.debris += [f"{TX_DIR}/E/{c}" for c in sorted(os.listdir(path))]
            seen.fact("E xattr", number("E", get_xattr_of(path, TX_XATTR)))
            secs, rest = divmod(st.st_mtime_ns, 10**9)
            if rest:
                seen.odd.append(f"E: mtime {st.st_mtime_ns} ns, not whole seconds")
            else:
                seen.fact("E mtime", secs - TX_EPOCH)
    for name, ino in inos.items():
        twin = "N" + name[1:] if name[0] == "L" else None
        if twin is not None and twin in inos and inos[twin] != ino:
            seen.split.append(f"{TX_DIR}/{name} and {twin} are two inodes")
    return seen


def verify_tx(base: int, begun: list[int], acked: int | None, seen: TxSeen
              ) -> tuple[Verdict, int | None]:
    """All or nothing: every fact of TX_FACTS names one transaction t, once, and Y's
    mode is t's; t is ``base`` (before this cut) or one begun in it, and t is not
    older than the last acknowledged.  Returns the verdict and t (None if mixed)."""
    ver = Verdict(started=len(begun), acked=0 if acked is None else begun.index(acked) + 1)
    for name, why in seen.torn.items():
        ver.bad("torn", f"{TX_DIR}/{name}: {why}")
    for d in seen.debris:
        ver.bad("debris", d)
    for s in seen.split:
        ver.bad("split_links", s)
    values = {t for ts in seen.facts.values() for t in ts}
    missing = [k for k in TX_FACTS if k not in seen.facts]
    twice = sorted(k for k, ts in seen.facts.items() if len(ts) > 1)
    mode_ok = len(values) == 1 and seen.mode == tx_mode(next(iter(values)))
    if seen.torn or seen.odd or missing or twice or len(values) != 1 or not mode_ok:
        ver.bad("mixed", f"{TX_DIR}: not one transaction: {seen.shape()}"
                + (f"; missing {missing}" if missing else "")
                + (f"; more than one {twice}" if twice else "")
                + (f"; torn {sorted(seen.torn)}" if seen.torn else "")
                + (f"; {'; '.join(seen.odd)}" if seen.odd else "")
                + f" (before the cut {base}, begun {begun[-3:]}, acknowledged {acked})")
        return ver, None
    t = values.pop()
    if acked is not None and t < acked:
        ver.bad("older", f"{TX_DIR}: transaction {t}, but {acked} was acknowledged")
    elif t != base and t not in begun:
        ver.bad("lost", f"{TX_DIR}: transaction {t} was never begun (before the cut {base}, "
                f"begun {begun[-3:]})")
    return ver, t


# ================================================================================
# Checking a worker's directory after a cut
# ================================================================================
@dataclass
class Verdict:
    counts: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)
    started: int = 0
    acked: int = 0
    prefix: int = -1  # the prefix that fits (-1: none)

    def bad(self, kind: str, msg: str) -> None:
        self.counts[kind] += 1
        self.lines.append(f"{kind}: {msg}")


def last_ack_time(path: Path) -> float | None:
    """When the worker logged its last acknowledgement (time.monotonic(), which the
    driver's cut time shares), or None."""
    t = None
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if "a" in rec:
                    t = rec["t"]
    return t


def late_acks(logs: dict[str, Path], t_cut: float) -> str:
    """``w1 +2.1 ms``...: the workers whose last acknowledgement came after the cut
    began.  A real power cut answers nothing after it; here a call may still
    return, and one that returns 0 must be durable: an ack just after the cut on
    a file that came back older is the signature of a sync that answered 0 on a
    filesystem already down (XFS's directory fsync: docs/verification-powercuts.md)."""
    out = []
    for w, path in logs.items():
        t = last_ack_time(path)
        if t is not None and t > t_cut:
            out.append(f"{w} +{(t - t_cut) * 1000:.1f} ms")
    return ", ".join(out)


def load_log(path: Path) -> tuple[list[dict[str, Any]], int, dict[str, Any] | None]:
    """(operations in order, index of the last acknowledged one, the error record)."""
    ops: list[dict[str, Any]] = []
    acked, err = 0, None
    if not path.exists():
        return ops, acked, err
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed worker
        if "s" in rec:
            assert rec["s"] == len(ops) + 1, f"{path}: operation {rec['s']} out of sequence"
            ops.append(rec["op"])
        elif "a" in rec:
            acked = max(acked, rec["a"])
        elif "e" in rec:
            err = rec
    return ops, acked, err


def verify_worker(wid: int, model0: Model, ops: list[dict[str, Any]], acked: int,
                  seen: Seen) -> Verdict:
    """Does the directory equal the state after some prefix k >= acked of ``ops``?"""
    ver = Verdict(started=len(ops), acked=acked)
    where = f"w{wid}"
    for name, why in seen.torn.items():
        ver.bad("torn", f"{where}/{name}: {why}")
    for d in seen.debris:
        ver.bad("debris", d)
    # the state after each prefix, and the appender's acknowledged length
    m = model0.copy()
    states = [m.state()]
    log_acked = model0.log_count
    for i, op in enumerate(ops, 1):
        m.apply(op)
        states.append(m.state())
        if op["op"] == "append" and i <= acked and op.get("sync"):
            log_acked = op["index"] + 1
    if acked > len(ops):
        acked = len(ops)
    log_written = m.log_count
    if seen.log is not None:
        count, err = seen.log
        if err:
            ver.bad("log", f"{where}/{L_NAME}: torn: {err}")
        elif not log_acked <= count <= log_written:
            ver.bad("log", f"{where}/{L_NAME}: {count} records, acknowledged {log_acked}, "
                    f"written {log_written}")
    elif log_acked:
        ver.bad("log", f"{where}/{L_NAME}: missing, {log_acked} records acknowledged")
    obs = seen.state
    window = range(acked, len(ops) + 1)
    names = set(obs) | {n for k in window for n in states[k]}
    names -= set(seen.torn)
    fits = {n: {k for k in window if states[k].get(n) == obs.get(n)} for n in names}
    common = set(window)
    for s in fits.values():
        common &= s
    if common:
        ver.prefix = min(common)
    else:
        unfit = [n for n, s in fits.items() if not s]
        for n in sorted(unfit):
            want = states[acked].get(n)
            got = obs.get(n)
            hist = describe(n, ops, acked)
            if got is None:
                ver.bad("lost", f"{where}/{n}: missing; after the acknowledged op {acked} it "
                        f"is {want} ({hist})")
            elif not any(n in states[k] for k in window):
                ver.bad("lost", f"{where}/{n}: present as {got}, but an acknowledged op "
                        f"removed it ({hist})")
            elif (want is not None and got[0] == "f" and want[0] == "f" and got[1] == want[1]
                  and older(got, want)):
                ver.bad("older", f"{where}/{n}: {got}, acknowledged {want} ({hist})")
            else:
                ver.bad("lost", f"{where}/{n}: {got}, fits no state from the acknowledged op "
                        f"{acked} on ({hist})")
        if not unfit:
            spans = ", ".join(f"{n}: ops {min(s)}-{max(s)}" for n, s in sorted(fits.items())
                              if len(s) < len(window))
            tail = "; ".join(f"#{i} {brief(op)}" for i, op in enumerate(ops, 1)
                             if acked < i <= len(ops))
            ver.bad("out_of_order", f"{where}: each name fits some prefix, none fits all "
                    f"(acknowledged {acked}, started {len(ops)}; {spans}; unacknowledged "
                    f"ops: {tail[:1500]})")
    # hard links: the names of one file id are one inode, and only they
    by_fid: dict[str, set[int]] = {}
    for n, st in obs.items():
        if st[0] == "f":
            by_fid.setdefault(st[1], set()).add(seen.ino[n])
    for fid, inos in by_fid.items():
        if len(inos) > 1:
            ver.bad("split_links", f"{where}: file {fid} is {len(inos)} inodes")
    return ver


def older(got: NameState, want: NameState) -> bool:
    return bool(got[2] < want[2] or (got[2] == want[2] and got[3:] != want[3:]))


def brief(op: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in op.items() if k not in ("fid", "recs"))


def describe(name: str, ops: list[dict[str, Any]], acked: int) -> str:
    """The operations of the window that touched ``name`` (for the report)."""
    out = []
    for i, op in enumerate(ops, 1):
        if name in (op.get("name"), op.get("src"), op.get("dst"), op.get("then")):
            out.append(f"#{i}{'*' if i <= acked else ''} {brief(op)}")
    return "; ".join(out[-4:]) or "no op of this cut"


# ================================================================================
# The driver
# ================================================================================
class PowerCuts:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.mode = "batch" if "durability=batch" in args.options else "full"
        self.totals: dict[str, Counter[str]] = {}
        self.tx_base = 0  # the transaction in x0 before the cut
        self.violations: list[str] = []

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def run(self) -> int:
        import powercutkit

        kinds = list(powercutkit.FS_KINDS) if self.args.fs == "both" else [self.args.fs]
        self.say(f"atomicfs power cuts: seed {self.args.seed}, {self.args.power_cuts} cuts per "
                 f"filesystem on {', '.join(kinds)}, options {','.join(self.args.options) or '-'} "
                 f"(mode {self.mode}), {self.args.writers} workers, workdir {self.work}")
        for kind in kinds:
            with powercutkit.powercut_fs(self.work / kind, kind) as pc:
                self.run_fs(pc)
        ok = not self.violations
        self.say(f"POWERCUT {' '.join(f'{k}={v}' for k, v in self.total().items())} "
                 f"violations={len(self.violations)}")
        if ok:
            self.say("OK: every cut left a prefix of each worker's operations including all "
                     "it saw acknowledged")
            return 0
        self.say("VIOLATIONS (first 40):\n  " + "\n  ".join(self.violations[:40]))
        self.say(f"replay: scripts/torture --power-cuts {self.args.power_cuts} --fs "
                 f"{self.args.fs} --seed {self.args.seed} "
                 + " ".join(f"-o {o}" for o in self.args.options)
                 + (" --tx-plain" if self.args.tx_plain else " --tx" if self.args.tx else ""))
        return 1

    def total(self) -> dict[str, int]:
        t: Counter[str] = Counter()
        for c in self.totals.values():
            t.update(c)
        tx = {k: t[k] for k in TX_FIGURES} if self.args.tx else {}
        return {"cuts": t["cuts"], **{k: t[k] for k in KINDS}, "ops_started": t["started"],
                "ops_acked": t["acked"], **tx, "daemon_ebadf": t["ebadf"],
                "daemon_tracebacks": t["tracebacks"]}

    def setup(self, pc: Any) -> dict[int, Model]:
        models = {}
        for w in range(self.args.writers):
            d = pc.source / f"w{w}"
            d.mkdir()
            model = Model()
            if w == 0 or self.args.big_all:
                fid = f"w{w}/{B_NAME}"
                body = b"".join(make_p_record(fid, i, 1) for i in range(torture.NREC["B"]))
                hdr, _ = make_p_header(fid, 1, body)
                (d / B_NAME).write_bytes(hdr + body)
                model.names[B_NAME] = fid
                model.inodes[fid] = [1, 0o644, None]
            models[w] = model
        if self.args.tx:
            tx_setup(pc.source / TX_DIR, 0)
            self.tx_base = 0
        pc.sync()
        return models

    def run_fs(self, pc: Any) -> None:
        tally: Counter[str] = Counter()
        self.totals[pc.kind] = tally
        models = self.setup(pc)
        for r in range(1, self.args.power_cuts + 1):
            delay = self.rng.uniform(self.args.min_delay, self.args.max_delay)
            how = self.rng.choice(["recover", "mount"])
            seeds = [self.rng.randrange(2**32) for _ in models]
            rdir = self.work / "logs" / pc.kind / f"cut{r:03d}"
            rdir.mkdir(parents=True, exist_ok=True)
            logs = {w: rdir / f"worker{w}.log" for w in models}
            txlog = rdir / "tx.log"

            def workload(top: Path, r: int = r, rdir: Path = rdir, seeds: list[int] = seeds,
                         logs: dict[int, Path] = logs, txlog: Path = txlog
                         ) -> list[subprocess.Popen[bytes]]:
                procs = []
                for w, model in models.items():
                    cfg = {"id": w, "dir": str(top / f"w{w}"), "mode": self.mode,
                           "seed": seeds[w], "vbase": r * VSTEP, "model": model.to_json(),
                           "log": str(logs[w])}
                    cfg_path = rdir / f"worker{w}.json"
                    cfg_path.write_text(json.dumps(cfg))
                    with open(rdir / f"worker{w}.out", "wb") as out:
                        procs.append(subprocess.Popen(
                            [PYTHON, str(Path(__file__).resolve()), "_pcworker",
                             str(cfg_path)], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL))
                if self.args.tx:
                    cfg_path = rdir / "tx.json"
                    cfg_path.write_text(json.dumps({
                        "kind": "tx", "dir": str(top / TX_DIR), "mnt": str(top),
                        "vbase": r * VSTEP, "log": str(txlog), "plain": self.args.tx_plain}))
                    with open(rdir / "tx.out", "wb") as out:
                        procs.append(subprocess.Popen(
                            [PYTHON, str(Path(__file__).resolve()), "_pcworker",
                             str(cfg_path)], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL))
                    logs_all = [*logs.values(), txlog]
                else:
                    logs_all = list(logs.values())
                # the delay to the cut starts once every worker runs (Python's start
                # takes a second or more on a loaded machine)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and any(
                        p.poll() is None and not (log.exists() and log.stat().st_size)
                        for log, p in zip(logs_all, procs, strict=True)):
                    time.sleep(0.01)
                return procs

            cut = pc.cycle(workload, delay, self.args.options, recovered_by=how)
            t_cut = cut.at
            (rdir / "daemon.log").write_text(cut.daemon_log)
            (rdir / "recovery.txt").write_text(f"recovered by {cut.recovered_by}\n{cut.recovery}")
            tally["cuts"] += 1
            tally["ebadf"] += len(re.findall(r"EBADF|Bad file descriptor", cut.daemon_log))
            tally["tracebacks"] += cut.daemon_log.count("Traceback")
            said = cut.recovery + cut.daemon_log
            tally["tx_replayed"] += said.count("replayed the committed transaction")
            tally["tx_discarded"] += said.count("discarded the uncommitted transaction")
            found = self.check(pc, r, models, logs, t_cut, rdir, tally)
            status = "ok" if not found else f"{len(found)} violation(s)"
            late = late_acks({**{f"w{w}": p for w, p in logs.items()},
                              **({TX_DIR: txlog} if self.args.tx else {})}, t_cut)
            if late:
                status += f" (acknowledged after the cut: {late})"
            self.say(f"{pc.kind} cut {r}: after {delay:.2f} s, recovered by {cut.recovered_by}: "
                     f"{status}")
            for line in found[:10]:
                self.say(f"    {line}")
            self.violations += [f"{pc.kind} cut {r}: {line}" for line in found]
            if found and not self.args.keep_going:
                break
        self.say(f"{pc.kind} {self.mode}: " + " ".join(
            f"{k}={tally[k]}" for k in ("cuts", *KINDS, "started", "acked",
                                        *(TX_FIGURES if self.args.tx else ()),
                                        "ebadf", "tracebacks")))

    def check(self, pc: Any, r: int, models: dict[int, Model], logs: dict[int, Path],
              t_cut: float, rdir: Path, tally: Counter[str]) -> list[str]:
        found: list[str] = []
        top = sorted(os.listdir(pc.source))
        for name in top:
            if not re.fullmatch(r"w\d+", name) and not (self.args.tx and name == TX_DIR):
                extra = ""
                if os.path.isdir(pc.source / name):
                    extra = f": {sorted(os.listdir(pc.source / name))[:8]}"
                tally["debris"] += 1
                found.append(f"debris: {name} in SOURCE after recovery{extra}")
        for w, model in models.items():
            ops, acked, err = load_log(logs[w])
            out = (rdir / f"worker{w}.out").read_text(errors="replace")
            if out.strip():
                found.append(f"early_errors: worker {w} printed: {out.strip()[-800:]}")
                tally["early_errors"] += 1
            if err is not None and err["t"] < t_cut - 0.05:
                found.append(f"early_errors: worker {w} failed before the cut: {err['msg']}")
                tally["early_errors"] += 1
            seen = observe(pc.source / f"w{w}", w)
            ver = verify_worker(w, model, ops, acked, seen)
            tally.update(ver.counts)
            tally["started"] += ver.started
            tally["acked"] += ver.acked
            found += ver.lines
            # the next cut starts from what is on disk (torn files removed)
            for name in seen.torn:
                os.unlink(pc.source / f"w{w}" / name)
            if seen.log is not None and seen.log[1]:
                os.unlink(pc.source / f"w{w}" / L_NAME)
            models[w] = self.model_of(seen)
        if self.args.tx:
            found += self.check_tx(pc, rdir, t_cut, tally)
        pc.sync()
        return found

    def check_tx(self, pc: Any, rdir: Path, t_cut: float, tally: Counter[str]) -> list[str]:
        begun, acked, err = load_tx_log(rdir / "tx.log")
        found = []
        out = (rdir / "tx.out").read_text(errors="replace")
        if out.strip():
            found.append(f"early_errors: the transaction worker printed: {out.strip()[-800:]}")
            tally["early_errors"] += 1
        if err is not None and err["t"] < t_cut - 0.05:
            found.append(f"early_errors: the transaction worker failed before the cut: "
                         f"{err['msg']}")
            tally["early_errors"] += 1
        seen = observe_tx(pc.source / TX_DIR)
        ver, t = verify_tx(self.tx_base, begun, acked, seen)
        tally.update(ver.counts)
        tally["tx_begun"] += len(begun)
        tally["tx_acked"] += ver.acked
        found += ver.lines
        if t is not None and begun and t == begun[-1] and t != acked:
            tally["tx_unacked_kept"] += 1  # committed, but the cut came before the ack
        if t is None or seen.debris or seen.split:  # go on from one whole transaction
            t = max([self.tx_base, *seen.facts.get("X0", [])])  # (--keep-going)
            tx_setup(pc.source / TX_DIR, t)
        self.tx_base = t
        return found

    @staticmethod
    def model_of(seen: Seen) -> Model:
        m = Model()
        for name, st in seen.state.items():
            if st[0] == "d":
                m.names[name] = "/"
            else:
                m.names[name] = st[1]
                m.inodes[st[1]] = [st[2], st[3], st[4]]
        if seen.log is not None and not seen.log[1]:
            m.log_count = seen.log[0]
        return m


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_pcworker"]:
        return worker_main(argv[1])
    if argv[:1] == ["_txprog"]:
        return tx_program(argv[1], int(argv[2]), *(
            (int(argv[3]), argv[4]) if len(argv) > 4 else ()))
    p = argparse.ArgumentParser(prog="torture --power-cuts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--power-cuts", type=int, required=True, metavar="N",
                   help="power cuts per filesystem")
    p.add_argument("--fs", choices=["xfs", "ext4", "both"], default="both")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="atomicfs mount options (e.g. -o durability=batch)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--writers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument("--workdir", default=None, help="images, logs and the mount point "
                   "(default: a new temporary directory, removed on success)")
    p.add_argument("--min-delay", type=float, default=0.3, help="earliest cut (s)")
    p.add_argument("--max-delay", type=float, default=2.0, help="latest cut (s)")
    p.add_argument("--keep-going", action="store_true", help="go on after a violation")
    p.add_argument("--tx", action="store_true",
                   help="add a transaction worker: `atomicfs run` of a program changing "
                   f"contents, names, directories and attributes in {TX_DIR}/ (all or "
                   "nothing)")
    p.add_argument("--tx-plain", action="store_true",
                   help="the transaction worker's program without `atomicfs run` (each "
                   "change committed on its own: the check should see mixed states)")
    p.add_argument("--big-all", action="store_true",
                   help="a 10 MiB file for every worker (default: worker 0 only)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    args.options = [x for o in args.options for x in o.split(",") if x]
    args.tx = args.tx or args.tx_plain
    made = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="atomicfs-powercut-")).resolve()
    rc = 1
    import pytest  # scratchfs (tests/) skips with pytest.skip where it cannot work

    try:
        rc = PowerCuts(args, work).run()
    except pytest.skip.Exception as exc:
        print(f"SKIP: {exc.msg}", flush=True)
        rc = 77
    finally:
        if made and rc in (0, 77):
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
    return rc


if __name__ == "__main__":
    sys.exit(main())
