"""Descriptors and commits (docs/semantics.md §11).

- A commit that happened is never reported as failed, and a failed one never
  leaves SOURCE changed: every step of a commit is made to fail (fault points,
  a daemon that has run out of descriptors), and each time the reply, SOURCE
  and reads through the mount agree.
- No thread dies: a failure after a commit's point of no return used to hand
  the shadow's fd to two owners (the housekeeper's deferred close and the
  error path), which closed other files' fds later.
- The daemon's descriptors stay bounded whatever the tree's size: walks of a
  tree larger than the daemon's RLIMIT_NOFILE, in both ways of reopening an
  inode (file handles as root; parent and name otherwise), and an inode whose
  file was replaced behind the mount gives ESTALE, never the other file.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Mount, MountFactory, run_cli
from sessionkit import assert_no_debris, save, status_of, wait_for

OLD, NEW = b"OLD\n", b"NEW\n"
MODES = {"handles": {}, "paths": {"ATOMICFS_INODE_HANDLES": "0"}}


def nofile(limit: int) -> list[str]:
    """Run the daemon with RLIMIT_NOFILE lowered to ``limit`` (soft and hard)."""
    return ["prlimit", f"--nofile={limit}:{limit}", "--"]


def daemon_fds(m: Mount) -> int:
    assert m.proc is not None
    return len(os.listdir(f"/proc/{m.proc.pid}/fd"))


def assert_agree(m: Mount, name: str, err: int | None, before: bytes | None) -> None:
    """The reply and the committed version agree: success and NEW everywhere, or a
    failure and the previous version (``before``; None: no file) everywhere."""
    src, via = m.src(name), m.path(name)
    if err is None:
        assert src.read_bytes() == NEW, f"{name}: close() succeeded, SOURCE has not NEW"
        assert via.read_bytes() == NEW, f"{name}: close() succeeded, the mount shows not NEW"
    else:
        if before is None:
            assert not src.exists(), f"{name}: failed ({errno.errorcode[err]}), yet in SOURCE"
            # the new file goes with its last release, which follows close() shortly
            assert wait_for(lambda: not via.exists(), timeout=5), \
                f"{name}: failed, yet visible through the mount"
        else:
            assert src.read_bytes() == before, \
                f"{name}: close() failed ({errno.errorcode[err]}) but SOURCE changed"
            assert via.read_bytes() == before, f"{name}: failed, the mount shows not {before!r}"


# -- a commit that happened is never reported as failed --------------------------------

# (fault, happens): each step of a commit made to fail; before the point of no
# return the commit must fail cleanly, after it the commit must stand.
STEPS = [
    ("fail:commit.prepare_backing:EMFILE", False),
    ("fail:commit.before_fsync:EIO", False),
    ("fail:commit.after_link:EIO", None),  # rename commits: before; new files: after
    ("fail:commit.after_rename:EMFILE", True),
    ("fail:commit.dir_fsync:EIO", True),
    ("fail:commit.after_dir_fsync:EMFILE", True),
]


@pytest.mark.parametrize("fault,happens", STEPS, ids=[s[0].split(":")[1] for s in STEPS])
def test_each_commit_step_failing_gives_a_reply_that_matches_source(
        mount_factory: MountFactory, tmp_path: Path, fault: str, happens: bool | None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "victim.txt").write_bytes(OLD)
    m = mount_factory(source=src, env={"ATOMICFS_FAULTS": fault})
    m.expect_log(r"commit of|directory|point of no return|synced")
    victim = err = save(m.path("victim.txt"), NEW)
    if happens is not None:
        assert (err is None) == happens, f"{fault}: close() gave {err}"
    assert_agree(m, "victim.txt", err, OLD)
    err = save(m.path("new.txt"), NEW, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    if fault.startswith("fail:commit.after_link"):
        assert err is None, "the new file was linked in: its commit happened"
    assert_agree(m, "new.txt", err, None)
    status = status_of(m.mountpoint)
    if fault.startswith("fail:commit.dir_fsync"):
        # tmpfs and ext4 take the syncfs fallback: the commit is durable after all
        assert status["not_durable"] == 0
        assert "synced by syncfs instead" in m.log()
    m.unmount()
    assert (src / "victim.txt").read_bytes() == (NEW if victim is None else OLD)
    assert_no_debris(src)


@pytest.mark.parametrize("fault,happens", [("fail:commit.prepare_backing:EMFILE", False),
                                            ("fail:commit.dir_fsync:EIO", True)],
                         ids=["prepare_backing", "dir_fsync"])
def test_batch_durability_agrees_too(mount_factory: MountFactory, tmp_path: Path, fault: str,
                                     happens: bool) -> None:
    """durability=batch: staging is all or nothing (a failure leaves the mount's
    view and SOURCE at OLD), and a group persist whose directory fsync fails still
    publishes (the commit was acknowledged: it stands)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "victim.txt").write_bytes(OLD)
    m = mount_factory(source=src, env={"ATOMICFS_FAULTS": fault},
                      options=["durability=batch"])
    m.expect_log(r"commit of|directory|synced")
    err = save(m.path("victim.txt"), NEW)
    assert (err is None) == happens, f"{fault}: close() gave {err}"
    want = NEW if happens else OLD
    assert m.path("victim.txt").read_bytes() == want
    assert wait_for(lambda: m.src("victim.txt").read_bytes() == want, timeout=5)
    m.unmount()
    assert (src / "victim.txt").read_bytes() == want
    assert_no_debris(src)


def test_a_failing_step_after_the_rename_closes_no_fd_twice(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """The housekeeper died with EBADF in _drain: a failure after the rename closed the
    shadow in the error path while its deferred close was queued, and the number,
    reused by a ready shadow, was closed twice.  Now every save succeeds, no fd is
    closed twice, and the housekeeper keeps working."""
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(source=src, env={"ATOMICFS_FAULTS": "fail:commit.after_dir_fsync:EIO"})
    m.expect_log(r"point of no return")
    for i in range(30):
        m.src(f"f{i}").write_bytes(OLD)
    for i in range(30):
        assert save(m.path(f"f{i}"), NEW) is None, f"f{i}: close() failed, the commit happened"
    time.sleep(3)  # the housekeeper's idle drain of the ready shadows (IDLE_DRAIN)
    for i in range(30):
        assert m.path(f"f{i}").read_bytes() == NEW
        assert m.src(f"f{i}").read_bytes() == NEW
    made = status_of(m.mountpoint)["housekeeping"]["shadows_made"]
    for i in range(5):
        assert save(m.path(f"g{i}"), NEW, os.O_WRONLY | os.O_CREAT) is None
    assert wait_for(lambda: status_of(m.mountpoint)["housekeeping"]["shadows_made"] > made,
                    timeout=5), "the housekeeper no longer refills its pool"
    assert "Bad file descriptor" not in m.log()
    assert "Exception in thread" not in m.log()


def test_a_daemon_out_of_descriptors_fails_requests_never_a_commit_that_happened(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """The issue's case, for real: files held open through the mount use up the
    daemon's descriptors; a save of a file opened before that either succeeds
    (NEW in SOURCE and through the mount) or fails with SOURCE unchanged, and the
    opens that failed are counted and logged once."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(400):
        (src / f"h{i:03d}").write_bytes(b"x")
    (src / "victim.txt").write_bytes(OLD)
    m = mount_factory(source=src, prefix=nofile(128))
    m.expect_log(r"out of file descriptors")
    victim = os.open(m.path("victim.txt"), os.O_WRONLY | os.O_TRUNC)
    held, refused = [], None
    try:
        for i in range(400):
            try:
                held.append(os.open(m.path(f"h{i:03d}"), os.O_RDONLY))
            except OSError as exc:
                refused = exc.errno
                break
        assert refused in (errno.EMFILE, errno.ENFILE), "the daemon never ran out"
        os.write(victim, NEW)
        try:
            os.close(victim)
            err = None
        except OSError as exc:
            err = exc.errno
        victim = -1
        # the commit may use the descriptors kept in reserve for commits
        assert err is None, f"the save failed with {err}: the reserve did not serve it"
        assert m.src("victim.txt").read_bytes() == NEW
    finally:
        if victim >= 0:
            os.close(victim)
        for fd in held:
            os.close(fd)
    assert_agree(m, "victim.txt", err, OLD)
    # everything works again once the files are closed
    assert save(m.path("after.txt"), NEW, os.O_WRONLY | os.O_CREAT) is None
    fds = status_of(m.mountpoint)["descriptors"]
    assert fds["exhausted"] >= 1
    assert fds["limit"] == 128
    assert m.log().count("out of file descriptors") == 1
    text = run_cli(["status", str(m.mountpoint)]).stdout
    assert re.search(r"descriptors: \d+ held of 128 \(inode fd cache \d+/30.*reserve for "
                     r"commits \d+/8\); requests failed for lack of descriptors: [1-9]", text), text


def test_a_crashed_housekeeper_takes_the_mount_down_with_a_clear_line(
        mount_factory: MountFactory) -> None:
    m = mount_factory(env={"ATOMICFS_FAULTS": "raise:housekeeper.loop"})
    m.expect_log(r"CRITICAL .*housekeeping thread crashed; unmounting|Traceback|"
                 r"RuntimeError|fault injected|^\s|^$")
    save(m.path("f"), NEW, os.O_WRONLY | os.O_CREAT)  # wakes the thread
    assert m.proc is not None
    m.proc.wait(timeout=20)
    assert not os.path.ismount(m.mountpoint)
    assert "housekeeping thread crashed; unmounting" in m.log()


# -- bounded descriptors ---------------------------------------------------------------

def make_tree(root: Path, dirs: int, per_dir: int) -> int:
    """``dirs`` directories of ``per_dir`` empty files each, made directly (cheaply)."""
    for d in range(dirs):
        sub = root / f"d{d:04d}"
        sub.mkdir()
        for f in range(per_dir):
            os.close(os.open(sub / f"f{f:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    return dirs * per_dir


@pytest.mark.parametrize("mode", MODES)
def test_walks_of_a_tree_larger_than_the_limit_count_every_file(
        mount_factory: MountFactory, tmp_path: Path, mode: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = make_tree(src, 30, 100)
    limit = 256
    m = mount_factory(source=src, prefix=nofile(limit), env=MODES[mode])
    for _ in range(2):  # the second walk: every inode is known, its fd long closed
        out = subprocess.run(["find", str(m.mountpoint), "-type", "f"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert len(out.stdout.splitlines()) == files
        assert daemon_fds(m) < limit
    ls = subprocess.run(["ls", "-lR", str(m.mountpoint)], capture_output=True, timeout=120)
    assert ls.returncode == 0, ls.stderr[-2000:]
    assert ls.stdout.count(b" f0") == files
    fds = status_of(m.mountpoint)["descriptors"]
    assert fds["inode_mode"] == mode
    assert fds["cached_inodes"] <= fds["cache_budget"]
    assert fds["held"] < limit
    assert fds["exhausted"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_an_inode_replaced_behind_the_mount_is_stale_never_the_other_file(
        mount_factory: MountFactory, tmp_path: Path, mode: str) -> None:
    """A directory reached by an O_PATH fd through the mount (as a process's cwd is)
    has its fd evicted; then SOURCE's name is given to another directory.  By
    handle the daemon finds the very directory (renamed); by name it finds another
    one and answers ESTALE."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "d").mkdir()
    (src / "d" / "mine").write_bytes(b"1")
    for i in range(20):
        (src / f"o{i}").write_bytes(b"")
    env = {"ATOMICFS_FD_CACHE": "2", **MODES[mode]}
    m = mount_factory(source=src, env=env, options=["attr_timeout=0", "entry_timeout=0"])
    m.expect_log(r"out of file descriptors")  # never expected; ESTALE is no such line
    dfd = os.open(m.path("d"), os.O_PATH)
    try:
        for i in range(20):  # other inodes take the cache: d's fd is evicted
            os.stat(m.path(f"o{i}"))
        os.rename(src / "d", src / "d.old")
        (src / "d").mkdir()
        (src / "d" / "theirs").write_bytes(b"2")
        if mode == "handles":
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
            try:
                assert os.listdir(fd) == ["mine"]
            finally:
                os.close(fd)
        else:
            with pytest.raises(OSError) as info:
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
                try:
                    os.listdir(fd)
                finally:
                    os.close(fd)
            assert info.value.errno == errno.ESTALE
        assert status_of(m.mountpoint)["descriptors"]["evicted"] > 0
    finally:
        os.close(dfd)
    assert sorted(os.listdir(m.path("d"))) == ["theirs"]


SCALE_FILES = int(os.environ.get("ATOMICFS_SCALE_FILES", "100000"))
SCALE_LIMIT = int(os.environ.get("ATOMICFS_SCALE_NOFILE", "512"))


def test_a_big_tree_is_walked_copied_and_synced_under_a_small_descriptor_limit(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """Issue 13's scale test, bounded for CI (by hand: ATOMICFS_SCALE_FILES=1000000
    ATOMICFS_SCALE_NOFILE=1024): SCALE_FILES empty files in 500-file directories
    made directly in SOURCE, walked through the mount by find, du and ls -lR under a
    daemon whose RLIMIT_NOFILE is SCALE_LIMIT; then cp -a of a 2,000-file subtree
    inside the mount, rsync -a of it twice and diff -r.  Every file is counted and
    the daemon's descriptors stay under its limit all along."""
    src = tmp_path / "src"
    src.mkdir()
    per_dir = 500
    files = make_tree(src, SCALE_FILES // per_dir, per_dir)
    m = mount_factory(source=src, prefix=nofile(SCALE_LIMIT))
    peak = 0

    def sh(*argv: str) -> bytes:
        nonlocal peak
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=600)
        peak = max(peak, daemon_fds(m))
        assert proc.returncode == 0, f"{argv}: {err[-2000:]!r}"
        return out

    mnt = str(m.mountpoint)
    assert len(sh("find", mnt, "-type", "f").splitlines()) == files
    du = sh("du", "-s", "--inodes", mnt)
    assert int(du.split()[0]) == files + files // per_dir + 1  # files, dirs, the root
    assert sh("ls", "-lR", mnt).count(b" f0") == files
    sub = m.path("copy")
    sub.mkdir()
    for d in range(4):  # a 2,000-file subtree
        sh("cp", "-a", f"{mnt}/d{d:04d}", str(sub))
    sh("rsync", "-a", f"{sub}/", f"{mnt}/synced/")
    sh("rsync", "-a", f"{sub}/", f"{mnt}/synced/")
    sh("diff", "-r", str(sub), f"{mnt}/synced")
    assert len(sh("find", f"{mnt}/synced", "-type", "f").splitlines()) == 4 * per_dir
    fds = status_of(m.mountpoint)["descriptors"]
    assert fds["exhausted"] == 0
    assert fds["cached_inodes"] <= fds["cache_budget"]
    assert peak < SCALE_LIMIT
    m.unmount()
    assert len(list((src / "synced").rglob("f*"))) == 4 * per_dir
    assert_no_debris(src)


# -- the table alone (no FUSE) -----------------------------------------------------------

def test_budget_follows_the_limit() -> None:
    from atomicfs.inodes import Budget
    assert (Budget.for_limit(512).reserve, Budget.for_limit(512).cache) == (32, 120)
    assert (Budget.for_limit(128).reserve, Budget.for_limit(128).cache) == (8, 30)
    assert (Budget.for_limit(1 << 20).reserve, Budget.for_limit(1 << 20).cache) == (64, 4096)
    assert Budget.for_limit(20).cache == 16


@pytest.mark.parametrize("handles", [True, False], ids=["handles", "paths"])
def test_table_keeps_its_cache_bounded_and_reopens_only_the_same_file(
        tmp_path: Path, handles: bool) -> None:
    from atomicfs.inodes import Budget, InodeTable, open_path
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(b"%d" % i)
    root_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    table = InodeTable(root_fd, Budget(limit=1024, reserve=2, cache=5), handles=handles)
    try:
        assert table.mode == ("handles" if handles and os.geteuid() == 0 else "paths")
        inodes = []
        for i in range(50):
            with table.scope():
                fd, st = open_path(table.root.fd, b"f%d" % i, table)
                inode = table.learn(table.root.ino, b"f%d" % i, fd, st)
                table.remember(inode)
                inodes.append(inode)
            assert table.cached <= 5
        table.check()
        with table.scope():  # every inode reopens, and is the same file
            for i, inode in enumerate(inodes):
                assert os.readlink(f"/proc/self/fd/{inode.fd}") == str(tmp_path / f"f{i}")
        assert table.cached <= 5
        assert table.fd_stats.reopened >= 45
        # held inodes stay open whatever the budget
        with table.scope():
            for inode in inodes[:10]:
                inode.fd  # noqa: B018
                table.hold(inode)
        assert all(inode._fd is not None for inode in inodes[:10])
        for inode in inodes[:10]:
            table.release(inode)
        with table.scope():
            table.trim()
        # replaced behind the table's back: ESTALE, never the other file
        victim = inodes[20]
        assert victim._fd is None
        os.unlink(tmp_path / "f20")
        (tmp_path / "f20").write_bytes(b"other")
        with table.scope(), pytest.raises(OSError) as info:
            victim.fd  # noqa: B018
        assert info.value.errno == errno.ESTALE
        table.check()
    finally:
        table.close_all()
        os.close(root_fd)


def test_table_gives_a_forgotten_file_its_number_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/semantics.md §5: a file the kernel forgot and looks up again keeps its
    inode number; a number never goes to two known files; the record is bounded."""
    from atomicfs import inodes as mod
    monkeypatch.setattr(mod, "NUMBERS_KEPT", 3)
    for i in range(6):
        (tmp_path / f"f{i}").write_bytes(b"%d" % i)
    root_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    table = mod.InodeTable(root_fd, mod.Budget(limit=1024, reserve=2, cache=64))

    def look(name: str) -> mod.Inode:
        with table.scope():
            fd, st = mod.open_path(table.root.fd, name.encode(), table)
            inode = table.learn(table.root.ino, name.encode(), fd, st)
            table.remember(inode)
            return inode

    try:
        first = {f"f{i}": look(f"f{i}").ino for i in range(6)}
        assert len(set(first.values())) == 6
        for i in range(6):
            table.forget(first[f"f{i}"], 1)  # dropped in order f0..f5
        assert len(table) == 1  # the root
        again = look("f5")
        assert again.ino == first["f5"]
        # f0..f2 were dropped longest ago, past the bound: new numbers
        assert look("f0").ino not in first.values()
        assert look("f4").ino == first["f4"]
        # a new file never takes a number kept for another
        (tmp_path / "g").write_bytes(b"g")
        assert look("g").ino not in first.values()
        table.check()
    finally:
        table.close_all()
        os.close(root_fd)
