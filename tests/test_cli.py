"""The command line: bad input (docs/semantics.md §8), --help/--version, the mount.fuse3 forms.

Every refusal is checked the same way: ``python -m atomicfs ...`` as a
subprocess exits non-zero, prints exactly one line on stderr that names the
problem, and changes nothing: the involved directories are snapshotted
(names, types, modes, owners, sizes, mtimes, ctimes, contents) before and
after, and no mount appeared on or below them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import (
    PYTHON,
    ROOT,
    Mount,
    cli_env,
    mounted_fstype,
    needs_fuse,
    needs_root,
    run_cli,
)
from sessionkit import snapshot

from atomicfs import __version__, manual, mounttable

NOBODY = 65534

# Runs the real command line as uid/gid 65534.  The interpreter and the
# package may live where that user cannot read (a pyenv under /root), so they
# are loaded first, as root, and the process then drops its privileges before
# main() looks at any argument.
AS_NOBODY = f"""
import os, sys
import encodings.latin_1, encodings.unicode_escape, subprocess, tempfile
import atomicfs.cli
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
sys.exit(atomicfs.cli.main(sys.argv[1:]))
"""


# -- "nothing changed" -------------------------------------------------------------------

def mounts_below(*roots: Path) -> list[str]:
    """Mount points (from mountinfo) at or below any of ``roots``."""
    return mounttable.mounts_below(*(str(r) for r in roots))


def assert_one_line(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), f"want one line on stderr, got:\n{stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not named in: {lines[0]}"


def expect_refusal(args: Sequence[str], needles: Sequence[str], *, cwd: Path,
                   watch: Sequence[Path] | None = None, prefix: Sequence[str] = (),
                   python_args: Sequence[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command; it must fail with one line naming ``needles``, changing nothing."""
    watch = [cwd] if watch is None else list(watch)
    before = snapshot(*watch)
    mounts_before = mounts_below(*watch)
    if python_args is None:
        res = run_cli(args, cwd, prefix)
    else:
        res = subprocess.run([*prefix, PYTHON, *python_args, *args], cwd=cwd, env=cli_env(),
                             capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    try:
        assert res.returncode != 0, f"exit 0 for {list(args)}; stderr: {res.stderr}"
        assert_one_line(res.stderr, *needles)
        assert res.stdout == ""
        assert mounts_below(*watch) == mounts_before
        assert snapshot(*watch) == before
    finally:
        for point in set(mounts_below(*watch)) - set(mounts_before):  # never leave one behind
            subprocess.run(["fusermount3", "-uz", point], capture_output=True)
    return res


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    """tmp_path with a SOURCE ``src`` (some content), MOUNTPOINT ``mnt`` and a file ``afile``."""
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "data.txt").write_text("content\n")
    (tmp_path / "src" / "sub" / "deep").write_bytes(b"\x00" * 100)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "afile").write_text("a file\n")
    return tmp_path


# -- bad command lines -------------------------------------------------------------------

def test_mount_without_arguments(dirs: Path) -> None:
    res = expect_refusal(["mount"], ["SOURCE", "MOUNTPOINT", "required"], cwd=dirs)
    assert res.returncode == 2


def test_mount_without_mountpoint(dirs: Path) -> None:
    res = expect_refusal(["mount", "src"], ["MOUNTPOINT", "required"], cwd=dirs)
    assert res.returncode == 2


def test_mount_with_unknown_flag(dirs: Path) -> None:
    expect_refusal(["mount", "src", "mnt", "--frobnicate"], ["--frobnicate"], cwd=dirs)


def test_unknown_command(dirs: Path) -> None:
    res = expect_refusal(["frobnicate"], ["'frobnicate'", "command"], cwd=dirs)
    assert res.returncode == 2


def test_unknown_command_with_arguments(dirs: Path) -> None:
    # not a path that exists and without a slash: a misspelt command, not the mount.fuse3 form
    expect_refusal(["mnout", "src", "mnt"], ["'mnout'"], cwd=dirs)


def test_bare_atomicfs_is_not_success(dirs: Path) -> None:
    res = run_cli([], dirs)
    assert res.returncode != 0
    assert "usage:" in res.stdout + res.stderr


# -- bad SOURCE --------------------------------------------------------------------------

def test_source_missing(dirs: Path) -> None:
    expect_refusal(["mount", "nosuch", "mnt"], ["SOURCE", "'nosuch'", "does not exist"],
                   cwd=dirs)


def test_source_dangling_symlink(dirs: Path) -> None:
    (dirs / "dangling").symlink_to("nowhere")
    expect_refusal(["mount", "dangling", "mnt"], ["SOURCE", "'dangling'"], cwd=dirs)


def test_source_is_a_file(dirs: Path) -> None:
    expect_refusal(["mount", "afile", "mnt"], ["SOURCE", "'afile'", "not a directory"],
                   cwd=dirs)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A 0755 directory in /tmp that uid 65534 can reach (tmp_path is 0700 root's)."""
    base = Path(tempfile.mkdtemp(prefix="atomicfs-cli-"))
    try:
        base.chmod(0o755)
        (base / "mnt").mkdir()
        os.chown(base / "mnt", NOBODY, NOBODY)
        yield base
    finally:
        shutil.rmtree(base)


@needs_root
def test_source_unreadable_for_the_user(shared_dir: Path) -> None:
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o700)
    (locked / "secret").write_text("x")
    expect_refusal(["mount", "locked", "mnt"], ["SOURCE", "'locked'", "not readable"],
                   cwd=shared_dir, python_args=["-c", AS_NOBODY])


@needs_root
def test_source_not_writable_for_the_user(shared_dir: Path) -> None:
    # the daemon keeps SOURCE/.atomicfs: a SOURCE it cannot write is refused up front
    readonly = shared_dir / "readonly"
    readonly.mkdir(mode=0o755)
    (readonly / "f").write_text("x")
    expect_refusal(["mount", "readonly", "mnt"], ["SOURCE", "'readonly'", "not writable"],
                   cwd=shared_dir, python_args=["-c", AS_NOBODY])


def test_source_daemon_dir_is_a_file(dirs: Path) -> None:
    (dirs / "src" / ".atomicfs").write_text("not the daemon's directory\n")
    expect_refusal(["mount", "src", "mnt"], ["'src'", ".atomicfs"], cwd=dirs)


# -- bad MOUNTPOINT ----------------------------------------------------------------------

def test_mountpoint_missing(dirs: Path) -> None:
    expect_refusal(["mount", "src", "nosuch"], ["MOUNTPOINT", "'nosuch'", "does not exist"],
                   cwd=dirs)


def test_mountpoint_is_a_file(dirs: Path) -> None:
    expect_refusal(["mount", "src", "afile"], ["MOUNTPOINT", "'afile'", "not a directory"],
                   cwd=dirs)


def test_mountpoint_inside_source(dirs: Path) -> None:
    (dirs / "src" / "inner").mkdir()
    expect_refusal(["mount", "src", "src/inner"], ["MOUNTPOINT", "'src/inner'", "inside"],
                   cwd=dirs)


def test_mountpoint_inside_source_through_a_symlink(dirs: Path) -> None:
    (dirs / "src" / "inner").mkdir()
    (dirs / "link").symlink_to("src/inner")
    expect_refusal(["mount", "src", "link"], ["MOUNTPOINT", "'link'", "inside"], cwd=dirs)


def test_mountpoint_already_an_atomicfs_mount(mount: Mount, tmp_path: Path) -> None:
    mount.path("served").write_text("still served\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("f\n")
    res = expect_refusal(["mount", str(other), str(mount.mountpoint)],
                         ["MOUNTPOINT", str(mount.mountpoint), "already mounted"],
                         cwd=tmp_path, watch=[other, mount.source])
    assert "fuse.atomicfs" in res.stderr
    # exactly one mount there still, and it still works
    assert mounts_below(mount.mountpoint) == [str(mount.mountpoint)]
    assert mount.path("served").read_text() == "still served\n"


# -- bad options -------------------------------------------------------------------------

@pytest.mark.parametrize(("opts", "needles"), [
    ("bogus", ["'bogus'"]),
    ("allow_other,bogus=1,ro", ["'bogus=1'"]),
    ("durability=maybe", ["durability", "'maybe'"]),
    ("isolation=x", ["isolation", "'x'"]),
    ("commit=never", ["commit", "'never'"]),
    ("ro,rw", ["ro", "rw"]),
    ("max_read=lots", ["max_read", "'lots'"]),
])
def test_bad_option(dirs: Path, opts: str, needles: list[str]) -> None:
    expect_refusal(["mount", "src", "mnt", "-o", opts], needles, cwd=dirs)


def test_bad_option_in_a_later_o_argument(dirs: Path) -> None:
    expect_refusal(["mount", "src", "mnt", "-o", "ro", "-o", "isolation=x"],
                   ["isolation", "'x'"], cwd=dirs)


def test_bad_option_in_mount_fuse3_form(dirs: Path) -> None:
    expect_refusal([str(dirs / "src"), str(dirs / "mnt"), "-o", "rw,durability=maybe"],
                   ["durability", "'maybe'"], cwd=dirs)


@needs_fuse
def test_option_the_kernel_refuses(dirs: Path) -> None:
    # passes our checks, fails in the mount itself: libfuse's own complaint is
    # folded into the one line, and SOURCE/.atomicfs made on the way is removed
    expect_refusal(["mount", "src", "mnt", "-o", "context=not_a_context"], ["'mnt'"],
                   cwd=dirs)


def test_mount_fuse3_form_with_missing_source(dirs: Path) -> None:
    expect_refusal(["./nosuch", "mnt", "-o", "rw"], ["SOURCE", "'./nosuch'"], cwd=dirs)


# -- umount ------------------------------------------------------------------------------

def test_umount_of_a_plain_directory(dirs: Path) -> None:
    expect_refusal(["umount", "mnt"], ["'mnt'", "not a FUSE mount"], cwd=dirs)


def test_umount_of_a_missing_path(dirs: Path) -> None:
    expect_refusal(["umount", "nosuch"], ["'nosuch'"], cwd=dirs)


def test_umount_without_argument(dirs: Path) -> None:
    expect_refusal(["umount"], ["MOUNTPOINT"], cwd=dirs)


def test_mount_with_an_unwritable_log_file(dirs: Path) -> None:
    expect_refusal(["mount", "src", "mnt", "--log", "nodir/daemon.log"],
                   ["log file", "'nodir/daemon.log'"], cwd=dirs)


def test_umount_with_a_bad_timeout(dirs: Path) -> None:
    res = expect_refusal(["umount", "mnt", "--timeout", "soon"], ["--timeout", "'soon'"],
                         cwd=dirs)
    assert res.returncode == 2


def test_umount_if_dead_with_lazy(dirs: Path) -> None:
    expect_refusal(["umount", "--if-dead", "--lazy", "mnt"], ["--if-dead"], cwd=dirs)


def test_umount_if_dead_of_a_plain_directory_does_nothing(dirs: Path) -> None:
    before = snapshot(dirs)
    res = run_cli(["umount", "--if-dead", "mnt"], dirs)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    assert snapshot(dirs) == before


def test_status_of_a_plain_directory(dirs: Path) -> None:
    expect_refusal(["status", "mnt"], ["'mnt'", "not a FUSE mount"], cwd=dirs)


def test_status_of_a_missing_path(dirs: Path) -> None:
    expect_refusal(["status", "nosuch"], ["'nosuch'", "does not exist"], cwd=dirs)


def test_status_without_argument(dirs: Path) -> None:
    res = expect_refusal(["status"], ["MOUNTPOINT", "required"], cwd=dirs)
    assert res.returncode == 2


def test_install_into_a_missing_directory(dirs: Path) -> None:
    expect_refusal(["install", "--bindir", "nosuch"], ["BINDIR", "'nosuch'"], cwd=dirs)


# -- no /dev/fuse ------------------------------------------------------------------------

def _unshare_without_dev_fuse() -> list[str]:
    """A command prefix that runs the rest in a mount namespace whose /dev is empty."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
              'mount -t tmpfs atomicfs-test-nodev /dev && exec "$@"', "sh"]
    probe = subprocess.run([*prefix, "sh", "-c", "test ! -e /dev/fuse"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace without /dev/fuse: {probe.stderr.strip()}")
    return prefix


def test_no_dev_fuse(dirs: Path) -> None:
    prefix = _unshare_without_dev_fuse()
    expect_refusal(["mount", "src", "mnt"], ["/dev/fuse"], cwd=dirs, prefix=prefix)


# -- --version and --help ----------------------------------------------------------------

def test_version(tmp_path: Path) -> None:
    res = run_cli(["--version"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"atomicfs {__version__}"
    assert res.stderr == ""


@pytest.mark.parametrize(("args", "words"), [
    (["--help"], ["NAME\n    atomicfs - ", "atomicfs mount", "atomicfs umount"]),
    (["-h"], ["SYNOPSIS\n    atomicfs mount"]),
    (["mount", "--help"], ["NAME\n    atomicfs mount - ", "SOURCE", "MOUNTPOINT", "durability"]),
    (["umount", "--help"], ["NAME\n    atomicfs umount - ", "MOUNTPOINT", "--lazy"]),
    (["unmount", "--help"], ["MOUNTPOINT"]),
    (["status", "--help"], ["NAME\n    atomicfs status - ", "--json"]),
    (["recover", "--help"], ["NAME\n    atomicfs recover - ", "SOURCE"]),
    (["install", "--help"], ["NAME\n    atomicfs install - ", "--bindir"]),
])
def test_help(tmp_path: Path, args: list[str], words: list[str]) -> None:
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    for word in words:
        assert word in res.stdout
    for section in manual.SECTIONS:
        assert f"\n{section}\n" in "\n" + res.stdout


def test_help_does_not_mount(dirs: Path) -> None:
    before = snapshot(dirs)
    res = run_cli(["mount", "src", "mnt", "--help"], dirs)
    assert res.returncode == 0
    assert mounted_fstype(dirs / "mnt") is None
    assert snapshot(dirs) == before


# -- the mount.fuse3 forms ---------------------------------------------------------------

def _unmount_background(mnt: Path, src: Path) -> None:
    """Unmount a mount whose daemon we did not start ourselves; wait until it is gone."""
    deadline = time.monotonic() + 20
    while mounted_fstype(mnt) is not None and time.monotonic() < deadline:
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode:
            time.sleep(0.1)
    if mounted_fstype(mnt) is not None:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    # the daemon removes SOURCE/.atomicfs as it exits
    while (src / ".atomicfs").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _check_served(src: Path, mnt: Path) -> None:
    assert mounted_fstype(mnt) == "fuse.atomicfs"
    assert (mnt / "data.txt").read_text() == "content\n"
    (mnt / "new.txt").write_text("through the mount\n")
    assert (src / "new.txt").read_text() == "through the mount\n"


@needs_fuse
def test_mount_fuse3_form_mounts(dirs: Path) -> None:
    src, mnt = dirs / "src", dirs / "mnt"
    try:
        res = run_cli([str(src), str(mnt), "-o", "rw,dev,suid,nofail,durability=full"], dirs)
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        _check_served(src, mnt)
    finally:
        _unmount_background(mnt, src)
    assert mounted_fstype(mnt) is None
    assert not (src / ".atomicfs").exists()


@needs_fuse
def test_mount_fuse3_form_with_relative_existing_source(dirs: Path) -> None:
    src, mnt = dirs / "src", dirs / "mnt"
    try:
        res = run_cli(["src", "mnt", "-o", "rw"], dirs)
        assert res.returncode == 0, res.stderr
        _check_served(src, mnt)
    finally:
        _unmount_background(mnt, src)


def _venv_atomicfs() -> Path:
    exe = ROOT / ".venv" / "bin" / "atomicfs"
    if not os.access(exe, os.X_OK):
        pytest.skip(f"{exe} is not installed (scripts/bootstrap.sh installs it)")
    return exe


@needs_fuse
@needs_root
def test_mount_fuse3_helper_finds_atomicfs_on_path(dirs: Path) -> None:
    # exactly what mount(8) runs for `mount -t fuse.atomicfs src mnt`
    helper = shutil.which("mount.fuse3")
    if helper is None:
        pytest.skip("mount.fuse3 (package fuse3) is not installed")
    exe = _venv_atomicfs()
    src, mnt = dirs / "src", dirs / "mnt"
    env = cli_env(PATH=str(exe.parent) + os.pathsep + os.environ.get("PATH", ""))
    try:
        res = subprocess.run([helper, str(src), str(mnt), "-t", "atomicfs", "-o", "rw,nosuid"],
                             env=env, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        _check_served(src, mnt)
    finally:
        _unmount_background(mnt, src)
    assert mounted_fstype(mnt) is None


@needs_fuse
@needs_root
def test_mount_8_with_type_fuse_and_program_in_source(dirs: Path) -> None:
    # mount(8) runs helpers with PATH reset, so name the program: `prog#source`
    if shutil.which("mount.fuse3") is None:
        pytest.skip("mount.fuse3 (package fuse3) is not installed")
    exe = _venv_atomicfs()
    src, mnt = dirs / "src", dirs / "mnt"
    try:
        res = subprocess.run(["mount", "-t", "fuse", f"{exe}#{src}", str(mnt),
                              "-o", "nosuid,nodev"],
                             env=cli_env(), capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        _check_served(src, mnt)
    finally:
        _unmount_background(mnt, src)
    assert mounted_fstype(mnt) is None


SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@needs_fuse
@needs_root
def test_mount_8_with_type_fuse_atomicfs(dirs: Path) -> None:
    if shutil.which("mount.fuse3") is None:
        pytest.skip("mount.fuse3 (package fuse3) is not installed")
    if shutil.which("atomicfs", path=SYSTEM_PATH) is None:
        pytest.skip("no atomicfs in the system PATH: mount(8) resets PATH for helpers, so "
                    "`mount -t fuse.atomicfs` needs it installed there (/usr/local/bin)")
    src, mnt = dirs / "src", dirs / "mnt"
    try:
        # the launcher may be another checkout's: ATOMICFS_VENV makes it run this one
        res = subprocess.run(["mount", "-t", "fuse.atomicfs", str(src), str(mnt)],
                             env=cli_env(ATOMICFS_VENV=sys.prefix),
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        _check_served(src, mnt)
    finally:
        _unmount_background(mnt, src)


@needs_fuse
def test_umount_command_of_a_background_mount(dirs: Path) -> None:
    src, mnt = dirs / "src", dirs / "mnt"
    try:
        res = run_cli(["mount", "src", "mnt", "--log", str(dirs / "daemon.log")], dirs)
        assert res.returncode == 0, res.stderr
        assert mounted_fstype(mnt) == "fuse.atomicfs"
        res = run_cli(["umount", "mnt"], dirs)
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        assert mounted_fstype(mnt) is None
    finally:
        _unmount_background(mnt, src)
    log = (dirs / "daemon.log").read_text()
    assert "Traceback" not in log and " ERROR " not in log, log



# -- odd paths as arguments, the same SOURCE twice ---------------------------------------

ODD_NAMES = {
    "space": "with space",
    "newline": "new\nline",
    "tab-backslash": "tab\tback\\slash",
    "comma": "com,ma",
    "utf8": "donn\u00e9es-\u65e5\u672c",
    "non-utf8": os.fsdecode(b"latin1-\xe9t\xe9-\xff"),
    "255-bytes": "n" * 255,
}


@needs_fuse
@pytest.mark.parametrize("name", ODD_NAMES.values(), ids=ODD_NAMES.keys())
def test_mount_and_umount_with_odd_paths(tmp_path: Path, name: str) -> None:
    # SOURCE and MOUNTPOINT named alike, side by side: the mount table escapes both
    (tmp_path / "s").mkdir()
    (tmp_path / "m").mkdir()
    src, mnt = tmp_path / "s" / name, tmp_path / "m" / name
    src.mkdir()
    mnt.mkdir()
    (src / "f").write_bytes(b"old\n")
    try:
        res = run_cli(["mount", str(src), str(mnt), "--log", str(tmp_path / "log")], tmp_path)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert mounted_fstype(mnt) == "fuse.atomicfs", "the mount table reader misses it"
        (mnt / "f").write_bytes(b"new\n")
        assert (src / "f").read_bytes() == b"new\n"
        res = run_cli(["umount", str(mnt)], tmp_path)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert mounted_fstype(mnt) is None
    finally:
        _unmount_background(mnt, src)
    assert os.listdir(src) == ["f"], "the daemon left its directory behind"
    log = (tmp_path / "log").read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log


def test_non_ascii_mount_option_is_refused(dirs: Path) -> None:
    expect_refusal(["mount", "src", "mnt", "-o", "fsname=caf\u00e9"], ["fsname", "ASCII"],
                   cwd=dirs)


@needs_fuse
def test_same_source_mounted_twice_is_refused(mount: Mount, tmp_path: Path) -> None:
    # Two daemons would share SOURCE/.atomicfs: the first to unmount removes it from
    # under the other (whose commits then fail), and each one's recovery at mount
    # would resolve the other's commits in flight.
    second = tmp_path / "second"
    second.mkdir()
    mount.path("f").write_bytes(b"through the first mount\n")
    expect_refusal(["mount", str(mount.source), str(second)],
                   ["SOURCE", str(mount.source), "already mounted"],
                   cwd=tmp_path, watch=[mount.source, second])
    mount.path("f").write_bytes(b"still committed\n")
    assert mount.src("f").read_bytes() == b"still committed\n"


@needs_fuse
def test_recover_refused_while_the_source_is_mounted_elsewhere(mount: Mount,
                                                               tmp_path: Path) -> None:
    mount.path("f").write_bytes(b"x\n")
    expect_refusal(["recover", str(mount.source)], ["SOURCE", "mounted"], cwd=tmp_path,
                   watch=[mount.source])
    mount.path("f").write_bytes(b"still committed\n")
    assert mount.src("f").read_bytes() == b"still committed\n"


@pytest.mark.parametrize(("fstype", "detached"), [
    ("fuse.atomicfs", True), ("fuse.custom", True), ("fuse", True),
    ("fuseblk", False), ("fusectl", False), ("ext4", False)])
def test_umount_if_dead_detaches_only_dead_fuse_mounts(monkeypatch, fstype: str,
                                                       detached: bool) -> None:
    """--if-dead (systemd's ExecStartPre) detaches a dead FUSE mount ("fuse",
    "fuse.SUBTYPE"), never a block-device FUSE mount (fuseblk: ntfs-3g...) or
    another filesystem that happens to sit there."""
    from atomicfs import control
    from atomicfs.mounttable import MountEntry
    entry = MountEntry(1, 0, "/srv/x", fstype, "src", "rw")
    calls: list[str] = []
    monkeypatch.setattr(control, "top_mount", lambda path: entry)
    monkeypatch.setattr(control, "is_dead", lambda e: True)
    monkeypatch.setattr(control, "_fusermount", lambda point, lazy: (
        calls.append(point), subprocess.CompletedProcess([], 0, "", ""))[1])
    out = control.unmount("/srv/x", if_dead=True)
    assert calls == (["/srv/x"] if detached else []), (fstype, out)
