"""The spool: where instances and results lie on disk, and how they get there safely.

Layout under the storage root::

    incoming/<StudyUID>/<SeriesUID>/<SOPInstanceUID>_<token>.dcm  received instances
    results/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm           objects we created
    rejected/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm          ours, failed validation
    tmp/                                                          files being written or received
    run/listener.lock                                             held by the listening node

A received instance's file name carries a random token, so two associations storing
the same SOP Instance UID at once never write the same file, and undoing one write
can never remove a file another association has acknowledged.

Every file is written to ``tmp/``, fsynced, renamed into place, and its folder
fsynced, so a crash leaves either the whole file or nothing at its final path.
Only UIDs that passed :func:`dicomnode.store.uids.uid_problem` become path components.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from pathlib import Path

from dicomnode.errors import DicomnodeError, NodeAlreadyRunning
from dicomnode.store.uids import uid_problem

INCOMING = "incoming"
RESULTS = "results"
REJECTED = "rejected"
TMP = "tmp"
STALE_TMP_SECONDS = 3600  # no write takes an hour; younger files may be another process's
LISTENER_LOCK = Path("run", "listener.lock")


class Spool:
    """Paths and durable writes under one storage root.

    Parameters
    ----------
    root : Path
        The storage root (``storage.path``); created if missing.
    create : bool
        False for a reader (``jobs show --preview``): nothing is created, and a
        missing root raises instead.

    Raises
    ------
    DicomnodeError
        With ``create=False``, if the root is not a folder.
    """

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = root
        if not create:
            if not root.is_dir():
                raise DicomnodeError(f"storage path not found: {root}")
            return
        (root / TMP).mkdir(parents=True, exist_ok=True)

    def relative_path(
        self, area: str, study_uid: str, series_uid: str, sop_uid: str, token: str = ""
    ) -> Path:
        """Return the path of an instance relative to the root.

        Parameters
        ----------
        area : str
            ``incoming``, ``results`` or ``rejected``.
        study_uid, series_uid, sop_uid : str
            The instance's UIDs.
        token : str
            Appended to the file name after an underscore, to make it unique.

        Returns
        -------
        Path
            ``area/study/series/sop[_token].dcm``.

        Raises
        ------
        ValueError
            If a UID is unsafe; callers check first, this is the last line of defence.
        """
        for uid in (study_uid, series_uid, sop_uid):
            problem = uid_problem(uid)
            if problem:
                raise ValueError(f"unsafe UID for a path: it {problem}")
        name = f"{sop_uid}_{token}.dcm" if token else f"{sop_uid}.dcm"
        return Path(area, study_uid, series_uid, name)

    def absolute(self, relative: str | Path) -> Path:
        """Return the absolute path of a spool-relative path.

        Parameters
        ----------
        relative : str or Path
            A path as stored in the database.

        Returns
        -------
        Path
            The path under the root.
        """
        return self.root / relative

    def write(self, relative: Path, data: bytes) -> Path:
        """Write ``data`` durably at ``relative``, replacing any earlier file there.

        Parameters
        ----------
        relative : Path
            Destination relative to the root.
        data : bytes
            The complete file content.

        Returns
        -------
        Path
            The absolute final path.

        Raises
        ------
        OSError
            If the disk is full or unwritable; nothing is left at the final path then.
        """
        staged = self.stage(data)
        try:
            return self.commit(staged, relative)
        finally:
            staged.unlink(missing_ok=True)

    def stage(self, data: bytes) -> Path:
        """Write ``data`` to a new file under ``tmp/`` (not yet durable).

        Parameters
        ----------
        data : bytes
            The complete file content.

        Returns
        -------
        Path
            The staged file; pass it to :meth:`commit`, or delete it.

        Raises
        ------
        OSError
            If the disk is full or unwritable; nothing is left behind then.
        """
        tmp = self.root / TMP / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def commit(self, staged: Path, relative: Path, *, synced: bool = False) -> Path:
        """Make a staged file durable and move it to ``relative``.

        The content is fsynced, the file renamed into place, and the folder fsynced,
        so after a crash the final path holds either the whole file or nothing.

        Parameters
        ----------
        staged : Path
            A complete file on the spool's filesystem (under ``tmp/``).
        relative : Path
            Destination relative to the root.
        synced : bool
            The caller has already fsynced the content.

        Returns
        -------
        Path
            The absolute final path.

        Raises
        ------
        OSError
            If the disk is full or unwritable; the final path is untouched then.
        """
        if not synced:
            fsync_file(staged)
        final = self.root / relative
        for attempt in range(3):
            _make_dirs_durable(final.parent)
            try:
                os.replace(staged, final)
                break
            except FileNotFoundError:
                # Retention removed the emptied folder between our mkdir and the rename;
                # make it again (the staged file itself is still there, or this raises).
                if attempt == 2 or not staged.exists():
                    raise
        _fsync_dir(final.parent)
        return final

    @property
    def tmp(self) -> Path:
        """Return the folder for files being written (on the spool's filesystem)."""
        return self.root / TMP

    def free_bytes(self) -> int:
        """Return the free space available to us on the spool's filesystem.

        Returns
        -------
        int
            Bytes available to an unprivileged writer.
        """
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def has_free(self, min_bytes: int) -> bool:
        """Return whether the spool's filesystem has at least ``min_bytes`` free.

        The one test of a free-space watermark, for the listener (``storage.min_free_mb``
        before it takes an instance) and the worker (before it runs a model again).

        Parameters
        ----------
        min_bytes : int
            The watermark; 0 or less asks for nothing, and the disk is not looked at.

        Returns
        -------
        bool
            True if at least ``min_bytes`` are available to an unprivileged writer.
        """
        return min_bytes <= 0 or self.free_bytes() >= min_bytes

    def remove(self, relative: str | Path) -> None:
        """Delete a file if it exists (used to undo a write whose row failed).

        Parameters
        ----------
        relative : str or Path
            Path relative to the root.
        """
        (self.root / relative).unlink(missing_ok=True)

    def move(self, relative: str | Path, area: str) -> Path:
        """Move a file to the same place under another area (e.g. ``rejected``).

        Parameters
        ----------
        relative : str or Path
            The file, relative to the root.
        area : str
            The new first path component.

        Returns
        -------
        Path
            The new relative path.
        """
        source = Path(relative)
        target = Path(area, *source.parts[1:])
        _make_dirs_durable((self.root / target).parent)
        os.replace(self.root / source, self.root / target)
        return target

    def clean_tmp(self, older_than: float = STALE_TMP_SECONDS) -> int:
        """Delete leftovers of writes a crash interrupted.

        Only files older than ``older_than`` seconds go: other processes sharing the
        storage path may be writing the younger ones right now.

        Parameters
        ----------
        older_than : float
            Minimum age in seconds.

        Returns
        -------
        int
            How many partial files were removed.
        """
        count = 0
        cutoff = time.time() - older_than
        for part in (self.root / TMP).iterdir():  # ours (*.part) and the listener's
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    count += 1
            except FileNotFoundError:
                continue
        return count


class ListenerLock:
    """The spool's lock, held by the one node that listens for it while it runs.

    Two listening nodes on one spool (with one database or two) would each
    acknowledge images the other's completion sweep may also see, and with
    ``listener.processes`` above 1 share a port unnoticed; the second is refused.
    Worker processes (``dicomnode worker``) take no lock: any number of them share
    the spool with its listener, on this host or others.

    An exclusive ``flock`` on ``run/listener.lock``: the kernel drops it when the
    process ends, however it ends (kill -9 and the OOM killer included), so there
    is never a stale lock to clean up. The file is never removed: a second process
    could otherwise lock a new file of the same name while the first still holds
    the old one. It holds one line naming the holder, for the refusal message. On
    NFS (v4, or v3 with lockd) Linux makes a flock a lock the server keeps, so a
    listener on another host that mounts the same spool is refused too; a
    ``nolock`` mount keeps locks local to each host.

    Parameters
    ----------
    root : Path
        The storage root.
    holder : str
        One line written into the lock file: pid, host and start time, no PHI.

    Raises
    ------
    NodeAlreadyRunning
        If another process holds the lock; the message names it.
    DicomnodeError
        If the filesystem cannot lock.
    """

    def __init__(self, root: Path, holder: str) -> None:
        path = root / LISTENER_LOCK
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not inherited by child processes (PEP 446): a receiver or a tool the node
        # runs must not keep the lock alive after the node itself is gone.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Written by the holder right after it locked; empty only in that moment.
            other = " ".join(os.pread(fd, 512, 0).decode(errors="replace").split())[:200]
            os.close(fd)
            raise NodeAlreadyRunning(
                f"storage.path {root} is in use by another listening dicomnode "
                f"({other or 'holder not known yet'}); one listening node per spool"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise DicomnodeError(f"cannot lock storage.path {root}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock (closing the file is what releases a flock); idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def fsync_file(path: Path) -> None:
    """Flush a file's content and size to the disk.

    Parameters
    ----------
    path : Path
        The file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry itself is on disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durable(path: Path) -> None:
    """Create ``path`` and any missing parents, fsyncing each new entry's parent."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        # Another association may have created it meanwhile and not synced it yet.
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        _fsync_dir(folder.parent)
