"""Durability order, from the daemon's real system calls (docs/semantics.md §1.5, §2.1-2.2, §3).

strace is attached to a live daemon while writers make a burst of commits
(tests/stracekit.py records and checks the calls).  For every commit:

- the new file's data was fsync'ed after its last change and before the
  ``rename``/``linkat`` that published it;
- durability=full: the directory holding it was fsync'ed after the
  publication and before the writer's close()/fsync() returned;
- commit=journal: the redo record (and the daemon's directory) were fsync'ed
  before the first in-place write, and the writer's call returned only after
  both (the commit is durable once its record is); the file was fsync'ed
  after its last in-place write and before the record was removed, which may
  come after the call returned;
- durability=batch: fsync() returns only after the group published the file
  and fsync'ed its directory; a close() is published by a group, in the same
  order, within a bounded delay.

The checker itself is tested on hand-made traces (last section), so a wrong
order in the daemon cannot pass unnoticed.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, Mount, MountFactory
from sessionkit import status_of, wait_for
from stracekit import (
    Call,
    PtraceRefused,
    Tracer,
    WriterOp,
    journal_violations,
    journal_writer_violations,
    parse,
    publications,
    publish_violations,
    resolve_proc_fds,
    writer_violations,
)

NAMES = ["a", "b", "c", "d", "sub/e", "sub/f", "sub/g", "sub/h"]
BATCH_BOUND = 2.0  # seconds: group delay (50 ms) plus strace's slowdown of a busy daemon


def attach(m: Mount, out: Path) -> Tracer:
    assert m.proc is not None
    try:
        return Tracer(m.proc.pid, out)
    except FileNotFoundError as exc:
        pytest.skip(f"needs strace: {exc}")
    except PtraceRefused as exc:
        pytest.skip(f"ptrace is not permitted here, strace cannot attach: {exc}")


def seeded_source(root: Path, names: list[str], size: int = 6000) -> Path:
    src = root / "src"
    for name in names:
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    return src


class Burst:
    """Writers in threads, each recording the window of every commit call it made."""

    def __init__(self, m: Mount, seed: int) -> None:
        self.m = m
        self.rng = random.Random(seed)
        self.ops: list[WriterOp] = []
        self.lock = threading.Lock()
        self.new = 0

    def record(self, rel: str, how: str, t0: float, t1: float) -> None:
        with self.lock:
            self.ops.append(WriterOp(str(self.m.src(rel)), how, t0, t1))

    def rewrite(self, rel: str, how: str, patch: bool = False) -> None:
        """One commit of ``rel`` by ``how``: close() after writing, or fsync()."""
        data = os.urandom(self.rng.randrange(1, 20000))
        flags = os.O_RDWR if patch else os.O_WRONLY | os.O_TRUNC
        fd = os.open(self.m.path(rel), flags)
        try:
            if patch:
                os.pwrite(fd, data[:512], self.rng.randrange(0, 4096))
            else:
                os.write(fd, data)
        finally:
            self.finish(fd, rel, how)

    def create(self, directory: str, how: str) -> None:
        with self.lock:
            self.new += 1
            rel = os.path.join(directory, f"new{self.new}")
        fd = os.open(self.m.path(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, os.urandom(self.rng.randrange(1, 9000)))
        finally:
            self.finish(fd, rel, how)

    def finish(self, fd: int, rel: str, how: str) -> None:
        """fsync (timed, if that is the commit point) and close (timed, if it is)."""
        try:
            if how == "fsync":
                t0 = time.time()
                os.fsync(fd)
                self.record(rel, how, t0, time.time())
        finally:
            t0 = time.time()
            os.close(fd)
            t1 = time.time()
        if how == "close":
            self.record(rel, how, t0, t1)

    def run(self, names: list[str], threads: int, per_thread: int) -> None:
        errors: list[BaseException] = []

        def work(k: int) -> None:
            rng = random.Random(self.rng.random())
            try:
                for _ in range(per_thread):
                    how = rng.choice(["close", "close", "fsync"])
                    if rng.random() < 0.25:
                        self.create(rng.choice(["", "sub"]), how)
                    else:  # threads own disjoint files: one commit per call
                        self.rewrite(rng.choice(names[k::threads]), how)
            except BaseException as exc:  # re-raised in the test's thread
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in workers), "a writer hung (deadlock?)"
        if errors:
            raise errors[0]


@pytest.fixture
def traced_mount(mount_factory: MountFactory, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[tuple[Mount, Tracer]]:
    marker = request.node.get_closest_marker("mount_options")
    m = mount_factory(source=seeded_source(tmp_path, NAMES),
                      options=list(marker.args) if marker else [])
    tracer = attach(m, tmp_path / "daemon.strace")
    try:
        yield m, tracer
    finally:
        tracer.kill()


def report(calls: list, problems: list[str]) -> str:  # type: ignore[type-arg]
    return f"{len(problems)} violation(s) in {len(calls)} traced calls:\n" + \
        "\n".join(problems[:20])


@pytest.mark.mount_options("commit=rename")
def test_rename_and_new_file_commits_are_durable_before_the_call_returns(
        traced_mount: tuple[Mount, Tracer]) -> None:
    m, tracer = traced_mount
    burst = Burst(m, random.randrange(2**31))
    burst.run(NAMES, threads=3, per_thread=14)
    calls = tracer.stop()
    daemon_dir = str(m.src(".atomicfs"))
    pubs = publications(calls, daemon_dir)
    assert len(pubs) >= len(burst.ops), \
        f"{len(burst.ops)} commits but only {len(pubs)} publications traced"
    assert any(p.call.name == "linkat" for p in pubs) and \
        any(p.call.name.startswith("rename") for p in pubs), "want new files and rewrites"
    problems = publish_violations(calls, daemon_dir)
    assert not problems, report(calls, problems)
    problems = writer_violations(calls, daemon_dir, burst.ops)
    assert not problems, report(calls, problems)
    print(f"{len(burst.ops)} commits, {len(pubs)} publications, {len(calls)} calls checked")


@pytest.mark.skipif(not IS_ROOT, reason="journalled commits need root (open_by_handle_at)")
@pytest.mark.mount_options("commit=journal")
def test_journalled_commits_sync_record_then_file_before_the_call_returns(
        traced_mount: tuple[Mount, Tracer]) -> None:
    m, tracer = traced_mount
    burst = Burst(m, random.randrange(2**31))
    hows = ["close", "fsync"] * 5
    for i, how in enumerate(hows):  # sequential: the checker pairs a record with its apply
        burst.rewrite(NAMES[i % 3], how, patch=True)
    daemon_dir = str(m.src(".atomicfs"))
    # the last commits settle after their call returned
    assert wait_for(lambda: not any(n.startswith("journal-") for n in os.listdir(daemon_dir)),
                    timeout=10), "journal records not settled in 10 s"

    def retired(calls: list[Call]) -> bool:  # every record's removal is in the trace
        return sum(1 for c in calls if c.name == "unlinkat" and c.ok and c.strings
                   and c.strings[0].startswith("journal-")) >= len(hows)

    calls = tracer.stop(until=retired)
    assert status_of(m.mountpoint)["commits"]["journal"] == len(hows)
    checked, problems = 0, []
    for name in NAMES[:3]:  # one file at a time: its records and the calls of its ops
        target = str(m.src(name))
        ops = [op for op in burst.ops if op.path == target]
        mine = [c for c in calls if any(op.t0 <= c.start <= op.t1 for op in ops)]
        n, bad = journal_violations(calls, daemon_dir, target, records_from=mine)
        checked += n
        problems += bad + journal_writer_violations(calls, daemon_dir, target, ops)
    assert checked == len(hows), f"{checked} journal records traced for {len(hows)} commits"
    print(f"{checked} journalled commits, {len(calls)} calls checked")
    assert not problems, report(calls, problems)
    assert publish_violations(calls, daemon_dir) == []


@pytest.mark.mount_options("durability=batch", "commit=rename")
def test_batch_fsync_waits_for_the_group_and_closes_are_published_in_order(
        traced_mount: tuple[Mount, Tracer]) -> None:
    m, tracer = traced_mount
    burst = Burst(m, random.randrange(2**31))
    burst.run(NAMES, threads=3, per_thread=14)
    written = sorted({op.path for op in burst.ops})

    def all_published() -> bool:
        return all(Path(p).exists() and Path(p).read_bytes() ==
                   m.path(os.path.relpath(p, m.source)).read_bytes() for p in written)

    assert wait_for(all_published, timeout=10), "the last group was not persisted in 10 s"
    calls = tracer.stop()
    daemon_dir = str(m.src(".atomicfs"))
    closes = [op for op in burst.ops if op.how == "close"]
    fsyncs = [op for op in burst.ops if op.how == "fsync"]
    assert closes and fsyncs
    pubs = publications(calls, daemon_dir)
    assert pubs, "nothing published"
    problems = publish_violations(calls, daemon_dir)
    problems += writer_violations(calls, daemon_dir, fsyncs)
    problems += writer_violations(calls, daemon_dir, closes, deferred=BATCH_BOUND)
    assert not problems, report(calls, problems)
    print(f"{len(closes)} closes, {len(fsyncs)} fsyncs, {len(pubs)} publications, "
          f"{len(calls)} calls checked")


# -- the checker, on hand-made traces --------------------------------------------------------
RENAME_COMMIT = """\
100 1000.000100 openat(3</s>, ".", O_RDWR|O_CLOEXEC|O_TMPFILE, 0600) = 15</s/#77>(deleted) <0.000010>
100 1000.000200 pwrite64(15</s/#77>(deleted), "x\\n", 2, 0) = 2 <0.000010>
101 1000.000250 fchmod(15</s/#77>(deleted), 0644) = 0 <0.000005>
101 1000.000300 fsync(15</s/#77>(deleted) <unfinished ...>
100 1000.000320 openat(3</s>, "g", O_RDONLY|O_PATH) = 18</s/g> <0.000005>
101 1000.000400 <... fsync resumed>) = 0 <0.000100>
100 1000.000500 linkat(15</s/#77>(deleted), "", 4</s/.atomicfs>, "commit-1", AT_EMPTY_PATH) = 0 <0.000010>
100 1000.000600 renameat(4</s/.atomicfs>, "commit-1", 3</s>, "f") = 0 <0.000010>
101 1000.000700 openat(AT_FDCWD</w>, "/proc/self/fd/3", O_RDONLY|O_DIRECTORY) = 16</s> <0.000010>
101 1000.000710 fsync(16</s>) = 0 <0.000100>
"""  # noqa: E501
NEW_FILE = """\
100 1000.000100 openat(3</s>, ".", O_RDWR|O_TMPFILE, 0644) = 15</s/#78>(deleted) <0.000010>
100 1000.000200 pwrite64(15</s/#78>(deleted), "new", 3, 0) = 3 <0.000010>
101 1000.000300 fsync(15</s/#78>(deleted)) = 0 <0.000100>
100 1000.000500 linkat(AT_FDCWD</w>, "/proc/self/fd/15", 3</s>, "n", AT_SYMLINK_FOLLOW) = 0 <0.000010>
101 1000.000710 fsync(16</s>) = 0 <0.000100>
"""  # noqa: E501
F_OP = [WriterOp("/s/f", "close", 1000.0, 1000.0009)]


def checked(text: str) -> list:  # type: ignore[type-arg]
    calls = parse(text)
    resolve_proc_fds(calls)
    return calls


def test_checker_accepts_a_correct_rename_commit() -> None:
    calls = checked(RENAME_COMMIT)
    assert [p.name for p in publications(calls, "/s/.atomicfs")] == ["f"]
    assert publish_violations(calls, "/s/.atomicfs") == []
    assert writer_violations(calls, "/s/.atomicfs", F_OP) == []


def test_checker_accepts_a_new_file_linked_through_proc() -> None:
    calls = checked(NEW_FILE)
    assert [(p.key, p.name) for p in publications(calls, "/s/.atomicfs")] == [("tmp#78", "n")]
    assert publish_violations(calls, "/s/.atomicfs") == []
    op = WriterOp("/s/n", "close", 1000.0, 1000.0009)
    assert writer_violations(calls, "/s/.atomicfs", [op]) == []


@pytest.mark.parametrize(("change", "words"), [
    (("101 1000.000300 fsync(15</s/#77>(deleted) <unfinished ...>",
      "101 1000.000550 fsync(15</s/#77>(deleted) <unfinished ...>"), "published unsynced"),
    (("101 1000.000250 fchmod(15</s/#77>(deleted), 0644)",
      "101 1000.000450 fchmod(15</s/#77>(deleted), 0644)"), "last change"),
    (("fsync(15</s/#77>(deleted) <unf", "fsync(19</s/#79>(deleted) <unf"), "never fsync'ed"),
], ids=["fsync-after-link", "change-after-fsync", "other-file-synced"])
def test_checker_catches_an_unsynced_publication(change: tuple[str, str], words: str) -> None:
    text = RENAME_COMMIT.replace(*change)
    assert text != RENAME_COMMIT
    problems = publish_violations(checked(text), "/s/.atomicfs")
    assert len(problems) == 1 and words in problems[0], problems


@pytest.mark.parametrize(("change", "t1"), [
    (("101 1000.000710 fsync(16</s>) = 0 <0.000100>", ""), 1000.0009),  # never synced
    (("fsync(16</s>) = 0 <0.000100>", "fsync(16</s>) = 0 <0.000300>"), 1000.0009),  # late
    (("101 1000.000710 fsync(16</s>)", "101 1000.000590 fsync(16</s>)"), 1000.0009),  # early
    (("fsync(16</s>)", "fsync(16</s/sub>)"), 1000.0009),  # the wrong directory
    (("", ""), 1000.00075),  # the writer returned first
], ids=["no-dir-fsync", "ends-after-return", "starts-before-rename", "other-dir", "returned"])
def test_checker_catches_a_return_before_the_directory_fsync(change: tuple[str, str],
                                                             t1: float) -> None:
    text = RENAME_COMMIT.replace(*change) if change[0] else RENAME_COMMIT
    op = WriterOp("/s/f", "close", 1000.0, t1)
    problems = writer_violations(checked(text), "/s/.atomicfs", [op])
    assert len(problems) == 1 and "directory" in problems[0], problems


def test_checker_catches_a_commit_outside_the_call() -> None:
    op = WriterOp("/s/f", "fsync", 1000.001, 1000.002)  # the rename came before the call
    problems = writer_violations(checked(RENAME_COMMIT), "/s/.atomicfs", [op])
    assert len(problems) == 1 and "no publication" in problems[0], problems


JOURNAL_COMMIT = """\
100 1000.000100 openat(4</s/.atomicfs>, "journal-9-1", O_RDWR|O_CREAT|O_EXCL, 0600) = 20</s/.atomicfs/journal-9-1> <0.000010>
101 1000.000200 pwrite64(20</s/.atomicfs/journal-9-1>, "data", 4, 64) = 4 <0.000010>
101 1000.000210 pwrite64(20</s/.atomicfs/journal-9-1>, "head", 4, 0) = 4 <0.000010>
101 1000.000300 fsync(20</s/.atomicfs/journal-9-1>) = 0 <0.000100>
101 1000.000410 fsync(21</s/.atomicfs>) = 0 <0.000050>
100 1000.000500 openat(AT_FDCWD</w>, "/proc/self/fd/9", O_RDWR) = 22</s/f> <0.000010>
101 1000.000600 copy_file_range(15</s/#77>(deleted), [4096], 22</s/f>, [4096], 4, 0) = 4 <0.000010>
101 1000.000610 ftruncate(22</s/f>, 8192) = 0 <0.000010>
101 1000.000620 utimensat(22</s/f>, "", [UTIME_OMIT, {tv_sec=1, tv_nsec=0}], AT_EMPTY_PATH) = 0 <0.000010>
101 1000.000700 fsync(22</s/f>) = 0 <0.000100>
101 1000.000900 unlinkat(4</s/.atomicfs>, "journal-9-1", 0) = 0 <0.000010>
101 1000.000950 fsync(23</s/.atomicfs>) = 0 <0.000040>
"""  # noqa: E501
J_OP = [WriterOp("/s/f", "close", 1000.0, 1000.001)]


def test_checker_accepts_a_correct_journalled_commit() -> None:
    calls = checked(JOURNAL_COMMIT)
    assert journal_violations(calls, "/s/.atomicfs", "/s/f") == (1, [])
    assert journal_writer_violations(calls, "/s/.atomicfs", "/s/f", J_OP) == []


def test_checker_accepts_an_overlapping_directory_fsync_of_another_thread() -> None:
    # the housekeeper's fsync of the daemon's directory (settling an earlier record)
    # starts first and is still running when the commit's own one has returned
    other = ("102 1000.000400 fsync(24</s/.atomicfs> <unfinished ...>\n"
             "102 1000.000800 <... fsync resumed>) = 0 <0.000400>\n")
    lines = JOURNAL_COMMIT.splitlines(keepends=True)
    text = "".join(lines[:4] + [other] + lines[4:])
    calls = checked(text)
    assert journal_violations(calls, "/s/.atomicfs", "/s/f") == (1, [])


@pytest.mark.parametrize(("change", "words"), [
    (("101 1000.000300 fsync(20", "101 1000.000650 fsync(20"), "before the record"),
    (("101 1000.000410 fsync(21", "101 1000.000560 fsync(21"), "daemon's directory"),
    (("101 1000.000700 fsync(22", "101 1000.000905 fsync(22"), "removed"),
    (("101 1000.000610 ftruncate(22", "101 1000.000800 ftruncate(22"), "removed"),
], ids=["apply-before-record-fsync", "apply-before-dir-fsync", "retire-before-file-fsync",
        "write-after-file-fsync"])
def test_checker_catches_a_journal_out_of_order(change: tuple[str, str], words: str) -> None:
    text = JOURNAL_COMMIT.replace(*change)
    assert text != JOURNAL_COMMIT
    n, problems = journal_violations(checked(text), "/s/.atomicfs", "/s/f")
    assert n == 1 and len(problems) == 1 and words in problems[0], problems


def test_checker_catches_a_journalled_commit_after_the_return() -> None:
    op = WriterOp("/s/f", "fsync", 1000.0, 1000.00055)  # before the in-place writes
    problems = journal_writer_violations(checked(JOURNAL_COMMIT), "/s/.atomicfs", "/s/f", [op])
    assert len(problems) == 1 and "written in place" in problems[0], problems
    op = WriterOp("/s/f", "fsync", 1000.0, 1000.00029)  # before the record's fsync ended
    problems = journal_writer_violations(checked(JOURNAL_COMMIT), "/s/.atomicfs", "/s/f", [op])
    assert len(problems) == 1 and "record was fsync-ed" in problems[0], problems
