"""Real programs under the default options (isolation=committed, durability=full).

- git clone --no-local, push, fetch and gc into the mount: ``git index-pack``
  reopens the ``tmp_pack_*`` it is writing (O_RDONLY, from several threads) and
  must read what it wrote (docs/semantics.md §4.1).
- LMDB: a writer process and two reader processes, each mapping the data file
  shared while the writer holds it (§4.5).

The fixtures fail a test on any warning or error in the daemon's log.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import Mount, MountFactory
from sessionkit import git_env, status_of, wait_for

TIMEOUT = 120


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/bootstrap.sh installs it for tests)")


# -- git -----------------------------------------------------------------------------

def git(args: Sequence[str | Path], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(["git", "-c", "safe.directory=*", "-c", "init.defaultBranch=main",
                          *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"git {list(args)} exited {res.returncode}:\n{res.stderr}"
    return res.stdout


def add_commits(repo: Path, env: dict[str, str], n: int, seed: int) -> None:
    """``n`` commits, each changing three files with incompressible text: ~4 objects
    each, so every transfer is well above git's unpack limit (100 objects): a pack
    kept and indexed by index-pack."""
    rnd = random.Random(seed)
    for i in range(n):
        for k in range(3):
            path = repo / f"dir{k}" / f"file{rnd.randrange(20)}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_text(f"commit {seed}-{i}\n" + "".join(
                rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789 \n") for _ in range(2000)))
        git(["add", "-A"], repo, env)
        git(["commit", "-q", "-m", f"commit {seed}-{i}"], repo, env)


@pytest.fixture
def origin(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    env = git_env(tmp_path / "home")
    repo = tmp_path / "origin"
    repo.mkdir()
    git(["init", "-q"], repo, env)
    add_commits(repo, env, 120, seed=1)
    return repo, env


def assert_same_history(a: Path, b: Path, env: dict[str, str], ref: str = "HEAD") -> None:
    assert git(["rev-parse", ref], a, env) == git(["rev-parse", ref], b, env)
    git(["fsck", "--full", "--strict", "--no-dangling"], b, env)


def assert_no_failure(mnt: Path) -> None:
    assert wait_for(lambda: not status_of(mnt)["sessions"], timeout=10)
    assert status_of(mnt)["failures"] == {}


def test_git_clone_no_local_into_the_mount(mount_factory: MountFactory,
                                           origin: tuple[Path, dict[str, str]]) -> None:
    need("git")
    repo, env = origin
    m = mount_factory()
    git(["clone", "-q", "--no-local", repo, m.path("clone")], m.mountpoint, env)
    packs = list(m.path("clone", ".git", "objects", "pack").glob("pack-*.pack"))
    assert len(packs) == 1  # index-pack kept the pack (not unpacked to loose objects)
    assert_same_history(repo, m.path("clone"), env)
    assert_no_failure(m.mountpoint)
    m.unmount()
    git(["fsck", "--full", "--strict", "--no-dangling"], m.src("clone"), env)


def test_git_push_into_a_bare_repository_in_the_mount(mount_factory: MountFactory,
                                                      origin: tuple[Path, dict[str, str]]
                                                      ) -> None:
    need("git")
    repo, env = origin
    m = mount_factory()
    git(["init", "-q", "--bare", m.path("bare.git")], m.mountpoint, env)
    git(["push", "-q", m.path("bare.git"), "HEAD:refs/heads/main"], repo, env)
    assert_same_history(repo, m.path("bare.git"), env, "main")
    add_commits(repo, env, 40, seed=2)  # a second push: a pack into an existing repo
    git(["push", "-q", m.path("bare.git"), "HEAD:refs/heads/main"], repo, env)
    assert_same_history(repo, m.path("bare.git"), env, "main")
    assert_no_failure(m.mountpoint)


def clone_one_thread(repo: Path, m: Mount, env: dict[str, str]) -> Path:
    """A clone into the mount by an index-pack with one thread (which reads its pack
    through the descriptor it writes with), so what follows is tested on its own."""
    clone = m.path("clone")
    git(["-c", "pack.threads=1", "clone", "-q", "--no-local", repo, clone], m.mountpoint,
        env)
    return clone


def test_git_fetch_into_the_mount(mount_factory: MountFactory,
                                  origin: tuple[Path, dict[str, str]]) -> None:
    need("git")
    repo, env = origin
    m = mount_factory()
    clone = clone_one_thread(repo, m, env)
    add_commits(repo, env, 40, seed=3)
    git(["fetch", "-q", "origin"], clone, env)
    git(["merge", "-q", "--ff-only", "origin/main"], clone, env)
    assert_same_history(repo, clone, env)
    assert len(list((clone / ".git" / "objects" / "pack").glob("pack-*.pack"))) == 2
    assert_no_failure(m.mountpoint)


def test_git_gc_in_the_mount(mount_factory: MountFactory,
                             origin: tuple[Path, dict[str, str]]) -> None:
    need("git")
    repo, env = origin
    m = mount_factory()
    clone = clone_one_thread(repo, m, env)
    add_commits(clone, env, 30, seed=4)  # loose objects, and a pack from the clone
    git(["gc", "-q", "--prune=now"], clone, env)
    packs = list((clone / ".git" / "objects" / "pack").glob("pack-*.pack"))
    assert len(packs) == 1  # gc made one pack of everything
    assert not list((clone / ".git" / "objects").glob("??/*"))  # no loose object left
    git(["fsck", "--full", "--strict", "--no-dangling"], clone, env)
    assert git(["rev-list", "--count", "HEAD"], clone, env).strip() == "150"
    git(["verify-pack", packs[0].with_suffix(".idx")], clone, env)
    assert_no_failure(m.mountpoint)
    m.unmount()
    git(["fsck", "--full", "--strict", "--no-dangling"], m.src("clone"), env)


# -- LMDB ------------------------------------------------------------------------------

LMDB_WRITER = textwrap.dedent("""
    import sys, lmdb
    path, rounds = sys.argv[1], int(sys.argv[2])
    env = lmdb.open(path, map_size=64 << 20, max_readers=16)
    # each transaction: a counter and 50 keys that all carry the counter's value
    for n in range(1, rounds + 1):
        with env.begin(write=True) as txn:
            txn.put(b"counter", str(n).encode())
            for k in range(50):
                txn.put(b"key%03d" % k, (b"%d:" % n) + bytes([n % 251]) * 2000)
        print("committed", n, flush=True)
        line = sys.stdin.readline()  # the test lets the writer go on
        if line.strip() != "go":
            break
    print("done", flush=True)
    sys.stdin.readline()  # holds the environment open until told to close it
    env.close()
""")

LMDB_READER = textwrap.dedent("""
    import sys, lmdb
    path = sys.argv[1]
    env = lmdb.open(path, readonly=True, lock=True, max_readers=16)
    print("open", flush=True)
    for line in sys.stdin:
        if line.strip() != "read":
            break
        with env.begin() as txn:
            n = int(txn.get(b"counter"))
            values = {txn.get(b"key%03d" % k) for k in range(50)}
        ok = values == {(b"%d:" % n) + bytes([n % 251]) * 2000}
        print(n, "consistent" if ok else "MIXED", flush=True)
    env.close()
""")


class Proc:
    def __init__(self, script: str, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", script, *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)

    def say(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def hear(self) -> str:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            assert self.p.stderr is not None
            self.p.wait(TIMEOUT)
            raise AssertionError(f"process exited {self.p.returncode}: {self.p.stderr.read()}")
        return line.strip()

    def finish(self) -> None:
        try:
            if self.p.stdin is not None:
                self.p.stdin.close()
            self.p.wait(TIMEOUT)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
            for f in (self.p.stdout, self.p.stderr):
                if f is not None:
                    f.close()


def test_lmdb_writer_and_two_reader_processes(mount_factory: MountFactory) -> None:
    pytest.importorskip("lmdb")
    m = mount_factory()
    path = str(m.path("db"))
    os.mkdir(path)
    writer = Proc(LMDB_WRITER, path, "6")
    readers: list[Proc] = []
    try:
        assert writer.hear() == "committed 1"
        # each reader opens the environment while the writer holds it
        for _ in range(2):
            reader = Proc(LMDB_READER, path)
            readers.append(reader)
            assert reader.hear() == "open"
        for n in range(1, 7):
            for reader in readers:  # every reader sees the last committed transaction
                reader.say("read")
                assert reader.hear() == f"{n} consistent"
            writer.say("go")
            assert writer.hear() == (f"committed {n + 1}" if n < 6 else "done")
        for reader in readers:
            reader.say("read")
            assert reader.hear() == "6 consistent"
    finally:
        for proc in [*readers, writer]:
            proc.finish()
    assert writer.p.returncode == 0 and all(r.p.returncode == 0 for r in readers)
    assert_no_failure(m.mountpoint)
    m.unmount()
    import lmdb  # the environment is whole in SOURCE, read without the mount
    env = lmdb.open(str(m.src("db")), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"counter") == b"6"
    env.close()
