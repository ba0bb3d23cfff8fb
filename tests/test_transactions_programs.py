"""Real programs inside ``atomicfs run`` (docs/semantics.md §14): ``make install
DESTDIR=`` into the mount, and ``pip install`` into a venv on the mount.

Each test mounts a real atomicfs.  An outside reader (``Poller``, a process that
is no member) reads the installed files over and over while the program runs
and must see the old install or the new one, never a mix; a program that fails
half way must leave the old install exactly as it was (contents, modes, links,
inode numbers and times).  Where a test passes today, a ``plain`` variant runs
the same program without ``atomicfs run`` and shows what the check catches
then (a mix, or a half install).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import Mount, cli_env
from sessionkit import TIMEOUT, assert_no_debris, wait_for
from test_transactions import Poller, atomicfs_run, check_never_mixed

needs_make = pytest.mark.skipif(shutil.which("make") is None or shutil.which("install") is None,
                                reason="needs make and coreutils install")

Seen = list[str | None]


class StartedPoller(Poller):
    """A Poller that has read once before the constructor returns, so a program
    started afterwards cannot finish before the reader saw the tree as it was
    (every Poller does now)."""


def check_whole(passes: list[Seen], old: Seen, new: Seen) -> tuple[int, int]:
    """``check_never_mixed`` over the paths that differ between the two versions
    (a path the same in both must read that all along)."""
    same = [i for i, (o, n) in enumerate(zip(old, new, strict=True)) if o == n]
    for seen in passes:
        for i in same:
            assert seen[i] == old[i], f"read {seen[i]!r}, which is in neither version"

    def differ(values: Seen) -> Seen:
        return [v for i, v in enumerate(values) if i not in same]
    return check_never_mixed([differ(p) for p in passes], differ(old), differ(new))


def read_all(paths: list[Path]) -> Seen:
    out: Seen = []
    for p in paths:
        try:
            out.append(p.read_bytes().decode(errors="replace"))
        except FileNotFoundError:
            out.append(None)
    return out


def tree_of(root: Path, ino: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything below ``root`` that an install may change, exactly: kind, mode,
    inode number, mtime and content (or link target) of every entry.  Through the
    mount ``ino=False``: the numbers there are the daemon's (docs/semantics.md §5),
    and bounded in how long a forgotten file keeps its own; SOURCE keeps its inode
    numbers."""
    out: dict[str, tuple[object, ...]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                body: object = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                body = p.read_bytes()
            else:
                body = None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                             st.st_ino if ino else None, st.st_mtime_ns, body)
    return out


def run_plain(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def start(wrapped: bool, m: Mount, *cmd: str) -> subprocess.Popen[str]:
    prefix = [sys.executable, "-m", "atomicfs", "run", str(m.mountpoint), "--"] if wrapped else []
    return subprocess.Popen([*prefix, *cmd], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


# ==========================================================================================
# make install DESTDIR=
# ==========================================================================================
# A project the way real ones install themselves: ``install -d`` of the directories,
# ``install -m 755`` of a program, ``install -m 644`` of a library and data files, a
# symlink by ``ln -sf``, obsolete files of an older version removed.  ``$(PAUSE)`` is a
# hook in the middle of the install (empty unless a test sets it).
MAKEFILE = """\
PREFIX ?= /usr/local
BINDIR = $(DESTDIR)$(PREFIX)/bin
LIBDIR = $(DESTDIR)$(PREFIX)/lib
DATADIR = $(DESTDIR)$(PREFIX)/share/demo
include version.mk

all: demo

demo: demo.in version.mk
\tsed 's/@VERSION@/$(VERSION)/' demo.in > demo

install: all
\tinstall -d $(BINDIR) $(LIBDIR) $(DATADIR)
\tinstall -m 755 demo $(BINDIR)/demo
\tinstall -m 644 libdemo.so.$(VERSION) $(LIBDIR)/libdemo.so.$(VERSION)
\tln -sf libdemo.so.$(VERSION) $(LIBDIR)/libdemo.so
\t$(PAUSE)
\tinstall -m 644 $(DATA) $(DATADIR)
\trm -f $(addprefix $(DATADIR)/,$(OBSOLETE)) $(addprefix $(LIBDIR)/,$(OBSOLETE_LIBS))
\tinstall -m 644 VERSION $(DATADIR)/VERSION

.PHONY: all install
"""

# version -> (data files, obsolete data files, obsolete libraries).  Version 3 lists a
# manual that was never written: its ``install`` of the data files fails (exit 1)
# after the program, the library and the symlink were installed.
VERSIONS = {1: ("a.txt old.txt", "", ""),
            2: ("a.txt new.txt", "old.txt", "libdemo.so.1"),
            3: ("a.txt new.txt manual.txt", "old.txt", "libdemo.so.1 libdemo.so.2")}

# what the outside reader reads, below DESTDIR/usr/local
MAKE_PATHS = ["bin/demo", "lib/libdemo.so", "lib/libdemo.so.1", "lib/libdemo.so.2",
              "share/demo/a.txt", "share/demo/old.txt", "share/demo/new.txt",
              "share/demo/VERSION"]


def make_project(d: Path, version: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    data, obsolete, obsolete_libs = VERSIONS[version]
    (d / "Makefile").write_text(MAKEFILE)
    (d / "version.mk").write_text(f"VERSION = {version}\nDATA = {data}\nOBSOLETE = {obsolete}\n"
                                  f"OBSOLETE_LIBS = {obsolete_libs}\n")
    (d / "demo.in").write_text("#!/bin/sh\necho demo @VERSION@\n")
    (d / "VERSION").write_text(f"{version}\n")
    (d / f"libdemo.so.{version}").write_text(f"lib {version}\n")
    for name in data.split():
        if name != "manual.txt":
            (d / name).write_text(f"{name.split('.')[0]} {version}\n")


def installed(version: int | None) -> Seen:
    """What the reader must see of MAKE_PATHS after installing ``version`` (None: nothing)."""
    if version is None:
        return [None] * len(MAKE_PATHS)
    v = version
    return [f"#!/bin/sh\necho demo {v}\n", f"lib {v}\n",
            "lib 1\n" if v == 1 else None, "lib 2\n" if v == 2 else None, f"a {v}\n",
            "old 1\n" if v == 1 else None, "new 2\n" if v == 2 else None, f"{v}\n"]


def make_install(m: Mount, project: Path, wrapped: bool = True,
                 pause: str = "") -> subprocess.Popen[str]:
    return start(wrapped, m, "make", "-C", str(project), "install",
                 f"DESTDIR={m.path('dest')}", f"PAUSE={pause}")


def assert_install(m: Mount, version: int) -> None:
    local = m.src("dest", "usr", "local")
    assert read_all([local / p for p in MAKE_PATHS]) == installed(version)
    assert os.readlink(local / "lib" / "libdemo.so") == f"libdemo.so.{version}"
    modes = {p: stat.S_IMODE(os.lstat(local / p).st_mode)
             for p in ("bin/demo", f"lib/libdemo.so.{version}", "share/demo/VERSION")}
    assert modes == {"bin/demo": 0o755, f"lib/libdemo.so.{version}": 0o644,
                     "share/demo/VERSION": 0o644}
    res = run_plain(str(m.path("dest", "usr", "local", "bin", "demo")))
    assert res.stdout == f"demo {version}\n", res
    assert_no_debris(m.source)


def install_with_reader(m: Mount, tmp_path: Path, version: int,
                        before: int | None) -> tuple[int, int]:
    """``make install`` of ``version`` in a transaction, paused half way (after the
    program, the library and its symlink) while an outside reader polls; at the
    pause the reader's view must still be the install before.  Returns how many
    reads saw old and new."""
    project = tmp_path / f"demo-{version}"
    make_project(project, version)
    local = m.path("dest", "usr", "local")
    paths = [local / p for p in MAKE_PATHS]
    ready, go = tmp_path / "paused", tmp_path / "go"
    poller = StartedPoller(paths, tmp_path / "stop")
    try:
        proc = make_install(m, project, pause=f"touch {ready}; while [ ! -e {go} ]; "
                            "do sleep 0.02; done")
        try:
            assert wait_for(lambda: ready.exists() or proc.poll() is not None, TIMEOUT)
            assert proc.poll() is None, proc.communicate()
            assert read_all(paths) == installed(before), "half an install is visible"
            go.touch()
            out, err = proc.communicate(timeout=120)
        finally:
            go.touch()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        time.sleep(0.2)
    finally:
        passes = poller.finish()
    assert proc.returncode == 0, (out, err)
    return check_whole(passes, installed(before), installed(version))


@needs_make
def test_make_install_into_an_empty_destdir_appears_whole(mount: Mount, tmp_path: Path) -> None:
    olds, news = install_with_reader(mount, tmp_path, 1, None)
    assert olds and news, (olds, news)
    assert_install(mount, 1)


@needs_make
def test_make_install_over_an_existing_install_appears_whole(
        mount: Mount, tmp_path: Path) -> None:
    """Version 2 over version 1: changed files (program, data, VERSION), a new
    library and data file, the symlink moved to the new library by ``ln -sf``
    (a new symlink renamed over the old), and files of version 1 removed."""
    make_project(tmp_path / "demo-1", 1)
    res = atomicfs_run(mount, "make", "-C", str(tmp_path / "demo-1"), "install",
                       f"DESTDIR={mount.path('dest')}")
    assert res.returncode == 0, res.stderr
    assert_install(mount, 1)
    olds, news = install_with_reader(mount, tmp_path, 2, 1)
    assert olds and news, (olds, news)
    assert_install(mount, 2)
    assert not mount.src("dest", "usr", "local", "lib", "libdemo.so.1").exists()


@needs_make
def test_make_install_that_resets_a_directory_mode_appears_whole(
        mount: Mount, tmp_path: Path) -> None:
    """Over an install whose data directory was made 0700 since: ``install -d`` of
    an existing directory sets its mode again (fchmod), in the transaction."""
    make_project(tmp_path / "demo-1", 1)
    res = atomicfs_run(mount, "make", "-C", str(tmp_path / "demo-1"), "install",
                       f"DESTDIR={mount.path('dest')}")
    assert res.returncode == 0, res.stderr
    data_dir = mount.path("dest", "usr", "local", "share", "demo")
    data_dir.chmod(0o700)
    olds, news = install_with_reader(mount, tmp_path, 2, 1)
    assert olds and news, (olds, news)
    assert_install(mount, 2)
    assert stat.S_IMODE(os.stat(mount.src("dest", "usr", "local", "share", "demo")).st_mode) \
        == 0o755


@needs_make
def test_make_install_plain_shows_the_mix_the_reader_looks_for(
        mount: Mount, tmp_path: Path) -> None:
    """The check is not vacuous: the same install without ``atomicfs run``, paused
    at the same place, shows the outside reader half an install."""
    make_project(tmp_path / "demo-1", 1)
    assert make_install(mount, tmp_path / "demo-1", wrapped=False).wait(timeout=120) == 0
    make_project(tmp_path / "demo-2", 2)
    ready, go = tmp_path / "paused", tmp_path / "go"
    proc = make_install(mount, tmp_path / "demo-2", wrapped=False,
                        pause=f"touch {ready}; while [ ! -e {go} ]; do sleep 0.02; done")
    try:
        assert wait_for(lambda: ready.exists() or proc.poll() is not None, TIMEOUT)
        seen = read_all([mount.path("dest", "usr", "local", p) for p in MAKE_PATHS])
    finally:
        go.touch()
        proc.communicate(timeout=120)
    assert seen not in (installed(1), installed(2))
    with pytest.raises(AssertionError, match="saw a mix"):
        check_never_mixed([seen], installed(1), installed(2))


@needs_make
@pytest.mark.parametrize("over", [False, True], ids=["empty-destdir", "existing-install"])
def test_make_install_that_fails_half_way_leaves_the_old_install(
        mount: Mount, tmp_path: Path, over: bool) -> None:
    """Version 3's install fails at its data files (a manual that was never
    written) after installing the program, the library and the symlink: make
    exits 2, and the tree is exactly as before, inode numbers and times too."""
    if over:
        make_project(tmp_path / "demo-1", 1)
        res = atomicfs_run(mount, "make", "-C", str(tmp_path / "demo-1"), "install",
                           f"DESTDIR={mount.path('dest')}")
        assert res.returncode == 0, res.stderr
    before, before_mnt = tree_of(mount.src("dest")), tree_of(mount.path("dest"), ino=False)
    make_project(tmp_path / "demo-3", 3)
    res = atomicfs_run(mount, "sh", "-c", f"make -C {tmp_path / 'demo-3'} install "
                       f"DESTDIR={mount.path('dest')}; rc=$?; "
                       f"ls -R {mount.path('dest')} > {tmp_path / 'inside'}; exit $rc")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "manual.txt" in res.stderr, res.stderr
    # half way: inside the transaction, version 3's program was installed
    assert "libdemo.so.3" in (tmp_path / "inside").read_text()
    assert tree_of(mount.src("dest")) == before
    assert tree_of(mount.path("dest"), ino=False) == before_mnt
    assert_no_debris(mount.source)


# ==========================================================================================
# pip install into a venv on the mount
# ==========================================================================================
PKG = "tinypkg"


def build_wheel(out: Path, version: str, entry: str = f"{PKG} = {PKG}:main") -> Path:
    """A wheel made by hand (no network, no build backend): the package, its
    dist-info (METADATA, WHEEL, entry_points.txt, RECORD with sha256 and sizes) and a
    console script.  Version 1.x has a module ``old.py``, the others ``new.py``."""
    files = {f"{PKG}/__init__.py": f"__version__ = {version!r}\n\n"
             "def main() -> None:\n    print(__name__, __version__)\n",
             f"{PKG}/version.txt": f"{version}\n"}
    if version.startswith("1"):
        files[f"{PKG}/old.py"] = "OLD = 1\n"
    else:
        files[f"{PKG}/new.py"] = "NEW = 1\n"
    info = f"{PKG}-{version}.dist-info"
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {version}\n"
    files[f"{info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: by-hand\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n")
    files[f"{info}/entry_points.txt"] = f"[console_scripts]\n{entry}\n"
    record = []
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={b64},{len(text.encode())}\n")
    files[f"{info}/RECORD"] = "".join(record) + f"{info}/RECORD,,\n"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{PKG}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


class Venv:
    """A venv made on the mount outside any transaction (``--without-pip``: fast,
    offline); packages go in with this interpreter's pip (``pip --python``)."""

    def __init__(self, m: Mount) -> None:
        self.root = m.path("venv")
        res = run_plain(sys.executable, "-m", "venv", "--without-pip", str(self.root))
        assert res.returncode == 0, res.stderr
        self.python = self.root / "bin" / "python"
        site = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
        self.site = self.root / site
        self.src_site = m.src("venv", site)
        assert self.site.is_dir()

    def pip(self, wheel: Path) -> list[str]:
        return [sys.executable, "-m", "pip", "--isolated", "--python", str(self.python),
                "install", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
                str(wheel)]

    def paths(self) -> list[Path]:
        """What the outside reader reads: the package's files of either version, each
        version's dist-info and the console script."""
        return [self.site / PKG / "__init__.py", self.site / PKG / "version.txt",
                self.site / PKG / "old.py", self.site / PKG / "new.py",
                *(self.site / f"{PKG}-{v}.dist-info" / n for v in ("1.0", "2.0")
                  for n in ("METADATA", "RECORD")),
                self.root / "bin" / PKG]

    def version(self) -> str:
        res = run_plain(str(self.python), "-c", "import importlib.metadata as md, tinypkg; "
                        "print(tinypkg.__version__, md.version('tinypkg'))")
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()


def pip_with_reader(m: Mount, tmp_path: Path, venv: Venv, wheel: Path) -> tuple[int, int]:
    """``pip install`` of ``wheel`` in a transaction while an outside reader polls.
    The new view is what the mount shows after the commit (pip writes the console
    script and RECORD itself); returns how many reads saw old and new."""
    paths = venv.paths()
    old = read_all(paths)
    poller = StartedPoller(paths, tmp_path / "stop")
    try:
        res = atomicfs_run(m, *venv.pip(wheel), timeout=120)
        time.sleep(0.2)
    finally:
        passes = poller.finish()
    assert res.returncode == 0, (res.stdout, res.stderr)
    return check_whole(passes, old, read_all(paths))


def test_pip_install_of_a_fresh_package_appears_whole(mount: Mount, tmp_path: Path) -> None:
    venv = Venv(mount)
    wheel = build_wheel(tmp_path / "wheels", "1.0")
    olds, news = pip_with_reader(mount, tmp_path, venv, wheel)
    assert olds and news, (olds, news)
    assert venv.version() == "1.0 1.0"
    assert (venv.src_site / PKG / "old.py").read_text() == "OLD = 1\n"
    res = run_plain(str(mount.path("venv", "bin", PKG)))
    assert res.stdout == f"{PKG} 1.0\n", res
    assert_no_debris(mount.source)


def test_pip_install_plain_leaves_half_a_package_when_it_fails(
        mount: Mount, tmp_path: Path) -> None:
    """The check below is not vacuous: without ``atomicfs run`` the failing pip
    leaves the package's files and a partial dist-info in site-packages."""
    venv = Venv(mount)
    wheel = build_wheel(tmp_path / "wheels", "3.0", entry="bad = not a callable")
    res = run_plain(*venv.pip(wheel))
    assert res.returncode != 0 and "Invalid script entry point" in res.stderr, res.stderr
    assert (venv.src_site / PKG / "version.txt").read_text() == "3.0\n"


def test_pip_upgrade_appears_whole(mount: Mount, tmp_path: Path) -> None:
    """Version 2.0 over 1.0: pip moves the old version's files away (renames of
    committed names), installs the new ones and removes the stash: the outside
    reader sees 1.0 whole, then 2.0 whole (``old.py`` gone, ``new.py`` there)."""
    venv = Venv(mount)
    res = atomicfs_run(mount, *venv.pip(build_wheel(tmp_path / "w1", "1.0")), timeout=120)
    assert res.returncode == 0, res.stderr
    olds, news = pip_with_reader(mount, tmp_path, venv, build_wheel(tmp_path / "w2", "2.0"))
    assert olds and news, (olds, news)
    assert venv.version() == "2.0 2.0"
    assert not (venv.src_site / PKG / "old.py").exists()
    assert not (venv.src_site / f"{PKG}-1.0.dist-info").exists()
    assert_no_debris(mount.source)


@pytest.mark.parametrize("over", [
    pytest.param(False, id="fresh"),
    pytest.param(True, id="upgrade")])
def test_pip_install_that_fails_half_way_leaves_nothing(
        mount: Mount, tmp_path: Path, over: bool) -> None:
    """A wheel whose console script entry is invalid: pip has written the package's
    files when it fails.  Nothing of it stays; over 1.0, 1.0 stays exactly."""
    venv = Venv(mount)
    if over:
        res = atomicfs_run(mount, *venv.pip(build_wheel(tmp_path / "w1", "1.0")), timeout=120)
        assert res.returncode == 0, res.stderr
    before, before_mnt = tree_of(mount.src("venv")), tree_of(mount.path("venv"), ino=False)
    inside = tmp_path / "inside"
    wheel = build_wheel(tmp_path / "w3", "3.0", entry="bad = not a callable")
    res = atomicfs_run(mount, "sh", "-c", " ".join(venv.pip(wheel)) +
                       f"; rc=$?; cat {venv.site / PKG / 'version.txt'} > {inside}; exit $rc",
                       timeout=120)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Invalid script entry point" in res.stderr, res.stderr
    # pip wrote 3.0 before it failed; over 1.0, its own rollback (moving the old
    # version's files back) put 1.0 in place again before it exited
    assert inside.read_text() == ("1.0\n" if over else "3.0\n"), "pip failed early"
    assert tree_of(mount.src("venv")) == before
    assert tree_of(mount.path("venv"), ino=False) == before_mnt
    if over:
        assert venv.version() == "1.0 1.0"
    assert_no_debris(mount.source)
