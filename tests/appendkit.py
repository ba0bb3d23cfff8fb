"""A logger process for the append-session tests (docs/semantics.md §10).

``Logger`` runs ``python appendkit.py PATH TAG`` and drives it over its stdin:
it holds PATH open (O_WRONLY|O_APPEND|O_CREAT, as Python's logging and most
daemons do) and writes numbered lines ``TAG SEQ TIME PADDING\\n`` on request,
each with one write().  On SIGHUP it reopens PATH before its next write (a
logger that reopens its file after a rotation).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Logger:
    def __init__(self, path: Path, tag: str = "L", extra: dict[str, str] | None = None
                 ) -> None:
        env = dict(os.environ, **(extra or {}))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "appendkit.py"), str(path), tag],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.expect("ready")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line.startswith(word), f"logger said {line!r}, expected {word!r}"
        return line

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str) -> str:
        self.send(command)
        return self.expect("ok")

    def write(self, count: int, every: float = 0.0, wait: bool = True) -> None:
        """Write ``count`` more lines, ``every`` seconds apart (``wait``: until done;
        else :meth:`done` waits)."""
        self.send(f"w {count} {every}")
        if wait:
            self.done()

    def done(self) -> None:
        self.expect("ok")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask("close")
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def lines_of(data: bytes) -> list[tuple[str, int, float]]:
    """``(tag, seq, time written)`` of every line of ``data``, in order; asserts that
    every line is whole (its padding matches its number)."""
    assert not data or data.endswith(b"\n"), f"the data ends inside a line: ...{data[-80:]!r}"
    found = []
    for line in data.splitlines():
        fields = line.split(b" ")
        assert len(fields) == 4, f"not a whole line: {line[:80]!r}"
        assert len(fields[3]) == int(fields[1]) % 97, f"a torn line: {line[:80]!r}"
        found.append((fields[0].decode(), int(fields[1]), float(fields[2])))
    return found


def parse(data: bytes, tag: str = "L") -> list[int]:
    """The sequence numbers of the lines of ``data``, all of ``tag`` and whole."""
    found = lines_of(data)
    assert all(t == tag for t, _, _ in found), "a line of another writer"
    return [seq for _, seq, _ in found]


def line(tag: str, seq: int) -> bytes:
    return b"%s %d %.6f %s\n" % (tag.encode(), seq, time.time(), b"x" * (seq % 97))


def main() -> None:
    path, tag = sys.argv[1], sys.argv[2]
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    reopen = False

    def on_hup(signum: int, frame: object) -> None:
        nonlocal reopen
        reopen = True

    signal.signal(signal.SIGHUP, on_hup)
    seq = 0
    print("ready", flush=True)
    for command in sys.stdin:
        word, *args = command.split()
        if word == "w":
            for i in range(int(args[0])):
                if reopen:
                    os.close(fd)
                    fd = os.open(path, flags, 0o644)
                    reopen = False
                if i and float(args[1]):
                    time.sleep(float(args[1]))
                os.write(fd, line(tag, seq))
                seq += 1
        elif word == "close":
            os.close(fd)
            print("ok", flush=True)
            return
        print("ok", flush=True)


if __name__ == "__main__":
    main()
