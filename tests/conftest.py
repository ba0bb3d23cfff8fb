"""Shared fixtures: real FUSE mounts of atomicfs, driven as a separate process.

- ``mount`` mounts a fresh SOURCE on a fresh MOUNTPOINT (options via the
  ``mount_options`` marker), yields a :class:`Mount`, always unmounts, and
  fails the test if the daemon logged a traceback or an error the test did not
  declare with ``Mount.expect_log``.
- ``mount_factory`` makes mounts on directories a test chooses (mount over
  itself, remount after a crash...).
- At the end of the session, any atomicfs mount still present fails the run, and
  so does any other mount or loop device left below the run's temporary
  directory (scratch filesystems of fault tests, tests/scratchfs.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import scratchfs

from atomicfs.harness import Daemon
from atomicfs.harness import mounted_fstype as mounted_fstype  # for the tests
from atomicfs.mounttable import mount_table

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LOG_BAD = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")

HAVE_FUSE = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
IS_ROOT = os.geteuid() == 0

needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and fusermount3")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for running this checkout's atomicfs (``python -m atomicfs``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args: Sequence[str], cwd: Path | None = None, prefix: Sequence[str] = (),
            timeout: float = 30, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """``atomicfs ARGS`` from this checkout, its output captured as text."""
    return subprocess.run([*prefix, PYTHON, "-m", "atomicfs", *args], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def atomicfs_mounts() -> list[str]:
    return [point for point, fstype in mount_table() if fstype == "fuse.atomicfs"]


@dataclass
class Mount(Daemon):
    """A daemon of the test suite (atomicfs/harness.py): this checkout's code, and the
    daemon log checked at the end of the test."""

    code: Path | None = ROOT
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def force_cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.unmount(timeout=10)
                return
            except Exception:
                pass
        self.kill()

    # -- the daemon's log ----------------------------------------------------
    def expect_log(self, pattern: str) -> None:
        """Declare that the daemon may log lines matching ``pattern`` (not a failure)."""
        self.allowed.append(re.compile(pattern))

    def bad_log_lines(self) -> list[str]:
        bad = []
        for line in self.log().splitlines():
            if LOG_BAD.search(line) and not any(p.search(line) for p in self.allowed):
                bad.append(line)
        return bad

    # -- helpers -----------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def src(self, *parts: str) -> Path:
        return self.source.joinpath(*parts)


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[MountFactory]:
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and fusermount3")
    made: list[Mount] = []
    counter = iter(range(1000))

    def make(source: Path | None = None, mountpoint: Path | None = None,
             options: Sequence[str] = (), env: dict[str, str] | None = None,
             start: bool = True, prefix: Sequence[str] = ()) -> Mount:
        n = next(counter)
        if source is None:
            source = tmp_path / f"src{n}"
            source.mkdir()
        if mountpoint is None:
            mountpoint = tmp_path / f"mnt{n}"
            mountpoint.mkdir()
        m = Mount(source, mountpoint, list(options), tmp_path / f"daemon{n}.log", env, prefix)
        made.append(m)
        if start:
            m.start()
        return m

    yield make
    problems = []
    for m in made:
        try:
            m.unmount()
        except Exception as exc:  # still fail the test, after cleaning up
            problems.append(f"{m.mountpoint}: {exc}")
            m.force_cleanup()
        bad = m.bad_log_lines()
        if bad:
            problems.append(f"daemon log of {m.mountpoint} has unexpected errors:\n"
                            + "\n".join(bad[:20]) + "\n--- full log ---\n" + m.log()[-4000:])
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def mount(mount_factory: MountFactory, request: pytest.FixtureRequest) -> Mount:
    marker = request.node.get_closest_marker("mount_options")
    options = list(marker.args) if marker else []
    return mount_factory(options=options)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mount_options(*opts): -o options for the mount fixture")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only this run's mounts (under its temporary base directory): other runs on
    # the same machine may have theirs.
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = str(factory.getbasetemp().resolve())
    left = [p for p in atomicfs_mounts() if p == base or p.startswith(base + os.sep)]
    if left:
        sys.stderr.write("\nERROR: atomicfs mounts left behind by the test suite:\n  "
                         + "\n  ".join(left) + "\n")
        for point in left:
            subprocess.run(["fusermount3", "-uz", point], capture_output=True)
        session.exitstatus = 1
    other = scratchfs.detach_leftovers(base)  # detached, so the machine stays usable
    if other:
        sys.stderr.write("\nERROR: mounts or loop devices left behind by the test suite:\n  "
                         + "\n  ".join(other) + "\n")
        session.exitstatus = 1
