"""The daemon's lifecycle: launcher, mount -t / fstab, systemd units and the notify
handshake, status, logging, signals and shutdown, unmount, unprivileged mounts.

Every mount made here is a real FUSE mount; each test unmounts what it made,
and processes it started are ended by their pid.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import (
    IS_ROOT,
    PYTHON,
    ROOT,
    Mount,
    MountFactory,
    cli_env,
    mounted_fstype,
    needs_fuse,
    run_cli,
)
from sessionkit import status_of, wait_for

from atomicfs import cli, launcher, logs, manual
from atomicfs.mounttable import top_mount

SYSTEM_LAUNCHER = Path("/usr/local/bin/atomicfs")
SERVICE = ROOT / "systemd" / "atomicfs@.service"
MOUNT_UNIT = ROOT / "systemd" / "srv-data.mount"
VENV = Path(sys.prefix)  # the virtualenv running the tests: what launchers must run


def atomicfs(*args: str, cwd: Path | None = None, timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(args, cwd, timeout=timeout, env=env)


class Cleanup:
    """Mounts and processes a test made outside the mount fixtures; undone at teardown."""

    def __init__(self) -> None:
        self.mounts: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def finish(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for mnt in self.mounts:
            deadline = time.monotonic() + 10
            while (mounted_fstype(mnt) or "").startswith("fuse"):
                lazy = ["-z"] if time.monotonic() > deadline else []
                subprocess.run(["fusermount3", "-u", *lazy, str(mnt)], capture_output=True)
                time.sleep(0.05)


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    try:
        yield c
    finally:
        c.finish()


def alive(pid: int) -> bool:
    """Is process ``pid`` running (not gone, not a zombie waiting to be reaped)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except FileNotFoundError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def daemon_gone(src: Path, timeout: float = 20) -> bool:
    """A background daemon removes SOURCE/.atomicfs as the last thing before exiting."""
    return wait_for(lambda: not (src / ".atomicfs").exists(), timeout)


# -- the launcher --------------------------------------------------------------------------

def test_install_writes_a_launcher_that_runs_with_an_empty_environment(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    res = atomicfs("install", "--bindir", str(bindir))
    assert res.returncode == 0, res.stderr
    target = bindir / "atomicfs"
    assert res.stdout.strip() == f"installed {target} (runs {VENV}/bin/atomicfs)"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    # as mount(8) -> mount.fuse3 -> sh would run it: no PATH, nothing in the environment
    run = subprocess.run([str(target), "--version"], env={}, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("atomicfs ")
    # --if-missing keeps a working launcher; a plain install of the same is a no-op too
    before = target.stat().st_mtime_ns
    for args in (["--if-missing"], []):
        res = atomicfs("install", "--bindir", str(bindir), *args)
        assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res
    assert target.stat().st_mtime_ns == before
    # ATOMICFS_VENV selects the virtualenv; a wrong one is one clear line
    for venv, says in ((tmp_path / "nowhere", "is missing"), (tmp_path, "is this launcher")):
        run = subprocess.run([str(target), "--version"], env={"ATOMICFS_VENV": str(venv)},
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 1
        assert run.stderr.count("\n") == 1 and f"{venv}/bin/atomicfs {says}" in run.stderr


def test_install_replaces_a_launcher_whose_virtualenv_is_gone(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "atomicfs").write_text(launcher.render(str(tmp_path / "deleted-venv")))
    res = atomicfs("install", "--bindir", str(bindir), "--if-missing")
    assert res.returncode == 0, res.stderr
    assert launcher.installed_venv(str(bindir / "atomicfs")) == str(VENV)


def test_install_never_replaces_a_foreign_program(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    foreign = bindir / "atomicfs"
    foreign.write_text("#!/bin/sh\necho someone else's\n")
    res = atomicfs("install", "--bindir", str(bindir))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "not an atomicfs launcher" in res.stderr
    assert foreign.read_text() == "#!/bin/sh\necho someone else's\n"
    assert sorted(os.listdir(bindir)) == ["atomicfs"]


def _system_launcher() -> None:
    """Skip unless /usr/local/bin/atomicfs is an atomicfs launcher (scripts/bootstrap.sh
    installs one as root); the tests make it run this checkout with ATOMICFS_VENV."""
    if not IS_ROOT:
        pytest.skip("mount(8) with a helper needs root")
    if shutil.which("mount.fuse3") is None:
        pytest.skip("mount.fuse3 (package fuse3) is not installed")
    if launcher.installed_venv(str(SYSTEM_LAUNCHER)) is None:
        pytest.skip(f"{SYSTEM_LAUNCHER} is not an atomicfs launcher "
                    "(run ./scripts/atomicfs install as root)")


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data.txt").write_text("content\n")
    (tmp_path / "mnt").mkdir()
    return tmp_path


# -- mount -t and fstab --------------------------------------------------------------------

@needs_fuse
def test_fstab_line_mounts_with_mount_T(dirs: Path, cleanup: Cleanup) -> None:
    _system_launcher()
    src, mnt = dirs / "src", dirs / "mnt"
    fstab = dirs / "fstab"
    # the line the README documents, with atomicfs options and fstab-only words
    fstab.write_text(f"# test fstab\n{src} {mnt} fuse.atomicfs "
                     "nofail,_netdev,x-systemd.requires-mounts-for=/,durability=batch,"
                     "isolation=shared 0 0\n")
    cleanup.mounts.append(mnt)
    env = cli_env(ATOMICFS_VENV=str(VENV))
    res = subprocess.run(["mount", "-T", str(fstab), str(mnt)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert mounted_fstype(mnt) == "fuse.atomicfs"
    entry = top_mount(str(mnt))
    assert entry is not None and entry.source == str(src)
    assert (mnt / "data.txt").read_text() == "content\n"
    (mnt / "new.txt").write_text("via fstab\n")
    doc = status_of(mnt)
    assert doc["options"] == {"durability": "batch", "isolation": "shared", "commit": "auto",
                              "entry_timeout": "10", "attr_timeout": "10", "checkpoint": "5",
                              "checkpoint_bytes": str(64 << 20)}
    assert doc["pid"] != os.getpid()
    # umount(8) works on it too; the daemon finishes and removes SOURCE/.atomicfs
    res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert daemon_gone(src)
    assert (src / "new.txt").read_text() == "via fstab\n"


@needs_fuse
def test_fstab_line_with_a_bad_option_is_one_line_and_changes_nothing(dirs: Path,
                                                                       cleanup: Cleanup) -> None:
    _system_launcher()
    src, mnt = dirs / "src", dirs / "mnt"
    fstab = dirs / "fstab"
    fstab.write_text(f"{src} {mnt} fuse.atomicfs nofail,durability=maybe 0 0\n")
    cleanup.mounts.append(mnt)
    before = sorted(os.listdir(src)), (src / "data.txt").stat().st_mtime_ns
    res = subprocess.run(["mount", "-T", str(fstab), str(mnt)],
                         env=cli_env(ATOMICFS_VENV=str(VENV)), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1, res.stderr
    assert "durability" in res.stderr and "'maybe'" in res.stderr
    assert mounted_fstype(mnt) is None
    assert (sorted(os.listdir(src)), (src / "data.txt").stat().st_mtime_ns) == before


@needs_fuse
@pytest.mark.parametrize(("source", "mountpoint", "options", "needles"), [
    ("nosuch", "mnt", "rw", ["SOURCE", "nosuch'", "does not exist"]),
    ("src", "nosuch", "rw", ["MOUNTPOINT", "nosuch'", "does not exist"]),
    ("src", "mnt", "rw,bogus", ["unknown mount option", "'bogus'"]),
    ("src", "mnt", "isolation=none", ["isolation", "'none'"]),
])
def test_mount_t_with_bad_paths_and_options(dirs: Path, cleanup: Cleanup, source: str,
                                            mountpoint: str, options: str,
                                            needles: list[str]) -> None:
    _system_launcher()
    cleanup.mounts.append(dirs / "mnt")
    before = sorted(os.listdir(dirs)), sorted(os.listdir(dirs / "src"))
    res = subprocess.run(["mount", "-t", "fuse.atomicfs", "-o", options, str(dirs / source),
                          str(dirs / mountpoint)], env=cli_env(ATOMICFS_VENV=str(VENV)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("atomicfs: error: "), res.stderr
    for needle in needles:
        assert needle in res.stderr
    assert mounted_fstype(dirs / "mnt") is None
    assert (sorted(os.listdir(dirs)), sorted(os.listdir(dirs / "src"))) == before


# -- systemd units -------------------------------------------------------------------------

def _unit_lines(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in path.read_text().splitlines()
            if line.startswith(key + "=")]


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60)


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # the units name the launcher in /usr/local/bin ...
    for key in ("ExecStartPre", "ExecStart"):
        (line,) = _unit_lines(SERVICE, key)
        assert line.split()[0] == str(SYSTEM_LAUNCHER), line
    # ... so verify copies that run a launcher installed here (verify checks it is executable)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    assert launcher.install(str(bindir)) is not None
    units = tmp_path / "units"
    units.mkdir()
    for unit in (SERVICE, MOUNT_UNIT):
        text = unit.read_text().replace(str(SYSTEM_LAUNCHER), str(bindir / "atomicfs"))
        (units / unit.name).write_text(text)
    instance = units / "atomicfs@srv-data.service"
    res = _verify(instance, units / MOUNT_UNIT.name)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    # the check can fail: a broken copy does not pass (verify warns, or refuses)
    broken = units / "atomicfs@.service"
    broken.write_text(broken.read_text().replace("Type=notify", "Type=notifyy"))
    res = _verify(instance)
    assert "notifyy" in res.stderr, res.stderr
    # the mount unit's name is the escaped Where= path, as systemd demands
    (where,) = _unit_lines(MOUNT_UNIT, "Where")
    (what,) = _unit_lines(MOUNT_UNIT, "What")
    assert what == where  # SOURCE == MOUNTPOINT
    escaped = subprocess.run(["systemd-escape", "--path", "--suffix=mount", where],
                             capture_output=True, text=True).stdout.strip()
    assert escaped == MOUNT_UNIT.name
    if launcher.installed_venv(str(SYSTEM_LAUNCHER)) is not None:  # the files as shipped
        res = _verify(SERVICE.parent / "atomicfs@srv-data.service", MOUNT_UNIT)
        assert res.returncode == 0 and res.stderr == "", res.stderr


def _service_command(key: str, path: Path) -> list[str]:
    """The unit's command for ``key`` as systemd runs it for the instance at ``path``,
    with the launcher replaced by this checkout's program."""
    (line,) = _unit_lines(SERVICE, key)
    words = [w.replace("%f", str(path)) for w in shlex.split(line.lstrip("-"))]
    assert words[0] == str(SYSTEM_LAUNCHER)
    return [PYTHON, "-m", "atomicfs", *words[1:]]


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket, credentials of each sender."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, timeout: float = 30) -> tuple[dict[str, str], int]:
        """One notification: its KEY=VALUE fields and the sender's pid."""
        self.sock.settimeout(timeout)
        ucred = 12  # struct ucred: pid, uid, gid (3 ints)
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(ucred))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = array.array("i", payload[:ucred])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        return fields, pid

    def close(self) -> None:
        self.sock.close()


@needs_fuse
def test_service_notify_handshake_stop_and_restart(tmp_path: Path, cleanup: Cleanup) -> None:
    data = tmp_path / "srv-data"  # SOURCE == MOUNTPOINT, as the unit runs it
    data.mkdir()
    (data / "before.txt").write_text("there before\n")
    cleanup.mounts.append(data)
    log_path = tmp_path / "journal.log"

    def start(address: str) -> tuple[subprocess.Popen[bytes], NotifySocket]:
        pre = subprocess.run(_service_command("ExecStartPre", data), env=cli_env(),
                             capture_output=True, text=True, timeout=60)
        assert pre.returncode == 0, pre.stderr
        notify = NotifySocket(address)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(_service_command("ExecStart", data),
                                    env=cli_env(NOTIFY_SOCKET=address), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        cleanup.procs.append(proc)
        fields, sender = notify.receive()
        # READY=1 comes from the main process, once the mount is live
        assert fields.get("READY") == "1", fields
        assert sender == proc.pid, "NotifyAccess=main would drop a notification from a child"
        assert mounted_fstype(data) == "fuse.atomicfs"
        assert (data / "before.txt").read_text() == "there before\n"
        assert status_of(data)["pid"] == proc.pid
        return proc, notify

    proc, notify = start(str(tmp_path / "notify.sock"))
    (data / "made.txt").write_text("while served\n")
    proc.send_signal(signal.SIGTERM)  # systemctl stop (KillMode=mixed: the main process)
    fields, _ = notify.receive()
    assert fields.get("STOPPING") == "1", fields
    assert proc.wait(timeout=30) == 0
    notify.close()
    assert mounted_fstype(data) is None
    assert (data / "made.txt").read_text() == "while served\n"
    assert not (data / ".atomicfs").exists()

    # a crash: the mount stays behind, dead; Restart=on-failure runs ExecStartPre first
    proc, notify = start("@atomicfs-test-" + secrets.token_hex(6))  # an abstract address
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    notify.close()
    assert mounted_fstype(data) == "fuse.atomicfs"  # dead, still mounted
    with pytest.raises(OSError) as info:
        os.stat(data / "before.txt")
    assert info.value.errno == errno.ENOTCONN
    proc, notify = start(str(tmp_path / "notify2.sock"))
    assert (data / "made.txt").read_text() == "while served\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    notify.close()
    assert mounted_fstype(data) is None
    log = log_path.read_text()
    assert "received SIGTERM: finishing the commits in flight (0), then unmounting" in log
    assert "Traceback" not in log


# -- status --------------------------------------------------------------------------------

def cli_output(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the command line in this process, its output captured."""
    assert cli.main(list(args)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


@needs_fuse
def test_status_shows_open_sessions_and_counters(mount: Mount,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (mount.src("old.txt")).write_bytes(b"o" * 100_000)
    new = os.open(mount.path("new.txt"), os.O_CREAT | os.O_WRONLY, 0o644)
    old = os.open(mount.path("old.txt"), os.O_WRONLY)
    old2 = os.open(mount.path("old.txt"), os.O_WRONLY)
    mnt = str(mount.mountpoint)
    try:
        os.pwrite(new, b"n" * 10_000, 0)
        os.pwrite(new, b"m" * 100, 50_000)  # a hole between: three extents
        os.pwrite(old, b"x" * 4096, 8192)  # committed | shadow | committed
        time.sleep(0.1)
        doc = json.loads(cli_output(capsys, "status", "--json", mnt))
        sessions = {s["path"]: s for s in doc["sessions"]}
        assert set(sessions) == {"/new.txt", "/old.txt"}
        s = sessions["/new.txt"]
        assert (s["buffered_bytes"], s["extents"], s["writers"], s["new_file"], s["size"]) \
            == (10_100, 3, 1, True, 50_100)
        s = sessions["/old.txt"]
        assert (s["buffered_bytes"], s["extents"], s["writers"], s["new_file"], s["size"]) \
            == (4096, 3, 2, False, 100_000)
        assert s["spilled_bytes"] == 0
        assert all(s["age_s"] >= 0.1 for s in doc["sessions"])
        assert mount.proc is not None and doc["pid"] == mount.proc.pid
        assert doc["mountpoint"] == mnt and doc["source"] == str(mount.source)
        assert doc["commits_in_flight"] == 0
        assert sum(doc["commits"].values()) == 0
        text = cli_output(capsys, "status", mnt)
        assert f"on {mnt} (source {mount.source}), pid {doc['pid']}, up " in text
        assert "open sessions: 2 (open handles 3, commits in flight 0, staged 0)" in text
        assert re.search(r"\n +1 +9\.9 KiB +3 +\S+s +rewrite +/new\.txt \(new file\)\n",
                         text), text
        assert re.search(r"\n +2 +4\.0 KiB +3 +\S+s +rewrite +/old\.txt\n", text), text
        assert "commit latency: no commits yet" in text
    finally:
        for fd in (new, old, old2):
            os.close(fd)
    assert wait_for(lambda: status_of(mount.mountpoint)["sessions"] == [], timeout=10)
    doc = status_of(mount.mountpoint)
    assert doc["commits"]["new"] == 1 and doc["commits"]["rename"] == 1
    assert doc["bytes_committed"] == 150_100
    assert doc["failures"] == {}
    assert doc["commit_latency"]["samples"] == 2
    hk = doc["housekeeping"]
    # both first writes asked the (empty at mount) shadow pool, which then filled
    assert hk["shadow_pool_misses"] >= 1 and hk["shadows_made"] >= 1, hk
    assert 0 <= hk["shadows_ready"] <= 8 and hk["journal_records_unsettled"] == 0, hk
    res = atomicfs("status", mnt)  # and as its own process
    assert res.returncode == 0 and res.stderr == "", res.stderr
    text = res.stdout
    assert "open sessions: 0" in text
    assert "commits: 2 (new 1, rename 1); 146.6 KiB committed" in text, text
    assert "failed commits: none" in text
    assert re.search(r"shadow pool: \d+ ready, \d+ made, \d+ asked for while empty; "
                     r"journal records not yet settled: 0", text), text
    assert re.search(r"commit latency: p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms, "
                     r"max [\d.]+ ms \(2 most recent commits\)", text), text


@needs_fuse
def test_failed_commits_are_counted_and_logged_once_each(mount_factory: MountFactory) -> None:
    m = mount_factory(env={"ATOMICFS_FAULTS": "fail:commit.before_fsync:ENOSPC"})
    m.src("g").write_bytes(b"committed")
    fd = os.open(m.path("g"), os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"never lands")
    with pytest.raises(OSError) as info:
        os.close(fd)
    assert info.value.errno == errno.ENOSPC
    assert m.src("g").read_bytes() == b"committed"
    # the close's commit, then the last release's
    assert wait_for(lambda: status_of(m.mountpoint)["failures"] == {"ENOSPC": 2},
                    timeout=10), \
        status_of(m.mountpoint)
    lines = [line for line in m.log().splitlines() if " WARNING " in line]
    assert len(lines) == 2, lines
    assert "commit of /g at close failed: ENOSPC (No space left on device)" in lines[0]
    assert "commit of /g at last close failed: ENOSPC" in lines[1]
    text = atomicfs("status", str(m.mountpoint)).stdout
    assert "failed commits: 2 (ENOSPC 2)" in text
    m.unmount()
    assert re.search(r"INFO atomicfs\.mount: unmounted \S+ after \S+: commits 0, 0 B "
                     r"committed, failed 2 \(ENOSPC 2\)$", m.log(), re.M), m.log()[-500:]


# -- logging ---------------------------------------------------------------------------------

@needs_fuse
def test_foreground_log_summary_debug_tracing_and_journal_format(
        mount_factory: MountFactory) -> None:
    m = mount_factory(options=["debug"])
    m.path("a").write_bytes(b"12345")
    os.stat(m.path("a"))
    m.unmount()
    log = m.log()
    assert re.search(r"DEBUG atomicfs\.operations: -> create\(", log), log[-2000:]
    assert re.search(r"DEBUG atomicfs\.operations: <- flush ok \([\d.]+ ms\)", log)
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO atomicfs\.mount: unmounted "
                     r"\S+ after [\d.]+s: commits 1 \(new 1\), 5 B committed, failed 0$",
                     log, re.M), log[-2000:]
    assert "\x1b[" not in log  # no colour codes

    # without --debug: no request tracing. Under systemd (stderr is the journal
    # stream) lines carry a syslog priority and no timestamp.
    j = mount_factory(start=False)
    j.log_path.touch()
    st = j.log_path.stat()
    # ... and a NOTIFY_SOCKET that leads nowhere (inherited from elsewhere) is not fatal
    j.env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
             "NOTIFY_SOCKET": str(j.log_path.parent / "no-such-socket")}
    j.expect_log("cannot notify systemd")
    j.start()
    j.path("b").write_bytes(b"x")
    j.unmount()
    lines = j.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>atomicfs\.[a-z]+: ", line) for line in lines), lines
    assert any(line.startswith("<6>atomicfs.mount: unmounted ") for line in lines), lines
    assert not any("->" in line for line in lines)
    assert any(line.startswith("<4>atomicfs.mount: cannot notify systemd at NOTIFY_SOCKET=")
               for line in lines), lines


# -- signals and shutdown ------------------------------------------------------------------

@needs_fuse
def test_sigterm_during_a_commit_finishes_it_then_unmounts(mount_factory: MountFactory) -> None:
    m = mount_factory(env={"ATOMICFS_FAULTS": "sleep:commit.before_fsync:1.5"})
    m.src("held").write_bytes(b"old")
    held = os.open(m.path("held"), os.O_WRONLY)  # a session that is still being written
    os.write(held, b"uncommitted")
    outcome: list[object] = []

    def writer() -> None:
        try:
            fd = os.open(m.path("slow"), os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, b"committed during shutdown")
            os.close(fd)  # the commit sleeps 1.5 s before its fsync
            outcome.append("closed")
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    assert wait_for(lambda: status_of(m.mountpoint)["commits_in_flight"] == 1,
                    timeout=10), \
        "the slow commit never started"
    assert m.proc is not None
    started = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    thread.join(30)
    assert outcome == ["closed"], outcome  # close() got its commit's answer
    assert m.proc.wait(timeout=30) == 0
    took = time.monotonic() - started
    m.proc = None
    assert mounted_fstype(m.mountpoint) is None
    assert m.src("slow").read_bytes() == b"committed during shutdown"
    assert m.src("held").read_bytes() == b"old"  # the unclosed session was dropped
    with contextlib.suppress(OSError):
        os.close(held)
    log = m.log()
    assert "received SIGTERM: finishing the commits in flight (1), then unmounting" in log
    assert re.search(r"unmounted \S+ after \S+: commits 1 \(new 1\), 25 B committed", log)
    assert took < 20


@needs_fuse
def test_sigterm_unmounts_a_mount_with_its_own_subtype(dirs: Path, cleanup: Cleanup) -> None:
    src, mnt = dirs / "src", dirs / "mnt"
    cleanup.mounts.append(mnt)
    proc = subprocess.Popen([PYTHON, "-m", "atomicfs", "mount", "-f", str(src), str(mnt), "-o",
                             "subtype=mine"], env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cleanup.procs.append(proc)
    assert wait_for(lambda: mounted_fstype(mnt) == "fuse.mine" or proc.poll() is not None,
                    timeout=10)
    assert (mnt / "data.txt").read_text() == "content\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert mounted_fstype(mnt) is None


@needs_fuse
def test_background_daemon_sigusr1_stack_dump_and_umount_waits(dirs: Path,
                                                              cleanup: Cleanup) -> None:
    src, mnt, log_path = dirs / "src", dirs / "mnt", dirs / "daemon.log"
    cleanup.mounts.append(mnt)
    env = cli_env(ATOMICFS_FAULTS="sleep:commit.before_fsync:1.5")
    # -o subtype= renames the mount's type: status and umount find the daemon all the same
    res = atomicfs("mount", "src", "mnt", "--log", str(log_path), "-o", "subtype=renamed",
                   env=env, cwd=dirs)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    entry = top_mount(str(mnt))
    assert entry is not None and entry.source == str(src)  # absolute in the mount table
    assert entry.fstype == "fuse.renamed"
    pid = int(status_of(mnt)["pid"])
    os.kill(pid, signal.SIGUSR1)
    assert wait_for(lambda: "most recent call first" in log_path.read_text(), timeout=10), \
        log_path.read_text()
    assert (mnt / "data.txt").read_text() == "content\n"  # still serving
    # a session whose only commit comes at its last release (: > f): close() returns at
    # once, the commit (1.5 s) runs after it; umount must wait for it and the daemon's exit
    with open(mnt / "data.txt", "w"):
        pass
    assert wait_for(lambda: status_of(mnt)["commits_in_flight"] == 1, timeout=10), \
        "no commit at release"
    res = atomicfs("umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert not alive(pid), "umount returned before the daemon exited"
    assert (src / "data.txt").read_bytes() == b""
    assert not (src / ".atomicfs").exists()
    log = log_path.read_text()
    assert re.search(r"unmounted \S+ after \S+: commits 1 \((rename|reflink) 1\)", log), \
        log[-1500:]


@needs_fuse
def test_umount_refuses_while_files_are_open_and_names_them(mount: Mount, tmp_path: Path) -> None:
    (mount.path("sub")).mkdir()
    mount.path("sub", "f").write_text("open me\n")
    f = open(mount.path("sub", "f"))  # noqa: SIM115 - held open on purpose
    sleeper = subprocess.Popen(["sleep", "60"], cwd=mount.path("sub"))
    try:
        res = atomicfs("umount", str(mount.mountpoint))
        assert res.returncode == 1
        assert res.stderr.count("\n") == 1, res.stderr
        line = res.stderr
        assert "is in use, not unmounted" in line and "--lazy" in line
        assert f"pid {os.getpid()} (" in line and f"{mount.path('sub', 'f')} open" in line
        assert f"pid {sleeper.pid} (sleep) has its working directory in " \
               f"{mount.path('sub')}" in line
        assert mounted_fstype(mount.mountpoint) == "fuse.atomicfs"
        assert f.read() == "open me\n"
    finally:
        sleeper.kill()
        sleeper.wait()
    # --lazy detaches at once; the open file is still served, and the daemon ends after it
    res = atomicfs("umount", "--lazy", str(mount.mountpoint))
    assert res.returncode == 0, res.stderr
    assert mounted_fstype(mount.mountpoint) is None
    f.seek(0)
    assert f.read() == "open me\n"
    assert mount.proc is not None and mount.proc.poll() is None
    f.close()
    assert mount.proc.wait(timeout=20) == 0
    mount.proc = None


@needs_fuse
def test_dead_mount_is_named_and_detached(mount_factory: MountFactory) -> None:
    m = mount_factory()
    m.path("f").write_text("kept\n")
    assert m.proc is not None
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    m.proc = None
    assert mounted_fstype(m.mountpoint) == "fuse.atomicfs"
    mnt = str(m.mountpoint)
    res = atomicfs("mount", str(m.source), mnt)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "dead FUSE mount" in res.stderr and f"atomicfs umount {mnt}" in res.stderr
    res = atomicfs("status", mnt)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "dead mount" in res.stderr
    res = atomicfs("umount", mnt)
    assert res.returncode == 0, res.stderr
    assert mounted_fstype(m.mountpoint) is None
    m.start()  # mounts again (recovery runs) and serves the committed file
    assert m.path("f").read_text() == "kept\n"


# -- man pages -----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["atomicfs", *sorted(cli.PARSERS)])
def test_help_is_a_manual_page_listing_every_option(command: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if command == "atomicfs" else [command, "--help"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out == manual.PAGES[command]
    heads = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert heads == list(manual.SECTIONS), heads
    assert f"atomicfs {command}" in out.split("SYNOPSIS", 1)[1] or command == "atomicfs"
    options = out.split("\nOPTIONS\n", 1)[1].split("\nEXIT STATUS\n", 1)[0]
    parser = cli._top_parser() if command == "atomicfs" else cli.PARSERS[command]("p")
    for action in parser._actions:
        for flag in action.option_strings:
            assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", options), \
                f"{flag} of atomicfs {command} is not in its OPTIONS section"


# -- unprivileged use ----------------------------------------------------------------------

# The interpreter may live where a new user cannot read it (a pyenv under /root):
# load everything as root, then drop to the user before main() sees an argument.
AS_USER = """
import os, sys
import encodings.latin_1, encodings.unicode_escape, json, subprocess, tempfile, threading
import faulthandler, logging, socket
import trio, pyfuse3
import atomicfs.cli, atomicfs.control, atomicfs.mount, atomicfs.operations, atomicfs.logs
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
os.environ["HOME"] = "/"
sys.exit(atomicfs.cli.main(sys.argv[3:]))
"""


@pytest.fixture
def user() -> Iterator[tuple[int, int]]:
    """A throwaway user (removed at teardown), with /dev/fuse usable by it for the test."""
    if not IS_ROOT or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd (package passwd) to make a throwaway user")
    name = "afs-t" + secrets.token_hex(4)
    res = subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell",
                          "/usr/sbin/nologin", name], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot create a user: {res.stderr.strip()}")
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    try:
        import pwd
        entry = pwd.getpwnam(name)
        os.chmod("/dev/fuse", mode | 0o666)  # Debian's is 0666; this machine's is 0600
        yield entry.pw_uid, entry.pw_gid
    finally:
        os.chmod("/dev/fuse", mode)
        subprocess.run(["userdel", name], capture_output=True)


def run_as_user(uid_gid: tuple[int, int], args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", AS_USER, *map(str, uid_gid), *args], env=cli_env(),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@needs_fuse
def test_a_user_mounts_their_own_directory(user: tuple[int, int], cleanup: Cleanup) -> None:
    uid, gid = user
    base = Path(tempfile.mkdtemp(prefix="atomicfs-user-"))
    try:
        base.chmod(0o755)
        src, mnt = base / "src", base / "mnt"
        for d in (src, mnt):
            d.mkdir()
            os.chown(d, uid, gid)
        (src / "mine.txt").write_text("the user's\n")
        os.chown(src / "mine.txt", uid, gid)
        cleanup.mounts.append(mnt)
        # allow_other is refused up front unless fuse.conf allows it
        from atomicfs.mount import user_allow_other
        if not user_allow_other():
            res = run_as_user(user, ["mount", str(src), str(mnt), "-o", "allow_other"])
            assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
            assert "user_allow_other" in res.stderr
            assert mounted_fstype(mnt) is None
        log_path = base / "daemon.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([PYTHON, "-c", AS_USER, str(uid), str(gid), "mount", "-f",
                                     str(src), str(mnt)], env=cli_env(), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        cleanup.procs.append(proc)
        if not wait_for(lambda: mounted_fstype(mnt) == "fuse.atomicfs" or proc.poll() is not None,
                        20) or proc.poll() is not None:
            text = log_path.read_text()
            if "fusermount3" in text and "not permitted" in text:
                pytest.skip(f"fusermount3 cannot mount for a user here: {text.strip()}")
            pytest.fail(f"the user's mount did not come up:\n{text}")
        entry = top_mount(str(mnt))
        assert entry is not None
        assert f"user_id={uid}" in entry.super_options
        assert "allow_other" not in entry.super_options
        res = run_as_user(user, ["status", "--json", str(mnt)])
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["pid"] == proc.pid
        # root may not look in: no allow_other
        with pytest.raises(PermissionError):
            os.listdir(mnt)
        write = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                                "sh", "-c", 'echo "written by the user" > "$1"', "sh",
                                str(mnt / "new.txt")], capture_output=True, text=True,
                               timeout=30)
        assert write.returncode == 0, write.stderr
        res = run_as_user(user, ["umount", str(mnt)])
        assert res.returncode == 0, res.stderr
        assert mounted_fstype(mnt) is None
        assert proc.wait(timeout=20) == 0
        assert (src / "new.txt").read_text() == "written by the user\n"
        assert os.stat(src / "new.txt").st_uid == uid
        assert "Traceback" not in log_path.read_text()
    finally:
        cleanup.finish()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("debug", [False, True])
def test_a_reply_the_kernel_no_longer_waits_for_is_not_logged_as_an_error(
        tmp_path: Path, debug: bool) -> None:
    """libfuse logs ERROR "fuse_reply_* failed with No such file or directory" when the
    kernel gave a request up (an asynchronous RELEASE answered during the unmount): not
    an error an operator can act on. Other pyfuse3 errors stay errors."""
    log_file = tmp_path / "daemon.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("pyfuse3").level)
    try:
        logs.setup(debug=debug, log_file=str(log_file))
        fuse_log = logging.getLogger("pyfuse3")
        fuse_log.error("fuse_release(): fuse_reply_* failed with No such file or directory")
        fuse_log.error("fuse_reply_* failed with Invalid argument")
        for h in logging.getLogger().handlers:
            h.flush()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        logging.getLogger("pyfuse3").setLevel(saved[2])
    text = log_file.read_text()
    assert "ERROR pyfuse3: fuse_reply_* failed with Invalid argument" in text, text
    assert "ERROR pyfuse3: fuse_release()" not in text, text
    assert ("DEBUG pyfuse3: fuse_release(): fuse_reply_*" in text) == debug, text
