"""Model-based test: random operations on a real mount against a model of docs/semantics.md.

Operations: open (O_RDONLY/O_WRONLY/O_RDWR with O_CREAT, O_EXCL, O_TRUNC,
O_APPEND), dup (a second descriptor of one open file, as the shell's dup2),
pread, pwrite / append, ftruncate, fsync/fdatasync, close, fstat, stat, a fresh
reader (open-read-close) in this process and in another, truncate(2) by path,
rename, unlink, link, on three names, with up to six descriptors open at once
(several on the same file).

The model (docs/semantics.md §1, §2, §4, §5) keeps, per file:
- ``committed``: the content stored in the source tree (None: a new file that
  was never committed, which must not exist in the source);
- ``session``: the uncommitted content shared by every handle that can write
  the file (None: no session);
and per open file whether it joined the session, whether it wrote since its
last commit point, and whether it is an *isolated* reader: under
isolation=committed a read-only open while a session exists reads the
committed version, unless this process holds a descriptor of the file open for
writing (it reads its own writes, docs/semantics.md §4.1); a fresh reader in
another process (started before any descriptor is open) is isolated whenever a
session exists; a reader opened before the session began shares the page
cache and reads the session's content (the documented kernel limit, §4.5);
under isolation=shared every reader reads the session's content.

Commit points: close() of a descriptor whose open file wrote (every close,
dup()s included), fsync() on any handle of a file with a session, the last
release of a session (asynchronous: after close() returned, so the source
check then waits for it), truncate(2) by path with no session (at once), and
the namespace operations that need a new file in the source (link of a new
file, rename of a new file over an existing name).  A file with no name left
is never committed.

Append sessions (docs/semantics.md §10): a session that only appended since its
last commit is a log; a reader's open (isolated) first checkpoints its appends
(the model's writes are whole and short: every append is a write boundary), and
a truncate to zero of a log that was appended to, while another handle holds it,
is committed at once (rotation).  The mounts use checkpoint=3600, so no timer
checkpoint comes between two steps.

One corner is left out: a file unlinked while written whose last writer then
closed with uncommitted changes, read through a descriptor that still holds
it (the contract does not say what such a reader sees).

Every step compares what the mount returns (data, sizes and link counts by
fstat and stat, errno) with the model, then checks the SOURCE tree: every
name holds its file's committed content (hard links as one file), new files
that were never committed are absent, nothing else is there.  One mount per
isolation mode serves all examples; every example runs in a fresh
subdirectory.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from conftest import HAVE_FUSE, IS_ROOT, Mount
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from atomicfs.harness import ReaderProcess

NAMES = ["a", "b", "c"]
MAX_HANDLES = 6
SETTLE = 3.0  # seconds a release commit may take to reach the source
SOAK = os.environ.get("ATOMICFS_SOAK") == "1"

FLAGS = {
    "RDONLY": os.O_RDONLY,
    "WRONLY": os.O_WRONLY,
    "RDWR": os.O_RDWR,
    "WRONLY|CREAT": os.O_WRONLY | os.O_CREAT,
    "RDWR|CREAT": os.O_RDWR | os.O_CREAT,
    "WRONLY|CREAT|TRUNC": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "RDWR|TRUNC": os.O_RDWR | os.O_TRUNC,
    "WRONLY|APPEND|CREAT": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    "RDWR|APPEND": os.O_RDWR | os.O_APPEND,
    "RDWR|CREAT|EXCL": os.O_RDWR | os.O_CREAT | os.O_EXCL,
    "RDONLY|CREAT": os.O_RDONLY | os.O_CREAT,
}


@dataclass(eq=False)
class MFile:
    committed: bytes | None  # None: never committed
    session: bytearray | None = None
    names: set[str] = field(default_factory=set)
    members: int = 0  # open handles in the session
    # Unlinked while written, and the session ended with changes never committed:
    # what readers still holding the file see is not specified (docs/semantics.md §5 says
    # only that the data vanishes at release); reads and sizes are not compared.
    unspecified: bool = False
    # docs/semantics.md §10: the session is a log; it appended as one (ever; since
    # its last commit)
    log: bool = False
    appended: bool = False
    unsaved: bool = False

    def view(self) -> bytes:
        """What the file's writers (and non-isolated readers) see."""
        if self.session is not None:
            return bytes(self.session)
        return self.committed or b""

    def commit(self) -> None:
        """Commit the session (a file with no name left is never committed)."""
        if self.session is not None and self.names:
            self.committed = bytes(self.session)

    def whole_commit(self) -> None:
        """A commit point of the session: committed, and a log again from here."""
        self.commit()
        if self.session is not None:
            self.log, self.unsaved = True, False

    def start(self, log: bool) -> None:
        self.log, self.appended, self.unsaved = log, False, False

    def truncating(self, size: int, others: int) -> bool:
        """Before a truncate of the session: is it a rotation, committed at once?"""
        assert self.session is not None
        if self.log and size == 0 and others > 0:
            if not self.session:
                return False  # changes nothing
            if self.appended:
                self.log = False
                return True
        self.log = False
        return False

    def rotate(self) -> None:
        """After a rotation's truncate: committed if that changed anything."""
        assert self.session is not None
        if self.committed is None or bytes(self.session) != self.committed:
            self.whole_commit()

    def reader_open(self) -> None:
        """An isolated reader's open: the log's appends are checkpointed first."""
        if self.session is None or not self.log or not self.unsaved:
            return
        if self.committed is None:  # a new log: its first checkpoint publishes it
            self.whole_commit()
        elif IS_ROOT and self.names:  # in place (needs file handles); never unlinked
            self.committed = bytes(self.session)
            self.unsaved = False


@dataclass(eq=False)
class MHandle:
    """An open file description (shared by dup()ed descriptors): one FUSE handle."""

    fds: list[int]
    file: MFile
    flags: int
    label: str
    member: bool  # joined the write session
    isolated: bool  # reads the committed version
    wrote: bool = False

    @property
    def readable(self) -> bool:
        return (self.flags & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)

    @property
    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)


def can_modify(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


def errno_of(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args), 0
    except OSError as exc:
        return None, exc.errno


class Model(RuleBasedStateMachine):
    mount: Mount
    reader: ReaderProcess  # another process, started before any descriptor is open
    isolation = "committed"  # or "shared": every reader sees the session's content
    counter = itertools.count()
    steps = 0  # checks of the source tree made, over all examples

    def __init__(self) -> None:
        super().__init__()
        self.sub = f"ex{next(self.counter)}"
        self.dir = self.mount.path(self.sub)
        self.srcdir = self.mount.src(self.sub)
        os.mkdir(self.dir)
        self.names: dict[str, MFile] = {}
        self.handles: list[tuple[int, MHandle]] = []  # open descriptors
        self.labels = itertools.count()
        self.settle = False  # a release commit may still be on its way to the source

    # -- helpers -----------------------------------------------------------------
    def p(self, name: str) -> str:
        return str(self.dir / name)

    def handle(self, i: int) -> tuple[int, MHandle]:
        return self.handles[i % len(self.handles)]

    def publish(self, f: MFile) -> None:
        """A new file made real in the source (before a namespace operation needs it)."""
        if f.committed is None:
            f.whole_commit()

    def isolated_open(self, f: MFile) -> bool:
        """Is a read-only open of ``f`` by this process isolated?  Not while this
        process holds a descriptor of it open for writing (docs/semantics.md §4.1)."""
        writing = any(h.file is f and h.writable for _, h in self.handles)
        return f.session is not None and self.isolation == "committed" and not writing

    def expect_errno(self, what: str, got: int, want: int) -> None:
        assert got == want, f"{what}: errno {errno.errorcode.get(got, got)}, model says " \
                            f"{errno.errorcode.get(want, want)}"

    # -- rules -----------------------------------------------------------------------
    @precondition(lambda self: len(self.handles) < MAX_HANDLES)
    @rule(name=st.sampled_from(NAMES), flags=st.sampled_from(sorted(FLAGS)))
    def open(self, name: str, flags: str) -> None:
        fl = FLAGS[flags]
        f = self.names.get(name)
        want = 0
        if f is None and not fl & os.O_CREAT:
            want = errno.ENOENT
        elif f is not None and fl & os.O_CREAT and fl & os.O_EXCL:
            want = errno.EEXIST
        fd, got = errno_of(os.open, self.p(name), fl, 0o644)
        self.expect_errno(f"open({name}, {flags})", got, want)
        if got:
            return
        label = f"h{next(self.labels)}:{name}:{flags}"
        if f is None:  # created: a new file with a session of its own
            f = MFile(None, bytearray(), {name})
            f.start(log=bool(fl & os.O_APPEND))  # a new file is a log if created to append
            self.names[name] = f
            h = MHandle([fd], f, fl, label, member=True, isolated=False)
        elif can_modify(fl):
            if f.session is None:
                f.session = bytearray(f.committed or b"")
                f.start(log=True)
            if fl & os.O_TRUNC:
                rotation = f.truncating(0, f.members)
                del f.session[:]
                if rotation:
                    f.rotate()
            h = MHandle([fd], f, fl, label, member=True, isolated=False)
        else:
            isolated = self.isolated_open(f)
            if isolated:
                f.reader_open()
            h = MHandle([fd], f, fl, label, member=False, isolated=isolated)
        if h.member:
            f.members += 1
        self.handles.append((fd, h))

    @precondition(lambda self: 0 < len(self.handles) < MAX_HANDLES)
    @rule(i=st.integers(0, MAX_HANDLES))
    def dup(self, i: int) -> None:
        """A second descriptor of the same open file (the shell's dup2 before writing)."""
        fd, h = self.handle(i)
        new = os.dup(fd)
        h.fds.append(new)
        self.handles.append((new, h))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, MAX_HANDLES), off=st.integers(0, 300), size=st.integers(0, 300))
    def read(self, i: int, off: int, size: int) -> None:
        fd, h = self.handle(i)
        data, got = errno_of(os.pread, fd, size, off)
        self.expect_errno(f"pread({h.label})", got, 0 if h.readable else errno.EBADF)
        if got:
            return
        if h.file.unspecified:
            return
        source = (h.file.committed or b"") if h.isolated else h.file.view()
        want = source[off:off + size]
        assert data == want, (f"pread({h.label}, {size}, {off}) = {data!r}, model says "
                              f"{want!r} ({'committed' if h.isolated else 'session'} view)")

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, MAX_HANDLES), off=st.integers(0, 300),
          data=st.binary(min_size=1, max_size=80))
    def write(self, i: int, off: int, data: bytes) -> None:
        fd, h = self.handle(i)
        if h.flags & os.O_APPEND:
            n, got = errno_of(os.write, fd, data)
        else:
            n, got = errno_of(os.pwrite, fd, data, off)
        self.expect_errno(f"write({h.label})", got, 0 if h.writable else errno.EBADF)
        if got:
            return
        assert n == len(data)
        s = h.file.session
        assert s is not None and h.member
        if h.flags & os.O_APPEND:
            off = len(s)
        if off < len(s):  # an overwrite: a rewrite until the next commit
            h.file.log = False
        elif h.file.log:
            h.file.appended = h.file.unsaved = True
        if off > len(s):
            s.extend(bytes(off - len(s)))
        s[off:off + len(data)] = data
        h.wrote = True

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, MAX_HANDLES), size=st.integers(0, 300))
    def ftruncate(self, i: int, size: int) -> None:
        fd, h = self.handle(i)
        _, got = errno_of(os.ftruncate, fd, size)
        self.expect_errno(f"ftruncate({h.label})", got, 0 if h.writable else errno.EINVAL)
        if got:
            return
        s = h.file.session
        assert s is not None
        rotation = h.file.truncating(size, h.file.members - 1)
        if size < len(s):
            del s[size:]
        else:
            s.extend(bytes(size - len(s)))
        h.wrote = True
        if rotation:
            h.file.rotate()

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, MAX_HANDLES), data=st.booleans())
    def fsync(self, i: int, data: bool) -> None:
        fd, h = self.handle(i)
        _, got = errno_of(os.fdatasync if data else os.fsync, fd)
        self.expect_errno(f"fsync({h.label})", got, 0)
        h.file.whole_commit()
        h.wrote = False

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, MAX_HANDLES))
    def close(self, i: int) -> None:
        fd, h = self.handle(i)
        self.handles.remove((fd, h))
        h.fds.remove(fd)
        _, got = errno_of(os.close, fd)
        self.expect_errno(f"close({h.label})", got, 0)
        f = h.file
        if h.member:
            if h.wrote:  # flush (every close): commits if this handle wrote
                f.whole_commit()
                h.wrote = False
            if h.fds:  # other descriptors of the open file remain: no release yet
                return
            f.members -= 1
            if f.members == 0:  # last release: commits what is left, ends the session
                f.commit()
                if not f.names and f.session is not None and bytes(f.session) != f.committed:
                    f.unspecified = True
                f.session = None
                self.settle = True

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, MAX_HANDLES))
    def fstat(self, i: int) -> None:
        fd, h = self.handle(i)
        st_ = os.fstat(fd)
        f = h.file
        if f.unspecified:
            return
        assert st_.st_size == len(f.view()), f"fstat({h.label}).st_size {st_.st_size}, " \
                                             f"model {len(f.view())}"
        assert st_.st_nlink == len(f.names), f"fstat({h.label}).st_nlink {st_.st_nlink}, " \
                                             f"model {len(f.names)}"

    @rule(name=st.sampled_from(NAMES))
    def stat(self, name: str) -> None:
        st_, got = errno_of(os.stat, self.p(name))
        f = self.names.get(name)
        self.expect_errno(f"stat({name})", got, 0 if f else errno.ENOENT)
        if f is not None:
            assert st_.st_size == len(f.view()), f"stat({name}).st_size {st_.st_size}, " \
                                                 f"model {len(f.view())}"
            assert st_.st_nlink == len(f.names), f"stat({name}).st_nlink {st_.st_nlink}"

    @rule(name=st.sampled_from(NAMES))
    def read_whole(self, name: str) -> None:
        """A fresh reader: open, read all, close (close-to-open, isolation)."""
        f = self.names.get(name)
        fd, got = errno_of(os.open, self.p(name), os.O_RDONLY)
        self.expect_errno(f"open({name}, RDONLY)", got, 0 if f else errno.ENOENT)
        if got:
            return
        try:
            data = os.pread(fd, 1 << 16, 0)
        finally:
            os.close(fd)
        assert f is not None
        want = (f.committed or b"") if self.isolated_open(f) else f.view()
        assert data == want, f"fresh reader of {name}: {data!r}, model says {want!r}"

    @rule(name=st.sampled_from(NAMES))
    def read_whole_elsewhere(self, name: str) -> None:
        """A fresh reader in another process, which never writes: isolated while a
        session exists (isolation=committed)."""
        f = self.names.get(name)
        try:
            data, got = self.reader.read(self.dir / name), 0
        except OSError as exc:
            data, got = b"", exc.errno or errno.EIO
        self.expect_errno(f"open({name}, RDONLY) in another process", got,
                          0 if f else errno.ENOENT)
        if got or f is None or f.unspecified:
            return
        isolated = f.session is not None and self.isolation == "committed"
        if isolated:
            f.reader_open()
        want = (f.committed or b"") if isolated else f.view()
        assert data == want, f"reader process of {name}: {data!r}, model says {want!r}"

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES))
    def rename(self, a: str, b: str) -> None:
        src, dst = self.names.get(a), self.names.get(b)
        _, got = errno_of(os.rename, self.p(a), self.p(b))
        self.expect_errno(f"rename({a}, {b})", got, 0 if src else errno.ENOENT)
        if got or src is dst:  # same file (or same name): rename does nothing
            return
        assert src is not None
        if dst is not None:
            if src.committed is None:
                self.publish(src)  # a new file replacing a name must be in the source
                if dst.committed is None:
                    self.publish(dst)
            dst.names.discard(b)
        src.names.discard(a)
        src.names.add(b)
        del self.names[a]
        self.names[b] = src

    @rule(name=st.sampled_from(NAMES), size=st.integers(0, 300))
    def truncate(self, name: str, size: int) -> None:
        """truncate(2) by path: joins the file's session, or is a session of its own."""
        f = self.names.get(name)
        _, got = errno_of(os.truncate, self.p(name), size)
        self.expect_errno(f"truncate({name})", got, 0 if f else errno.ENOENT)
        if got:
            return
        assert f is not None
        alone = f.session is None
        rotation = False
        if alone:
            f.session = bytearray(f.committed or b"")
        else:
            rotation = f.truncating(size, f.members)
        if size < len(f.session):
            del f.session[size:]
        else:
            f.session.extend(bytes(size - len(f.session)))
        if alone:  # committed at once
            f.commit()
            f.session = None
        elif rotation:
            f.rotate()

    @rule(name=st.sampled_from(NAMES))
    def unlink(self, name: str) -> None:
        f = self.names.get(name)
        _, got = errno_of(os.unlink, self.p(name))
        self.expect_errno(f"unlink({name})", got, 0 if f else errno.ENOENT)
        if got:
            return
        assert f is not None
        f.names.discard(name)
        del self.names[name]

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES))
    def link(self, a: str, b: str) -> None:
        src, dst = self.names.get(a), self.names.get(b)
        want = errno.ENOENT if src is None else errno.EEXIST if dst is not None else 0
        _, got = errno_of(os.link, self.p(a), self.p(b))
        self.expect_errno(f"link({a}, {b})", got, want)
        if got:
            return
        assert src is not None
        self.publish(src)  # a new file gets its first name in the source before a second
        src.names.add(b)
        self.names[b] = src

    # -- the source tree -----------------------------------------------------------------
    def source_problems(self) -> list[str]:
        problems = []
        want = {n: f.committed for n, f in self.names.items() if f.committed is not None}
        have = sorted(os.listdir(self.srcdir))
        if sorted(want) != have:
            problems.append(f"SOURCE has {have}, model says {sorted(want)} "
                            f"(new files never committed: "
                            f"{sorted(n for n, f in self.names.items() if f.committed is None)})")
        for n in sorted(set(want) & set(have)):
            try:
                data = (self.srcdir / n).read_bytes()
            except FileNotFoundError:
                problems.append(f"SOURCE/{n} vanished")
                continue
            if data != want[n]:
                problems.append(f"SOURCE/{n} = {data!r}, committed version in the model: "
                                f"{want[n]!r}")
        links: dict[int, set[str]] = {}
        for n in have:
            links.setdefault(os.stat(self.srcdir / n).st_ino, set()).add(n)
        for n in want:
            f = self.names[n]
            same = {m for m in f.names if m in want}
            got = links.get(os.stat(self.srcdir / n).st_ino) if n in have else same
            if got != same:
                problems.append(f"SOURCE/{n}: names of the file {sorted(got or ())}, "
                                f"model says {sorted(same)}")
        return problems

    def check(self) -> None:
        problems = self.source_problems()
        if problems and self.settle:  # a release commit arrives after close() returned
            deadline = time.monotonic() + SETTLE
            while problems and time.monotonic() < deadline:
                time.sleep(0.01)
                problems = self.source_problems()
        self.settle = False
        assert not problems, "\n".join(problems)

    @invariant()
    def source_matches_model(self) -> None:
        self.check()
        Model.steps += 1

    def teardown(self) -> None:
        try:
            while self.handles:
                self.close(0)
                self.check()
        finally:
            for fd, _ in self.handles:  # after a failure: never leave the mount busy
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.handles.clear()
        for name in list(self.names):  # keep the shared mount small
            with contextlib.suppress(OSError):
                os.unlink(self.p(name))
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


@pytest.fixture(scope="module", params=["committed", "shared"])
def shared_mount(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount for all the examples of a test (mounting costs ~0.5 s)."""
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and fusermount3")
    base = tmp_path_factory.mktemp("model")
    (base / "src").mkdir()
    (base / "mnt").mkdir()
    options = ["checkpoint=3600"]  # no timer checkpoint between two steps
    if request.param != "committed":
        options.append(f"isolation={request.param}")
    m = Mount(base / "src", base / "mnt", options, base / "daemon.log")
    m.start()
    try:
        yield m
    finally:
        try:
            m.unmount()
        finally:
            m.force_cleanup()
    bad = m.bad_log_lines()
    assert not bad, "daemon log has errors:\n" + "\n".join(bad[:20])


def run_model(m: Mount, examples: int, steps: int) -> None:
    Model.mount = m
    Model.isolation = "shared" if "isolation=shared" in m.options else "committed"
    Model.counter = itertools.count()
    Model.steps = 0
    with ReaderProcess() as reader:
        Model.reader = reader
        run_state_machine_as_test(
            Model,
            settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.filter_too_much]),
        )
    made = next(Model.counter)
    print(f"model ({Model.isolation}): {made} examples, {Model.steps} steps checked")
    assert Model.steps >= made > 0
    assert os.listdir(m.source) == [] or sorted(os.listdir(m.source)) == [".atomicfs"]


def test_model(shared_mount: Mount) -> None:
    run_model(shared_mount, examples=100, steps=40)


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak test: set ATOMICFS_SOAK=1")
def test_model_soak(shared_mount: Mount) -> None:
    run_model(shared_mount, examples=3000, steps=80)


# -- regressions the model found (deterministic versions) ---------------------------------
def test_write_after_unlink_of_open_file(mount: Mount) -> None:
    """POSIX: a file unlinked while open stays writable (was EIO: no name for a shadow)."""
    for new in (True, False):
        p = mount.path("f")
        if not new:
            p.write_bytes(b"old")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.fsync(fd)
            os.unlink(p)
            assert os.pwrite(fd, b"more", 3) == 4
            assert os.pread(fd, 10, 0) == (b"\0\0\0more" if new else b"oldmore")
        finally:
            os.close(fd)
        assert not mount.src("f").exists()


def test_truncate_by_path_right_after_close(mount: Mount) -> None:
    """truncate(2) arriving while the last release still commits was lost."""
    for i in range(50):
        p = mount.path(f"t{i}")
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        os.truncate(p, 43)
        assert os.stat(p).st_size == 43
        assert mount.src(f"t{i}").stat().st_size == 43  # committed before truncate returned


def test_new_file_keeps_its_link_count_during_its_first_commit(mount: Mount) -> None:
    """stat() during a new file's first commit showed st_nlink 0."""
    import ctypes
    import struct
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    zero: list[str] = []

    def watch(path: str, done: threading.Event) -> None:
        while not done.is_set():  # AT_STATX_FORCE_SYNC: a GETATTR every time
            if (libc.statx(-100, path.encode(), 0x2000, 0x7FF, buf) == 0
                    and struct.unpack_from("<I", buf.raw, 16)[0] == 0):
                zero.append(path)
                return

    for i in range(50):
        p = str(mount.path(f"n{i}"))
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"data")
        done = threading.Event()
        t = threading.Thread(target=watch, args=(p, done))
        t.start()
        os.close(fd)
        done.set()
        t.join()
    assert zero == []
