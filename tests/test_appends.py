"""Append sessions (logs) through a real mount: docs/semantics.md §10.

A logger holds its file open and appends (tests/appendkit.py).  Under the
default options its appends are committed in steps (checkpoints): ``tail -F``
sees them within one interval, log rotation loses no line, concurrent
appenders keep their lines whole, and a crash of the daemon loses at most the
last interval.  Sessions that are not appends are never committed part way.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import scratchfs
from appendkit import Logger, line, lines_of, parse
from conftest import Mount, MountFactory, needs_root, run_cli
from sessionkit import assert_no_debris, status_of, wait_for

CHECKPOINT = 5.0  # the default checkpoint= interval
SLACK = 2.0  # tail's own polling, a loaded 2-core machine


def read_via_mount(m: Mount, name: str) -> bytes:
    """A reader's open through the mount (isolated: it reads committed versions)."""
    return m.path(name).read_bytes()


# -- readers ---------------------------------------------------------------------------
def test_tail_follows_a_held_open_log(mount: Mount) -> None:
    """tail -F started after the logger sees each line within one checkpoint interval,
    while the logger keeps the file open."""
    log = mount.path("app.log")
    logger = Logger(log)
    tail = None
    try:
        logger.write(5)
        tail = subprocess.Popen(["tail", "-F", "-n", "+1", "-s", "0.2", str(log)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        seen: list[tuple[float, bytes]] = []

        def collect() -> None:
            assert tail is not None and tail.stdout is not None
            for raw in tail.stdout:
                seen.append((time.time(), raw))

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        logger.write(40, every=0.2)  # 8 s of lines, the file held open throughout
        assert wait_for(lambda: len(seen) >= 45, timeout=CHECKPOINT + SLACK), \
            f"tail -F saw {len(seen)} of 45 lines within {CHECKPOINT + SLACK}s of the last"
        got = [lines_of(raw)[0] for _, raw in seen]
        assert [seq for _, seq, _ in got] == list(range(45))
        late = [(seq, round(at - written, 2)) for (at, _), (_, seq, written) in zip(seen, got,
                                                                                   strict=True)
                if at - written > CHECKPOINT + SLACK]
        assert not late, f"lines seen later than one interval after their write: {late}"
        assert logger.proc.poll() is None  # still holding it
    finally:
        if tail is not None:
            tail.kill()
            tail.wait()
        logger.close()


def test_reader_open_sees_every_append_before_it(mount: Mount) -> None:
    """A reader's open checkpoints the log first: it reads every line appended before
    it opened, and only whole lines; the committed file in SOURCE has them too."""
    logger = Logger(mount.path("app.log"))
    try:
        for n in (1, 10, 100):
            logger.write(n)
            data = read_via_mount(mount, "app.log")
            assert parse(data) == list(range(len(parse(data))))
            assert len(parse(data)) == {1: 1, 10: 11, 100: 111}[n]
            assert mount.src("app.log").read_bytes() == data
        st = status_of(mount.mountpoint)["sessions"][0]
        assert st["append"] is True and st["checkpoints"] == 3, st
    finally:
        logger.close()
    assert parse(mount.src("app.log").read_bytes()) == list(range(111))


@pytest.mark.mount_options("checkpoint=3600")
def test_unmount_keeps_a_held_logs_appends(mount: Mount) -> None:
    """SIGTERM while a logger holds its log: the unmount makes a last checkpoint (a
    rewrite held open would be dropped)."""
    logger = Logger(mount.path("app.log"))
    try:
        logger.write(20)
        assert mount.proc is not None
        mount.proc.send_signal(signal.SIGTERM)
        assert mount.proc.wait(timeout=30) == 0
        mount.proc = None
    finally:
        logger.kill()
    assert parse(mount.src("app.log").read_bytes()) == list(range(20))
    assert "checkpoint of" not in mount.log()  # no failure logged


def test_closing_a_large_append_commits_in_place(mount_factory: MountFactory,
                                                 tmp_path: Path) -> None:
    """`cat more >> f` of a large append onto a large file (over APPEND_MIN: 1 MiB
    here by the test knob, 8 MiB by default): its close commits by appending in place
    (the file in SOURCE stays the same inode, its content is not copied), and so does
    an fsync; a small append goes the usual way (here a copy: the file is under
    commit=auto's journal threshold)."""
    mount = mount_factory(env={"ATOMICFS_APPEND_MIN": str(1 << 20)})
    big = b"".join(line("L", n) for n in range(30000))  # ~2.4 MiB
    mount.path("big.log").write_bytes(big)
    ino = os.stat(mount.src("big.log")).st_ino
    more = b"".join(line("L", n) for n in range(30000, 45000))  # ~1.2 MiB
    (tmp_path / "more").write_bytes(more)
    subprocess.run(["sh", "-c", f"cat '{tmp_path / 'more'}' >> '{mount.path('big.log')}'"],
                   check=True, timeout=60)
    assert mount.src("big.log").read_bytes() == big + more
    fd = os.open(mount.path("big.log"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"".join(line("L", n) for n in range(45000, 60000)))
        os.fsync(fd)
        assert parse(mount.src("big.log").read_bytes()) == list(range(60000))
        assert os.stat(mount.src("big.log")).st_ino == ino
        os.write(fd, line("L", 60000))
    finally:
        os.close(fd)
    assert parse(mount.src("big.log").read_bytes()) == list(range(60001))
    commits = status_of(mount.mountpoint)["commits"]
    assert commits.get("append") == 2, commits
    assert (commits["new"], commits["rename"]) == (1, 1), commits  # the first, the last line


@pytest.mark.mount_options("checkpoint=0.2")
def test_an_unlinked_log_is_not_checkpointed(mount: Mount) -> None:
    """rm of a log its logger still holds: its appends go nowhere, quietly (no
    failure, no spin: the timer comes back one interval later)."""
    logger = Logger(mount.path("app.log"))
    try:
        logger.write(3)
        assert wait_for(lambda: mount.src("app.log").exists(), timeout=5)
        os.unlink(mount.path("app.log"))
        logger.write(3, every=0.2)
        time.sleep(1)
        doc = status_of(mount.mountpoint)
        assert doc["checkpoints"]["failed"] == 0, doc["checkpoints"]
        assert [s["checkpoints"] for s in doc["sessions"]] == [1], doc["sessions"]
    finally:
        logger.close()
    assert not mount.src("app.log").exists()
    assert "WARNING" not in mount.log()


# -- rotation --------------------------------------------------------------------------
def logrotate(tmp_path: Path, body: str) -> None:
    conf = tmp_path / "logrotate.conf"
    conf.write_text(body)
    conf.chmod(0o644)
    res = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"),
                          str(conf)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"logrotate failed: {res.stderr}"


def assert_rotated(rotated: bytes, current: bytes) -> None:
    """The first 100 lines went to log.1, the next 100 to log: none lost or doubled."""
    assert parse(rotated) == list(range(100))
    assert parse(current) == list(range(100, 200))


@pytest.mark.parametrize("how", ["logrotate", "cp-and-truncate"])
def test_copytruncate_loses_no_line(mount: Mount, tmp_path: Path, how: str) -> None:
    """logrotate's copytruncate (and its shell form, `cp log log.1 && : > log`, whose
    O_TRUNC open joins the logger's session) while the logger holds the log open.

    The logger pauses around the rotation: lines written between the copy and the
    truncation are lost on any filesystem (the copytruncate race); every other line
    must be in log.1 or in log."""
    log = mount.path("app.log")
    logger = Logger(log)
    try:
        logger.write(100)
        if how == "logrotate":
            logrotate(tmp_path, f"{log} {{\n  copytruncate\n  rotate 1\n  missingok\n}}\n")
        else:
            subprocess.run(["sh", "-c", f"cp '{log}' '{log}.1' && : > '{log}'"], check=True,
                           timeout=60)
        logger.write(100)
        # while the logger still holds it: log.1 has the first part, log the second
        assert_rotated(read_via_mount(mount, "app.log.1"), read_via_mount(mount, "app.log"))
    finally:
        logger.close()
    assert_rotated(mount.src("app.log.1").read_bytes(), mount.src("app.log").read_bytes())


def test_create_rotation_with_sighup_loses_no_line(mount: Mount, tmp_path: Path) -> None:
    """logrotate's create mode: log renamed to log.1 while the logger holds it, a new
    log created, the logger told by SIGHUP to reopen."""
    log = mount.path("app.log")
    logger = Logger(log)
    try:
        logger.write(100)
        logrotate(tmp_path, f"{log} {{\n  create 0644\n  rotate 1\n  postrotate\n"
                            f"    kill -HUP {logger.pid}\n  endscript\n}}\n")
        logger.write(100)  # reopens first
        assert_rotated(read_via_mount(mount, "app.log.1"), read_via_mount(mount, "app.log"))
    finally:
        logger.close()
    assert_rotated(mount.src("app.log.1").read_bytes(), mount.src("app.log").read_bytes())


# -- concurrent appenders, large writes ------------------------------------------------------
def test_concurrent_appenders_keep_lines_whole(mount: Mount) -> None:
    """Four processes append with O_APPEND at once, holding the file open: every
    checkpoint holds whole lines only, each writer's lines in its order, and all of
    them are committed within one interval while the writers still hold the file."""
    loggers = [Logger(mount.path("shared.log"), tag) for tag in "ABCD"]
    try:
        for lg in loggers:
            lg.write(150, every=0.02, wait=False)
        samples = 0
        while any(lg.proc.poll() is None for lg in loggers) and samples < 150:
            found = lines_of(read_via_mount(mount, "shared.log"))  # asserts whole lines
            for tag in "ABCD":
                seqs = [seq for t, seq, _ in found if t == tag]
                assert seqs == list(range(len(seqs))), f"{tag}'s lines out of order or lost"
            samples += 1
            if len(found) == 600:
                break
            time.sleep(0.1)
        for lg in loggers:
            lg.done()
        # every line committed while the four still hold the file open (no reader opens)
        assert wait_for(lambda: len(lines_of(mount.src("shared.log").read_bytes())) == 600,
                        timeout=CHECKPOINT + SLACK)
    finally:
        for lg in loggers:
            lg.close()
    found = lines_of(mount.src("shared.log").read_bytes())
    assert sorted((t, s) for t, s, _ in found) == [(t, s) for t in "ABCD" for s in range(150)]


BIG_WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for n, size in enumerate(int(a) for a in sys.argv[2:]):
    head = b"R %d %d " % (n, size)
    os.write(fd, head + b"x" * (size - len(head) - 1) + b"\\n")  # one write() each
print("written", flush=True)
sys.stdin.readline()
os.close(fd)
"""


def records(data: bytes) -> list[int]:
    """Sizes of the whole records in ``data``; asserts none is torn."""
    sizes = []
    for rec in data.split(b"\n")[:-1]:
        _, n, size, fill = rec.split(b" ")
        assert len(rec) + 1 == int(size) and fill == b"x" * len(fill), f"torn record {n!r}"
        sizes.append(int(size))
    assert data.endswith(b"\n") or not data, "the data ends inside a record"
    return sizes


@pytest.mark.mount_options("checkpoint_bytes=1M")
def test_checkpoint_never_splits_a_large_write(mount: Mount) -> None:
    """write()s larger than a FUSE request (1 MiB) arrive as several WRITE requests;
    checkpoints by size (checkpoint_bytes=1M) still end only at write() boundaries,
    including writes whose last request ends on a page boundary."""
    mib = 1 << 20
    # 2 MiB from offset 0: two full requests, the last ending on a page (taken as whole
    # at the next write); the last record ends on a MiB: taken as whole when alone 1 s
    sizes = [2 * mib, 3 * mib // 2 + 123, 3 * mib + 4001, mib, 5 * mib // 2 + 7]
    sizes.append(-(-(sum(sizes) + 2 * mib) // mib) * mib - sum(sizes))
    writer = subprocess.Popen([sys.executable, "-c", BIG_WRITER, str(mount.path("big.log")),
                               *map(str, sizes)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "written"
        # each size is over checkpoint_bytes: all are committed, the page-aligned last
        # one once it has been alone for a second, while the writer holds the file
        assert wait_for(lambda: os.path.getsize(mount.src("big.log")) == sum(sizes),
                        timeout=CHECKPOINT - 1)
        assert records(mount.src("big.log").read_bytes()) == sizes
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert records(mount.src("big.log").read_bytes()) == sizes


@pytest.mark.mount_options("checkpoint_bytes=1", "debug")
def test_checkpoints_fall_on_write_boundaries(mount: Mount) -> None:
    """A checkpoint after every write (checkpoint_bytes=1): each one ends where a
    line ends, also for lines that cross a page, which the kernel sends as two
    requests (the first ending on the page boundary)."""
    logger = Logger(mount.path("app.log"))
    try:
        logger.write(600)
        data = read_via_mount(mount, "app.log")
    finally:
        logger.close()
    ends, pos = set(), 0
    for raw in data.splitlines(keepends=True):
        pos += len(raw)
        ends.add(pos)
    assert len(ends) == 600
    sizes = [int(x) for x in re.findall(r"checkpoint of inode \d+: \d+ bytes appended, "
                                        r"size (\d+)", mount.log())]
    assert len(sizes) > 300, f"only {len(sizes)} checkpoints"
    cut = sorted(set(sizes) - ends)
    assert not cut, f"checkpoints inside a line, at sizes {cut[:10]}"


# -- crashes ---------------------------------------------------------------------------
def test_daemon_kill_loses_at_most_one_interval(mount_factory: MountFactory) -> None:
    """kill -9 of the daemon during a long append: SOURCE keeps a prefix of the lines,
    all whole, up to at most one checkpoint interval before the crash."""
    m = mount_factory()
    logger = Logger(m.path("app.log"))
    try:
        logger.write(5000, every=0.01, wait=False)  # ~10 s+ of lines; killed before the end
        time.sleep(2 * CHECKPOINT + 1)
        killed_at = time.time()
        m.kill()
    finally:
        logger.kill()
    found = lines_of(m.src("app.log").read_bytes())
    assert [s for _, s, _ in found] == list(range(len(found)))
    assert found, "nothing of the log survived the crash"
    lost_for = killed_at - found[-1][2]
    print(f"kill -9: {len(found)} lines kept, the last written {lost_for:.2f}s before")
    assert lost_for <= CHECKPOINT + SLACK, \
        f"the last line kept was written {lost_for:.1f}s before the crash"
    m.start()
    assert lines_of(read_via_mount(m, "app.log")) == found
    assert_no_debris(m.source)


GOINGDOWN = 0x8004587D  # XFS_IOC_GOINGDOWN == EXT4_IOC_SHUTDOWN
NOLOGFLUSH = 2


@needs_root
def test_power_cut_during_a_long_append_loses_at_most_one_interval(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """A power cut (ext4 shut down without flushing its log) during a long append:
    after the filesystem's recovery and the daemon's, the log is a prefix of the
    lines, all whole, up to at most one interval before the cut (checkpoint=1)."""
    image, point = tmp_path / "ext4.img", tmp_path / "fs"
    interval = 1.0
    with scratchfs.loop_fs(image, point, ["mkfs.ext4", "-q", "-F"]):
        (point / "src").mkdir()
        m = mount_factory(source=point / "src", options=[f"checkpoint={interval:g}"])
        logger = Logger(m.path("app.log"))
        try:
            logger.write(5000, every=0.005, wait=False)
            time.sleep(4 * interval + 0.5)
            fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.ioctl(fd, GOINGDOWN, struct.pack("I", NOLOGFLUSH))
            finally:
                os.close(fd)
            cut_at = time.time()
        finally:
            logger.kill()
            m.kill()
    res = scratchfs.sh("mount", "-o", "loop", str(image), str(point))  # the disk's recovery
    assert res.returncode == 0, res.stderr
    try:
        m.start()  # the daemon's recovery
        found = lines_of(m.src("app.log").read_bytes())
        assert [s for _, s, _ in found] == list(range(len(found)))
        assert found, "nothing of the log survived the power cut"
        print(f"power cut: {len(found)} lines kept, the last written "
              f"{cut_at - found[-1][2]:.2f}s before; recovery: {m.log().count('undid')} undone")
        assert cut_at - found[-1][2] <= interval + SLACK, \
            f"the last line kept was written {cut_at - found[-1][2]:.1f}s before the cut"
        assert lines_of(read_via_mount(m, "app.log")) == found
        m.unmount()
        assert_no_debris(m.source)
    finally:
        m.force_cleanup()
        scratchfs.unmount(point)
        for dev in scratchfs.loop_devices_of(image):
            scratchfs.sh("losetup", "-d", dev)


@pytest.mark.parametrize(("point", "recovered"), [
    ("append.after_record", "had not grown"),
    ("append.after_copy", "undid an unfinished checkpoint"),
    ("append.before_fsync", "undid an unfinished checkpoint"),
    ("append.before_retire", "undid an unfinished checkpoint"),
])
def test_crash_inside_a_checkpoint(mount_factory: MountFactory, point: str,
                                   recovered: str) -> None:
    """A crash at each step of a checkpoint: after recovery the log is its last
    checkpoint, byte for byte, and recovery says it undid the one in progress."""
    m = mount_factory(env={"ATOMICFS_FAULTS": f"exit:{point}"}, options=["checkpoint=3600"])
    m.path("app.log").write_bytes(b"".join(line("L", n) for n in range(3)))
    before = m.src("app.log").read_bytes()
    logger = Logger(m.path("app.log"))
    try:
        logger.ask("w 5 0")  # lines 0..4 again: the file's content is checked, not the seqs
        with pytest.raises(OSError):  # the reader's open checkpoints: the daemon dies
            read_via_mount(m, "app.log")
    finally:
        logger.kill()
    m.kill()
    m.env = None
    m.start()
    assert read_via_mount(m, "app.log") == before
    assert m.src("app.log").read_bytes() == before
    recoveries = status_of(m.mountpoint)["recoveries"]
    assert any(recovered in r for r in recoveries), recoveries
    assert_no_debris(m.source)


# -- sessions that are not logs --------------------------------------------------------
HOLDER = """
import os, sys
d = sys.argv[1]
fds = []
fd = os.open(d + "/data", os.O_RDWR); os.pwrite(fd, b"B" * 10, 0)   # an overwrite
os.pwrite(fd, b"tail\\n", os.fstat(fd).st_size); fds.append(fd)
fd = os.open(d + "/empty", os.O_WRONLY | os.O_TRUNC); os.write(fd, b"cmd > f\\n"); fds.append(fd)
fd = os.open(d + "/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644); os.write(fd, b"n\\n")
fds.append(fd)
fd = os.open(d + "/log", os.O_WRONLY | os.O_APPEND); os.write(fd, b"appended\\n"); fds.append(fd)
print("ready", flush=True)
sys.stdin.readline()
"""


def test_rewrites_are_never_checkpointed(mount_factory: MountFactory) -> None:
    """An overwrite, an O_TRUNC rewrite of an empty file and a new file written the
    ordinary way stay uncommitted while held open, whatever the readers and the
    timer; a log beside them is checkpointed.  `atomicfs status` says which is which
    and how old each session is; the daemon warns once of each long rewrite."""
    m = mount_factory(options=["checkpoint=0.2"], env={"ATOMICFS_LONG_SESSION": "1"})
    m.path("data").write_bytes(b"A" * 100)
    m.path("empty").write_bytes(b"")
    m.path("log").write_bytes(b"first\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(m.mountpoint)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        time.sleep(2.5)  # many checkpoint intervals, past the long-session threshold
        assert read_via_mount(m, "data") == b"A" * 100
        assert read_via_mount(m, "empty") == b""
        assert read_via_mount(m, "new") == b""
        assert not m.src("new").exists()
        assert m.src("log").read_bytes() == b"first\nappended\n"  # by the timer
        sessions = {s["path"]: s for s in status_of(m.mountpoint)["sessions"]}
        assert {p: s["append"] for p, s in sessions.items()} == \
            {"/data": False, "/empty": False, "/new": False, "/log": True}
        assert all(s["age_s"] >= 2.5 for s in sessions.values()), sessions
        text = run_cli(["status", str(m.mountpoint)]).stdout
        assert "rewrite" in text and "append (1 checkpoints)" in text, text
        for name in ("data", "empty", "new"):
            warned = [ln for ln in m.log().splitlines()
                      if f"/{name}: a write session open for" in ln]
            assert len(warned) == 1, f"{name}: {warned}"
        assert "/log: a write session open for" not in m.log()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    assert m.src("data").read_bytes() == b"B" * 10 + b"A" * 90 + b"tail\n"
    assert m.src("empty").read_bytes() == b"cmd > f\n"
    assert m.src("new").read_bytes() == b"n\n"
