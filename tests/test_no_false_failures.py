"""No false failures: every commit logged or counted as failed is a real one.

A file that loses its last name before or while its commit runs (created and
unlinked without a write, a commit racing an unlink, a rename over it during the
commit) is simply gone, as on any filesystem: no warning in the daemon's log
(the fixtures fail a test on one) and no failed commit in ``atomicfs status``
(docs/semantics.md §2.5).  Slow commits are made with
``ATOMICFS_FAULTS=sleep:commit.after_fsync:S`` so the race is certain.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import Mount, MountFactory
from sessionkit import TIMEOUT, make_source, status_of, user_entries, wait_for

SLOW_COMMIT = {"ATOMICFS_FAULTS": "sleep:commit.after_fsync:0.6"}


def assert_no_failure(m: Mount) -> None:
    """No failed commit counted, no warning logged."""
    doc = status_of(m.mountpoint)
    assert doc["failures"] == {}, doc["failures"]
    assert "WARNING" not in m.log(), m.log()


def test_create_close_unlink_unwritten(mount_factory: MountFactory) -> None:
    """The issue's reproducer: each last-release commit of the new, empty file runs
    while (or after) the unlink removes its name."""
    m = mount_factory()
    script = ("import os\n"
              "for i in range(40):\n"
              "    fd = os.open('z', os.O_RDWR | os.O_CREAT, 0o600)\n"
              "    os.close(fd)\n"
              "    os.unlink('z')\n")
    subprocess.run(["python3", "-c", script], cwd=m.mountpoint, check=True, timeout=TIMEOUT)
    assert wait_for(lambda: not status_of(m.mountpoint)["sessions"], timeout=10)
    assert_no_failure(m)
    assert not os.path.exists(m.path("z"))
    m.unmount()
    assert user_entries(m.source) == []


def _close_in_thread(fd: int, outcome: list[object]) -> threading.Thread:
    def close() -> None:
        try:
            os.close(fd)
            outcome.append("closed")
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=close)
    thread.start()
    return thread


def _commit_running(mnt: Path) -> bool:
    return int(status_of(mnt)["commits_in_flight"]) == 1


@pytest.mark.parametrize("new_file", [True, False], ids=["new-file", "existing-file"])
def test_unlink_during_the_commit_at_close(mount_factory: MountFactory, tmp_path: Path,
                                           new_file: bool) -> None:
    src = make_source(tmp_path, {} if new_file else {"f": b"committed\n"})
    m = mount_factory(source=src, env=SLOW_COMMIT)
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"written, then unlinked while committed\n")
    outcome: list[object] = []
    thread = _close_in_thread(fd, outcome)
    assert wait_for(lambda: _commit_running(m.mountpoint), timeout=10)
    os.unlink(m.path("f"))
    thread.join(TIMEOUT)
    assert outcome == ["closed"]  # the file is gone: close() has nothing to report
    assert not os.path.exists(m.path("f"))
    assert_no_failure(m)
    m.unmount()
    assert user_entries(m.source) == []


def test_unlink_during_the_commit_at_last_release(mount_factory: MountFactory) -> None:
    """git's maintenance.lock: created, closed unwritten, unlinked while the commit of
    the new (empty) file at its last release is in flight."""
    m = mount_factory(env=SLOW_COMMIT)
    fd = os.open(m.path("maintenance.lock"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)  # no write: no commit at close; the last release commits the new file
    assert wait_for(lambda: _commit_running(m.mountpoint), timeout=10)
    os.unlink(m.path("maintenance.lock"))
    assert wait_for(lambda: status_of(m.mountpoint)["commits_in_flight"] == 0, timeout=10)
    assert wait_for(lambda: not status_of(m.mountpoint)["sessions"], timeout=10)
    assert not os.path.exists(m.path("maintenance.lock"))
    assert_no_failure(m)
    m.unmount()
    assert user_entries(m.source) == []


@pytest.mark.parametrize("new_file", [True, False], ids=["new-file", "existing-file"])
def test_rename_over_the_file_during_its_commit(mount_factory: MountFactory, tmp_path: Path,
                                                new_file: bool) -> None:
    """Another file renamed over the name being committed: the committing file lost its
    name, the renamed one stands."""
    files = {"other": b"the file renamed over it\n"}
    if not new_file:
        files["f"] = b"committed\n"
    m = mount_factory(source=make_source(tmp_path, files), env=SLOW_COMMIT)
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"replaced while committed\n")
    outcome: list[object] = []
    thread = _close_in_thread(fd, outcome)
    assert wait_for(lambda: _commit_running(m.mountpoint), timeout=10)
    os.rename(m.path("other"), m.path("f"))
    thread.join(TIMEOUT)
    assert outcome == ["closed"]
    assert m.path("f").read_bytes() == b"the file renamed over it\n"
    assert_no_failure(m)
    m.unmount()
    assert m.src("f").read_bytes() == b"the file renamed over it\n"
    assert user_entries(m.source) == ["f"]


@pytest.mark.parametrize("new_file", [True, False], ids=["new-file", "existing-file"])
def test_rename_of_the_file_during_its_commit(mount_factory: MountFactory, tmp_path: Path,
                                              new_file: bool) -> None:
    """The file itself renamed while its commit runs: the commit lands under the new
    name (a real commit, no failure)."""
    src = make_source(tmp_path, {} if new_file else {"f": b"committed\n"})
    m = mount_factory(source=src, env=SLOW_COMMIT)
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"renamed while committed\n")
    outcome: list[object] = []
    thread = _close_in_thread(fd, outcome)
    assert wait_for(lambda: _commit_running(m.mountpoint), timeout=10)
    os.rename(m.path("f"), m.path("g"))
    thread.join(TIMEOUT)
    assert outcome == ["closed"]
    assert m.path("g").read_bytes() == b"renamed while committed\n"
    assert_no_failure(m)
    m.unmount()
    assert m.src("g").read_bytes() == b"renamed while committed\n"
    assert user_entries(m.source) == ["g"]


def test_unlinked_file_still_open_keeps_its_content(mount_factory: MountFactory) -> None:
    """A commit dropped because the file lost its name leaves the session's content to
    the descriptors still open on it (a scratch file unlinked during its commit)."""
    m = mount_factory(env=SLOW_COMMIT)
    path = m.path("scratch")
    keep = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"scratch data\n")
        outcome: list[object] = []
        thread = _close_in_thread(fd, outcome)
        assert wait_for(lambda: _commit_running(m.mountpoint), timeout=10)
        os.unlink(path)
        thread.join(TIMEOUT)
        assert outcome == ["closed"]
        assert os.pread(keep, 100, 0) == b"scratch data\n"
    finally:
        os.close(keep)
    assert wait_for(lambda: not status_of(m.mountpoint)["sessions"], timeout=10)
    assert_no_failure(m)


@pytest.mark.parametrize("program", ["vim.tiny", "vim"])
def test_vim_saves_without_a_warning(mount_factory: MountFactory, program: str) -> None:
    """vim's swap file (created, written, unlinked at exit) and its save; the
    fixture fails the test on any warning in the daemon's log."""
    vim = shutil.which(program)
    if vim is None:
        pytest.skip(f"{program} is not installed (scripts/bootstrap.sh installs vim-tiny)")
    m = mount_factory()
    m.path("notes.txt").write_text("line one\nline two\n")
    for n in range(3):
        res = subprocess.run([vim, "-u", "NONE", "-N", "-es", "-c", f"%s/one/one {n}/",
                              "-c", "wq", "notes.txt"], cwd=m.mountpoint, timeout=TIMEOUT,
                             capture_output=True, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res
    assert m.path("notes.txt").read_text() == "line one 2 1 0\nline two\n"
    assert sorted(os.listdir(m.mountpoint)) == ["notes.txt"]  # no swap file left
    assert wait_for(lambda: not status_of(m.mountpoint)["sessions"], timeout=10)
    assert_no_failure(m)
    m.unmount()
    assert m.src("notes.txt").read_text() == "line one 2 1 0\nline two\n"


def test_git_commits_without_a_warning(mount_factory: MountFactory, tmp_path: Path) -> None:
    """git's maintenance.lock (``git maintenance run --auto`` after each commit)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    m = mount_factory()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="a",
               GIT_AUTHOR_EMAIL="a@example.com", GIT_COMMITTER_NAME="c",
               GIT_COMMITTER_EMAIL="c@example.com")
    repo = m.path("repo")
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env, timeout=TIMEOUT)
    for n in range(8):
        (repo / f"file{n}").write_text(f"content {n}\n")
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env, timeout=TIMEOUT)
        subprocess.run(["git", "commit", "-q", "-m", f"commit {n}"], cwd=repo, check=True,
                       env=env, timeout=TIMEOUT)
    subprocess.run(["git", "fsck", "--strict"], cwd=repo, check=True, env=env,
                   timeout=TIMEOUT, capture_output=True)
    assert wait_for(lambda: not status_of(m.mountpoint)["sessions"], timeout=10)
    assert_no_failure(m)


@pytest.mark.parametrize("new_file", [True, False], ids=["new-file", "existing-file"])
def test_read_by_the_writer_while_the_directory_is_synced(mount_factory: MountFactory,
                                                          tmp_path: Path,
                                                          new_file: bool) -> None:
    """The last step of a commit (the directory's fsync) runs in a worker thread; a
    read through the writer's other descriptor meanwhile gets the content, not EIO."""
    src = make_source(tmp_path, {} if new_file else {"f": b"committed\n" * 100})
    m = mount_factory(source=src, env={"ATOMICFS_FAULTS": "sleep:commit.before_dir_fsync:0.6"})
    data = b"the new content\n" * 100
    # O_DIRECT: the read reaches the daemon, not the page cache
    other = os.open(m.path("f"), os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        fd = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
        os.write(fd, data)
        outcome: list[object] = []
        thread = _close_in_thread(fd, outcome)
        assert wait_for(lambda: _commit_running(m.mountpoint), timeout=10)
        reads = 0
        while thread.is_alive():  # every read while the commit runs, to its last step
            assert os.pread(other, len(data) + 10, 0) == data
            reads += 1
        assert reads
        thread.join(TIMEOUT)
        assert outcome == ["closed"]
    finally:
        os.close(other)
    assert_no_failure(m)
    m.unmount()
    assert m.src("f").read_bytes() == data


def test_unlinked_file_whose_write_failed(mount_factory: MountFactory, tmp_path: Path) -> None:
    """A write fails (ENOSPC: the program was told), then the file is unlinked and
    closed: nothing is lost, so neither close() nor the log reports anything."""
    import scratchfs
    with scratchfs.tmpfs(tmp_path / "small", "4m") as src:
        m = mount_factory(source=src)
        try:
            fd = os.open(m.path("f"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                with pytest.raises(OSError) as info:
                    for _ in range(64):
                        os.write(fd, b"N" * (256 << 10))
                assert info.value.errno == errno.ENOSPC
                os.unlink(m.path("f"))
            finally:
                os.close(fd)  # no error: the file is gone
            assert wait_for(lambda: not status_of(m.mountpoint)["sessions"], timeout=10)
            assert_no_failure(m)
        finally:
            m.unmount()
