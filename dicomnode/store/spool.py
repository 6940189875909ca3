"""The spool: where instances and results lie on disk, and how they get there safely.

Layout under the storage root::

    incoming/<StudyUID>/<SeriesUID>/<SOPInstanceUID>_<token>.dcm  received instances
    results/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm           objects we created
    rejected/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm          ours, failed validation
    tmp/                                                          files being written or received

A received instance's file name carries a random token, so two associations storing
the same SOP Instance UID at once never write the same file, and undoing one write
can never remove a file another association has acknowledged.

Every file is written to ``tmp/``, fsynced, renamed into place, and its folder
fsynced, so a crash leaves either the whole file or nothing at its final path.
Only UIDs that passed :func:`dicomnode.store.uids.uid_problem` become path components.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

from dicomnode.store.uids import uid_problem

INCOMING = "incoming"
RESULTS = "results"
REJECTED = "rejected"
TMP = "tmp"
STALE_TMP_SECONDS = 3600  # no write takes an hour; younger files may be another process's


class Spool:
    """Paths and durable writes under one storage root.

    Parameters
    ----------
    root : Path
        The storage root (``storage.path``); created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
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
