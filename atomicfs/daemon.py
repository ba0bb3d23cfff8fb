"""The daemon's components, built in one place, in order, one way.

Each component is handed its collaborators in its constructor; nothing is
wired afterwards.  The order (each needs only what is above it):

1. ``SOURCE/.atomicfs`` opened, recovery run (the first change made to SOURCE);
2. :class:`Housekeeper` (work off the request path), :class:`DirSyncs` (the
   directory fsyncs made, so a directory fsync with nothing new returns at once);
3. :class:`InodeTable`, closing replaced files' descriptors through the
   housekeeper;
4. :class:`Namespace`;
5. :class:`OpenState` and :class:`LostVersions`: the registry of open handles
   and sessions, and where the group persist reports a lost staged version.
   They are built before the batch and the open files to break the one cycle
   (the batch reports losses that the open files hand to fsync(), and the open
   files persist through the batch);
6. :class:`Publisher` (with the namespace's name finder), :class:`Shadows`,
   :class:`Reads`, :class:`Batch`, sharing one :class:`CommitStats`;
7. :class:`Committer`;
8. :class:`OpenFiles`, which builds its :class:`atomicfs.appends.Appends` and its
   :class:`atomicfs.transactions.Transactions` (``atomicfs run``), handing each
   itself: appends commit through the open files, a transaction's end drops its
   sessions through them, and the open files' opens and creates join a
   transaction.
"""

from __future__ import annotations

import trio

from . import recovery
from .batch import Batch
from .commit import Committer
from .dirsync import DirSyncs, fine_grained_ctime
from .files import LostVersions, OpenFiles, OpenState
from .housekeeping import Housekeeper
from .inodes import InodeTable
from .namespace import Namespace
from .options import MountOptions
from .publish import CommitStats, Publisher, name_finder
from .reads import Reads
from .shadows import Shadows


class Daemon:
    """Every component of one mount (built once the mount exists)."""

    def __init__(self, root_fd: int, options: MountOptions, mountpoint: str | None) -> None:
        self.daemon_dir = recovery.open_daemon_dir(root_fd)
        self.recovered = recovery.recover(root_fd, self.daemon_dir)
        self.housekeeper = Housekeeper(self.daemon_dir)
        self.dirsyncs = DirSyncs(fine_grained_ctime(self.daemon_dir))
        self.table = InodeTable(root_fd, closer=self.housekeeper.close_later)
        self.namespace = Namespace(self.table)
        self.state = OpenState()
        lost = LostVersions(self.state, self.namespace, self.housekeeper)
        find_name = name_finder(self.table, self.namespace.pending_name)
        self.counters = CommitStats()
        self.publisher = Publisher(self.table, self.daemon_dir, find_name,
                                   self.namespace.published, self.counters)
        self.shadows = Shadows(self.table, self.housekeeper, self.daemon_dir, find_name)
        self.reads = Reads(self.table)
        self.batch = Batch(self.table, self.publisher, self.counters, lost.report,
                           self.dirsyncs, options.durability)
        self.committer = Committer(self.table, self.daemon_dir, self.publisher, self.shadows,
                                   self.batch, self.reads, self.housekeeper, self.counters,
                                   self.dirsyncs, options.commit)
        self.files = OpenFiles(self.state, self.table, self.namespace, self.committer,
                               self.shadows, self.batch, self.reads, self.housekeeper,
                               self.daemon_dir, options.isolation, mountpoint,
                               options.checkpoint, options.checkpoint_bytes)
        self.transactions = self.files.transactions

    async def background(self) -> None:
        """Tasks that run beside the request handlers: housekeeping, append
        checkpoints, and the group persist of durability=batch."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.housekeeper.run)
            nursery.start_soon(self.transactions.run)
            nursery.start_soon(self.files.appends.run,
                               lambda: list(self.files.sessions.values()))
            if self.batch.enabled:
                nursery.start_soon(self.batch.run_batches)

    async def finish(self) -> None:
        """After the kernel let go: lost last releases, then every staged commit."""
        with self.table.scope():
            # a transaction whose command did not end before the unmount: nothing stays
            self.transactions.abort_all("the file system was unmounted before its "
                                        "command ended")
            await self.files.release_remaining()
            await self.batch.persist()

    def shutdown(self) -> None:
        """Close every fd the components hold (after the main loop ended)."""
        self.transactions.close_all()
        self.files.close_all()
        self.table.close_all()
        self.housekeeper.close_all()
        recovery.close_daemon_dir(self.table.root.fd, self.daemon_dir)
