"""Real programs through the mount, each compared with the same run on a plain directory.

Each test runs an unmodified program (tar, cp, rsync, git, sqlite3, sed) once
into an atomicfs mount and once into a plain directory of the same
filesystem, then compares the results: with the program's own checker where
it has one (diff -r, rsync --itemize-changes, git fsck, PRAGMA
integrity_check) and with a walk that compares type, mode, owner, size,
mtime, content, symlink target, device number, xattrs (ACLs included), link
count and hard-link structure.  The source tree is compared again after the
unmount, so the results are really in SOURCE.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import IS_ROOT, ROOT, MountFactory, mounted_fstype
from sessionkit import git_env

MiB = 1 << 20

# every program runs under each commit strategy, reader mode and durability
OPTION_SETS = [
    pytest.param((), id="defaults"),
    pytest.param(("commit=journal",), id="journal"),
    pytest.param(("isolation=shared",), id="shared"),
    pytest.param(("durability=batch",), id="batch"),
]


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/bootstrap.sh installs it for tests)")


def run(cmd: Sequence[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run([os.fspath(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, (f"{list(cmd)} exited {res.returncode}:\n"
                                 + res.stderr.decode(errors="replace")[-3000:])
    return res


# -- a realistic tree --------------------------------------------------------------------

ODD_NAMES = [
    "with space", "new\nline", "tab\there", "-leading-dash", "ünïcødé ✓", "'quote\"s",
    "back\\slash", "*star?", "L" * 255,
]
NON_UTF8 = b"latin1-\xe9t\xe9-\xff\xfe"


def build_tree(base: Path) -> Path:
    """A tree with the things programs trip over; returns ``base/tree``."""
    t = base / "tree"
    shutil.copytree(ROOT / "atomicfs", t / "src" / "atomicfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in ("tar", "sed", "rsync", "attr", "acl", "sqlite3"):
        doc = Path("/usr/share/doc") / pkg
        if doc.is_dir():
            shutil.copytree(doc, t / "doc" / pkg, symlinks=True)
    # odd names
    (t / "names").mkdir()
    for i, name in enumerate(ODD_NAMES):
        (t / "names" / name).write_bytes(f"file {i}\n".encode())
    with open(os.path.join(os.fsencode(t / "names"), NON_UTF8), "wb") as f:
        f.write(b"non-UTF-8 name\n")
    os.mkdir(os.path.join(os.fsencode(t / "names"), b"dir-" + NON_UTF8))
    # symlinks: relative, to a directory, dangling, absolute, chained
    (t / "links").mkdir()
    os.symlink("../src/atomicfs/cli.py", t / "links" / "rel")
    os.symlink("../src", t / "links" / "dir")
    os.symlink("nowhere/at/all", t / "links" / "dangling")
    os.symlink("/etc/hostname", t / "links" / "absolute")
    os.symlink("rel", t / "links" / "chain")
    # hard links, across directories
    (t / "hard" / "sub").mkdir(parents=True)
    (t / "hard" / "a").write_bytes(b"linked content\n" * 100)
    os.link(t / "hard" / "a", t / "hard" / "b")
    os.link(t / "hard" / "a", t / "hard" / "sub" / "c")
    (t / "hard" / "x").write_bytes(b"#!/bin/sh\necho x\n")
    os.chmod(t / "hard" / "x", 0o755)
    os.link(t / "hard" / "x", t / "links" / "x-hard")
    # special files
    (t / "special").mkdir()
    os.mkfifo(t / "special" / "fifo", 0o640)
    if IS_ROOT:
        os.mknod(t / "special" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    # sparse: 16 MiB with three small data ranges
    with open(t / "sparse.img", "wb") as f:
        f.truncate(16 * MiB)
        f.write(b"head")
        f.seek(8 * MiB)
        f.write(b"middle" * 1000)
        f.seek(16 * MiB - 4)
        f.write(b"tail")
    # bigger file with incompressible content, empty file, empty dir, deep dir
    (t / "big.bin").write_bytes(hashlib.shake_256(b"atomicfs").digest(3 * MiB + 123))
    (t / "empty.txt").write_bytes(b"")
    (t / "empty-dir").mkdir()
    deep = t.joinpath(*[f"d{i}" for i in range(12)])
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("deep\n")
    # modes
    (t / "modes").mkdir()
    for mode in (0o600, 0o644, 0o444, 0o000, 0o755, 0o4755, 0o2711):
        p = t / "modes" / f"m{mode:04o}"
        p.write_text(f"{mode:o}\n")
        os.chmod(p, mode)
    (t / "modes" / "setgid-dir").mkdir()
    os.chmod(t / "modes" / "setgid-dir", 0o2775)
    (t / "modes" / "sticky-dir").mkdir()
    os.chmod(t / "modes" / "sticky-dir", 0o1777)
    # xattrs on a file and a directory
    os.setxattr(t / "big.bin", "user.comment", b"three mebibytes")
    os.setxattr(t / "modes", "user.kind", b"dir\x00with nul")
    # owners
    if IS_ROOT:
        os.chown(t / "modes" / "m0644", 1234, 5678)
        os.chown(t / "modes" / "sticky-dir", 65534, 65534)
        os.chown(t / "links" / "rel", 4321, 8765, follow_symlinks=False)
        os.chown(t / "hard" / "a", 1000, 1000)
    # fixed, distinct mtimes everywhere (directories last: bottom-up)
    stamp = 1_000_000_000_123_456_789
    for parent, subdirs, files in os.walk(os.fsencode(t), topdown=False):
        for entry in sorted(files) + sorted(subdirs):
            stamp += 1_000_003_007
            os.utime(os.path.join(parent, entry), ns=(stamp, stamp), follow_symlinks=False)
    os.utime(t, ns=(stamp + 7, stamp + 7))
    return t


def add_acls(t: Path) -> None:
    need("setfacl")
    run(["setfacl", "-m", "u:1234:rw,g:5678:r", t / "src" / "atomicfs" / "cli.py"])
    run(["setfacl", "-d", "-m", "u:1234:rwx", t / "doc"] if (t / "doc").is_dir()
        else ["setfacl", "-d", "-m", "u:1234:rwx", t / "names"])


def build_acl_tree(tmp_path: Path) -> Path:
    """:func:`build_tree` in ``tmp_path/build``, with :func:`add_acls`; returns the tree."""
    build = tmp_path / "build"
    build.mkdir()
    tree = build_tree(build)
    add_acls(tree)
    return tree


# -- comparing trees ---------------------------------------------------------------------

def tree_state(root: Path) -> tuple[dict[bytes, dict[str, object]], set[frozenset[bytes]]]:
    """Every entry below ``root`` (relative bytes path -> properties), and the hard-link groups."""
    entries: dict[bytes, dict[str, object]] = {}
    by_inode: dict[int, list[bytes]] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        info: dict[str, object] = {
            "type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
            "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns, "nlink": st.st_nlink,
        }
        if stat.S_ISREG(st.st_mode):
            info["size"] = st.st_size
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(MiB):
                    h.update(chunk)
            info["sha256"] = h.hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            info["target"] = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info["rdev"] = st.st_rdev
        info["xattrs"] = {name: os.getxattr(path, name, follow_symlinks=False)
                          for name in sorted(os.listxattr(path, follow_symlinks=False))}
        entries[rel] = info
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), os.path.join(rel, name) if rel else name)
        elif st.st_nlink > 1:
            by_inode.setdefault(st.st_ino, []).append(rel)

    visit(os.fsencode(root), b"")
    return entries, {frozenset(names) for names in by_inode.values()}


def assert_same_tree(got: Path, want: Path) -> None:
    """``got`` (through atomicfs, or its SOURCE) equals ``want`` (the plain run)."""
    got_entries, got_links = tree_state(got)
    want_entries, want_links = tree_state(want)
    problems = []
    for rel in sorted(set(got_entries) | set(want_entries)):
        g, w = got_entries.get(rel), want_entries.get(rel)
        if g != w:
            if g is None or w is None:
                problems.append(f"{rel!r}: only in {'plain run' if g is None else 'atomicfs'}")
            else:
                diff = {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)}
                problems.append(f"{rel!r}: (atomicfs, plain) {diff}")
    if got_links != want_links:
        problems.append(f"hard links differ: atomicfs {sorted(map(sorted, got_links))} "
                        f"plain {sorted(map(sorted, want_links))}")
    assert not problems, f"{got} differs from {want}:\n" + "\n".join(problems[:30])


def assert_rich(tree: Path) -> None:
    """The reference really has what the comparisons are about (no vacuous pass)."""
    entries, links = tree_state(tree)
    assert frozenset({b"hard/a", b"hard/b", b"hard/sub/c"}) in links
    assert frozenset({b"hard/x", b"links/x-hard"}) in links
    assert entries[b"special/fifo"]["type"] == stat.S_IFIFO
    assert entries[b"links/dangling"]["target"] == b"nowhere/at/all"
    assert entries[b"big.bin"]["xattrs"] == {"user.comment": b"three mebibytes"}
    assert entries[b"modes/m4755"]["mode"] == oct(0o4755)
    assert b"names/" + NON_UTF8 in entries and b"names/new\nline" in entries
    assert len({e["mtime"] for e in entries.values()}) > len(entries) // 2
    if IS_ROOT:
        assert entries[b"special/null"]["rdev"] == os.makedev(1, 3)
        assert (entries[b"modes/m0644"]["uid"], entries[b"modes/m0644"]["gid"]) == (1234, 5678)
        assert entries[b"links/rel"]["uid"] == 4321
    acl = entries[b"src/atomicfs/cli.py"]["xattrs"]
    assert isinstance(acl, dict) and "system.posix_acl_access" in acl


SAME_KIND = re.compile(rb"^File .* is a (fifo|character special file|block special file) "
                       rb"while file .* is a \1$")


def assert_diff_r_clean(a: Path, b: Path) -> None:
    """``diff -r`` finds no difference.

    diff has no content to compare for fifos and devices and may report a pair
    of them ("File A is a fifo while file B is a fifo"); those lines are left
    to :func:`assert_same_tree`, which compares their type, mode and rdev.
    """
    res = subprocess.run(["diff", "-r", "--no-dereference", os.fspath(a), os.fspath(b)],
                         capture_output=True, timeout=60)
    lines = [line for line in res.stdout.splitlines() if not SAME_KIND.match(line)]
    assert res.returncode in (0, 1) and not lines, (
        b"\n".join(lines[:30]).decode(errors="replace") + res.stderr.decode(errors="replace"))


def assert_sparse(path: Path) -> None:
    st = os.stat(path)
    assert st.st_size == 16 * MiB
    assert st.st_blocks * 512 < 2 * MiB, f"{path} lost its holes: {st.st_blocks} blocks"


def assert_nothing_left(source: Path) -> None:
    """After a clean unmount, no daemon directory and no temporary names in SOURCE."""
    left = [os.path.join(d, n) for d, dirs, files in os.walk(os.fsencode(source))
            for n in dirs + files if n.startswith(b".atomicfs")]
    assert not left, left


# -- tar ---------------------------------------------------------------------------------

TAR_X = ["tar", "--extract", "--sparse", "--xattrs", "--xattrs-include=*", "--acls",
         "--numeric-owner", "--same-owner", "--same-permissions"]


def make_tarball(tmp_path: Path) -> Path:
    need("tar")
    tree = build_acl_tree(tmp_path)
    tarball = tmp_path / "tree.tar"
    run(["tar", "--create", "--sparse", "--xattrs", "--xattrs-include=*", "--acls",
         "--numeric-owner", f"--file={tarball}", "-C", tree.parent, "tree"])
    return tarball


@pytest.mark.parametrize("options", OPTION_SETS)
def test_tar_extract(mount_factory: MountFactory, tmp_path: Path,
                     options: tuple[str, ...]) -> None:
    need("diff")
    mount = mount_factory(options=options)
    tarball = make_tarball(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    run([*TAR_X, f"--file={tarball}", "-C", plain])
    run([*TAR_X, f"--file={tarball}", "-C", mount.mountpoint])
    assert_rich(plain / "tree")
    assert_diff_r_clean(mount.path("tree"), plain / "tree")
    assert_same_tree(mount.path("tree"), plain / "tree")
    assert_sparse(mount.path("tree", "sparse.img"))
    # tar's own check: compare the archive with what is on disk
    run(["tar", "--compare", "--xattrs", "--numeric-owner", f"--file={tarball}",
         "-C", mount.mountpoint])
    mount.unmount()
    assert_same_tree(mount.src("tree"), plain / "tree")
    assert_sparse(mount.src("tree", "sparse.img"))
    assert_nothing_left(mount.source)


@pytest.mark.parametrize("options", OPTION_SETS)
def test_tar_extract_twice_overwrites_in_place(mount_factory: MountFactory, tmp_path: Path,
                                               options: tuple[str, ...]) -> None:
    # the second extraction replaces every file: unlink + create, over existing names
    mount = mount_factory(options=options)
    tarball = make_tarball(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    for _ in range(2):
        run([*TAR_X, f"--file={tarball}", "-C", plain])
        run([*TAR_X, f"--file={tarball}", "-C", mount.mountpoint])
    assert_same_tree(mount.path("tree"), plain / "tree")
    mount.unmount()
    assert_same_tree(mount.src("tree"), plain / "tree")


# -- cp -a -------------------------------------------------------------------------------

@pytest.mark.parametrize("options", OPTION_SETS)
def test_cp_a(mount_factory: MountFactory, tmp_path: Path,
              options: tuple[str, ...]) -> None:
    need("cp", "diff")
    mount = mount_factory(options=options)
    tree = build_acl_tree(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    run(["cp", "-a", tree, plain])
    run(["cp", "-a", tree, mount.mountpoint])
    assert_rich(plain / "tree")
    assert_diff_r_clean(mount.path("tree"), plain / "tree")
    assert_same_tree(mount.path("tree"), plain / "tree")
    assert_same_tree(mount.path("tree"), tree)  # cp -a keeps everything
    assert_sparse(mount.path("tree", "sparse.img"))
    # and back out of the mount
    back = tmp_path / "back"
    back.mkdir()
    run(["cp", "-a", mount.path("tree"), back])
    assert_same_tree(back / "tree", tree)
    mount.unmount()
    assert_same_tree(mount.src("tree"), plain / "tree")
    assert_nothing_left(mount.source)


# -- rsync -aHAX round trip --------------------------------------------------------------

def rsync_changes(src: Path, dst: Path) -> list[str]:
    """What ``rsync -aHAX --checksum --dry-run`` would still change (empty: identical)."""
    res = run(["rsync", "-aHAX", "--checksum", "--dry-run", "--itemize-changes", "--delete",
               f"{src}/", f"{dst}/"])
    return res.stdout.decode(errors="replace").splitlines()


@pytest.mark.parametrize("options", OPTION_SETS)
def test_rsync_round_trip(mount_factory: MountFactory, tmp_path: Path,
                          options: tuple[str, ...]) -> None:
    need("rsync", "setfacl")
    mount = mount_factory(options=options)
    tree = build_acl_tree(tmp_path)
    plain2 = tmp_path / "plain2"
    into = mount.path("tree")
    run(["rsync", "-aHAX", f"{tree}/", f"{into}/"])
    run(["rsync", "-aHAX", f"{into}/", f"{plain2}/"])
    assert_rich(plain2)
    assert rsync_changes(tree, into) == []
    assert rsync_changes(tree, plain2) == []
    assert rsync_changes(into, plain2) == []
    assert_same_tree(into, tree)
    assert_same_tree(plain2, tree)
    # the ACL really is there, as getfacl reads it
    acl = run(["getfacl", "--omit-header", "--numeric", into / "src" / "atomicfs" / "cli.py"])
    assert b"user:1234:rw-" in acl.stdout
    # a second pass after a change transfers just that file
    (tree / "src" / "atomicfs" / "cli.py").write_text("changed\n")
    res = run(["rsync", "-aHAX", "--itemize-changes", f"{tree}/", f"{into}/"])
    changed = [line for line in res.stdout.decode(errors="replace").splitlines()
               if not line.startswith(".d")]
    assert [line.split(" ", 1)[1] for line in changed] == ["src/atomicfs/cli.py"], changed
    assert rsync_changes(tree, into) == []
    mount.unmount()
    assert_same_tree(mount.src("tree"), tree)
    assert_nothing_left(mount.source)


# -- git ---------------------------------------------------------------------------------

def git_session(repo: Path, env: dict[str, str]) -> dict[str, bytes]:
    """init, two commits, gc, fsck; returns what to compare between the two runs."""
    git = ["git", "-c", "safe.directory=*", "-c", "init.defaultBranch=main",
           "-c", "core.fsync=all", "-c", "gc.auto=0"]
    run([*git, "init", "-q", repo], env=env)
    shutil.copytree(ROOT / "atomicfs", repo / "atomicfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "README").write_text("a repository inside atomicfs\n")
    run([*git, "add", "-A"], cwd=repo, env=env)
    run([*git, "commit", "-q", "-m", "first"], cwd=repo, env=env)
    with open(repo / "README", "a") as f:
        f.write("a second line\n")
    (repo / "atomicfs" / "new.py").write_text("NEW = 1\n")
    os.unlink(repo / "atomicfs" / "__main__.py")
    run([*git, "add", "-A"], cwd=repo, env=env)
    run([*git, "commit", "-q", "-m", "second"], cwd=repo, env=env)
    run([*git, "tag", "-a", "-m", "v1", "v1"], cwd=repo, env=env)
    run([*git, "gc", "-q", "--prune=now"], cwd=repo, env=env)
    fsck = run([*git, "fsck", "--full", "--strict", "--no-dangling"], cwd=repo, env=env)
    assert fsck.stdout == b"", fsck.stdout
    packs = sorted((repo / ".git" / "objects" / "pack").glob("*.idx"))
    assert len(packs) == 1
    run([*git, "verify-pack", *packs], cwd=repo, env=env)
    return {
        "log": run([*git, "log", "--format=%H %T %s", "--stat"], cwd=repo, env=env).stdout,
        "status": run([*git, "status", "--porcelain", "--ignored"], cwd=repo, env=env).stdout,
        "tag": run([*git, "rev-parse", "v1"], cwd=repo, env=env).stdout,
        "show": run([*git, "show", "HEAD~1:README"], cwd=repo, env=env).stdout,
    }


@pytest.mark.parametrize("options", OPTION_SETS)
def test_git(mount_factory: MountFactory, tmp_path: Path,
             options: tuple[str, ...]) -> None:
    need("git")
    mount = mount_factory(options=options)
    env = git_env(tmp_path / "home")
    on_mount = git_session(mount.path("repo"), env)
    plain = git_session(tmp_path / "plain-repo", env)
    assert on_mount == plain  # fixed dates: the very same commit ids
    assert on_mount["log"].count(b"\n") > 10
    assert on_mount["status"] == b""
    assert on_mount["show"] == b"a repository inside atomicfs\n"
    mount.unmount()
    # the repository is intact in SOURCE, read without the mount
    git = ["git", "-c", "safe.directory=*"]
    run([*git, "fsck", "--full", "--strict"], cwd=mount.src("repo"), env=env)
    log = run([*git, "log", "--format=%H %T %s", "--stat"], cwd=mount.src("repo"), env=env)
    assert log.stdout == plain["log"]
    assert_nothing_left(mount.source)


# -- sqlite3 -----------------------------------------------------------------------------

SQL_WRITE = """
PRAGMA journal_mode={mode};
CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT NOT NULL, data BLOB);
CREATE INDEX t_name ON t(name);
BEGIN;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000)
INSERT INTO t(name, data) SELECT 'row ' || x, zeroblob(100 + x % 700) FROM c;
COMMIT;
BEGIN;
UPDATE t SET name = name || ' updated' WHERE id % 7 = 0;
DELETE FROM t WHERE id % 11 = 0;
COMMIT;
BEGIN;
DELETE FROM t;
ROLLBACK;
"""
SQL_READ = """
SELECT count(*), sum(id), sum(length(data)) FROM t;
SELECT name FROM t WHERE id IN (1, 7, 11, 2999, 3000);
SELECT count(*) FROM t WHERE name LIKE '%updated';
PRAGMA integrity_check;
"""


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite3_cli(mount_factory: MountFactory, tmp_path: Path, mode: str,
                     options: tuple[str, ...]) -> None:
    need("sqlite3")
    mount = mount_factory(options=options)
    plain = tmp_path / "plain"
    plain.mkdir()
    outputs = []
    for where in (mount.mountpoint, plain):
        db = where / "test.db"
        wrote = run(["sqlite3", "-batch", "-bail", db, SQL_WRITE.format(mode=mode)])
        read = run(["sqlite3", "-batch", "-bail", db, SQL_READ])  # a new process reads back
        outputs.append((wrote.stdout, read.stdout))
        assert read.stdout.splitlines()[-1] == b"ok"
        assert sorted(os.listdir(where)) == ["test.db"]  # no journal, -wal or -shm left
    assert outputs[0] == outputs[1]
    ids = [x for x in range(1, 3001) if x % 11]
    expected = f"{len(ids)}|{sum(ids)}|{sum(100 + x % 700 for x in ids)}"
    assert outputs[0][1].splitlines()[0] == expected.encode()
    # the same statements give the same database file, byte for byte
    assert mount.path("test.db").read_bytes() == (plain / "test.db").read_bytes()
    mount.unmount()
    assert mount.src("test.db").read_bytes() == (plain / "test.db").read_bytes()
    assert_nothing_left(mount.source)


def sqlite_python_session(path: Path) -> list[tuple[object, ...]]:
    con = sqlite3.connect(path)
    try:
        con.execute("CREATE TABLE kv(k TEXT PRIMARY KEY, v BLOB, n INTEGER)")
        with con:  # one transaction
            con.executemany("INSERT INTO kv VALUES (?, ?, ?)",
                            ((f"key{i:05d}", bytes([i % 256]) * (i % 3000), i)
                             for i in range(2000)))
        try:
            with con:
                con.execute("DELETE FROM kv")
                raise RuntimeError("abandon the transaction")
        except RuntimeError:
            pass
        with con:
            con.execute("UPDATE kv SET n = -n WHERE n % 3 = 0")
    finally:
        con.close()
    con = sqlite3.connect(path)  # reopen and read back
    try:
        rows = con.execute("SELECT count(*), sum(n), sum(length(v)), min(k), max(k) "
                           "FROM kv").fetchall()
        rows += con.execute("PRAGMA integrity_check").fetchall()
        rows += con.execute("SELECT k, n FROM kv WHERE n < -5990").fetchall()
    finally:
        con.close()
    return rows


@pytest.mark.parametrize("options", OPTION_SETS)
def test_sqlite3_python_module(mount_factory: MountFactory, tmp_path: Path,
                               options: tuple[str, ...]) -> None:
    mount = mount_factory(options=options)
    plain = tmp_path / "plain"
    plain.mkdir()
    got = sqlite_python_session(mount.path("py.db"))
    want = sqlite_python_session(plain / "py.db")
    assert got == want
    assert got[0][0] == 2000 and got[1] == ("ok",)
    assert os.listdir(mount.mountpoint) == ["py.db"]
    mount.unmount()
    assert mount.src("py.db").read_bytes() == (plain / "py.db").read_bytes()


# -- sed -i ------------------------------------------------------------------------------

FRUITS = "".join(f"{i} apple banana apple\n" for i in range(500))


def prepare_sed(where: Path) -> Path:
    f = where / "fruits.txt"
    f.write_text(FRUITS)
    os.chmod(f, 0o640)
    if IS_ROOT:
        os.chown(f, 1234, 5678)
    os.setxattr(f, "user.note", b"kept?")
    os.utime(f, ns=(1_100_000_000_000_000_000, 1_100_000_000_000_000_000))
    (where / "other").write_text("untouched\n")
    return f


@pytest.mark.parametrize("options", OPTION_SETS)
def test_sed_in_place(mount_factory: MountFactory, tmp_path: Path,
                      options: tuple[str, ...]) -> None:
    need("sed")
    mount = mount_factory(options=options)
    plain = tmp_path / "plain"
    plain.mkdir()
    for where in (mount.mountpoint, plain):
        f = prepare_sed(where)
        run(["sed", "-i", "-e", "s/apple/pear/g", "-e", "3d", f])
        run(["sed", "-i.orig", "-e", "1i first line", f])
    assert mount.path("fruits.txt").read_text().startswith("first line\n0 pear banana pear\n")
    assert "apple" not in mount.path("fruits.txt").read_text()
    assert mount.path("fruits.txt.orig").read_text() == FRUITS.replace("apple", "pear").replace(
        "2 pear banana pear\n", "", 1)
    # no temporary file left next to it; the same result as on the plain directory
    assert sorted(os.listdir(mount.mountpoint)) == ["fruits.txt", "fruits.txt.orig", "other"]
    # sed writes a new file: its mtime is "now", the rest must match
    for name in ("fruits.txt", "fruits.txt.orig"):
        assert mount.path(name).read_bytes() == (plain / name).read_bytes()
        gst, wst = os.stat(mount.path(name)), os.stat(plain / name)
        assert (gst.st_mode, gst.st_uid, gst.st_gid) == (wst.st_mode, wst.st_uid, wst.st_gid)
        assert os.listxattr(mount.path(name)) == os.listxattr(plain / name)
    mount.unmount()
    assert sorted(os.listdir(mount.source)) == ["fruits.txt", "fruits.txt.orig", "other"]
    for name in ("fruits.txt", "fruits.txt.orig", "other"):
        assert mount.src(name).read_bytes() == (plain / name).read_bytes()


# -- mounted over itself -----------------------------------------------------------------

def test_tar_into_a_directory_mounted_over_itself(mount_factory: MountFactory,
                                                  tmp_path: Path) -> None:
    need("tar", "diff")
    tarball = make_tarball(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    run([*TAR_X, f"--file={tarball}", "-C", plain])
    d = tmp_path / "self"
    (d / "before").mkdir(parents=True)
    (d / "before" / "kept.txt").write_text("there before the mount\n")
    m = mount_factory(source=d, mountpoint=d)
    assert mounted_fstype(d) == "fuse.atomicfs"
    assert (d / "before" / "kept.txt").read_text() == "there before the mount\n"
    run([*TAR_X, f"--file={tarball}", "-C", d])
    assert_same_tree(d / "tree", plain / "tree")
    m.unmount()
    assert mounted_fstype(d) != "fuse.atomicfs"
    assert_diff_r_clean(d / "tree", plain / "tree")
    assert_same_tree(d / "tree", plain / "tree")
    assert sorted(os.listdir(d)) == ["before", "tree"]
    assert (d / "before" / "kept.txt").read_text() == "there before the mount\n"
