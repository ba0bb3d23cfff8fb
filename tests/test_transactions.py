"""Multi-file transactions: ``atomicfs run MOUNTPOINT -- CMD`` (docs/semantics.md §14).

Every test but the pure ones at the end mounts a real atomicfs.  An outside
reader (a separate process, not a member) polls the files throughout and must
never see a mix: within its passes, in reading order, once a path shows the
transaction's version no later read shows an older one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, Mount, MountFactory, cli_env, run_cli
from sessionkit import TIMEOUT, assert_no_debris, git_env, status_of, wait_for

from atomicfs import txrecord
from atomicfs.membership import Membership, parse_stat, proc_stat
from atomicfs.txstate import conflicts, identity_of

RUN_FAILED = 125

_POLLER = r"""
import json, os, sys, time
paths = json.loads(sys.argv[1]); stop = sys.argv[2]
def read(p, again):
    try:
        with open(p, "rb") as f:
            return f.read().decode(errors="replace")
    except (FileNotFoundError, NotADirectoryError):  # no file at that path
        if again:  # a walk through a directory a member removes at that moment may
            time.sleep(0.01)  # fail once (docs/semantics.md §14, Limits): walk again
            return read(p, False)
        return None
    except OSError as exc:
        return "error %d" % exc.errno
last = None
while not os.path.exists(stop):
    seen = [read(p, True) for p in paths]
    if seen != last:  # a pass like the one before adds nothing to the check
        print(json.dumps(seen), flush=True)
        last = seen
"""


class Poller:
    """An outside process reading ``paths`` in a loop until stopped (it prints a pass
    only when it differs from the one before, so its pipe never fills)."""

    def __init__(self, paths: list[Path], stop: Path) -> None:
        self.stop = stop
        self.paths = paths
        self.proc = subprocess.Popen([sys.executable, "-c", _POLLER,
                                      json.dumps([str(p) for p in paths]), str(stop)],
                                     stdout=subprocess.PIPE, text=True)
        # its first pass is done before the caller goes on (on a loaded machine the
        # interpreter's start alone may outlast a short transaction)
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline()
        assert self.first, "the outside reader did not start"

    def finish(self) -> list[list[str | None]]:
        self.stop.touch()
        out, _ = self.proc.communicate(timeout=TIMEOUT)
        return [json.loads(line) for line in (self.first + out).splitlines() if line.strip()]


def check_never_mixed(passes: list[list[str | None]], old: list[str | None],
                      new: list[str | None]) -> tuple[int, int]:
    """Every read is the old or the new version, and in reading order no old one
    follows a new one.  Returns how many reads saw old, and new."""
    flat: list[str] = []
    for seen in passes:
        for value, o, n in zip(seen, old, new, strict=True):
            assert value in (o, n), f"read {value!r}: neither the old {o!r} nor the new {n!r}"
            flat.append("new" if value == n and value != o else "old")
    if "new" in flat:
        first = flat.index("new")
        assert "old" not in flat[first:], "an outside reader saw a mix of the two versions"
    return flat.count("old"), flat.count("new")


def atomicfs_run(m: Mount, *cmd: str, cwd: Path | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "atomicfs", "run", str(m.mountpoint), "--", *cmd],
                          cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def start_run(m: Mount, *cmd: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, "-m", "atomicfs", "run", str(m.mountpoint), "--", *cmd],
                            cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


class Paused:
    """A transaction whose command ran ``script`` (sh) and now waits: ``go()`` lets it
    exit 0, ``wait()`` returns its status."""

    def __init__(self, proc: subprocess.Popen[str], go: Path) -> None:
        self.proc, self._go = proc, go

    def go(self) -> None:
        self._go.touch()

    def wait(self) -> int:
        return self.proc.wait(timeout=TIMEOUT)


@contextlib.contextmanager
def paused_run(m: Mount, script: str, tmp_path: Path, cwd: Path) -> Iterator[Paused]:
    """Run ``script`` in a transaction and hold it open (until ``go()``) once the script
    has run; on the way out let it go, and kill it if it did not end."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = start_run(m, "sh", "-c", f"{script}; touch {ready}; "
                     f"while [ ! -e {go} ]; do sleep 0.02; done", cwd=cwd)
    try:
        assert wait_for(lambda: ready.exists(), TIMEOUT), "the transaction's script did not run"
        yield Paused(proc, go)
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def seed(m: Mount) -> None:
    m.src("a").write_text("a old\n")
    m.src("b").write_text("b old\n")


SCRIPT = r"""
import os, sys, time
mnt = sys.argv[1]; fail = sys.argv[2]
def put(name, text):
    with open(os.path.join(mnt, name), "w") as f:
        f.write(text)
put("a", "a new\n"); time.sleep(0.3)
put("b", "b new\n"); time.sleep(0.3)
if fail == "exit":
    sys.exit(1)
put("c", "c new\n")
os.mkdir(os.path.join(mnt, "d"))
put("d/x", "x new\n")
if fail == "kill":
    os.kill(os.getpid(), 9)
time.sleep(0.3)
"""

PATHS = ["a", "b", "c", "d/x"]
OLD = ["a old\n", "b old\n", None, None]
NEW = ["a new\n", "b new\n", "c new\n", "x new\n"]


def assert_old(m: Mount) -> None:
    for where in (m.path, m.src):
        assert where("a").read_text() == "a old\n"
        assert where("b").read_text() == "b old\n"
        assert not where("c").exists() and not where("d").exists()
    assert_no_debris(m.source)


def assert_new(m: Mount) -> None:
    for where in (m.path, m.src):
        assert [where(p).read_text() for p in PATHS] == NEW
    assert_no_debris(m.source)


# -- stage 1: contents and creates ---------------------------------------------------------
def test_the_log_names_the_transaction_and_counts_its_changes(mount: Mount) -> None:
    seed(mount)
    res = atomicfs_run(mount, "sh", "-c", "echo x > a; echo y > b; echo z > c; rm b",
                       cwd=mount.mountpoint)
    assert res.returncode == 0, res.stderr
    log = mount.log()
    assert re.search(r"INFO atomicfs\.transactions: transaction of pid \d+ began "
                     r"\(atomicfs run pid \d+\)$", log, re.M), log
    # a rewritten, c created, b rewritten then removed: two puts and one removal
    assert re.search(r"transaction of pid \d+ committed: 3 names put in place or removed, "
                     r"1 directories synced", log), log


def test_contents_and_creates_become_visible_together(mount: Mount, tmp_path: Path) -> None:
    seed(mount)
    poller = Poller([mount.path(p) for p in PATHS], tmp_path / "stop")
    try:
        time.sleep(0.2)
        res = atomicfs_run(mount, sys.executable, "-c", SCRIPT, str(mount.mountpoint), "")
        time.sleep(0.3)
    finally:
        passes = poller.finish()
    assert res.returncode == 0, res.stderr
    olds, news = check_never_mixed(passes, OLD, NEW)
    assert olds and news, f"the reader did not run across the commit ({olds} old, {news} new)"
    assert_new(mount)


def test_a_failing_command_leaves_nothing(mount: Mount) -> None:
    seed(mount)
    res = atomicfs_run(mount, sys.executable, "-c", SCRIPT, str(mount.mountpoint), "exit")
    assert res.returncode == 1, res.stderr
    assert_old(mount)


def test_a_killed_command_leaves_nothing(mount: Mount) -> None:
    seed(mount)
    res = atomicfs_run(mount, sys.executable, "-c", SCRIPT, str(mount.mountpoint), "kill")
    assert res.returncode == 128 + signal.SIGKILL, res.stderr
    assert_old(mount)


def test_members_read_their_own_writes_others_the_committed_version(
        mount: Mount, tmp_path: Path) -> None:
    seed(mount)
    script = r"""
import os, subprocess, sys, time
mnt, ready, go = sys.argv[1:4]
a = os.path.join(mnt, "a")
with open(a, "w") as f:
    f.write("a new, longer\n")
    f.flush()
    with open(a) as g:  # a second descriptor while the first is open
        assert g.read() == "a new, longer\n"
assert open(a).read() == "a new, longer\n"
assert os.stat(a).st_size == len("a new, longer\n")
with open(os.path.join(mnt, "c"), "w") as f:
    f.write("c new\n")
assert "c" in os.listdir(mnt)
# a child process is a member too
assert subprocess.run(["cat", a, os.path.join(mnt, "c")], capture_output=True,
                      check=True).stdout == b"a new, longer\nc new\n"
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.02)
"""
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = start_run(mount, sys.executable, "-c", script, str(mount.mountpoint), str(ready),
                     str(go))
    try:
        assert wait_for(lambda: ready.exists() or proc.poll() is not None, TIMEOUT)
        assert proc.poll() is None, proc.communicate()
        # outside: the committed version, by read, stat and listing
        assert mount.path("a").read_text() == "a old\n"
        assert os.stat(mount.path("a")).st_size == len("a old\n")
        assert not mount.path("c").exists()
        assert "c" not in os.listdir(mount.mountpoint)
        doc = status_of(mount.mountpoint)
        assert [t["root_pid"] for t in doc["transactions"]], doc
        tx = doc["transactions"][0]
        assert "python" in tx["command"] and tx["files"] == 2, tx
        go.touch()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert mount.path("a").read_text() == "a new, longer\n"
    assert mount.path("c").read_text() == "c new\n"
    assert_no_debris(mount.source)


def test_a_descriptor_opened_before_the_transaction_reads_committed_then_new(
        mount: Mount, tmp_path: Path) -> None:
    """The kernel keeps one page cache and one size per file: the transaction's
    writes (and its O_TRUNC) must not reach a reader that held the file open."""
    seed(mount)
    fd = os.open(mount.path("a"), os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"a old\n"  # cached by the kernel now
        with paused_run(mount, "echo 'a new and longer' > a; cat a > /dev/null", tmp_path,
                        mount.mountpoint) as run:
            for _ in range(3):
                assert os.pread(fd, 100, 0) == b"a old\n"
                assert os.fstat(fd).st_size == 6
            run.go()
            assert run.wait() == 0
        assert os.pread(fd, 100, 0) == b"a new and longer\n"
    finally:
        os.close(fd)


def test_the_runner_killed_aborts_the_transaction(mount: Mount, tmp_path: Path) -> None:
    seed(mount)
    ready = tmp_path / "ready"
    proc = start_run(mount, "sh", "-c", f'echo "a new" > a; echo c > c; mkdir d; '
                     f'touch {ready}; exec sleep 60', cwd=mount.mountpoint)
    try:
        assert wait_for(lambda: ready.exists(), TIMEOUT)
        root = status_of(mount.mountpoint)["transactions"][0]["root_pid"]
        proc.kill()
        proc.wait()
        assert wait_for(lambda: not status_of(mount.mountpoint)["transactions"], TIMEOUT)
        # the command dies with its runner (PR_SET_PDEATHSIG)
        assert wait_for(lambda: _gone(root), TIMEOUT), f"pid {root} still runs"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    mount.expect_log(r"WARNING .*runner .* died")
    assert_old(mount)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_tar_xf_of_a_tree_appears_whole(mount: Mount, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    count = 0
    for d in range(12):
        sub = tree / f"dir{d:02d}" / "sub"
        sub.mkdir(parents=True)
        for f in range(8):
            (sub / f"f{f}").write_text(f"file {d} {f}\n" * (f + 1))
            count += 1
        (tree / f"dir{d:02d}" / "link").symlink_to("sub/f0")
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname="tree")
    last = mount.path("tree", "dir11", "sub", "f7")
    poller = Poller([mount.path("tree", "dir00", "sub", "f0"), last], tmp_path / "stop")
    try:
        res = atomicfs_run(mount, "tar", "xf", str(archive), "-C", str(mount.mountpoint))
        time.sleep(0.2)
    finally:
        passes = poller.finish()
    assert res.returncode == 0, res.stderr
    check_never_mixed(passes, [None, None], ["file 0 0\n", "file 11 7\n" * 8])
    got = sorted(str(p.relative_to(mount.mountpoint)) for p in mount.path("tree").rglob("*"))
    want = sorted("tree/" + str(p.relative_to(tree)) for p in tree.rglob("*"))
    assert got == want
    assert os.readlink(mount.path("tree", "dir03", "link")) == "sub/f0"
    assert mount.src("tree", "dir05", "sub", "f3").read_text() == "file 5 3\n" * 4
    assert_no_debris(mount.source)


@pytest.mark.parametrize("fails", [True, False], ids=["fails", "succeeds"])
def test_a_shell_script_editing_two_config_files(mount: Mount, fails: bool) -> None:
    mount.src("a.conf").write_text("port=1\n")
    mount.src("b.conf").write_text("include a.conf\nlevel=1\n")
    script = ("set -e; sed -i s/port=1/port=2/ a.conf; "
              "sed -i s/level=1/level=2/ b.conf; echo extra > c.conf; "
              + ("echo 'half way' >&2; exit 3" if fails else "true"))
    res = atomicfs_run(mount, "sh", "-c", script, cwd=mount.mountpoint)
    if fails:
        assert res.returncode == 3, res.stderr
        assert mount.path("a.conf").read_text() == "port=1\n"
        assert mount.path("b.conf").read_text() == "include a.conf\nlevel=1\n"
        assert not mount.path("c.conf").exists()
    else:
        assert res.returncode == 0, res.stderr
        assert mount.path("a.conf").read_text() == "port=2\n"
        assert mount.path("b.conf").read_text() == "include a.conf\nlevel=2\n"
        assert mount.src("c.conf").read_text() == "extra\n"
    assert_no_debris(mount.source)


def test_fsync_inside_a_transaction_commits_nothing_outside(mount: Mount) -> None:
    seed(mount)
    script = ("import os, sys; fd = os.open(sys.argv[1] + '/a', os.O_WRONLY | os.O_TRUNC); "
              "os.write(fd, b'a new\\n'); os.fsync(fd); os.close(fd); "
              "assert open(sys.argv[2]).read() == 'a old\\n'; sys.exit(5)")
    res = atomicfs_run(mount, sys.executable, "-c", script, str(mount.mountpoint),
                       str(mount.src("a")))
    assert res.returncode == 5, res.stderr
    assert_old(mount)


def test_an_outsider_cannot_write_a_file_the_transaction_writes(
        mount: Mount, tmp_path: Path) -> None:
    seed(mount)
    with paused_run(mount, "echo 'a new' > a", tmp_path, mount.mountpoint) as run:
        with pytest.raises(OSError) as err:
            mount.path("a").write_text("outsider\n")
        assert err.value.errno == 16  # EBUSY
        run.go()
        assert run.wait() == 0
    assert mount.path("a").read_text() == "a new\n"


def test_umount_is_refused_while_a_transaction_runs_and_lazy_aborts_it(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    m = mount_factory()
    seed(m)
    ready = tmp_path / "ready"
    proc = start_run(m, "sh", "-c", f"echo 'a new' > {m.mountpoint}/a; touch {ready}; "
                     "exec sleep 60", cwd=tmp_path)
    try:
        assert wait_for(lambda: ready.exists(), TIMEOUT)
        res = run_cli(["umount", str(m.mountpoint)])
        assert res.returncode == 1 and "a transaction is open" in res.stderr, res.stderr
        assert status_of(m.mountpoint)["transactions"]
        res = run_cli(["umount", "--lazy", str(m.mountpoint)])
        assert res.returncode == 0, res.stderr
        proc.send_signal(signal.SIGTERM)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert m.proc is not None
    m.proc.wait(timeout=TIMEOUT)
    assert m.src("a").read_text() == "a old\n"
    m.proc = None
    m.start()
    assert m.path("a").read_text() == "a old\n"
    assert_no_debris(m.source)


# -- stage 2 (in part): removing committed files ----------------------------------------------
def test_unlink_of_committed_files_is_part_of_the_transaction(mount: Mount) -> None:
    seed(mount)
    script = ("set -e; rm a; test ! -e a; ls | grep -qv '^a$'; echo 'a again' > a; "
              "rm b; echo 'b by rename' > b.tmp; mv b.tmp b; cat a b > /dev/null; ")
    res = atomicfs_run(mount, "sh", "-c", script + "exit 7", cwd=mount.mountpoint)
    assert res.returncode == 7, res.stderr
    assert_old(mount)
    res = atomicfs_run(mount, "sh", "-c", script + "rm c 2>/dev/null || true", cwd=mount.mountpoint)
    assert res.returncode == 0, res.stderr
    assert mount.src("a").read_text() == "a again\n"
    assert mount.src("b").read_text() == "b by rename\n"
    res = atomicfs_run(mount, "sh", "-c", "rm a b", cwd=mount.mountpoint)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(mount.mountpoint)) == [] and not mount.src("a").exists()
    assert_no_debris(mount.source)


def checkout_with_reader(mount: Mount, tmp_path: Path, env: dict[str, str], paths: list[str],
                         old: list[str | None], new: list[str | None]) -> None:
    """``atomicfs run MNT -- git checkout -q other`` while an outside reader polls
    ``paths``: it sees the old tree, then the new, never a mix."""
    poller = Poller([mount.path(p) for p in paths], tmp_path / "stop")
    try:
        time.sleep(0.2)
        res = subprocess.run([PYTHON, "-m", "atomicfs", "run", str(mount.mountpoint), "--",
                              "git", "checkout", "-q", "other"], cwd=mount.mountpoint,
                             env={**cli_env(), **env}, capture_output=True, text=True,
                             timeout=120)
        time.sleep(0.2)
    finally:
        passes = poller.finish()
    assert res.returncode == 0, res.stderr
    olds, news = check_never_mixed(passes, old, new)
    assert olds and news, (olds, news)


def assert_git_clean(mount: Mount, env: dict[str, str]) -> None:
    status = subprocess.run(["git", "status", "--porcelain"], cwd=mount.mountpoint, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert status.returncode == 0 and status.stdout == "", status


def test_git_checkout_of_another_branch_appears_whole(mount: Mount, tmp_path: Path) -> None:
    env = git_env(tmp_path / "home")
    repo = mount.source

    def git(*args: str, cwd: Path = repo) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                       timeout=TIMEOUT)

    git("init", "-q", "-b", "main")
    for i in range(20):
        (repo / "src").mkdir(exist_ok=True)
        (repo / "src" / f"f{i}.c").write_text(f"main {i}\n" * 50)
    (repo / "gone.txt").write_text("only on main\n")
    git("add", "-A")
    git("commit", "-q", "-m", "main")
    git("checkout", "-q", "-b", "other")
    for i in range(0, 20, 2):
        (repo / "src" / f"f{i}.c").write_text(f"other {i}\n" * 60)
    (repo / "gone.txt").unlink()
    (repo / "added.txt").write_text("only on other\n")
    git("add", "-A")
    git("commit", "-q", "-m", "other")
    git("checkout", "-q", "main")
    paths = ["src/f0.c", "gone.txt", "added.txt", ".git/HEAD", "src/f18.c"]
    old = ["main 0\n" * 50, "only on main\n", None, "ref: refs/heads/main\n", "main 18\n" * 50]
    new = ["other 0\n" * 60, None, "only on other\n", "ref: refs/heads/other\n",
           "other 18\n" * 60]
    checkout_with_reader(mount, tmp_path, env, paths, old, new)
    assert_git_clean(mount, env)
    assert_no_debris(mount.source)


# -- stage 2: names of the committed tree (moves, rmdir, hard links) ----------------------
def seed_tree(m: Mount) -> None:
    """a, b; dir/f, dir/sub/x; dir2/g; a symlink l -> a and a fifo p."""
    seed(m)
    m.src("dir", "sub").mkdir(parents=True)
    m.src("dir", "f").write_text("f old\n")
    m.src("dir", "sub", "x").write_text("x old\n")
    m.src("dir2").mkdir()
    m.src("dir2", "g").write_text("g old\n")
    os.symlink("a", m.src("l"))
    os.mkfifo(m.src("p"))


def tree(root: Path) -> dict[str, str]:
    """What a reader sees below ``root`` (not .atomicfs): each path's type and content."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not (dirpath == str(root) and d == ".atomicfs"))
        for name in sorted(dirs + files):
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            elif stat.S_ISFIFO(path.lstat().st_mode):
                out[rel] = "fifo"
            else:
                out[rel] = path.read_text()
    return out


EXCHANGE = (f"{PYTHON} -c 'import sys; from atomicfs import syscalls; syscalls.renameat2("
            "-100, sys.argv[1].encode(), -100, sys.argv[2].encode(), syscalls.RENAME_EXCHANGE)'")

# name: (the script, run in the mount by sh -e; it checks its own view at once),
# the paths an outside reader polls (each changed by the commit: the check counts an
# unchanged one as old), what they hold before and after the commit
NAMES = {
    "mv-files-into-other-dirs-and-over-a-file": (
        "mv a dir2/a2; test ! -e a; test \"$(cat dir2/a2)\" = 'a old'; mv dir/f f2; "
        "mv b dir2/g; test \"$(cat dir2/g)\" = 'b old'; ls dir2 | grep -qx a2; "
        "mv l dir/l2; test \"$(readlink dir/l2)\" = a; mv p p2; test -p p2; test ! -e p",
        ["a", "dir2/a2", "dir/f", "f2", "b", "dir2/g"],
        ["a old\n", None, "f old\n", None, "b old\n", "g old\n"],
        [None, "a old\n", None, "f old\n", None, "b old\n"]),
    "swap-through-a-temp-name": (
        "mv a t; mv b a; mv t b; test \"$(cat a)\" = 'b old'; test \"$(cat b)\" = 'a old'",
        ["a", "b"], ["a old\n", "b old\n"], ["b old\n", "a old\n"]),
    "ln-then-rewrite-through-the-new-name": (
        "ln a dir/a3; test \"$(stat -c %h a)\" = 2; echo more >> dir/a3; "
        "test \"$(cat a)\" = \"$(printf 'a old\\nmore')\"",
        ["a", "dir/a3"], ["a old\n", None], ["a old\nmore\n", "a old\nmore\n"]),
    "rm-r-of-a-committed-tree": (
        "rm -r dir; test ! -e dir; ! ls dir; echo 'a new' > a",
        ["dir/f", "dir/sub/x", "a"], ["f old\n", "x old\n", "a old\n"],
        [None, None, "a new\n"]),
    "mv-then-edit": (
        "mv a dir2/c; echo edited >> dir2/c; "
        "test \"$(cat dir2/c)\" = \"$(printf 'a old\\nedited')\"",
        # (not "a": a reader whose open of a resolved the name just before the commit
        # reads the file's new version, as any descriptor does: semantics.md §14)
        ["dir2/c"], [None], ["a old\nedited\n"]),
    "mv-and-ln-into-a-new-directory": (
        "mkdir n; mv a n/a; ln b n/b2; mv dir/f n/f; echo more >> n/f; "
        "test \"$(stat -c %h b)\" = 2; test \"$(ls n)\" = \"$(printf 'a\\nb2\\nf')\"",
        ["a", "n/a", "n/b2", "n/f"], ["a old\n", None, None, None],
        [None, "a old\n", "b old\n", "f old\nmore\n"]),
    "rename-exchange-of-committed-files-and-a-new-one": (
        f"{EXCHANGE} a b; echo 'c new' > c; {EXCHANGE} b c; test \"$(cat c)\" = 'a old'",
        ["a", "b", "c"], ["a old\n", "b old\n", None], ["b old\n", "c new\n", "a old\n"]),
    "rm-then-a-new-file-then-mv-of-it": (
        "rm a; echo 'a again' > a; mv a z; test ! -e a",
        ["a", "z"], ["a old\n", None], [None, "a again\n"]),
    # committed directories moved (deploy scripts: mv current old; mv new current)
    "mv-dir": (
        "mv dir z; test ! -e dir; test \"$(cat z/f)\" = 'f old'; ls z | grep -qx sub; "
        "cd z/sub; test \"$(cat x)\" = 'x old'",
        ["dir/f", "z/f", "dir/sub/x", "z/sub/x"], ["f old\n", None, "x old\n", None],
        [None, "f old\n", None, "x old\n"]),
    "mv-dir-into-another-dir": (
        "mv dir dir2/d; test \"$(cat dir2/d/sub/x)\" = 'x old'; test ! -e dir",
        ["dir/f", "dir2/d/f", "dir2/d/sub/x"], ["f old\n", None, None],
        [None, "f old\n", "x old\n"]),
    "mv-dir-over-an-empty-dir": (
        "rm dir2/g; mv -T dir dir2; test \"$(cat dir2/f)\" = 'f old'; test ! -e dir",
        ["dir/f", "dir2/g", "dir2/f"], ["f old\n", "g old\n", None],
        [None, None, "f old\n"]),
    "deploy-swap": (
        "mv dir old && mv dir2 dir && test \"$(cat dir/g)\" = 'g old' && "
        "test \"$(cat old/f)\" = 'f old'",
        ["dir/f", "dir/g", "old/f"], ["f old\n", None, None], [None, "g old\n", "f old\n"]),
    "mv-dir-then-edit-inside": (
        "mv dir z; echo edited >> z/f; echo new > z/n; rm z/sub/x; mkdir z/m; "
        "echo m > z/m/y; chmod 600 z/f; test \"$(stat -c %a z/f)\" = 600; "
        "test \"$(cat z/f)\" = \"$(printf 'f old\\nedited')\"",
        # (not "dir/f": a reader whose walk passed dir just before the commit reads f's
        # new version, as for mv-then-edit)
        ["z/f", "z/n", "dir/sub/x", "z/m/y"], [None, None, "x old\n", None],
        ["f old\nedited\n", "new\n", None, "m\n"]),
    "deploy-swap-then-rm-r-of-the-old": (
        "mv dir old; mv dir2 dir; rm -r old; test ! -e old; test \"$(ls dir)\" = g",
        ["dir/f", "dir/g", "dir/sub/x"], ["f old\n", None, "x old\n"],
        [None, "g old\n", None]),
    "mv-dir-then-replace-it-once-emptied": (
        "mv dir z; ! mv -T dir2 z 2>/dev/null; test -e z/f; rm -r z/f z/sub; "
        "mv -T dir2 z; test \"$(ls z)\" = g",
        ["dir/f", "dir2/g", "z/g"], ["f old\n", "g old\n", None], [None, None, "g old\n"]),
    "exchange-of-a-dir-and-a-file": (
        f"{EXCHANGE} dir a; test \"$(cat dir)\" = 'a old'; test \"$(cat a/f)\" = 'f old'",
        ["dir/f"], ["f old\n"], [None]),
    "exchange-of-dirs-and-inside-a-new-dir": (
        f"{EXCHANGE} dir dir2; test \"$(cat dir/g)\" = 'g old'; mkdir n n/d; "
        f"echo 'h new' > n/d/h; {EXCHANGE} n/d dir; test \"$(cat dir/h)\" = 'h new'; "
        f"test \"$(cat n/d/g)\" = 'g old'; mkdir n/e; ln -s h n/e/s; {EXCHANGE} n/e n/d; "
        "test -L n/d/s; test \"$(cat n/e/g)\" = 'g old'",
        ["dir/f", "dir/h", "dir2/f", "n/e/g"], ["f old\n", None, None, None],
        [None, "h new\n", "f old\n", "g old\n"]),
    "rmdir-then-mkdir-of-the-same-name": (
        "rm -r dir; mkdir dir; echo 'f new' > dir/f; test ! -e dir/sub; "
        "test \"$(ls dir)\" = f",
        ["dir/f", "dir/sub/x"], ["f old\n", "x old\n"], ["f new\n", None]),
}


# An outsider's walk while a member moves directories between two directories may
# fail with ESTALE (semantics.md §14, Limits): polled from the end of the script on.
POLL_AFTER_SCRIPT = {"exchange-of-dirs-and-inside-a-new-dir"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


@pytest.mark.parametrize("case", sorted(NAMES))
def test_names_of_the_committed_tree_change_with_the_commit(
        mount: Mount, tmp_path: Path, case: str) -> None:
    """Moves, rmdir and links of committed names: the member sees them at once, an
    outside reader sees the old tree until the commit (checked while the
    transaction waits, and polled throughout: never a mix), then the new one."""
    script, paths, old, new = NAMES[case]
    seed_tree(mount)
    before = tree(mount.source)
    # A member's rmdir makes the kernel mark the directory dead for every process: an
    # outsider's path walk passing through it at that moment fails (a known limit,
    # semantics.md §14); there the reader polls from the end of the script on.
    throughout = "rm -r" not in script and case not in POLL_AFTER_SCRIPT
    poller = None
    try:
        if throughout:
            poller = Poller([mount.path(p) for p in paths], tmp_path / "stop")
            time.sleep(0.2)
        with paused_run(mount, f"set -e; {script}", tmp_path, mount.mountpoint) as run:
            assert tree(mount.mountpoint) == before  # an outsider: the committed tree
            assert [_read(mount.path(p)) for p in paths] == old  # by path (dentries)
            if poller is None:
                poller = Poller([mount.path(p) for p in paths], tmp_path / "stop")
                time.sleep(0.2)
            run.go()
            code = run.wait()
            _, err = run.proc.communicate(timeout=TIMEOUT)
        time.sleep(0.3)
    finally:
        passes = poller.finish() if poller is not None else []
    assert code == 0, err
    olds, news = check_never_mixed(passes, old, new)
    assert olds and news, f"the reader did not run across the commit ({olds} old, {news} new)"
    for where in (mount.path, mount.src):
        assert [_read(where(p)) for p in paths] == new
    assert tree(mount.mountpoint) == tree(mount.source)
    assert_no_debris(mount.source)
    if case.startswith("ln-"):
        assert os.stat(mount.src("a")).st_ino == os.stat(mount.src("dir", "a3")).st_ino
    if case == "mv-and-ln-into-a-new-directory":
        assert os.stat(mount.src("b")).st_ino == os.stat(mount.src("n", "b2")).st_ino


@pytest.mark.parametrize("case", sorted(NAMES))
def test_names_of_the_committed_tree_stay_when_the_command_fails(
        mount: Mount, case: str) -> None:
    seed_tree(mount)
    before = tree(mount.source)
    res = atomicfs_run(mount, "sh", "-c", f"set -e; {NAMES[case][0]}; exit 3",
                       cwd=mount.mountpoint)
    assert res.returncode == 3, res.stderr
    assert tree(mount.source) == before
    assert tree(mount.mountpoint) == before
    assert_no_debris(mount.source)


def test_an_outsider_keeps_using_a_directory_a_member_removed(
        mount: Mount, tmp_path: Path) -> None:
    """After a member's rmdir the kernel marks the directory's inode dead for every
    process: an outsider's next lookup gets a fresh one (a new generation), so it
    still lists the directory and opens files in it until the commit."""
    seed_tree(mount)
    assert sorted(os.listdir(mount.path("dir"))) == ["f", "sub"]  # known to the kernel
    # a process that keeps the directories' kernel inodes alive (its cwd)
    holder = subprocess.Popen(["sleep", "60"], cwd=mount.path("dir", "sub"))
    try:
        with paused_run(mount, "rm -r dir", tmp_path, mount.mountpoint) as run:
            assert sorted(os.listdir(mount.path("dir"))) == ["f", "sub"]
            assert os.listdir(mount.path("dir", "sub")) == ["x"]
            assert mount.path("dir", "sub", "x").read_text() == "x old\n"
            run.go()
            assert run.wait() == 0
    finally:
        holder.kill()
        holder.wait()
    assert not mount.path("dir").exists() and not mount.src("dir").exists()
    mount.path("dir").mkdir()  # the name is free again, for everyone
    assert os.listdir(mount.path("dir")) == []


def test_known_limit_an_outsider_inside_a_directory_a_member_removes_sees_it_gone(
        mount: Mount, tmp_path: Path) -> None:
    """The kernel marks a removed directory dead for every process: an outsider whose
    working directory it is finds nothing there any more, before the commit (a
    fresh path walk from outside sees the committed tree)."""
    seed_tree(mount)
    inside = subprocess.Popen([sys.executable, "-c", "import os, sys\n"
                               "sys.stdin.readline()\n"
                               "print(sorted(os.listdir('.')))\n"
                               "try:\n    open('x').close()\n"
                               "except OSError as exc:\n    print('errno', exc.errno)\n"],
                              cwd=mount.path("dir", "sub"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        with paused_run(mount, "rm -r dir", tmp_path, mount.mountpoint) as run:
            out, _ = inside.communicate("go\n", timeout=TIMEOUT)
            assert out.split("\n")[:2] == ["[]", "errno 2"], out
            assert os.listdir(mount.path("dir", "sub")) == ["x"]  # a fresh walk
            run.go()
            assert run.wait() == 0
    finally:
        if inside.poll() is None:
            inside.kill()
            inside.wait()


def test_a_path_walk_through_a_removed_directory_is_walked_again(mount: Mount) -> None:
    """A lookup inside a directory removed behind the kernel's back (by a commit, or
    here, deterministically, in SOURCE) answers ESTALE: the kernel walks the path
    again with every name looked up anew and finds the directory now at that name,
    not "no such file" halfway.  (A commit replacing dir while an outside reader
    walked dir/f between its two lookups made the reader see dir/f missing.)"""
    seed_tree(mount)
    os.stat(mount.path("dir"))  # dir is cached by the kernel (entry_timeout), f is not
    subprocess.run(["rm", "-r", str(mount.src("dir"))], check=True)
    mount.src("dir").mkdir()
    mount.src("dir", "f").write_text("f again\n")
    assert mount.path("dir", "f").read_text() == "f again\n"
    # a working directory inside a removed directory: no name to walk again, so the
    # process gets ESTALE (as stat of such a directory does, semantics.md §11)
    inside = subprocess.Popen([sys.executable, "-c", "import sys\nsys.stdin.readline()\n"
                               "try:\n    open('g')\nexcept OSError as exc:\n"
                               "    print(exc.errno)"], cwd=mount.path("dir2"),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        subprocess.run(["rm", "-r", str(mount.src("dir2"))], check=True)
        out, _ = inside.communicate("go\n", timeout=TIMEOUT)
    finally:
        if inside.poll() is None:
            inside.kill()
            inside.wait()
    assert out.strip() == str(errno.ESTALE), out


def crash_in_commit(m: Mount, script: str) -> None:
    """Run ``script`` (sh) in a transaction on a mount whose daemon exits at a fault
    point of the commit, then start the daemon again without faults: recovery
    replays a complete record and discards an incomplete one."""
    res = atomicfs_run(m, "sh", "-c", script, cwd=m.mountpoint)
    assert res.returncode == RUN_FAILED, (res.returncode, res.stderr)
    m.kill()
    m.env = None
    m.start()


COMMIT_SCRIPT = ("set -e; mv a dir2/a2; rm -r dir; ln b b2; mv dir2/g g2; mkdir dir; "
                 "echo 'f new' > dir/f; mv l dir/l")


@pytest.mark.parametrize("point,applied", [("tx.before_record", False),
                                           ("tx.after_record", True),
                                           ("tx.apply", True)])
def test_daemon_crash_while_committing_names_leaves_all_or_nothing(
        mount_factory: MountFactory, point: str, applied: bool) -> None:
    m = mount_factory(env={"ATOMICFS_FAULTS": f"exit:{point}"})
    seed_tree(m)
    before = tree(m.source)
    crash_in_commit(m, COMMIT_SCRIPT)
    after = tree(m.source)
    if applied:
        m.expect_log("replayed the committed transaction")
        assert after == {"b": "b old\n", "b2": "b old\n", "dir": "dir", "dir/f": "f new\n",
                         "dir/l": "-> a", "dir2": "dir", "dir2/a2": "a old\n",
                         "g2": "g old\n", "p": "fifo"}
        assert os.stat(m.src("b")).st_ino == os.stat(m.src("b2")).st_ino
    else:
        assert after == before
    assert tree(m.mountpoint) == after
    assert_no_debris(m.source)


_USER = r"""
import os, sys
top, names, rounds, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
seen = set()
for _ in range(rounds):
    for n in names:  # by path from the top, then in the working directory
        try:
            seen.add(("list", n, ",".join(sorted(os.listdir(os.path.join(top, n))))))
            with open(os.path.join(top, n, "f")) as f:
                seen.add(("read", n, f.read()))
        except OSError as exc:
            seen.add(("error", n, exc.errno))
    try:
        with open("x") as f:
            seen.add(("cwd", f.read(), ",".join(sorted(os.listdir(".")))))
    except OSError as exc:
        seen.add(("cwd error", exc.errno))
with open(out, "w") as f:
    f.write(repr(sorted(seen, key=repr)))
"""


def test_both_sides_keep_using_a_moved_directory(mount: Mount, tmp_path: Path) -> None:
    """The kernel keeps one dentry per directory: an outsider's lookup of dir while
    a member holds it as z moves that dentry to dir (d_splice_alias), the member's
    next lookup of z moves it back.  Both keep working meanwhile: listings, files
    opened by path, and a working directory inside, on both sides."""
    seed_tree(mount)
    outside_out, member_out = tmp_path / "outside", tmp_path / "member"
    go = tmp_path / "go"
    # an outsider, its working directory inside dir (known to the kernel before)
    outsider = subprocess.Popen(
        [sys.executable, "-c", f"import os, time\nwhile not os.path.exists({str(go)!r}): "
         f"time.sleep(0.01)\nexec(open({str(tmp_path / 'user.py')!r}).read())",
         str(mount.mountpoint), "dir,dir/sub", "300", str(outside_out)],
        cwd=mount.path("dir", "sub"))
    (tmp_path / "user.py").write_text(_USER)
    try:
        with paused_run(mount, f"mv dir z; cd z/sub; touch {go}; {PYTHON} {tmp_path}/user.py "
                        f"{mount.mountpoint} z,z/sub 300 {member_out}", tmp_path,
                        mount.mountpoint) as run:
            assert outsider.wait(timeout=TIMEOUT) == 0
            assert tree(mount.mountpoint) == tree(mount.source)
            run.go()
            assert run.wait() == 0
    finally:
        if outsider.poll() is None:
            outsider.kill()
            outsider.wait()
    for side, top in ((outside_out, "dir"), (member_out, "z")):
        assert side.read_text() == repr(sorted({
            ("cwd", "x old\n", "x"), ("list", top, "f,sub"), ("list", f"{top}/sub", "x"),
            ("read", top, "f old\n"), ("error", f"{top}/sub", errno.ENOENT)}, key=repr)), side
    assert not mount.path("dir").exists() and mount.path("z", "sub", "x").exists()


DIRS_SCRIPT = ("set -e; mv dir z; echo edited >> z/f; rm z/sub/x; mv dir2 dir; "
               "echo 'n new' > dir/n; mkdir dir/m; mv z/sub dir/m/s")


@pytest.mark.parametrize("point,applied", [("tx.before_record", False),
                                           ("tx.after_record", True),
                                           ("tx.apply", True)])
def test_daemon_crash_while_moving_committed_directories_leaves_all_or_nothing(
        mount_factory: MountFactory, point: str, applied: bool) -> None:
    """A deploy-like transaction (a directory moved aside, another moved into its
    place, edits inside both, a subdirectory moved into a new directory): a crash
    before the record leaves the committed tree, after it (tx.apply: right after the
    first stash) the replay completes it."""
    m = mount_factory(env={"ATOMICFS_FAULTS": f"exit:{point}"})
    seed_tree(m)
    before = tree(m.source)
    crash_in_commit(m, DIRS_SCRIPT)
    after = tree(m.source)
    if applied:
        m.expect_log("replayed the committed transaction")
        assert after == {"a": "a old\n", "b": "b old\n", "dir": "dir", "dir/g": "g old\n",
                         "dir/m": "dir", "dir/m/s": "dir", "dir/n": "n new\n", "l": "-> a",
                         "p": "fifo", "z": "dir", "z/f": "f old\nedited\n"}
    else:
        assert after == before
    assert tree(m.mountpoint) == after
    assert_no_debris(m.source)


def test_the_commit_of_moved_directories_is_one_step(mount: Mount, tmp_path: Path) -> None:
    """DIRS_SCRIPT with an outside reader polling files of both trees throughout.
    (Not dir/f: a reader whose path walk passed dir just before the commit finds f in
    that directory, at its new place, and reads its new version, as a walk racing a
    rename finds the directory's content on any filesystem.)"""
    seed_tree(mount)
    paths = ["z/f", "dir/g", "dir/n", "dir/sub/x"]  # (each changed by the commit)
    old = [None, None, None, "x old\n"]
    new = ["f old\nedited\n", "g old\n", "n new\n", None]
    with paused_run(mount, DIRS_SCRIPT, tmp_path, mount.mountpoint) as run:
        poller = Poller([mount.path(p) for p in paths], tmp_path / "stop")
        try:
            time.sleep(0.2)
            run.go()
            code = run.wait()
            time.sleep(0.3)
        finally:
            passes = poller.finish()
    assert code == 0
    olds, news = check_never_mixed(passes, old, new)
    assert olds and news, (olds, news)
    assert tree(mount.mountpoint) == tree(mount.source)
    assert_no_debris(mount.source)


# (the transaction's script, what an outsider does meanwhile, the path to be named)
NAME_CONFLICTS = {
    "outside-create-at-the-target-of-a-move": (
        "mv a dir2/a2", lambda m: m.path("dir2", "a2").write_text("outside\n"), "dir2/a2"),
    "outside-rename-of-the-source-of-a-move": (
        "mv a dir2/a2", lambda m: _replace_by_rename(m.path("a"), "a outside\n"), "a"),
    "outside-create-inside-a-removed-dir": (
        "rm -r dir", lambda m: m.path("dir", "new").write_text("outside\n"), "dir"),
    "outside-rename-of-a-dir-it-moved": (
        "mv dir z", lambda m: os.rename(m.path("dir"), m.path("dir3")), "dir"),
    "outside-mkdir-at-the-target-of-a-dir-move": (
        "mv dir z", lambda m: m.path("z").mkdir(), "z"),
    "outside-rewrite-of-a-file-it-linked-elsewhere": (
        "ln a a3", lambda m: _replace_by_rename(m.path("a3"), "outside\n"), "a3"),
}


@pytest.mark.parametrize("case", sorted(NAME_CONFLICTS))
def test_a_conflicting_change_to_names_fails_the_commit(
        mount: Mount, tmp_path: Path, case: str) -> None:
    script, outside, path = NAME_CONFLICTS[case]
    seed_tree(mount)
    with paused_run(mount, f"set -e; echo 'b tx' > b; {script}", tmp_path,
                    mount.mountpoint) as run:
        outside(mount)
        expected = tree(mount.source)
        run.go()
        code = run.wait()
        _, err = run.proc.communicate(timeout=TIMEOUT)
    assert code == RUN_FAILED, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "conflict" in lines[0] and f" {path} " in lines[0], lines
    assert tree(mount.source) == expected
    assert tree(mount.mountpoint) == expected
    assert_no_debris(mount.source)


def test_an_outsider_s_new_file_inside_a_moved_directory_moves_with_it(
        mount: Mount, tmp_path: Path) -> None:
    """A moved directory's old name counts as changed only if it is no longer that
    directory: what an outsider adds or saves inside it meanwhile is no conflict and
    is at the new name after the commit (as with a rename on any filesystem)."""
    seed_tree(mount)
    with paused_run(mount, "set -e; mv dir z; echo 'f tx' > z/f", tmp_path,
                    mount.mountpoint) as run:
        mount.path("dir", "new").write_text("outside\n")
        _replace_by_rename(mount.path("dir", "sub", "x"), "x outside\n")
        run.go()
        code = run.wait()
        _, err = run.proc.communicate(timeout=TIMEOUT)
    assert code == 0, err
    assert not mount.path("dir").exists()
    for where in (mount.path, mount.src):
        assert [_read(where("z", n)) for n in ("f", "new", "sub/x")] == [
            "f tx\n", "outside\n", "x outside\n"]
    assert_no_debris(mount.source)


def test_git_checkout_of_a_branch_that_removes_a_directory(
        mount: Mount, tmp_path: Path) -> None:
    env = git_env(tmp_path / "home")
    repo = mount.source

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                       timeout=TIMEOUT)

    git("init", "-q", "-b", "main")
    (repo / "docs" / "old").mkdir(parents=True)
    for i in range(5):
        (repo / "docs" / f"d{i}.md").write_text(f"doc {i}\n")
        (repo / "docs" / "old" / f"o{i}.md").write_text(f"old {i}\n")
    (repo / "README").write_text("main\n")
    git("add", "-A")
    git("commit", "-q", "-m", "main")
    git("checkout", "-q", "-b", "other")
    subprocess.run(["rm", "-r", str(repo / "docs")], check=True)
    (repo / "README").write_text("other\n")
    (repo / "moved.md").write_text("doc 0\n")
    git("add", "-A")
    git("commit", "-q", "-m", "other")
    git("checkout", "-q", "main")
    paths = ["docs/d0.md", "docs/old/o4.md", "README", "moved.md"]
    old = ["doc 0\n", "old 4\n", "main\n", None]
    new = [None, None, "other\n", "doc 0\n"]
    checkout_with_reader(mount, tmp_path, env, paths, old, new)
    assert not mount.path("docs").exists() and not mount.src("docs").exists()
    assert_git_clean(mount, env)
    assert_no_debris(mount.source)


# -- stage 2: attributes of committed names (chmod, chown, times, xattrs) ------------------
_VIEW = r"""
import json, os, stat
def view(p):
    # what a process sees of an object's attributes (not atime, not ctime), as text
    try:
        st = os.lstat(p)
    except OSError as exc:
        return "error %d" % exc.errno
    for _ in range(10):
        try:
            xs = {n: os.getxattr(p, n, follow_symlinks=False).decode()
                  for n in sorted(os.listxattr(p, follow_symlinks=False))
                  if n.startswith("user.")}
            break
        except OSError as exc:  # removed between listxattr and getxattr: again
            xs = {"error": exc.errno}
    return json.dumps([oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid, st.st_mtime_ns,
                       xs])
def split_view(p):
    # stat, then xattrs: two reads, in this order (a commit may land between them)
    v = json.loads(view(p))
    return [json.dumps(v[:4]), json.dumps(v[4])]
"""
_view_ns: dict[str, Any] = {}
exec(_VIEW, _view_ns)  # the same function in this (outside) process


def view(path: Path) -> str:
    return str(_view_ns["view"](str(path)))


ATTR_PATHS = ["a", "dir"]


def views(where: Callable[..., Path]) -> list[str]:
    return [view(where(p)) for p in ATTR_PATHS]


def member_dump(out: Path) -> str:
    """A shell command: a member writes its view of ATTR_PATHS (cwd: the mount) to out."""
    code = _VIEW + ("import sys; json.dump([view(p) for p in sys.argv[2:]], "
                    "open(sys.argv[1], 'w'))")
    return f"{PYTHON} -c {shlex.quote(code)} {out} {' '.join(ATTR_PATHS)}"


def seed_attrs(m: Mount) -> None:
    seed(m)
    m.src("dir").mkdir()
    m.src("dir", "f").write_text("f\n")
    os.chmod(m.src("a"), 0o644)
    os.chmod(m.src("dir"), 0o755)
    for p in ("a", "dir"):
        os.setxattr(m.src(p), "user.old", b"old")
        os.utime(m.src(p), ns=(1_200_000_000 * 10**9, 1_200_000_000 * 10**9))


ATTR_CASES = {
    "chmod": "chmod 640 a && chmod 700 dir",
    "chown": "chown 1234:5678 a && chown 4321 dir",
    "touch": "touch -c -d @1000000000 a && touch -d @1100000000 dir",
    "setfattr": "setfattr -n user.x -v new a && setfattr -n user.x -v new dir",
    "setfattr-x": "setfattr -x user.old a && setfattr -x user.old dir",
    "with-new-content": ("chmod 600 a && echo more >> a && setfattr -n user.x -v 1 a && "
                         "touch -d @1000000000 a && setfattr -x user.old a && chmod 711 dir"),
}


@pytest.mark.parametrize("case", sorted(ATTR_CASES))
def test_attributes_of_committed_names_change_with_the_transaction(
        mount: Mount, tmp_path: Path, case: str) -> None:
    """chmod, chown, utimes, setxattr, removexattr of a committed file and a committed
    directory: members see them at once, outsiders the committed attributes until
    the commit, then everyone (and SOURCE) the member's."""
    seed_attrs(mount)
    old = views(mount.path)
    assert views(mount.src) == old
    dump = tmp_path / "member.json"
    with paused_run(mount, f"{ATTR_CASES[case]} && {member_dump(dump)}", tmp_path,
                    mount.mountpoint) as run:
        assert dump.exists(), run.proc.communicate(timeout=TIMEOUT)
        inside = json.loads(dump.read_text())
        for p, o, n in zip(ATTR_PATHS, old, inside, strict=True):
            assert n != o, f"the member does not see its change of {p}: {n}"
        assert views(mount.path) == old  # outside: the committed attributes
        assert views(mount.src) == old
        run.go()
        assert run.wait() == 0, run.proc.communicate(timeout=TIMEOUT)
    assert views(mount.path) == inside
    assert views(mount.src) == inside
    if case == "with-new-content":
        assert mount.path("a").read_text() == "a old\nmore\n"
    assert_no_debris(mount.source)


def test_attributes_of_the_root_and_of_a_symlink(mount: Mount, tmp_path: Path) -> None:
    """The mount's root (no name: its own record operation) and a symlink itself
    (lchown, utimes without following)."""
    seed(mount)
    os.symlink("a", mount.src("link"))
    os.chmod(mount.source, 0o755)
    paths = [".", "link", "a"]
    old = [view(mount.src(p)) for p in paths]  # (the kernel may hold the root's from before)
    script = "chmod 711 . && chown -h 1234:5678 link && touch -h -d @1000000000 link"
    with paused_run(mount, script, tmp_path, mount.mountpoint) as run:
        assert [view(mount.path(p)) for p in paths] == old
        run.go()
        assert run.wait() == 0, run.proc.communicate(timeout=TIMEOUT)
    new = [view(mount.path(p)) for p in paths]
    assert [view(mount.src(p)) for p in paths] == new
    assert stat_mode(mount.source) == 0o711
    st = os.lstat(mount.src("link"))
    assert (st.st_uid, st.st_gid, st.st_mtime) == (1234, 5678, 1_000_000_000)
    assert new[2] == old[2]  # the symlink's target is untouched
    assert_no_debris(mount.source)


def test_set_id_bits_follow_the_same_rules_as_outside(mount: Mount, tmp_path: Path) -> None:
    """A chown clears set-uid (and set-gid with group execute) of a file, not of a
    directory, inside a transaction as outside it."""
    seed(mount)
    for name, mode in (("a", 0o6755), ("b", 0o6755), ("dir", 0o2755), ("dir2", 0o2755)):
        if name.startswith("dir"):
            mount.src(name).mkdir()
        os.chmod(mount.src(name), mode)
    os.chown(mount.path("b"), 1234, -1)  # outside
    os.chown(mount.path("dir2"), 1234, -1)
    with paused_run(mount, f"chown 1234 a dir && stat -c %a a dir > {tmp_path}/member",
                    tmp_path, mount.mountpoint) as run:
        assert (tmp_path / "member").read_text().split() == ["755", "2755"]
        assert stat_mode(mount.path("a")) == 0o6755  # outside: committed
        run.go()
        assert run.wait() == 0
    for where in (mount.path, mount.src):
        assert stat_mode(where("a")) == stat_mode(where("b")) == 0o755
        assert stat_mode(where("dir")) == stat_mode(where("dir2")) == 0o2755
        assert os.stat(where("a")).st_uid == 1234


def test_attribute_changes_are_dropped_by_an_abort(mount: Mount, tmp_path: Path) -> None:
    seed_attrs(mount)
    old = views(mount.path)
    dump = tmp_path / "member.json"
    script = " && ".join(ATTR_CASES[c] for c in ("chmod", "chown", "touch", "setfattr"))
    res = atomicfs_run(mount, "sh", "-c", f"{script} && {member_dump(dump)} && exit 4",
                       cwd=mount.mountpoint)
    assert res.returncode == 4, res.stderr
    assert all(n != o for n, o in zip(json.loads(dump.read_text()), old, strict=True))
    assert views(mount.path) == old
    assert views(mount.src) == old
    assert_no_debris(mount.source)


_ATTR_POLLER = _VIEW + r"""
import sys
paths = json.loads(sys.argv[1]); stop = sys.argv[2]
last = None
while not os.path.exists(stop):
    seen = [x for p in paths for x in split_view(p)]
    if seen != last:
        print(json.dumps(seen), flush=True)
        last = seen
"""


def test_an_outside_reader_sees_all_attribute_changes_at_once(
        mount: Mount, tmp_path: Path) -> None:
    """An outside process polling stat and xattrs of three objects throughout never
    sees a new attribute before the commit, nor an old one after a new one."""
    seed_attrs(mount)
    paths = [mount.path(p) for p in ("a", "b", "dir")]
    split = _view_ns["split_view"]
    old: list[str | None] = [x for p in paths for x in split(str(p))]
    stop = tmp_path / "stop"
    poller = subprocess.Popen([sys.executable, "-c", _ATTR_POLLER,
                               json.dumps([str(p) for p in paths]), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)
        res = atomicfs_run(mount, "sh", "-c",
                           "chmod 600 a; sleep 0.3; setfattr -n user.x -v 1 b; sleep 0.3; "
                           "chown 4321 b; touch -d @1100000000 dir; setfattr -x user.old a; "
                           "setfattr -n user.y -v 2 dir; sleep 0.3",
                           cwd=mount.mountpoint)
        time.sleep(0.3)
    finally:
        stop.touch()
        out, _ = poller.communicate(timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    new: list[str | None] = [x for p in paths for x in split(str(p))]
    assert all(n != o for n, o in zip(new, old, strict=True)), (old, new)
    passes = [json.loads(line) for line in out.splitlines() if line.strip()]
    olds, news = check_never_mixed(passes, old, new)
    assert olds and news, f"the reader did not run across the commit ({olds} old, {news} new)"
    assert [x for p in ("a", "b", "dir") for x in split(str(mount.src(p)))] == new


NOBODY = 65534


def as_nobody(*cmd: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]


def stat_mode(p: Path) -> int:
    return os.stat(p).st_mode & 0o7777


def test_permissions_are_judged_by_each_side_s_mode(mount: Mount, tmp_path: Path) -> None:
    """The kernel checks permissions (default_permissions) by the attributes it asks
    for: a member's by the member's mode, an outsider's by the committed mode."""
    seed(mount)
    os.chown(mount.src("a"), NOBODY, NOBODY)
    os.chmod(mount.src("a"), 0o644)

    def outsider_reads() -> bool:
        res = subprocess.run(as_nobody("cat", "a"), cwd=mount.mountpoint,
                             capture_output=True, text=True, timeout=TIMEOUT)
        return res.returncode == 0 and res.stdout == "a old\n"

    assert outsider_reads()
    result = tmp_path / "member"
    inner = ("chmod 000 a && (cat a > /dev/null 2>&1 && echo read || echo denied); "
             "chown 1234 a 2>/dev/null && echo chowned || echo refused")
    script = f"{shlex.join(as_nobody('sh', '-c', inner))} > {result}"
    with paused_run(mount, script, tmp_path, mount.mountpoint) as run:
        # the member: by its own mode 000; and the kernel's rule: no chown for a user
        assert result.read_text() == "denied\nrefused\n"
        assert outsider_reads()  # an outsider: by the committed 0644
        assert stat_mode(mount.path("a")) == 0o644
        run.go()
        assert run.wait() == 0
    assert not outsider_reads()  # committed: 000 for everyone
    assert stat_mode(mount.src("a")) == 0


def test_tar_xf_over_an_existing_tree_sets_modes_and_times(
        mount: Mount, tmp_path: Path) -> None:
    """tar sets the modes and times of the directories and files it extracts, existing
    ones included: all of it lands with the commit."""
    tree = tmp_path / "tree"
    for d in range(4):
        sub = tree / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(3):
            (sub / f"f{f}").write_text(f"new {d} {f}\n")
            os.chmod(sub / f"f{f}", 0o600)
            os.utime(sub / f"f{f}", (1_000_000_000 + f, 1_000_000_000 + f))
        os.chmod(sub, 0o750)
        os.utime(sub, (1_100_000_000 + d, 1_100_000_000 + d))
    os.chmod(tree, 0o711)
    os.utime(tree, (1_150_000_000, 1_150_000_000))
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname="tree")
    # the committed tree: the same names, other modes, times and contents
    for d in range(4):
        sub = mount.src("tree", f"d{d}")
        sub.mkdir(parents=True)
        for f in range(3):
            (sub / f"f{f}").write_text(f"old {d} {f}\n")
    before = {p: view(mount.path(p)) for p in ("tree", "tree/d0", "tree/d3/f2")}
    res = atomicfs_run(mount, "sh", "-c", f"tar xf {archive} -C {mount.mountpoint} && "
                       f"test \"$(stat -c %a {mount.mountpoint}/tree/d2)\" = 750 && exit 3")
    assert res.returncode == 3, res.stderr  # the member saw the modes; then it failed
    assert {p: view(mount.path(p)) for p in before} == before
    res = atomicfs_run(mount, "tar", "xf", str(archive), "-C", str(mount.mountpoint))
    assert res.returncode == 0, res.stderr
    for where in (mount.path, mount.src):
        for p in [tree, *tree.rglob("*")]:
            rel = str(p.relative_to(tmp_path))
            st, want = os.lstat(where(rel)), os.lstat(p)
            assert (oct(st.st_mode), st.st_mtime_ns) == (oct(want.st_mode),
                                                         want.st_mtime_ns), rel
        assert where("tree", "d1", "f2").read_text() == "new 1 2\n"
    assert_no_debris(mount.source)


ATTR_SCRIPT = ("echo 'a new' > a && chmod 600 a && chmod 640 b && setfattr -n user.x -v 1 b && "
               "touch -d @1100000000 dir && echo c > c")


@pytest.mark.parametrize("point,applied", [("tx.before_record", False),
                                           ("tx.after_record", True),
                                           ("tx.apply", True)])
def test_daemon_crash_during_a_commit_with_attributes_leaves_all_or_nothing(
        mount_factory: MountFactory, point: str, applied: bool) -> None:
    m = mount_factory(env={"ATOMICFS_FAULTS": f"exit:{point}"})
    seed_attrs(m)
    paths = ["a", "b", "dir"]
    old = [view(m.src(p)) for p in paths]
    crash_in_commit(m, ATTR_SCRIPT)
    now = [view(m.path(p)) for p in paths]
    if applied:
        m.expect_log("replayed the committed transaction")
        assert m.path("a").read_text() == "a new\n" and m.path("c").read_text() == "c\n"
        assert stat_mode(m.path("a")) == 0o600 and stat_mode(m.path("b")) == 0o640
        assert os.getxattr(m.path("b"), "user.x") == b"1"
        assert os.stat(m.path("dir")).st_mtime == 1_100_000_000
        assert all(n != o for n, o in zip(now, old, strict=True))
    else:
        assert now == old
        assert m.path("a").read_text() == "a old\n" and not m.path("c").exists()
    assert [view(m.src(p)) for p in paths] == now
    assert_no_debris(m.source)


def test_an_outside_change_of_attributes_it_changed_is_a_conflict(
        mount: Mount, tmp_path: Path) -> None:
    """First committer wins for attributes too (docs/semantics.md §14 item 11): an
    outsider's chmod of an object whose attributes the transaction changed fails
    the commit, and stays; one of an object it did not touch does not."""
    seed_attrs(mount)
    script = "chmod 600 a && touch -d @1100000000 dir && echo 'b tx' > b"
    with paused_run(mount, script, tmp_path, mount.mountpoint) as run:
        os.chmod(mount.path("a"), 0o604)
        run.go()
        code = run.wait()
        _, err = run.proc.communicate(timeout=TIMEOUT)
    assert code == RUN_FAILED, (code, err)
    assert "conflict: a was changed outside the transaction" in err, err
    mount.expect_log(r"WARNING .*commit failed \(conflict: ")
    assert stat_mode(mount.src("a")) == 0o604
    assert os.stat(mount.src("dir")).st_mtime == 1_200_000_000
    assert mount.path("b").read_text() == "b old\n"
    (tmp_path / "go").unlink()
    (tmp_path / "ready").unlink()
    with paused_run(mount, script, tmp_path, mount.mountpoint) as run:
        os.chmod(mount.path("b"), 0o606)  # not touched by the transaction's attributes
        os.setxattr(mount.path("dir", "f"), "user.y", b"outside")
        run.go()
        assert run.wait() == 0, run.proc.communicate(timeout=TIMEOUT)
    assert stat_mode(mount.src("a")) == 0o600
    assert os.stat(mount.src("dir")).st_mtime == 1_100_000_000
    assert mount.src("b").read_text() == "b tx\n"
    assert_no_debris(mount.source)


# -- limits (docs/semantics.md §14, "Limits") ------------------------------------------------
@pytest.mark.parametrize("change", ["mkfifo q; ln q q2", "ln -s a s; ln s s2"])
def test_known_limit_a_hard_link_to_a_fifo_or_symlink_it_made_is_refused(
        mount: Mount, change: str) -> None:
    """Not built: the call fails, CMD fails, nothing changes."""
    seed(mount)
    mount.src("dir").mkdir()
    mount.src("dir", "f").write_text("f\n")
    res = atomicfs_run(mount, "sh", "-c", f"echo 'a new' > c; {change}", cwd=mount.mountpoint)
    assert res.returncode != 0 and "not supported" in res.stderr.lower(), res.stderr
    assert_old(mount)
    assert mount.path("dir", "f").read_text() == "f\n"


def test_known_limit_a_hard_linked_file_cannot_be_written(mount: Mount) -> None:
    seed(mount)
    os.link(mount.src("a"), mount.src("a2"))
    res = atomicfs_run(mount, "sh", "-c", "echo 'a new' > a", cwd=mount.mountpoint)
    assert res.returncode != 0 and "not supported" in res.stderr.lower(), res.stderr
    assert mount.path("a").read_text() == "a old\n"


def test_known_limit_a_member_cannot_map_shared_a_file_it_rewrites(mount: Mount) -> None:
    seed(mount)
    script = ("import mmap, os, sys\n"
              "fd = os.open('a', os.O_RDWR)\n"
              "os.pwrite(fd, b'A', 0)\n"
              "try:\n"
              "    mmap.mmap(fd, 6, mmap.MAP_SHARED)\n"
              "except OSError as exc:\n"
              "    sys.exit(exc.errno)\n")
    res = atomicfs_run(mount, sys.executable, "-c", script, cwd=mount.mountpoint)
    assert res.returncode == 19, res.stderr  # ENODEV: its handles bypass the page cache
    assert_old(mount)


def _replace_by_rename(path: Path, text: str) -> None:
    """An outsider's save by rename (an editor's): a new file, then rename over."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.rename(tmp, path)


def _write_source_in_place(m: Mount) -> None:
    """A change made directly in SOURCE, beside the mount (in place, new size)."""
    with open(m.src("a"), "w") as f:
        f.write("a changed in SOURCE\n")


# (the transaction's script, what an outsider does meanwhile, the path to be named,
#  what the outsider leaves there: None = removed)
CONFLICTS = {
    "outside-rename-over-a-file-it-rewrote": (
        "echo 'a tx' > a", lambda m: _replace_by_rename(m.path("a"), "a outside\n"),
        "a", "a outside\n"),
    "outside-rewrite-of-a-file-it-replaced-by-rename": (
        "echo 'a tx' > a.tmp && mv a.tmp a", lambda m: m.path("a").write_text("a outside\n"),
        "a", "a outside\n"),
    "outside-create-of-a-name-it-created": (
        "echo 'c tx' > c", lambda m: m.path("c").write_text("c outside\n"),
        "c", "c outside\n"),
    "outside-unlink-of-a-file-it-rewrote": (
        "echo 'a tx' > a", lambda m: m.path("a").unlink(), "a", None),
    "outside-unlink-of-a-file-it-unlinked": (
        "rm a", lambda m: m.path("a").unlink(), "a", None),
    "outside-rewrite-of-a-file-it-unlinked": (
        "rm a", lambda m: _replace_by_rename(m.path("a"), "a outside\n"), "a", "a outside\n"),
    "outside-chmod-of-a-file-it-chmodded": (
        "chmod 600 a", lambda m: os.chmod(m.path("a"), 0o604), "a", "a old\n"),
    "direct-change-in-source-of-a-file-it-rewrote": (
        "echo 'a tx' > a", _write_source_in_place, "a", "a changed in SOURCE\n"),
}


@pytest.mark.parametrize("durability", ["full", "batch"])
@pytest.mark.parametrize("case", sorted(CONFLICTS))
def test_a_conflicting_change_outside_fails_the_commit(
        mount_factory: MountFactory, tmp_path: Path, case: str, durability: str) -> None:
    """First committer wins: a change committed outside (through the mount or in
    SOURCE) to a name the transaction changed, after its first touch, fails the
    commit: status 125, one line naming the path, nothing of the transaction
    applied (its change of b included)."""
    script, outside, path, left = CONFLICTS[case]
    mount = mount_factory(options=[f"durability={durability}"])
    seed(mount)
    with paused_run(mount, f"echo 'b tx' > b; {script}", tmp_path, mount.mountpoint) as run:
        outside(mount)
        run.go()
        code = run.wait()
        _, err = run.proc.communicate(timeout=TIMEOUT)
    assert code == RUN_FAILED, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "conflict" in lines[0] and f"{path} was changed" in lines[0], lines
    mount.expect_log(r"WARNING .*commit failed \(conflict: ")
    for where in (mount.path, mount.src):
        assert where("b").read_text() == "b old\n"
        if left is None:
            assert not where(path).exists()
        else:
            assert where(path).read_text() == left
        assert not where("a.tmp").exists()
        if path != "c":
            assert not where("c").exists()
    assert_no_debris(mount.source)


@pytest.mark.parametrize("durability", ["full", "batch"])
def test_changes_outside_to_other_names_are_no_conflict(
        mount_factory: MountFactory, tmp_path: Path, durability: str) -> None:
    """Only the names the transaction changes count: an outsider rewriting, creating
    and removing other names meanwhile (and reading the transaction's files) does
    not fail the commit; neither do plain reads by the transaction."""
    mount = mount_factory(options=[f"durability={durability}"])
    seed(mount)
    mount.src("r").write_text("read by the transaction\n")
    mount.src("gone").write_text("x\n")
    with paused_run(mount, "cat r > /dev/null; echo 'a tx' > a; echo 'c tx' > c; "
                    "echo 't tx' > t && mv t b; echo x > o && rm o",
                    tmp_path, mount.mountpoint) as run:
        _replace_by_rename(mount.path("r"), "r outside\n")
        mount.path("o").write_text("o outside\n")  # a name it made and dropped again
        mount.path("gone").unlink()
        assert mount.path("a").read_text() == "a old\n"
        run.go()
        assert run.wait() == 0
    for where in (mount.path, mount.src):
        assert [where(p).read_text() for p in ("a", "b", "c", "r", "o")] == [
            "a tx\n", "t tx\n", "c tx\n", "r outside\n", "o outside\n"]
    assert_no_debris(mount.source)


# -- crashes: kill -9 of the daemon, and exits at exact steps of the commit ---------------
def test_daemon_killed_mid_transaction_leaves_nothing(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    m = mount_factory()
    seed(m)
    ready = tmp_path / "ready"
    proc = start_run(m, "sh", "-c", f"cd {m.mountpoint}; echo 'a new' > a; echo 'b new' > b; "
                     f"mkdir d; echo x > d/x; touch {ready}; sleep 2", cwd=tmp_path)
    try:
        assert wait_for(lambda: ready.exists(), TIMEOUT)
        assert any(n.startswith("tx-") for n in os.listdir(m.src(".atomicfs")))
        m.kill()
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == RUN_FAILED
    m.start()
    assert_old(m)


@pytest.mark.parametrize("point,applied", [("tx.before_sync", False),
                                           ("tx.before_record", False),
                                           ("tx.after_record", True),
                                           ("tx.apply", True)])
def test_daemon_crash_during_the_commit_leaves_all_or_nothing(
        mount_factory: MountFactory, point: str, applied: bool) -> None:
    m = mount_factory(env={"ATOMICFS_FAULTS": f"exit:{point}"})
    seed(m)
    res = atomicfs_run(m, sys.executable, "-c", SCRIPT, str(m.mountpoint), "")
    assert res.returncode == RUN_FAILED, (res.returncode, res.stderr)
    assert "atomicfs run" in res.stderr
    m.kill()
    m.env = None
    m.start()  # recovery: replay a complete record, discard an incomplete one
    if applied:
        assert_new(m)
        m.expect_log("replayed the committed transaction")
    else:
        assert_old(m)


def test_commit_errors_give_a_distinct_status_and_one_line(mount_factory: MountFactory) -> None:
    m = mount_factory(env={"ATOMICFS_FAULTS": "fail:tx.before_record:ENOSPC"})
    seed(m)
    res = atomicfs_run(m, sys.executable, "-c", SCRIPT, str(m.mountpoint), "")
    assert res.returncode == RUN_FAILED
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not committed" in lines[0] and "No space" in lines[0], lines
    m.expect_log(r"WARNING .*commit failed")
    assert_old(m)


@pytest.mark.parametrize("faults,durable", [("fail:tx.before_dir_fsync:EIO", True),
                                             ("fail:tx.before_dir_fsync:EIO,"
                                              "fail:tx.syncfs:EIO", False)],
                         ids=["syncfs-saves-it", "not-durable"])
def test_a_failed_directory_sync_after_the_commit_is_said(
        mount_factory: MountFactory, faults: str, durable: bool) -> None:
    """The names are in place when the directories are synced: a failed fsync is
    retried as one syncfs; if that fails too, the log and `atomicfs run` say the
    transaction is visible but not known durable, and its record stays for the next
    mount to replay (idempotent)."""
    m = mount_factory(env={"ATOMICFS_FAULTS": faults})
    seed(m)
    res = atomicfs_run(m, sys.executable, "-c", SCRIPT, str(m.mountpoint), "")
    log = m.log()
    assert "WARNING atomicfs.transactions: a committed transaction's directory fsync " \
        "failed (EIO (Input/output error)); trying syncfs" in log, log
    if durable:
        assert res.returncode == 0, res.stderr
        assert re.search(r"committed: \d+ names put in place or removed, \d+ directories "
                         r"synced", log), log
        assert_new(m)
        return
    m.expect_log(r"ERROR .*NOT known durable")
    assert res.returncode == RUN_FAILED, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not known durable (EIO" in lines[0], lines
    assert re.search(r"ERROR atomicfs\.transactions: transaction of pid \d+ committed: "
                     r"\d+ names put in place or removed and visible, but NOT known durable: "
                     r"syncing its \d+ directories failed \(EIO \(Input/output error\)\); "
                     r"its record stays", log), log
    assert "directories synced" not in log
    for where in (m.path, m.src):  # applied and visible
        assert [where(p).read_text() for p in PATHS] == NEW
    assert [n for n in os.listdir(m.src(".atomicfs")) if n.startswith("tx-")]
    m.unmount()
    m.env = None
    m.start()  # the record is replayed: nothing changes, nothing is left
    m.expect_log("replayed the committed transaction")
    assert_new(m)


def test_run_without_a_mount_or_command_is_refused(tmp_path: Path) -> None:
    res = run_cli(["run", str(tmp_path), "--", "true"])
    assert res.returncode == RUN_FAILED and "not a mount point" in res.stderr
    res = run_cli(["run", str(tmp_path)])
    assert res.returncode == 2


# -- pure logic, no FUSE ----------------------------------------------------------------------
def test_conflicts_compare_only_changed_names_with_what_was_seen(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("one")
    first = identity_of(os.stat(f))
    assert identity_of(None) is None
    seen = {(1, b"f"): first, (1, b"new"): None, (1, b"dropped"): None}
    now = {(1, b"f"): first, (1, b"new"): None, (1, b"dropped"): first}
    look = lambda p, n: now[(p, n)]  # noqa: E731
    # alone: nothing differs; a name it no longer changes does not count
    assert conflicts(seen, {(1, b"f"), (1, b"new")}, look) == []
    assert conflicts(seen, {(1, b"dropped")}, look) == [(1, b"dropped")]
    f.write_text("two!")  # same file, other contents
    now[(1, b"f")] = identity_of(os.stat(f))
    now[(1, b"new")] = first  # a name made meanwhile
    assert conflicts(seen, {(1, b"f"), (1, b"new"), (2, b"unseen")}, look) == [
        (1, b"f"), (1, b"new")]


def test_record_round_trip_and_torn_records() -> None:
    ops = [txrecord.Unlink((b"a",), b"old", 2049, 1234, "1:00ff"),
           txrecord.Put("f1", (b"a", b"\xffb"), b"name"), txrecord.Put("d2", (), b"top")]
    data = txrecord.encode(ops)
    assert txrecord.decode(data) == ops
    for cut in (1, len(data) // 2, len(data) - 2):
        assert txrecord.decode(data[:cut]) is None
    flipped = data.replace(b"name", b"nbme")
    assert txrecord.decode(flipped) is None
    evil = txrecord.encode([txrecord.Put("f1", (b"..",), b"x")])
    assert txrecord.decode(evil) is None


def test_replay_is_idempotent_and_discards_incomplete(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / ".atomicfs" / "tx-1").mkdir(parents=True)
    (root / "dir").mkdir()
    (root / "dir" / "f").write_text("old")
    (root / "dir" / "gone").write_text("to remove")
    (root / "dir" / "kept").write_text("to remove")
    (root / ".atomicfs" / "tx-1" / "f1").write_text("new")
    (root / ".atomicfs" / "tx-1" / "f2").write_text("created")
    (root / ".atomicfs" / "tx-2" / "f1").mkdir(parents=True)  # no record: discarded
    rfd = os.open(root, os.O_PATH)
    dfd = os.open(root / ".atomicfs", os.O_PATH)
    try:
        sfd = os.open(root / ".atomicfs" / "tx-1", os.O_PATH)
        ids = {}
        for name in ("gone", "kept"):
            fd = os.open(root / "dir" / name, os.O_PATH)
            st = os.stat(fd)
            ids[name] = (st.st_dev, st.st_ino, txrecord.identity(fd))
            os.close(fd)
        assert ids["kept"][2], "no file handles here: the test needs them"
        txrecord.write(sfd, [txrecord.Unlink((b"dir",), b"gone", *ids["gone"]),
                             txrecord.Unlink((b"dir",), b"kept", *ids["kept"]),
                             txrecord.Put("f1", (b"dir",), b"f"),
                             txrecord.Put("f2", (), b"g")])
        # "kept" was removed by the apply and made again by someone else since (ext4
        # may give the new file the freed inode number: the handle tells them apart)
        os.unlink(root / "dir" / "kept")
        (root / "dir" / "kept").write_text("made again")
        # the first change was applied before the crash
        os.rename("f1", "f", src_dir_fd=sfd, dst_dir_fd=os.open(root / "dir", os.O_PATH))
        os.close(sfd)
        done = txrecord.recover(rfd, dfd, ["tx-1", "tx-2", "other"])
    finally:
        os.close(rfd)
        os.close(dfd)
    assert (root / "dir" / "f").read_text() == "new"
    assert (root / "g").read_text() == "created"
    assert not (root / "dir" / "gone").exists()
    assert (root / "dir" / "kept").read_text() == "made again"
    assert os.listdir(root / ".atomicfs") == []
    assert any("replayed" in d and "2 of 4" in d for d in done)
    assert any("discarded" in d for d in done)


def _names_tree(tmp_path: Path) -> tuple[Path, list[txrecord.Op]]:
    """SOURCE with a, b, d/x, d/sub/y and a staging directory holding what a
    transaction that swapped a and b, removed d and made a new d/n staged: a and b
    linked under tokens (before the record), the new directory complete."""
    root = tmp_path / "root"
    staging = root / ".atomicfs" / "tx-1"
    staging.mkdir(parents=True)
    (root / "d" / "sub").mkdir(parents=True)
    for rel, text in (("a", "A"), ("b", "B"), ("d/x", "X"), ("d/sub/y", "Y")):
        (root / rel).write_text(text)
    os.link(root / "a", staging / "f1")
    os.link(root / "b", staging / "f2")
    (staging / "d3").mkdir()
    (staging / "d3" / "n").write_text("N")

    def gone(kind: type[txrecord.Unlink] | type[txrecord.Rmdir], rel: str) -> txrecord.Op:
        path = root / rel
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.stat(fd)
            return kind(tuple(os.fsencode(p) for p in Path(rel).parent.parts), path.name.encode(),
                        st.st_dev, st.st_ino, txrecord.identity(fd))
        finally:
            os.close(fd)

    # in the order the daemon writes them: removals deepest first, then puts
    ops = [gone(txrecord.Unlink, "d/sub/y"), gone(txrecord.Unlink, "d/x"),
           gone(txrecord.Rmdir, "d/sub"), gone(txrecord.Unlink, "a"),
           gone(txrecord.Unlink, "b"), gone(txrecord.Rmdir, "d"),
           txrecord.Put("f2", (), b"a"), txrecord.Put("f1", (), b"b"),
           txrecord.Put("d3", (), b"d")]
    return root, ops


def apply_then_recover(root: Path, ops: list[txrecord.Op], done: int) -> None:
    """Write the record of ``ops`` in ``root/.atomicfs/tx-1``, apply its first ``done``
    steps (a crash after them), then recover, twice when all were applied (a replay
    of a record whose every step is done)."""
    sfd = os.open(root / ".atomicfs" / "tx-1", os.O_PATH)
    try:
        txrecord.write(sfd, ops)
        rfd = os.open(root, os.O_PATH)
        for op in ops[:done]:
            pfd = txrecord.open_parent(rfd, op.parent)
            txrecord.apply_op(sfd, op, pfd)
            os.close(pfd)
        os.close(rfd)
        if done == len(ops):  # all applied: a copy of the record is replayed once more
            (root / "copy").write_bytes((root / ".atomicfs" / "tx-1" / "record").read_bytes())
    finally:
        os.close(sfd)
    rfd = os.open(root, os.O_PATH)
    dfd = os.open(root / ".atomicfs", os.O_PATH)
    try:
        txrecord.recover(rfd, dfd, ["tx-1"])
        if (root / "copy").exists():  # replay again after a complete apply
            (root / ".atomicfs" / "tx-1").mkdir()
            os.rename(root / "copy", root / ".atomicfs" / "tx-1" / "record")
            txrecord.recover(rfd, dfd, ["tx-1"])
    finally:
        os.close(rfd)
        os.close(dfd)


@pytest.mark.parametrize("done", range(10))
def test_replay_of_moves_and_removals_ends_in_one_tree_from_any_step(
        tmp_path: Path, done: int) -> None:
    """A crash after any number of applied steps, then recovery (twice: a crash
    during recovery replays again), ends in the same tree; so does a replay of
    the record after everything was applied."""
    root, ops = _names_tree(tmp_path)
    apply_then_recover(root, ops, done)
    assert tree(root) == {"a": "B", "b": "A", "d": "dir", "d/n": "N"}
    assert os.listdir(root / ".atomicfs") == []


def _stash_tree(tmp_path: Path) -> tuple[Path, list[txrecord.Op]]:
    """SOURCE with d/x, d/sub/y, e/z, and the record of a deploy: mv d old, rm old/x,
    mv e d, a new file d/n (staged as f3)."""
    root = tmp_path / "root"
    staging = root / ".atomicfs" / "tx-1"
    staging.mkdir(parents=True)
    (root / "d" / "sub").mkdir(parents=True)
    (root / "e").mkdir()
    for rel, text in (("d/x", "X"), ("d/sub/y", "Y"), ("e/z", "Z")):
        (root / rel).write_text(text)
    (staging / "f3").write_text("N")

    def ident(rel: str) -> tuple[tuple[bytes, ...], bytes, int, int, str]:
        fd = os.open(root / rel, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.stat(fd)
            return (tuple(os.fsencode(p) for p in Path(rel).parent.parts),
                    Path(rel).name.encode(), st.st_dev, st.st_ino, txrecord.identity(fd))
        finally:
            os.close(fd)

    ops = [txrecord.Unlink(*ident("d/x")), txrecord.Stash(*ident("d"), "m1"),
           txrecord.Stash(*ident("e"), "m2"), txrecord.Put("m1", (), b"old"),
           txrecord.Put("m2", (), b"d"), txrecord.Put("f3", (b"d",), b"n")]
    return root, ops


@pytest.mark.parametrize("done", range(7))
def test_replay_of_moved_directories_ends_in_one_tree_from_any_step(
        tmp_path: Path, done: int) -> None:
    """Stashes and puts of moved directories: a crash after any number of applied
    steps, then recovery (twice), ends in the same tree; a stash whose name is now
    another directory (d, after the put of e there) is done, not repeated."""
    root, ops = _stash_tree(tmp_path)
    assert txrecord.decode(txrecord.encode(ops)) == ops
    apply_then_recover(root, ops, done)
    assert tree(root) == {"d": "dir", "d/n": "N", "d/z": "Z", "old": "dir", "old/sub": "dir",
                          "old/sub/y": "Y"}
    assert os.listdir(root / ".atomicfs") == []


def test_record_with_removals_of_directories_round_trips() -> None:
    ops = [txrecord.Rmdir((b"d",), b"sub", 1, 2, "1:aa"), txrecord.Unlink((), b"a", 1, 3),
           txrecord.Put("f1", (), b"b")]
    assert txrecord.decode(txrecord.encode(ops)) == ops


def test_membership_follows_parents_threads_and_start_times() -> None:
    procs = {10: (1, 100), 20: (10, 200), 30: (20, 300), 31: (20, 310), 40: (1, 400)}
    tgids = {31: 30}  # thread 31 of process 30
    m = Membership(procs.get, lambda tid: tgids.get(tid, tid))
    assert m.find(30) is None  # no transaction open: nobody is a member
    m.add(10, 100, "tx")
    assert m.find(10) == "tx" and m.find(30) == "tx" and m.find(31) == "tx"
    assert m.find(40) is None
    procs[30] = (40, 999)  # pid 30 reused by another process (another start time)
    assert m.find(30) is None
    m.remove(10)
    assert m.find(20) is None
    m.add(10, 555, "tx2")  # a root of the same pid but not the same process
    assert m.find(20) is None


def test_parse_stat_handles_names_with_spaces_and_parens() -> None:
    line = b"123 (a (b) c) S 45 123 123 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 0 0\n"
    assert parse_stat(line) == (45, 98765)


# -- what the kernel may cache inside a transaction (docs/performance.md) ------------------
_STATS = r"""
import os, sys
os.chdir(sys.argv[1])
os.mkdir("d")
os.mkdir("d/sub")
with open("d/sub/f", "w") as f:
    f.write("new\n")
dfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY)
os.stat("d/sub/f")  # the create in d/sub made the kernel drop what it knew of d/sub
os.path.exists("mark-start")  # a LOOKUP that marks the start of the window in the log
for _ in range(10):
    os.stat("d/sub/f")
    os.fstat(dfd)
os.path.exists("mark-end")
"""


def _requests_in_window(log: str) -> list[str]:
    """The requests the daemon logged (-o debug) between the two marks of _STATS."""
    lines = [ln.split("-> ", 1)[1] for ln in log.splitlines() if "-> " in ln]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("lookup(1, b'mark-start'"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("lookup(1, b'mark-end'"))
    return lines[start + 1:end]


@pytest.mark.mount_options("debug")
def test_names_inside_a_new_directory_are_cached_for_members(mount: Mount,
                                                             tmp_path: Path) -> None:
    """Only members can reach what is inside a directory the transaction made, so the
    kernel may cache those names and attributes: a member's stat() of d/sub/f asks
    the daemon again only about d (a name in a committed directory)."""
    with paused_run(mount, f"{PYTHON} -c '{_STATS}' {mount.mountpoint}", tmp_path,
                    mount.mountpoint) as run:
        window = _requests_in_window(mount.log())
        # outsiders still see nothing of it, although a member's lookups were cached
        assert not mount.path("d").exists()
        assert not mount.path("d", "sub", "f").exists()
        run.go()
        assert run.wait() == 0
    assert mount.path("d", "sub", "f").read_text() == "new\n"
    about_f = [r for r in window if r.startswith("lookup(") and "b'f'" in r]
    about_sub = [r for r in window if r.startswith("lookup(") and "b'sub'" in r]
    assert (about_f, about_sub) == ([], []), window
    assert sum(1 for r in window if r.startswith("lookup(1, b'd'")) == 10, window


@pytest.mark.mount_options("debug")
def test_attributes_of_what_a_transaction_made_are_cached_for_members(
        mount: Mount, tmp_path: Path) -> None:
    """The attributes of a directory or file the transaction made are the same for
    every process that can reach it (only members can): fstat() of a new directory
    through a descriptor is answered by the kernel's cache."""
    with paused_run(mount, f"{PYTHON} -c '{_STATS}' {mount.mountpoint}", tmp_path,
                    mount.mountpoint) as run:
        window = _requests_in_window(mount.log())
        assert not mount.path("d").exists()
        run.go()
        assert run.wait() == 0
    getattrs = [r for r in window if r.startswith("getattr(")]
    assert getattrs == [], window
    assert mount.path("d", "sub", "f").read_text() == "new\n"


def test_proc_stat_reads_parent_and_start_time_of_live_processes_only() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            want = parse_stat(f.read())
        assert want is not None and want[0] == os.getpid()
        assert proc_stat(child.pid) == want
        assert proc_stat(os.getpid()) == (os.getppid(), parse_stat(
            Path(f"/proc/{os.getpid()}/stat").read_bytes())[1])  # type: ignore[index]
    finally:
        child.kill()
        child.wait()
    assert proc_stat(child.pid) is None  # reaped: gone from /proc


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (drop_caches)")
@pytest.mark.parametrize("change", ["new-file", "new-dir", "unlink", "chmod"])
def test_a_directory_the_kernel_forgot_during_the_transaction_still_commits(
        mount: Mount, change: str) -> None:
    """The kernel forgets directories it has not used for a while (memory pressure;
    here drop_caches, by the member itself): a committed directory holding the
    transaction's changes must stay known until the commit, which puts them there."""
    mount.src("d", "e").mkdir(parents=True)
    mount.src("d", "e", "old").write_text("old\n")
    do = {"new-file": "echo new > d/e/new", "new-dir": "mkdir d/e/sub",
          "unlink": "rm d/e/old", "chmod": "chmod 600 d/e/old"}[change]
    res = atomicfs_run(mount, "sh", "-c", f"set -e; {do}; cd /; "
                       "echo 2 > /proc/sys/vm/drop_caches; sleep 0.5", cwd=mount.mountpoint)
    assert res.returncode == 0, res.stderr
    names = sorted(os.listdir(mount.src("d", "e")))
    assert names == {"new-file": ["new", "old"], "new-dir": ["old", "sub"], "unlink": [],
                     "chmod": ["old"]}[change]
    if change == "chmod":
        assert stat.S_IMODE(os.stat(mount.src("d", "e", "old")).st_mode) == 0o600
    assert_no_debris(mount.source)


def test_a_step_that_fails_after_the_record_keeps_it_for_the_next_mount(
        mount_factory: MountFactory) -> None:
    """docs/semantics.md §14 item 6: past the durable record the transaction is
    committed; a rename that fails there (a full disk) leaves the record, the
    command gets 125 and one line saying so, and the next mount completes the
    transaction.  (A directory sync that fails: the test below.)"""
    m = mount_factory(env={"ATOMICFS_FAULTS": "fail:tx.apply_op:ENOSPC"})
    seed(m)
    res = atomicfs_run(m, sys.executable, "-c", SCRIPT, str(m.mountpoint), "")
    assert res.returncode == RUN_FAILED, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "was committed, but not all of it is applied" in lines[0], lines
    m.expect_log(r"ERROR .*(committed but incomplete|applying .* failed)")
    assert "committed but incomplete" in m.log()
    assert status_of(m.mountpoint)["transactions_done"]["incomplete"] == 1
    assert [p.name for p in (m.source / ".atomicfs").iterdir() if p.name.startswith("tx-")]
    m.unmount()
    m.env = None
    m.start()  # recovery replays the record
    m.expect_log("replayed the committed transaction")
    assert_new(m)
    assert_no_debris(m.source)
