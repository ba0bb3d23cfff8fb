"""Crashes of the daemon at the worst moment, then a remount: docs/semantics.md §1.2-1.4, §7.

A crash is either ``Mount.kill()`` (kill -9 of the daemon, lazy detach of the
dead mount) while a program is in the middle of writing, or an exact step of a
commit reached with ``ATOMICFS_FAULTS=exit:POINT`` (the daemon ends with
os._exit there).  After each crash the test checks the *source tree* directly,
then remounts the same source and checks through the mount, and checks that no
debris of the daemon is left (recovery at mount).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mount, MountFactory
from sessionkit import (
    NEW,
    OLD,
    TIMEOUT,
    TOOL_IDS,
    TOOLS,
    Tool,
    assert_no_debris,
    debris,
    kill_group,
    make_source,
    user_entries,
    wait_for,
)


def remount(m: Mount) -> None:
    """Start the daemon again on the same directories, without fault injection."""
    m.env = None
    m.start()


def assert_untouched(m: Mount, name: str, before: os.stat_result, content: bytes) -> None:
    st = os.stat(m.src(name))
    assert m.src(name).read_bytes() == content, \
        f"SOURCE/{name} changed: {m.src(name).read_bytes()[:60]!r}..."
    assert (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode) == \
        (before.st_ino, before.st_size, before.st_mtime_ns, before.st_mode), \
        f"SOURCE/{name}: the committed version's inode, size, mtime or mode changed"


# -- `cmd > f` while cmd still runs --------------------------------------------------
REDIRECT_CASES = [
    pytest.param("echo part1; sleep 30; echo part2", id="builtins"),
    pytest.param("echo part1; /bin/true; sleep 30; echo part2", id="external-cmd-exits"),
    pytest.param("echo part1; /bin/echo part1b; sleep 30; echo part2", id="external-cmd-writes",
                 marks=pytest.mark.xfail(strict=True, reason=(
                     "LIMIT (docs/semantics.md §1.3, docs/verification.md): pyfuse3's flush "
                     "gets no pid, so the exit of a "
                     "child that wrote something (here /bin/echo, sharing the subshell's "
                     "descriptor) stays a commit point: it may have written the file, and "
                     "its close must get the commit's error (§2.1). 'part1 part1b' is "
                     "committed and a crash then leaves a half-written file."))),
]


@pytest.mark.parametrize("script", REDIRECT_CASES)
def test_crash_while_shell_redirect_runs(mount_factory: MountFactory, tmp_path: Path,
                                         script: str) -> None:
    m = mount_factory(source=make_source(tmp_path, {"f": OLD}))
    before = os.stat(m.src("f"))
    shell = subprocess.Popen(["sh", "-c", f'({script}) > "$1"', "sh", str(m.path("f"))],
                             start_new_session=True, stdin=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: os.stat(m.path("f")).st_size >= 6, timeout=5), \
            "the shell's first write never reached the daemon"
        time.sleep(0.3)  # whatever else the shell does before `sleep` runs (a wrong commit)
        assert m.path("f").read_bytes() == OLD, \
            "a reader through the mount sees the unfinished output"
        assert_untouched(m, "f", before, OLD)
        m.kill()
        assert_untouched(m, "f", before, OLD)
    finally:
        kill_group(shell)
    remount(m)
    assert m.path("f").read_bytes() == OLD, "after the crash and remount f is not the old version"
    assert user_entries(m.source) == ["f"], f"debris in SOURCE: {user_entries(m.source)}"
    assert os.listdir(m.src(".atomicfs")) == [], "SOURCE/.atomicfs is not empty after recovery"
    assert_no_debris(m.source)


# -- open(O_TRUNC), a partial write, crash ---------------------------------------------
def test_crash_after_trunc_and_partial_write(mount_factory: MountFactory, tmp_path: Path) -> None:
    m = mount_factory(source=make_source(tmp_path, {"f": OLD}))
    before = os.stat(m.src("f"))
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, NEW[: len(NEW) // 3])
        m.kill()
    finally:
        with contextlib.suppress(OSError):  # the mount is gone: ENOTCONN and the like
            os.close(fd)
    assert_untouched(m, "f", before, OLD)
    remount(m)
    assert m.path("f").read_bytes() == OLD
    assert user_entries(m.source) == ["f"]
    assert_no_debris(m.source)


# -- a new file being written, crash ---------------------------------------------------
def test_crash_while_new_file_written(mount_factory: MountFactory, tmp_path: Path) -> None:
    m = mount_factory(source=make_source(tmp_path, {"keep": OLD}))
    os.mkdir(m.path("sub"))
    fds = []
    try:
        for p in (m.path("new"), m.path("sub", "new")):
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            fds.append(fd)
            os.write(fd, NEW * 10)
        assert os.path.exists(m.path("new")), "the new file is not visible through the mount"
        m.kill()
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    assert user_entries(m.source) == ["keep", "sub"], \
        f"a new file that never reached a commit exists after the crash: {user_entries(m.source)}"
    assert os.listdir(m.src("sub")) == []
    remount(m)
    assert sorted(os.listdir(m.mountpoint)) == ["keep", "sub"]
    assert os.listdir(m.path("sub")) == []
    assert m.path("keep").read_bytes() == OLD
    assert_no_debris(m.source)


# -- write, fsync, more writes, crash ----------------------------------------------------
@pytest.mark.parametrize("existing", [True, False], ids=["existing-file", "new-file"])
def test_crash_after_fsync_keeps_fsynced_content(mount_factory: MountFactory, tmp_path: Path,
                                                 existing: bool) -> None:
    m = mount_factory(source=make_source(tmp_path, {"f": OLD} if existing else {}))
    flags = os.O_WRONLY | os.O_TRUNC | (0 if existing else os.O_CREAT | os.O_EXCL)
    fd = os.open(m.path("f"), flags, 0o644)
    try:
        os.write(fd, b"synced part\n")
        os.fsync(fd)
        assert m.src("f").read_bytes() == b"synced part\n", "fsync() did not commit"
        os.write(fd, b"unsynced part\n" * 100)
        os.pwrite(fd, b"OVERWRITE", 0)
        m.kill()
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert m.src("f").read_bytes() == b"synced part\n", \
        "after the crash the source does not hold exactly the fsync'ed content"
    remount(m)
    assert m.path("f").read_bytes() == b"synced part\n"
    assert user_entries(m.source) == ["f"]
    assert_no_debris(m.source)


# -- ordinary programs, the daemon dying at a step of the commit -----------------------
POINTS = ["commit.after_fsync", "commit.after_link", "commit.after_rename"]


def crash_outcome(tool: Tool, point: str) -> tuple[bool, bytes | None]:
    """(does the daemon reach ``point``, the target's content afterwards; None: absent)."""
    if tool.kind == "rewrite":  # a rename commit of the target itself
        return True, tool.expected if point == "commit.after_rename" else OLD
    if tool.kind == "temp+rename":  # sed: publication of its temporary file, then rename(2)
        if point == "commit.after_rename":
            return False, tool.expected  # a new file is published by link, never renamed
        return True, OLD  # sed sees close() fail and never renames
    # unlink+create (tar): the old file is gone before the new one is created
    if point == "commit.after_rename":
        return False, tool.expected
    return True, (tool.expected if point == "commit.after_link" else None)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("tool", TOOLS, ids=TOOL_IDS)
def test_crash_inside_commit(mount_factory: MountFactory, tmp_path: Path, tool: Tool,
                             point: str) -> None:
    src = make_source(tmp_path, {"dir/f": OLD})
    work = tmp_path / "work"
    work.mkdir()
    m = mount_factory(source=src, env={"ATOMICFS_FAULTS": f"exit:{point}"})
    dies, want = crash_outcome(tool, point)
    proc = m.proc
    assert proc is not None
    res = tool.go(m.path("dir", "f"), work)
    if dies:
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{tool.name}: the daemon did not reach {point}")
        assert code == 99, f"the daemon ended with {code}, not at the injected fault"
        assert res.returncode != 0, f"{tool.name} succeeded although the daemon died in " \
            "the commit its close() waited for"
    else:
        assert proc.poll() is None, f"{tool.name}: the daemon died, though no commit of this " \
            f"kind passes {point}"
        assert res.returncode == 0, res.stderr.decode(errors="replace")
    m.kill()

    def check(where: str, d: Path) -> None:
        target = d / "f"
        if want is None:
            assert not target.exists(), f"{where}: a half-made file exists after the crash"
        else:
            assert target.exists(), f"{where}: f is missing after a crash at {point}"
            got = target.read_bytes()
            label = "the old" if want == OLD else "the new"
            assert got == want, f"{where}: after a crash at {point}, f is not {label} " \
                f"version ({len(got)} bytes, starts {got[:40]!r})"
        for name in os.listdir(d):
            if name != "f":  # only a tool's own temporary file, and only complete
                assert tool.kind == "temp+rename" and name.startswith("sed"), \
                    f"{where}: unexpected name {name!r} after the crash"
                assert (d / name).read_bytes() == tool.expected, \
                    f"{where}: {name} is a partial file"

    check("source after the crash", m.src("dir"))
    if dies and tool.kind == "rewrite" and point == "commit.after_link":
        # the crash fell between link and rename: recovery has something to resolve
        assert debris(m.source), "no commit leftover in SOURCE/.atomicfs after a crash " \
            "between the link and the rename (did the fault point move?)"
    remount(m)
    check("source after recovery", m.src("dir"))
    check("mount after recovery", m.path("dir"))
    assert user_entries(m.source) == ["dir"]
    assert_no_debris(m.source)
    m.unmount()
    assert not m.src(".atomicfs").exists(), "SOURCE/.atomicfs remains after a clean unmount"
    assert_no_debris(m.source)


# -- recovery of staged debris ---------------------------------------------------------------
def test_recovery_removes_staged_debris(mount_factory: MountFactory, tmp_path: Path) -> None:
    src = make_source(tmp_path, {"f": OLD})
    (src / ".atomicfs").mkdir(mode=0o700)
    (src / ".atomicfs" / "commit-deadbeef").write_bytes(NEW)
    m = mount_factory(source=src)
    assert os.listdir(src / ".atomicfs") == [], \
        f"recovery at mount left {os.listdir(src / '.atomicfs')}"
    assert m.path("f").read_bytes() == OLD, "recovery changed a committed file"
    assert os.listdir(m.mountpoint) == ["f"], "the daemon's directory is visible"
    assert "commit-deadbeef" in m.log(), "recovery did not report what it removed"
    m.unmount()
    assert os.listdir(src) == ["f"], f"a clean unmount left {os.listdir(src)}"
    assert (src / "f").read_bytes() == OLD


# -- §1.3: a writer that dies mid-write ---------------------------------------------------
WRITER = r'''
import os, sys, time
path, mode = sys.argv[1], sys.argv[2]
flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if mode == "new" else os.O_TRUNC)
fd = os.open(path, flags, 0o644)
os.write(fd, b"partial")
if mode == "exec":  # run a command meanwhile: its exec closes the inherited descriptor
    os.set_inheritable(fd, False)
    import subprocess
    subprocess.run(["/bin/true"], check=True)
    os.write(fd, b" more")
print("written", flush=True)
if mode == "exit":
    os._exit(0)  # an exit, not a death: the kernel closes the descriptor
time.sleep(60)
'''


@pytest.mark.parametrize("mode", ["trunc", "new", "exec"])
def test_writer_killed_mid_write_commits_nothing(mount_factory: MountFactory, tmp_path: Path,
                                                 mode: str) -> None:
    m = mount_factory(source=make_source(tmp_path, {"f": OLD}))
    before = os.stat(m.src("f"))
    name = "n" if mode == "new" else "f"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(m.path(name)), mode],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"written\n"
        if mode == "exec":  # the child's exec was no commit point
            assert_untouched(m, "f", before, OLD)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        kill_group(proc)
    assert wait_for(lambda: "killed by signal 9" in m.log()), \
        "no warning that the writer was killed before closing"
    assert_untouched(m, "f", before, OLD)
    assert wait_for(lambda: m.path("f").read_bytes() == OLD), "the mount shows dropped data"
    assert user_entries(m.source) == ["f"], f"a killed writer's new file exists: " \
        f"{user_entries(m.source)}"
    assert wait_for(lambda: not m.path("n").exists()), "the mount still shows the dropped file"
    m.kill()
    remount(m)
    assert m.path("f").read_bytes() == OLD
    assert_no_debris(m.source)


def test_writer_that_exits_without_close_commits(mount_factory: MountFactory,
                                                 tmp_path: Path) -> None:
    """The contrast: exit(0) without close() is the program's choice; it commits."""
    m = mount_factory(source=make_source(tmp_path, {"f": OLD}))
    proc = subprocess.run([sys.executable, "-c", WRITER, str(m.path("f")), "exit"],
                          capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert wait_for(lambda: m.src("f").read_bytes() == b"partial"), \
        f"not committed at exit: {m.src('f').read_bytes()!r}"
