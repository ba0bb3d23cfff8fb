"""More programs and failures through a mount with the default options.

Each test drives an unmodified program (a shell, coreutils, python) the way a
user's machine does, and checks what docs/semantics.md promises for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mount, MountFactory, mounted_fstype, run_cli
from sessionkit import (
    OLD,
    TIMEOUT,
    assert_no_debris,
    kill_group,
    make_source,
    status_of,
    wait_for,
)

# A shell script writing a file line by line through a descriptor it keeps open
# (exec 3>FILE), each line by a builtin redirected to it (echo ... >&3).  For each
# such command the shell saves its stdout, dup2()s 3 onto it, writes, and restores
# stdout: the restore closes a descriptor right after a write through it.
FD3_SCRIPT = ('exec 3>"$1"; echo a=1 >&3; printf "%s\\n" b=2 >&3; cat "$1" > "$2"; '
              'sleep 30')


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/bootstrap.sh installs them)")


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_a_shell_writing_through_a_descriptor_it_keeps_commits_at_each_command(
        mount_factory: MountFactory, tmp_path: Path, shell: str) -> None:
    """docs/semantics.md §2: a close after writing commits before it returns, also
    the close of a copy of a descriptor the process still holds (the shell's
    restore of its stdout after ``echo x >&3``); a process started after it (the
    script's ``cat``) reads what it committed (close-to-open), as on ext4."""
    m = mount_factory(source=make_source(tmp_path, {"f": OLD}))
    out = tmp_path / "seen-by-cat"
    proc = subprocess.Popen([shell, "-c", FD3_SCRIPT, shell, str(m.path("f")), str(out)],
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: out.exists() and out.stat().st_size > 0, timeout=10), \
            "the script's cat saw nothing"
        assert out.read_bytes() == b"a=1\nb=2\n"
        assert m.src("f").read_bytes() == b"a=1\nb=2\n"
    finally:
        kill_group(proc)
    # killed while it sleeps: what its closes committed stays, as on ext4
    assert wait_for(lambda: not status_of(m.mountpoint)["sessions"], timeout=5), \
        "the killed script's session never ended"
    assert m.src("f").read_bytes() == b"a=1\nb=2\n"
    assert_no_debris(m.source)


def test_a_killed_script_whose_child_lives_on_commits_nothing_the_child_did_not_write(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """docs/semantics.md §2 "Commit points": a shell killed by SIGKILL in the middle
    of writing a file, while a child it started (``sleep``) still holds the
    descriptor: the child's exit later is no commit point, the unfinished output is
    dropped.  A child that writes after the kill finishes the file (its close
    commits), as it would on any filesystem."""
    m = mount_factory(source=make_source(tmp_path, {"f": OLD, "g": OLD}))
    silent = subprocess.Popen(
        ["sh", "-c", '{ echo a=1; echo b=2; sleep 1.5; echo c=3; } > "$1"',
         "sh", str(m.path("f"))], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writing = subprocess.Popen(
        ["sh", "-c", '{ echo a=1; '
         '"$2" -c "import os, time; time.sleep(1.5); os.write(1, b\'b=2\\n\')"; '
         'echo c=3; } > "$1"', "sh", str(m.path("g")), sys.executable],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: os.stat(m.path("f")).st_size == 8
                        and os.stat(m.path("g")).st_size == 4, timeout=5), \
            "the scripts' first lines never reached the daemon"
        time.sleep(0.3)
        silent.kill()  # the shells only: their children live on, holding the descriptors
        writing.kill()
        silent.wait(timeout=TIMEOUT)
        writing.wait(timeout=TIMEOUT)
        assert m.src("f").read_bytes() == OLD and m.src("g").read_bytes() == OLD
        # sleep and python exit about 1.5 s later: then the sessions end
        assert wait_for(lambda: not status_of(m.mountpoint)["sessions"], timeout=10), \
            "the sessions never ended"
    finally:
        for proc in (silent, writing):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=TIMEOUT)
    assert m.src("f").read_bytes() == OLD, \
        "the killed script's unfinished output was committed when its child exited"
    assert m.path("f").read_bytes() == OLD
    assert m.src("g").read_bytes() == b"a=1\nb=2\n", \
        "a child that wrote after the kill did not finish the file"
    m.expect_log(r"WARNING .*/[fg]: the process writing it .* was killed by signal 9")
    assert_no_debris(m.source)


def test_the_daemon_directory_removed_beside_the_mount_is_made_again(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """docs/semantics.md §13: SOURCE/.atomicfs removed directly in SOURCE while the
    mount runs (``rm -rf``, ``git clean -fdx``, a cleaner of old files in /tmp):
    the next commit that needs it makes it again, instead of every rewrite failing
    with ENOENT until the next mount."""
    big = b"b" * (16 << 20)
    m = mount_factory(source=make_source(tmp_path, {"f": OLD, "big": big}))
    m.path("f").write_bytes(b"v0\n")
    shutil.rmtree(m.src(".atomicfs"))
    for i in range(1, 13):  # more than the shadows the pool had ready
        m.path("f").write_bytes(b"v%d\n" % i)  # raised ENOENT at close before
        assert m.src("f").read_bytes() == b"v%d\n" % i
    assert m.src(".atomicfs").is_dir()
    # a small change of a large file is journalled: its record goes there too
    shutil.rmtree(m.src(".atomicfs"))
    with open(m.path("big"), "r+b") as f:
        f.seek(1 << 20)
        f.write(b"J" * 4096)
    data = m.src("big").read_bytes()
    assert data[(1 << 20):(1 << 20) + 4096] == b"J" * 4096 and len(data) == len(big)
    assert status_of(m.mountpoint)["commits"]["journal"] == 1
    m.expect_log(r"WARNING .*\.atomicfs was removed")
    m.unmount()
    assert_no_debris(m.source)


def test_a_source_inside_or_around_a_mounted_source_is_refused(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """docs/semantics.md §13: two daemons on nested SOURCE trees would both commit
    the files of the inner one, and the inner one's SOURCE/.atomicfs (journal
    records of commits in flight) would show, and could be removed, through the
    outer mount.  Refused with one line, like a second mount of the same SOURCE."""
    outer = make_source(tmp_path, {"srv/app/conf": OLD, "srv/f": OLD}, name="top") / "srv"
    m = mount_factory(source=outer)
    (tmp_path / "mnt-in").mkdir()
    inner = run_cli(["mount", str(outer / "app"), str(tmp_path / "mnt-in")])
    (tmp_path / "mnt-out").mkdir()
    around = run_cli(["mount", str(tmp_path / "top"), str(tmp_path / "mnt-out")])
    for res in (inner, around):
        if res.returncode == 0:  # mounted after all: do not leave it behind
            run_cli(["umount", str(tmp_path / ("mnt-in" if res is inner else "mnt-out"))])
    assert inner.returncode != 0 and around.returncode != 0
    assert inner.stderr.count("\n") == 1 and "inside" in inner.stderr \
        and str(outer) in inner.stderr, inner.stderr
    assert around.stderr.count("\n") == 1 and "contains" in around.stderr, around.stderr
    assert mounted_fstype(tmp_path / "mnt-in") is None
    assert mounted_fstype(tmp_path / "mnt-out") is None
    assert not (outer / "app" / ".atomicfs").exists()
    assert m.path("app", "conf").read_bytes() == OLD


def test_a_shell_appending_to_a_log_through_a_descriptor_it_keeps_shows_each_line(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """docs/semantics.md §2, §10: for a log (only appended to), such a close commits
    the whole appends, as a checkpoint would: each line reaches SOURCE at once."""
    m = mount_factory(source=make_source(tmp_path, {"log": b"old\n"}))
    proc = subprocess.Popen(["bash", "-c", 'exec 3>>"$1"; echo l1 >&3; echo l2 >&3; sleep 30',
                             "bash", str(m.path("log"))], start_new_session=True,
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the checkpoint interval is 5 s: this is the close, not a checkpoint
        assert wait_for(lambda: m.src("log").read_bytes() == b"old\nl1\nl2\n", timeout=2.5), \
            f"SOURCE/log is {m.src('log').read_bytes()!r}"
    finally:
        kill_group(proc)
    m.expect_log(r"WARNING .*/log: the process writing it .* was killed by signal 9")


def test_known_limit_inode_flags_and_fallocate_are_refused_clearly(mount: Mount) -> None:
    """docs/semantics.md §13: pyfuse3 3.5 has no ioctl and no fallocate handler, so
    ``lsattr``/``chattr`` (FS_IOC_GETFLAGS) and ``fallocate(1)`` fail with EOPNOTSUPP
    and a clear message, changing nothing; glibc's ``posix_fallocate`` falls back to
    writing, so programs using it work."""
    need_tools("lsattr", "chattr", "fallocate")
    m = mount
    m.path("f").write_bytes(OLD)
    for argv in (["lsattr", str(m.path("f"))], ["chattr", "+i", str(m.path("f"))],
                 ["fallocate", "-l", "1M", str(m.path("f"))]):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                             stdin=subprocess.DEVNULL)
        assert res.returncode != 0 and "not supported" in res.stderr, (argv, res)
    assert m.src("f").read_bytes() == OLD and os.stat(m.path("f")).st_size == len(OLD)
    fd = os.open(m.path("g"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 100_000)
    finally:
        os.close(fd)
    assert m.src("g").read_bytes() == bytes(100_000)
