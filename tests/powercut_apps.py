"""Real programs under power cuts: what each does, and the check of its own invariant.

Each :class:`App` prepares its files in a directory, runs as a process (this
module run as a script: ``python powercut_apps.py APP DIR ACKLOG MODE``) that
works until it is killed and appends to ACKLOG (a file outside the image,
written after the call returned) every item it saw acknowledged, and checks
the directory after the cut and recovery:

- ``sqlite-delete`` / ``sqlite-wal``: sqlite3 in journal_mode DELETE / WAL with
  synchronous=FULL inserts rows in transactions; acknowledged: COMMIT returned.
  Check: ``PRAGMA integrity_check`` is ok, every acknowledged row is present
  and every row matches its checksum.
- ``git``: ``git add`` + ``git commit`` of a new file each time; acknowledged:
  ``git commit`` exited 0.  Under ``durability=batch`` git is told to fsync
  objects and refs (``core.fsync=committed,reference``: without an fsync
  nothing is acknowledged there), and a commit counts once the next ``git
  add`` returned: git fsyncs the ref's lock file but renames it into place
  without an fsync, and under batch a rename is durable with the next group
  or the next fsync (docs/semantics.md §9.2), which that ``git add``'s
  object fsync is.  Check: ``git fsck --full`` passes and every acknowledged
  commit is reachable from HEAD.
- ``lmdb``: one put per write transaction (the ``lmdb`` package, sync=True);
  acknowledged: the commit returned.  Check: the environment opens, every
  acknowledged key is present with its value.
- ``json``: a legacy writer saving ``state.json`` with open/write/close and no
  fsync.  Acknowledged: close() returned, under ``durability=full`` only (it
  never fsyncs: under batch and on the raw filesystem nothing promises it).
  Check: the file exists, is complete (parses, checksum) and is no older than
  the last acknowledged save.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GIT_ENV = {"GIT_AUTHOR_NAME": "pc", "GIT_AUTHOR_EMAIL": "pc@example.org",
           "GIT_COMMITTER_NAME": "pc", "GIT_COMMITTER_EMAIL": "pc@example.org",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def payload(rng: random.Random) -> str:
    return rng.randbytes(rng.randrange(50, 3000)).hex()


class Acks:
    """The acknowledgement log; ``<log>.ready`` appears once the first operation is
    done (the harness starts the delay to the cut from there)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.started = False

    def __call__(self, item: object) -> None:
        os.write(self.fd, f"{item}\n".encode())
        self.progress()

    def progress(self) -> None:
        if not self.started:
            self.started = True
            os.close(os.open(self.path + ".ready", os.O_WRONLY | os.O_CREAT, 0o644))


def read_acks(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [line for line in lines[:-1] if line]  # the last line may be cut short


# -- sqlite --------------------------------------------------------------------------
def sqlite_prepare(d: Path, journal: str) -> None:
    con = sqlite3.connect(d / "app.db", isolation_level=None)
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, val TEXT, sha TEXT)")
    con.close()


def sqlite_run(d: Path, ack: Acks, mode: str, journal: str) -> None:
    rng = random.Random()
    con = sqlite3.connect(d / "app.db", isolation_level=None)
    con.execute(f"PRAGMA journal_mode={journal}")
    # DELETE mode commits by unlinking its journal, which synchronous=FULL does not
    # fsync: under durability=batch that unlink is durable with the next group only
    # (docs/semantics.md §9.2), so an acknowledged COMMIT needs synchronous=EXTRA there
    extra = journal == "DELETE" and mode == "batch"
    con.execute(f"PRAGMA synchronous={'EXTRA' if extra else 'FULL'}")
    i = (con.execute("SELECT max(id) FROM t").fetchone()[0] or 0) + 1
    while True:
        con.execute("BEGIN IMMEDIATE")
        val = payload(rng)
        con.execute("INSERT INTO t VALUES (?, ?, ?)", (i, val, digest(val)))
        if i > 10 and rng.random() < 0.3:  # rewrite an older row too
            val = payload(rng)
            con.execute("UPDATE t SET val = ?, sha = ? WHERE id = ?",
                        (val, digest(val), rng.randrange(1, i)))
        con.execute("COMMIT")
        ack(i)  # COMMIT fsyncs, so it counts in both modes
        i += 1


def sqlite_check(d: Path, acked: list[str], mode: str, journal: str) -> list[str]:
    try:
        con = sqlite3.connect(d / "app.db", isolation_level=None)
        ok = con.execute("PRAGMA integrity_check").fetchall()
        rows = con.execute("SELECT id, val, sha FROM t").fetchall()
        con.close()
    except sqlite3.Error as exc:
        return [f"sqlite ({journal}): cannot read the database: {exc}"]
    problems = []
    if ok != [("ok",)]:
        problems.append(f"sqlite ({journal}): integrity_check: {ok[:5]}")
    ids = {r[0] for r in rows}
    bad = [r[0] for r in rows if digest(r[1]) != r[2]]
    if bad:
        problems.append(f"sqlite ({journal}): rows with a wrong checksum: {bad[:10]}")
    lost = sorted(int(a) for a in acked if int(a) not in ids)
    if lost:
        problems.append(f"sqlite ({journal}): acknowledged transactions lost (rows "
                        f"{lost[:10]}; {len(lost)} of {len(acked)}; newest row "
                        f"{max(ids, default=0)})")
    return problems


# -- git -----------------------------------------------------------------------------
def git(d: Path, *args: str, mode: str = "full") -> subprocess.CompletedProcess[str]:
    sync = ["-c", "core.fsync=committed,reference", "-c", "core.fsyncMethod=fsync"] \
        if mode == "batch" else []
    return subprocess.run(["git", *sync, "-C", str(d / "repo"), *args], capture_output=True,
                          text=True, env={**os.environ, **GIT_ENV}, stdin=subprocess.DEVNULL,
                          timeout=120)


def git_prepare(d: Path) -> None:
    subprocess.run(["git", "init", "-q", "-b", "main", str(d / "repo")], check=True,
                   env={**os.environ, **GIT_ENV}, capture_output=True)
    (d / "repo" / "README").write_text("power cuts\n")
    for args in (("add", "-A"), ("commit", "-q", "-m", "start")):
        res = git(d, *args)
        assert res.returncode == 0, res.stderr


def git_run(d: Path, ack: Acks, mode: str) -> None:
    rng = random.Random()
    for lock in ("index.lock", "HEAD.lock", "refs/heads/main.lock"):
        # a git killed by the cut leaves its lock: what a user removes (git says so)
        (d / "repo" / ".git" / lock).unlink(missing_ok=True)
    n = 0
    covered = None  # batch: a commit whose ref update no fsync has covered yet
    while True:
        n += 1
        name = f"f{os.getpid()}-{n}.txt"
        (d / "repo" / name).write_text(payload(rng))
        for args in (("add", name), ("commit", "-q", "-m", f"commit {name}")):
            res = git(d, *args, mode=mode)
            if res.returncode != 0:
                sys.stderr.write(res.stderr)
                return
            if args[0] == "add" and covered is not None:
                ack(covered)  # the new object's fsync came after that ref's rename
                covered = None
        head = git(d, "rev-parse", "--verify", "HEAD")  # fails if the cut came first
        if head.returncode == 0:
            if mode == "batch":
                covered = head.stdout.strip()
                ack.progress()
            else:
                ack(head.stdout.strip())


def git_check(d: Path, acked: list[str], mode: str) -> list[str]:
    problems = []
    fsck = git(d, "fsck", "--full", "--no-progress")
    if fsck.returncode != 0:
        problems.append(f"git fsck --full: exit {fsck.returncode}: "
                        f"{(fsck.stderr + fsck.stdout).strip()[-600:]}")
    listed = git(d, "rev-list", "HEAD")
    if listed.returncode != 0:
        return problems + [f"git rev-list HEAD: {listed.stderr.strip()[-300:]}"]
    reachable = set(listed.stdout.split())
    lost = [a for a in acked if a not in reachable]
    if lost:
        problems.append(f"git: {len(lost)} of {len(acked)} acknowledged commits not "
                        f"reachable from HEAD (first {lost[0]})")
    return problems


# -- lmdb ----------------------------------------------------------------------------
def lmdb_open(d: Path):  # type: ignore[no-untyped-def]
    import lmdb

    return lmdb.open(str(d / "db"), map_size=256 << 20, sync=True, metasync=True)


def lmdb_prepare(d: Path) -> None:
    (d / "db").mkdir()
    lmdb_open(d).close()


def lmdb_run(d: Path, ack: Acks, mode: str) -> None:
    rng = random.Random()
    env = lmdb_open(d)
    with env.begin() as txn:
        i = txn.stat()["entries"] + 1
    while True:
        key = f"k{i:08d}"
        val = payload(rng)
        with env.begin(write=True) as txn:
            txn.put(key.encode(), f"{digest(val)}:{val}".encode())
        ack(key)  # the commit returned (fdatasync'ed: sync=True)
        i += 1


def lmdb_check(d: Path, acked: list[str], mode: str) -> list[str]:
    try:
        env = lmdb_open(d)
        with env.begin() as txn:
            items = {k.decode(): v.decode() for k, v in txn.cursor()}
        env.close()
    except Exception as exc:  # lmdb.Error and its kin: the database does not open
        return [f"lmdb: cannot read the environment: {type(exc).__name__}: {exc}"]
    problems = []
    bad = [k for k, v in items.items() if digest(v.partition(":")[2]) != v.partition(":")[0]]
    if bad:
        problems.append(f"lmdb: values with a wrong checksum: {bad[:5]}")
    lost = [a for a in acked if a not in items]
    if lost:
        problems.append(f"lmdb: {len(lost)} of {len(acked)} acknowledged keys lost "
                        f"(first {lost[0]})")
    return problems


# -- the legacy JSON writer ------------------------------------------------------------
def json_doc(n: int, rng: random.Random) -> bytes:
    pad = payload(rng)
    return json.dumps({"n": n, "pad": pad, "sha": digest(f"{n}:{pad}")}).encode()


def json_prepare(d: Path) -> None:
    (d / "state.json").write_bytes(json_doc(0, random.Random(0)))


def json_run(d: Path, ack: Acks, mode: str) -> None:
    rng = random.Random()
    n = json.loads((d / "state.json").read_bytes())["n"]
    while True:
        n += 1
        fd = os.open(d / "state.json", os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o644)
        try:
            os.write(fd, json_doc(n, rng))
        finally:
            os.close(fd)
        if mode != "batch":  # close() returned; under batch nothing is promised without fsync
            ack(n)
        ack.progress()


def json_check(d: Path, acked: list[str], mode: str) -> list[str]:
    try:
        data = (d / "state.json").read_bytes()
    except FileNotFoundError:
        return ["json: state.json is missing"]
    try:
        doc = json.loads(data)
        ok = doc["sha"] == digest(f"{doc['n']}:{doc['pad']}")
    except (ValueError, KeyError, TypeError):
        return [f"json: state.json is not a complete save ({len(data)} bytes)"]
    if not ok:
        return ["json: state.json checksum mismatch"]
    last = max((int(a) for a in acked), default=0)
    if doc["n"] < last:
        return [f"json: state.json holds save {doc['n']}, older than the last acknowledged "
                f"{last}"]
    return []


@dataclass(frozen=True)
class App:
    name: str
    prepare: Callable[[Path], None]
    run: Callable[[Path, Acks, str], None]
    check: Callable[[Path, list[str], str], list[str]]
    tools: tuple[str, ...] = ()
    module: str | None = None


APPS = {
    "sqlite-delete": App("sqlite-delete", lambda d: sqlite_prepare(d, "DELETE"),
                         lambda d, a, m: sqlite_run(d, a, m, "DELETE"),
                         lambda d, a, m: sqlite_check(d, a, m, "DELETE")),
    "sqlite-wal": App("sqlite-wal", lambda d: sqlite_prepare(d, "WAL"),
                      lambda d, a, m: sqlite_run(d, a, m, "WAL"),
                      lambda d, a, m: sqlite_check(d, a, m, "WAL")),
    "git": App("git", git_prepare, git_run, git_check, tools=("git",)),
    "lmdb": App("lmdb", lmdb_prepare, lmdb_run, lmdb_check, module="lmdb"),
    "json": App("json", json_prepare, json_run, json_check),
}


def main(argv: list[str]) -> int:
    app, d, acklog, mode = argv
    APPS[app].run(Path(d), Acks(acklog), mode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
