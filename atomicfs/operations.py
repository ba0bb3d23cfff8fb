"""The pyfuse3 ``Operations`` class: a thin dispatch layer.

Each handler turns FUSE arguments into calls on the inode table, the namespace,
and the open files, and turns their results into FUSE replies.  Every handler
is wrapped by :func:`_handler`: an ``OSError`` becomes its errno, any other
exception is logged with a traceback and answered with EIO, so a bug in one
request never ends the mount (pyfuse3 itself lets anything but FUSEError
escape and stop the main loop).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from . import faults, metadata, status, syscalls, timing
from .daemon import Daemon
from .inodes import EXHAUSTED, Inode
from .namespace import DirHandle
from .options import MountOptions
from .transactions import CONTROL_PREFIX, Transaction

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
TRACE_BYTES = 64  # --debug shows byte arguments (names, xattr values) up to this length


def _trace_args(args: Sequence[Any]) -> str:
    """Request arguments for a --debug line: long buffers (write data) only by size."""
    shown = []
    for arg in args:
        if isinstance(arg, bytes | bytearray | memoryview) and len(arg) > TRACE_BYTES:
            shown.append(f"<{len(arg)} bytes>")
        elif isinstance(arg, pyfuse3.RequestContext):
            shown.append(f"ctx(uid={arg.uid}, gid={arg.gid}, pid={arg.pid})")
        else:
            shown.append(repr(arg))
    return ", ".join(shown)


def _handler(fn: F) -> F:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: AtomicOperations, *args: Any) -> Any:
        started = 0.0
        if self.trace:
            log.debug("-> %s(%s)", name, _trace_args(args))
            started = time.monotonic()
        timed = timing.begin(name)
        try:
            faults.point(name)
            with self.table.scope():  # the inodes whose fds it uses stay open until done
                result = await fn(self, *args)
        except pyfuse3.FUSEError as exc:
            if self.trace:
                log.debug("<- %s: %s (%.3f ms)", name, os.strerror(exc.errno),
                          (time.monotonic() - started) * 1000)
            raise
        except OSError as exc:
            err = exc.errno or errno.EIO
            if err in EXHAUSTED:  # docs/semantics.md §11: this request only; logged once
                self.table.note_exhausted(name)
            if self.trace:
                log.debug("<- %s: %s (%.3f ms)", name, os.strerror(err),
                          (time.monotonic() - started) * 1000)
            raise pyfuse3.FUSEError(err) from None
        except Exception:
            log.exception("unexpected error in %s%r; answered EIO", name, args)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            timing.end(timed)
        if self.trace:
            log.debug("<- %s ok (%.3f ms)", name, (time.monotonic() - started) * 1000)
        return result

    return wrapper  # type: ignore[return-value]


class AtomicOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, root_fd: int, options: MountOptions | None = None) -> None:
        super().__init__()
        options = options or MountOptions()
        self.trace = options.debug
        self.options_summary = {"durability": options.durability,
                                "isolation": options.isolation, "commit": options.commit,
                                "entry_timeout": f"{options.entry_timeout:g}",
                                "attr_timeout": f"{options.attr_timeout:g}",
                                "checkpoint": f"{options.checkpoint:g}",
                                "checkpoint_bytes": str(options.checkpoint_bytes)}
        metadata.Timeouts.entry = options.entry_timeout
        metadata.Timeouts.attr = options.attr_timeout
        self.options = options
        self.info = status.DaemonInfo()
        self.root_fd = root_fd
        self.dirs: dict[int, DirHandle] = {}
        self.dir_tx: dict[int, Transaction] = {}  # directory handles opened by members
        self._next_dh = 1

    def prepare(self) -> None:
        """Build the daemon's components (:class:`atomicfs.daemon.Daemon`): opens
        SOURCE/.atomicfs and runs recovery, the first change made to SOURCE.

        Called once the mount exists and before serving, so that a mount that
        fails leaves SOURCE untouched.  The handlers dispatch to these components.
        """
        self.daemon = Daemon(self.root_fd, self.options, self.info.mountpoint or None)
        self.recovered = self.daemon.recovered
        self.table = self.daemon.table
        self.namespace = self.daemon.namespace
        self.housekeeper = self.daemon.housekeeper
        self.reads = self.daemon.reads
        self.batch = self.daemon.batch
        self.committer = self.daemon.committer
        self.files = self.daemon.files
        self.tx = self.daemon.transactions

    def _attrs(self, inode: Inode, st: os.stat_result, tx: Transaction | None = None,
               name: tuple[int, bytes] | None = None) -> pyfuse3.EntryAttributes:
        if inode.is_reg:
            attr = self.files.attributes(inode, tx)
        else:
            attr = metadata.entry_attributes(inode.ino, st)
            if inode is self.table.root:
                attr.st_nlink -= self.namespace.hidden_dirs(inode)
        attr.generation = inode.generation
        self.tx.fold(tx, inode, attr)  # a member's view: its changes of attributes and links
        if self.tx.open and (self.tx.touched_inode(inode)
                             or (name is not None and self.tx.touched_name(*name))):
            # the kernel's caches are shared by all processes: what a transaction
            # touched is asked again every time (docs/semantics.md §14); the
            # attributes of what it made are the same for every process that can
            # reach it (its members)
            attr.entry_timeout = 0
            if not self.tx.made(inode):
                attr.attr_timeout = 0
        return attr

    # -- lookup and attributes -------------------------------------------
    @_handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        tx = self.tx.member(ctx)
        entry = self.tx.entry(tx, parent, name)
        if entry is not None:
            entry.lookups += 1
            return self._attrs(entry, os.stat(entry.fd), tx, (parent_inode, name))
        if self.tx.whited(tx, parent, name):
            raise OSError(errno.ENOENT, "removed by the transaction")
        try:
            inode, st = self.namespace.lookup(parent, name)
        except FileNotFoundError:
            if parent.is_dir and os.stat(parent.fd).st_nlink == 0:
                # A directory removed behind the kernel's back (a transaction's commit
                # removed it, or SOURCE directly): the caller's path walk passed
                # through its old name before that.  ESTALE makes the kernel walk the
                # whole path again with every name looked up anew (LOOKUP_REVAL),
                # which finds the new tree, not "no such file" halfway through.
                raise OSError(errno.ESTALE, "the directory was removed") from None
            raise
        return self._attrs(inode, st, tx, (parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self.table.forget(ino, count)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, count)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        return self._attrs(node, os.stat(node.fd), self.tx.member(ctx))

    @_handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        tx = self.tx.member(ctx)
        if tx is not None:
            await self.tx.setattr(tx, node, attr, fields, fh, ctx)
            return self._attrs(node, os.stat(node.fd), tx)
        if fields.update_size:
            handle = self.files.get(fh) if fh is not None else None
            await self.files.truncate(node, attr.st_size, handle)
        if node.is_dir and (fields.update_atime or fields.update_mtime):
            # durability=batch publishes staged names into directories later, which
            # would move the times set now (tar sets them last): publish them first
            await self.batch.persist()
        if not fields.update_size and (fields.update_mode or fields.update_uid
                                       or fields.update_gid or fields.update_atime
                                       or fields.update_mtime):
            # a change of the file's metadata; a truncate (and the times the kernel
            # sends with it, as for O_TRUNC) belongs to the write session
            await self._before_metadata_change(node)
        metadata.apply_setattr(node.fd, attr, fields)
        if fields.update_size or not (fields.update_mode or fields.update_uid or fields.update_gid
                                      or fields.update_atime or fields.update_mtime):
            # a truncate, or the SETATTR the kernel sends before a write (or for a
            # chown(-1, -1)) to drop privileges: finish the set-id rule it applies in part
            metadata.drop_set_id(node.fd, ctx)
        session = self.files.sessions.get(inode)
        if session is not None and fields.update_mtime:
            session.mtime_ns = attr.st_mtime_ns  # an explicit time outlives the commit
        if not fields.update_size and (fields.update_mode or fields.update_uid
                                       or fields.update_gid or fields.update_atime
                                       or fields.update_mtime):
            await self._after_metadata_change(node)
        return self._attrs(node, os.stat(node.fd))

    async def _before_metadata_change(self, node: Inode) -> None:
        """durability=batch: order a metadata change of SOURCE behind the commits
        acknowledged before it (docs/semantics.md §9.2).  A new file not committed
        yet is not in SOURCE: its change goes with its first commit."""
        session = self.files.sessions.get(node.ino)
        if session is None or not session.pending:
            await self.batch.before_change(node)

    async def _after_metadata_change(self, node: Inode) -> None:
        """durability=full: the change is durable before the reply (§9.1); a new file
        not committed yet gets it with its first commit."""
        session = self.files.sessions.get(node.ino)
        if session is None or not session.pending:
            await self.batch.after_metadata_change(node)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self.table.get(inode).fd)

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return metadata.may_access(os.stat(self.table.get(inode).fd), mode, ctx)

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.table.root.fd)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(sv, name))
        return data

    # -- namespace -------------------------------------------------------
    # Each operation that changes SOURCE is ordered behind the commits acknowledged
    # before it (before_change: durability=batch) and durable before the reply
    # (after_change: durability=full fsyncs the directories it changed), as
    # docs/semantics.md §9 promises.  Between before_change and the change itself
    # there is no await.
    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        tx = self.tx.member(ctx)
        if tx is not None:
            inode, st = self.tx.make(tx, parent, name, "node", mode, ctx, rdev=rdev)
            return self._attrs(inode, st, tx, (parent_inode, name))
        await self.batch.before_change()
        inode, st = self.namespace.mknod(parent, name, mode, rdev, ctx)
        await self.batch.after_change([parent])
        return self._attrs(inode, st)

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        tx = self.tx.member(ctx)
        if tx is not None:
            inode, st = self.tx.make(tx, parent, name, "dir", mode, ctx)
            return self._attrs(inode, st, tx, (parent_inode, name))
        await self.batch.before_change()
        inode, st = self.namespace.mkdir(parent, name, mode, ctx)
        await self.batch.after_change([parent])
        return self._attrs(inode, st)

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        tx = self.tx.member(ctx)
        if tx is not None:
            inode, st = self.tx.make(tx, parent, name, "symlink", 0o777, ctx, target=target)
            return self._attrs(inode, st, tx, (parent_inode, name))
        await self.batch.before_change()
        inode, st = self.namespace.symlink(parent, name, target, ctx)
        await self.batch.after_change([parent])
        return self._attrs(inode, st)

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        parent = self.table.get(new_parent_inode)
        tx = self.tx.member(ctx)
        if tx is not None:
            if self.tx.link(tx, node, parent, new_name):
                return self._attrs(node, os.stat(node.fd), tx, (new_parent_inode, new_name))
            node, st = self.namespace.link(node, parent, new_name)  # inside directories
            return self._attrs(node, st, tx)  # the transaction made
        await self.files.publish(node)  # a new file gets its first name before a second
        await self.batch.before_change()
        node, st = self.namespace.link(node, parent, new_name)
        await self.batch.after_change([parent])
        return self._attrs(node, st)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.table.get(parent_inode)
        tx = self.tx.member(ctx)
        if tx is not None:
            if not self.tx.unlink(tx, parent, name):
                self.namespace.unlink(parent, name)  # inside a directory it made
            return
        if self.namespace.pending_at(parent, name) is not None:
            self.namespace.unlink(parent, name)  # never in SOURCE: nothing to order or sync
            return
        await self.batch.before_change()
        self.namespace.unlink(parent, name)
        await self.batch.after_change([parent])

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.table.get(parent_inode)
        tx = self.tx.member(ctx)
        if tx is not None:
            self.tx.rmdir(tx, parent, name)
            return
        await self.batch.before_change()
        self.namespace.rmdir(parent, name)
        await self.batch.after_change([parent])

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old_parent = self.table.get(parent_inode_old)
        new_parent = self.table.get(parent_inode_new)
        tx = self.tx.member(ctx)
        if tx is not None:
            if not self.tx.rename(tx, old_parent, name_old, new_parent, name_new, flags):
                self.namespace.rename(old_parent, name_old, new_parent, name_new, flags)
            return
        for parent, name in ((old_parent, name_old), (new_parent, name_new)):
            pending = self.namespace.pending_at(parent, name)
            if pending is not None and self._rename_needs_real(old_parent, name_old,
                                                                new_parent, name_new, flags):
                await self.files.publish(pending)
        if self.namespace.pending_at(old_parent, name_old) is None:  # else: pending names only
            await self.batch.before_change()
        if self.namespace.rename(old_parent, name_old, new_parent, name_new, flags):
            await self.batch.after_change(
                [old_parent] if old_parent is new_parent else [old_parent, new_parent])

    def _rename_needs_real(self, old_parent: Inode, old: bytes, new_parent: Inode, new: bytes,
                           flags: int) -> bool:
        """Can this rename be done on pending entries alone, or must they be published?"""
        src_pending = self.namespace.pending_at(old_parent, old) is not None
        if flags & syscalls.RENAME_EXCHANGE:
            return True
        if src_pending:
            return self.namespace.exists(new_parent, new)
        return False

    # -- directories -----------------------------------------------------
    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        handle = self.namespace.opendir(self.table.get(inode))
        dh = self._next_dh
        self._next_dh += 1
        self.dirs[dh] = handle
        tx = self.tx.member(ctx)
        if tx is not None:
            self.dir_tx[dh] = tx
        self.table.hold(handle.inode)
        return dh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dirs[fh]
        tx = self.dir_tx.get(fh)
        if tx is not None and tx.state != "open":
            tx = None
        if start_id == 0:
            handle.names = [b".", b".."] + self.tx.listing(tx, handle.inode,
                                                         self.namespace.list_names(handle))
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            if index < 2:  # "." and "..": the kernel counts no lookup for them
                dot = metadata.entry_attributes(handle.inode.ino, os.stat(handle.inode.fd))
                if not pyfuse3.readdir_reply(token, name, dot, index + 1):
                    break
                continue
            with self.table.scope():  # one entry's inode pinned at a time, not the batch
                entry = self.tx.entry(tx, handle.inode, name)
                found = ((entry, os.stat(entry.fd)) if entry is not None
                         else self.namespace.readdir_entry(handle, name))
                if found is None:
                    continue
                inode, st = found
                attr = self._attrs(inode, st, tx, (handle.inode.ino, name))
                if not pyfuse3.readdir_reply(token, name, attr, index + 1):
                    self.table.maybe_drop(inode)
                    break
                self.table.remember(inode)

    @_handler
    async def releasedir(self, fh: int) -> None:
        handle = self.dirs.pop(fh)
        self.dir_tx.pop(fh, None)
        os.close(handle.fd)
        self.table.release(handle.inode)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self.dirs[fh]
        # batch: the commits acknowledged before are published and durable first
        # (docs/semantics.md §3.3): a name appears only with its content
        await self.batch.persist()
        dirsyncs = self.daemon.dirsyncs
        if dirsyncs.clean(handle.fd):  # nothing new since the daemon's last fsync of it
            dirsyncs.counts.skipped += 1
            return
        snap = dirsyncs.snapshot(handle.fd)
        await _in_thread(syscalls.fsync_dir_fd, handle.fd)  # EIO if SOURCE went down
        dirsyncs.synced([snap])
        dirsyncs.counts.done += 1

    # -- files -----------------------------------------------------------
    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.table.get(inode)
        tx = self.tx.member(ctx)
        if flags & os.O_TRUNC:  # the kernel drops no privileges for an atomic O_TRUNC
            self.tx.drop_set_id(tx, node, ctx)
        _, info = await self.files.open(node, flags, ctx.pid, tx)
        return info

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        tx = self.tx.member(ctx)
        handle, attr = self.files.create(self.table.get(parent_inode), name, mode, flags, ctx,
                                         tx)
        if self.tx.touched_name(parent_inode, name):  # a transaction's name (§14)
            attr.entry_timeout = 0
            if tx is None:
                attr.attr_timeout = 0
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=True), attr

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.files.read(self.files.get(fh), off, size)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.files.write(self.files.get(fh), off, buf)

    @_handler
    async def flush(self, fh: int) -> None:
        await self.files.flush(self.files.get(fh))

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.files.fsync(self.files.get(fh), datasync)

    @_handler
    async def release(self, fh: int) -> None:
        await self.files.release(self.files.get(fh))

    # -- extended attributes ---------------------------------------------
    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        node = self.table.get(inode)
        tx = self.tx.member(ctx)
        if tx is not None:
            self.tx.setxattr(tx, node, name, value)
            return
        await self._before_metadata_change(node)
        metadata.set_xattr(node.fd, name, value)
        await self._after_metadata_change(node)

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == self.table.root.ino and name == status.STATUS_XATTR:
            return status.render(self)
        if inode == self.table.root.ino and name.startswith(CONTROL_PREFIX.encode()):
            return await self.tx.control(name.decode("utf-8", "replace"), ctx)
        return self.tx.getxattr(self.tx.xattr_viewer(ctx), self.table.get(inode), name)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return self.tx.listxattr(self.tx.xattr_viewer(ctx), self.table.get(inode), ctx)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.table.get(inode)
        tx = self.tx.member(ctx)
        if tx is not None:
            self.tx.removexattr(tx, node, name)
            return
        await self._before_metadata_change(node)
        metadata.remove_xattr(node.fd, name)
        await self._after_metadata_change(node)

    async def background(self) -> None:
        """Tasks that run beside the request handlers (:meth:`Daemon.background`)."""
        await self.daemon.background()

    async def finish(self) -> None:
        """After the kernel let go: lost last releases, then every staged commit."""
        await self.daemon.finish()

    def shutdown(self) -> None:
        """Close every fd the daemon holds (after the main loop ended)."""
        for handle in self.dirs.values():
            os.close(handle.fd)
        self.dirs.clear()
        self.daemon.shutdown()


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)
