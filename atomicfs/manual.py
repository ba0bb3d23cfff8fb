"""The ``--help`` of every command, written as a manual page.

Each page has NAME, SYNOPSIS, DESCRIPTION, OPTIONS, EXIT STATUS and EXAMPLES.
The options a page documents are checked against the command's parser by
``tests/test_lifecycle.py``, so a new flag without its paragraph fails the tests.
"""

from __future__ import annotations

TOP = """\
NAME
    atomicfs - a FUSE filesystem that makes every file update all-or-nothing

SYNOPSIS
    atomicfs mount SOURCE MOUNTPOINT [-o OPT[,OPT...]] [-f] [--debug] [--log FILE]
    atomicfs SOURCE MOUNTPOINT -o OPTS
    atomicfs umount MOUNTPOINT [--lazy] [--timeout SECONDS] [--if-dead]
    atomicfs status MOUNTPOINT [--json]
    atomicfs recover SOURCE
    atomicfs install [--bindir DIR] [--if-missing]
    atomicfs run MOUNTPOINT [--] CMD [ARGS...]
    atomicfs --version

DESCRIPTION
    atomicfs mounts a directory tree (SOURCE) on MOUNTPOINT, which may be the
    same directory. Every file opened for writing through the mount is
    buffered in a shadow copy and committed on close() and fsync() with
    fsync + rename + directory fsync (or a redo journal for large files), so
    a crash or a power loss never leaves a torn, empty or half-written file.

    The second form is what mount.fuse3 runs for `mount -t fuse.atomicfs`
    and for fstab lines of type fuse.atomicfs.

    Run `atomicfs COMMAND --help` for the manual page of each command.

OPTIONS
    -h, --help     print this page
    --version      print the version

EXIT STATUS
    0 on success, 1 when the command failed (one line on stderr says why),
    2 for a bad command line.

EXAMPLES
    atomicfs mount /srv/data /srv/data
    mount -t fuse.atomicfs /srv/data /srv/data -o durability=batch
    atomicfs status /srv/data
    atomicfs umount /srv/data
"""

MOUNT = """\
NAME
    atomicfs mount - mount SOURCE on MOUNTPOINT with atomic file updates

SYNOPSIS
    atomicfs mount SOURCE MOUNTPOINT [-o OPT[,OPT...]] [-f] [--debug] [--log FILE]
    atomicfs SOURCE MOUNTPOINT -o OPTS          (the form mount.fuse3 runs)

DESCRIPTION
    Serves the tree of SOURCE on MOUNTPOINT. SOURCE may be MOUNTPOINT itself:
    the tree is then served from a handle opened before the mount. Before
    serving, what an interrupted commit left in SOURCE/.atomicfs is recovered.

    Without -f the command returns once the mount is live and the daemon goes
    on in the background (its log goes to --log FILE, else nowhere). With -f
    it stays in the foreground, logs to stderr, tells systemd when the mount
    is live (READY=1 on $NOTIFY_SOCKET) and ends when the mount goes away.

    SIGTERM, SIGINT or SIGHUP: requests in progress (commits among them)
    finish and are answered, then the mount is detached and the daemon exits
    0. A session still being written (a file open for writing whose writes
    were not yet committed by a close or fsync) is dropped: the file stays at
    its last committed version. SIGUSR1 writes every thread's stack to the log.

    Checks made before anything changes (one line on stderr, exit 1):
    SOURCE exists, is a readable and writable directory; MOUNTPOINT is a
    directory, not inside SOURCE, not already a FUSE mount; /dev/fuse is
    usable; every option is known.

OPTIONS
    -o OPT[,OPT...]
        mount options, comma-separated; -o may repeat:
        durability=full|batch
            full (default): a commit is on stable storage before the call
            that made it returns. batch: commits are visible at once and
            made durable in groups within 50 ms; fsync() is always durable.
        isolation=committed|shared
            committed (default): a read-only handle opened while the file is
            being written reads the last committed version (for a file only
            appended to, its open first commits the appends, and it sees
            each checkpoint: tail -F follows logs). shared: readers see
            writes in progress, as on ext4.
        commit=auto|rename|journal
            how commits are made; auto chooses per file.
        checkpoint=SECONDS, checkpoint_bytes=BYTES
            a file that is only appended to (a log held open) is committed
            in steps: every SECONDS (default 5, 0.1 to 3600) and every BYTES
            appended (default 64M; units k, M, G), at a write() boundary,
            by appending to the committed file in place. A crash loses at
            most the last step. Other sessions are committed only whole.
        entry_timeout=SECONDS, attr_timeout=SECONDS
            how long the kernel trusts a cached name / a file's attributes
            (default 10 each, 0 to 3600). Changes made through the mount are
            never late; a change made directly in SOURCE shows through the
            mount after at most this long.
        allow_other, default_permissions, ro, rw, nosuid, nodev, noexec,
        fsname=, subtype=, auto_unmount, ...
            standard FUSE options, passed on. As root, allow_other and
            default_permissions are on by default (no_allow_other,
            no_default_permissions turn them off). A user other than root
            may ask for allow_other only if /etc/fuse.conf has the line
            user_allow_other.
        defaults, _netdev, nofail, noauto, user, x-*
            fstab words: accepted and ignored.
    -f, --foreground
        stay in the foreground, log to stderr (no timestamps and a syslog
        priority prefix when stderr is the systemd journal).
    --debug
        log every FUSE request and its answer with its duration (implies -f).
    --log FILE
        append the daemon's log to FILE (in the background: also its stack
        dumps and anything else it prints).
    -h, --help
        print this page.

EXIT STATUS
    0   the mount is live (background), or it was served and unmounted
        cleanly (foreground).
    1   the mount was refused or failed; nothing was changed.
    2   bad command line.

EXAMPLES
    atomicfs mount /srv/data /srv/data
    atomicfs mount -f --debug ~/notes /tmp/notes
    atomicfs mount /srv/db /mnt/db -o durability=batch,isolation=shared --log /var/log/afs.log
    mount -t fuse.atomicfs /srv/data /srv/data -o nofail

    fstab (see docs/operations.md):
    /srv/data  /srv/data  fuse.atomicfs  nofail  0  0
"""

UMOUNT = """\
NAME
    atomicfs umount - unmount an atomicfs mount once its commits are done

SYNOPSIS
    atomicfs umount MOUNTPOINT [--lazy] [--timeout SECONDS]
    atomicfs umount --if-dead MOUNTPOINT

DESCRIPTION
    Unmounts MOUNTPOINT and waits until its daemon has exited: the daemon
    finishes the commits in progress, commits the sessions whose last close
    had not reached it yet, and persists batched commits before it exits, so
    once this command returns every commit is on disk.

    While processes have files, working directories or mappings in the mount,
    the unmount is refused with one line naming them (pid, program, path),
    unless --lazy. The names come from /proc, so a user other than root only
    sees their own processes; the kernel refuses a busy unmount in any case.

    A dead mount (its daemon was killed: every access fails with "Transport
    endpoint is not connected") is detached the same way; mount again to
    recover what its interrupted commits left.

OPTIONS
    -z, --lazy
        detach the mount now even if files are open; the daemon serves them
        until they are closed, then exits. Does not wait.
    --timeout SECONDS
        give up waiting for the daemon after SECONDS (exit 1; the mount is
        gone, the daemon still runs). Default: wait as long as it takes.
    --if-dead
        only detach MOUNTPOINT if its daemon is gone; otherwise do nothing
        and exit 0 (for systemd's ExecStartPre before a restart).
    -h, --help
        print this page.

EXIT STATUS
    0   unmounted and the daemon has exited (with --lazy: detached; with
        --if-dead: detached, or nothing to do).
    1   not unmounted (not a FUSE mount, busy, fusermount3 failed), or the
        daemon did not exit within --timeout.
    2   bad command line.

EXAMPLES
    atomicfs umount /srv/data
    atomicfs umount --lazy /srv/data
    atomicfs umount --if-dead /srv/data
"""

STATUS = """\
NAME
    atomicfs status - what a live atomicfs mount is doing

SYNOPSIS
    atomicfs status MOUNTPOINT [--json]

DESCRIPTION
    Asks the daemon serving MOUNTPOINT for its status and prints it: its pid,
    source and uptime; the open write sessions (path, bytes buffered, extents
    of the extent map, age, writers, and KIND: "append" for a log committed
    in checkpoints, with their number, or "rewrite" for a session committed
    only whole); counters since mount (commits per strategy, "append" for
    logs committed by appending in place; checkpoints; bytes committed,
    failed commits by errno, commits in flight, recovery actions at mount);
    and commit latency percentiles over the most recent commits.

    The daemon serves this as the extended attribute user.atomicfs.status of
    the mount's root (a JSON document); no file in the tree is involved.
    `getfattr --only-values -n user.atomicfs.status MOUNTPOINT` reads the same.

OPTIONS
    --json
        print the JSON document instead of text.
    -h, --help
        print this page.

EXIT STATUS
    0   printed.
    1   MOUNTPOINT is not an atomicfs mount, its daemon is gone, or it did
        not answer within 10 s.
    2   bad command line.

EXAMPLES
    atomicfs status /srv/data
    atomicfs status --json /srv/data | jq '.sessions[].path'
"""

RECOVER = """\
NAME
    atomicfs recover - resolve what interrupted commits left in SOURCE

SYNOPSIS
    atomicfs recover SOURCE

DESCRIPTION
    Offline recovery, as a mount does before serving: complete journal
    records in SOURCE/.atomicfs are replayed (their commits finish), torn
    ones discarded, temporary names of unfinished rename commits removed.
    Every file ends up at its previous or its new committed version. Prints
    one line per action, or "nothing to recover". SOURCE must not be
    mounted by atomicfs at the time.

OPTIONS
    -h, --help
        print this page.

EXIT STATUS
    0   recovered (or nothing to do).
    1   SOURCE is not a directory, is mounted, or recovery failed.
    2   bad command line.

EXAMPLES
    atomicfs recover /srv/data
"""

INSTALL = """\
NAME
    atomicfs install - put the atomicfs launcher on the system PATH

SYNOPSIS
    atomicfs install [--bindir DIR] [--if-missing]
    ./scripts/atomicfs install

DESCRIPTION
    Writes DIR/atomicfs (default /usr/local/bin/atomicfs): a small sh script
    that runs the atomicfs of this virtualenv. mount(8) runs mount.fuse3 with
    an empty PATH and mount.fuse3 finds the filesystem program through
    /bin/sh's default PATH, which has /usr/local/bin; that is what makes
    `mount -t fuse.atomicfs`, fstab lines and the systemd units work. The
    environment variable ATOMICFS_VENV, if set, makes the launcher run the
    atomicfs of another virtualenv.

    An existing DIR/atomicfs that is not an atomicfs launcher is never
    replaced. ./scripts/atomicfs (run as root) installs the launcher on its
    first run when there is none.

OPTIONS
    --bindir DIR
        where to write the launcher (default /usr/local/bin).
    --if-missing
        do nothing when a working atomicfs launcher is already there (possibly
        one of another checkout); replace one whose virtualenv is gone.
    -h, --help
        print this page.

EXIT STATUS
    0   installed, or nothing to do.
    1   refused: no such DIR, not writable, a foreign file in the way.
    2   bad command line.

EXAMPLES
    sudo ./scripts/atomicfs install
    atomicfs install --bindir ~/.local/bin
"""

RUN = """\
NAME
    atomicfs run - run a command whose changes under a mount are one transaction

SYNOPSIS
    atomicfs run MOUNTPOINT [--] CMD [ARGS...]

DESCRIPTION
    Runs CMD. What CMD and its descendants change under MOUNTPOINT (file
    contents, new files, directories, symlinks and fifos, renames and removals
    of what they made) is one transaction: other processes see none of it
    until CMD exits with status 0; then all of it becomes visible and durable
    in one step. If CMD fails or is killed, or the daemon stops first,
    nothing of it remains. See docs/semantics.md, section 14, for what is
    covered and the limits.

OPTIONS
    -h, --help
        print this page.

EXIT STATUS
    CMD's own status (128+N when signal N killed it: nothing is applied).
    125 the transaction could not be begun or committed: one line on
        stderr says why, and nothing of CMD's changes was applied.
    126 CMD could not be run; 127 CMD was not found.

EXAMPLES
    atomicfs run /srv/data -- sh -c 'echo 2 > a.conf && echo 2 > b.conf'
    atomicfs run /srv/www -- tar xf site.tar -C /srv/www
"""

PAGES = {"atomicfs": TOP, "run": RUN, "mount": MOUNT, "umount": UMOUNT, "unmount": UMOUNT,
         "status": STATUS, "recover": RECOVER, "install": INSTALL}
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "EXAMPLES")
