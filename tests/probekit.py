"""Another process that opens, reads and maps files on request, for the tests of
what each kind of reader sees (docs/semantics.md §4).

Start it *before* the test opens a file for writing (see sessionkit.ReaderProcess:
a fork+exec while a written descriptor is open closes the child's copy, a FLUSH).
Commands and answers are JSON lines; an OSError comes back as its errno.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atomicfs.harness import ChildProcess

_PROBE = r"""
import json, mmap, os, sys
held, maps = {}, {}
for line in sys.stdin:
    cmd = json.loads(line)
    op, answer = cmd["op"], {}
    try:
        if op == "open":  # open O_RDONLY and keep it: an id
            fd = os.open(cmd["path"], os.O_RDONLY)
            held[fd] = fd
            answer["id"] = fd
        elif op == "pread":
            answer["data"] = os.pread(cmd["id"], 1 << 24, 0).hex()
        elif op == "map":  # map a held descriptor: an id of the mapping
            flags = mmap.MAP_SHARED if cmd["shared"] else mmap.MAP_PRIVATE
            mm = mmap.mmap(cmd["id"], cmd["size"], flags=flags, prot=mmap.PROT_READ)
            maps[id(mm)] = mm
            answer["id"] = id(mm)
        elif op == "mapped":  # what a mapping shows now
            answer["data"] = maps[cmd["id"]][:].hex()
        elif op == "close":
            os.close(held.pop(cmd["id"]))
        else:
            answer["errno"] = 22
    except OSError as exc:
        answer["errno"] = exc.errno
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
for mm in maps.values():
    mm.close()
for fd in held:
    os.close(fd)
"""


class ProbeProcess(ChildProcess):
    def __init__(self) -> None:
        super().__init__(_PROBE)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the probe process exited ({self.proc.poll()})"
        answer: dict[str, Any] = json.loads(line)
        if "errno" in answer:
            raise OSError(answer["errno"], f"probe {cmd['op']}")
        return answer

    def open(self, path: Path) -> int:
        return int(self.ask(op="open", path=str(path))["id"])

    def pread(self, fid: int) -> bytes:
        return bytes.fromhex(self.ask(op="pread", id=fid)["data"])

    def map(self, fid: int, size: int, shared: bool = True) -> int:
        return int(self.ask(op="map", id=fid, size=size, shared=shared)["id"])

    def mapped(self, mid: int) -> bytes:
        return bytes.fromhex(self.ask(op="mapped", id=mid)["data"])
