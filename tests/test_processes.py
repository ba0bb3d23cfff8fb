"""atomicfs.processes: what /proc says about the process behind a close (no FUSE)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from atomicfs import processes


def test_parse_stat_counts_fields_after_the_command_name() -> None:
    fields = ["S"] + [str(n) for n in range(4, 53)]  # fields 3..52
    fields[9 - 3] = str(processes.PF_EXITING | 0x40)
    fields[20 - 3] = "3"
    fields[52 - 3] = "9"
    text = "1234 (a) b (c) " + " ".join(fields) + "\n"
    got = processes.parse_stat(text)
    assert got == (processes.PF_EXITING | 0x40, 9, 3)
    assert got.exiting and got.signal == 9
    # an old kernel without exit_code: 0
    assert processes.parse_stat("1 (x) " + " ".join(fields[:40])) == \
        (processes.PF_EXITING | 0x40, 0, 3)


def test_state_of_this_process() -> None:
    me = processes.state(os.getpid())
    assert not me.exiting and me.signal == 0
    assert me.threads == len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_parse_fdinfo() -> None:
    info = processes.parse_fdinfo("pos:\t0\nflags:\t02100001\nmnt_id:\t27\nino:\t42\n")
    assert info == {"pos": "0", "flags": "02100001", "mnt_id": "27", "ino": "42"}


def test_a_running_process_is_not_killed_and_holds_its_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"x")
    child = subprocess.Popen([sys.executable, "-c",
                              "import os, sys, time; fd = os.open(sys.argv[1], os.O_WRONLY);"
                              "print(fd, flush=True); time.sleep(30)", str(target)],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip()
        ino = os.stat(target).st_ino
        assert processes.killed(child.pid) == 0
        assert processes.holds(child.pid, str(tmp_path), ino, os.O_WRONLY)
        assert not processes.holds(child.pid, str(tmp_path), ino, os.O_RDONLY), \
            "a descriptor opened another way is another open file"
        assert not processes.holds(child.pid, str(tmp_path / "elsewhere"), ino, os.O_WRONLY)
        assert processes.children(os.getpid()) and child.pid in processes.children(os.getpid())
        # the child sleeps: it is closing nothing
        assert not processes.silent_children_closing(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert not processes.holds(child.pid, str(tmp_path), os.stat(target).st_ino, os.O_WRONLY)


def test_unknown_processes_answer_the_safe_way() -> None:
    gone = 2**22 + 12345  # above the default pid_max
    assert processes.killed(gone) == 0
    assert not processes.holds(gone, "/", 1, os.O_WRONLY)
    assert processes.children(gone) == []
    assert not processes.silent_children_closing(gone)


def test_children_of_a_process_with_too_many_threads_are_not_read(monkeypatch) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in processes.children(os.getpid())
        monkeypatch.setattr(processes, "MAX_THREADS", 0)
        assert processes.children(os.getpid()) == []
    finally:
        child.kill()
        child.wait()


def test_children_of_a_single_threaded_process_read_from_its_one_task() -> None:
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE)
    sleeper = 0
    try:
        assert shell.stdout is not None
        sleeper = int(shell.stdout.readline())
        assert processes.state(shell.pid).threads == 1
        assert processes.children(shell.pid, threads=1) == [sleeper]
        assert processes.children(shell.pid) == [sleeper]
    finally:
        shell.kill()
        shell.wait()
        if sleeper:
            os.kill(sleeper, 9)


def test_parse_maps_shared_finds_a_shared_mapping_of_the_file() -> None:
    text = ("7f00-7f10 r--s 00000000 00:2a 17 /mnt/db/data.mdb\n"
            "7f10-7f20 r--p 00000000 00:2a 18 /mnt/db/other (deleted)\n"
            "7f20-7f30 rw-p 00000000 00:00 0 \n"
            "7f30-7f40 rw-s 00000000 00:2b 19 /elsewhere/x\n")
    assert processes.parse_maps_shared(text, "/mnt", 17)
    assert not processes.parse_maps_shared(text, "/mnt", 18)  # private
    assert not processes.parse_maps_shared(text, "/mnt", 19)  # not under the mount
    assert not processes.parse_maps_shared(text, "/mn", 17)  # a prefix is not a parent
    assert processes.parse_maps_shared(text.replace("data.mdb", "data.mdb (deleted)"),
                                       "/mnt/", 17)


def test_writes_file_and_maps_shared_of_another_process(tmp_path: Path) -> None:
    (tmp_path / "w").write_bytes(b"x" * 4096)
    (tmp_path / "r").write_bytes(b"y" * 4096)
    script = ("import mmap, os, sys\n"
              "w = os.open(sys.argv[1] + '/w', os.O_RDWR)\n"
              "r = os.open(sys.argv[1] + '/r', os.O_RDONLY)\n"
              "m = mmap.mmap(r, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)\n"
              "print('ready', flush=True)\n"
              "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        w_ino, r_ino = os.stat(tmp_path / "w").st_ino, os.stat(tmp_path / "r").st_ino
        assert processes.writes_file(proc.pid, str(tmp_path), w_ino)
        assert not processes.writes_file(proc.pid, str(tmp_path), r_ino)  # read-only
        assert not processes.writes_file(proc.pid, str(tmp_path / "sub"), w_ino)
        assert processes.maps_shared(proc.pid, str(tmp_path), r_ino)
        assert not processes.maps_shared(proc.pid, str(tmp_path), w_ino)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert not processes.writes_file(proc.pid, str(tmp_path), w_ino)  # gone
