"""The spool: where instances and results lie on disk, and how they get there safely.

Layout under the storage root::

    incoming/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   received instances
    results/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm    objects we created
    tmp/                                                   files being written

Every file is written to ``tmp/``, fsynced, renamed into place, and its folder
fsynced, so a crash leaves either the whole file or nothing at its final path.
Only UIDs that passed :func:`dicomnode.store.uids.uid_problem` become path components.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from dicomnode.store.uids import uid_problem

INCOMING = "incoming"
RESULTS = "results"
TMP = "tmp"


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

    def relative_path(self, area: str, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Return the path of an instance relative to the root.

        Parameters
        ----------
        area : str
            ``incoming`` or ``results``.
        study_uid, series_uid, sop_uid : str
            The instance's UIDs.

        Returns
        -------
        Path
            ``area/study/series/sop.dcm``.

        Raises
        ------
        ValueError
            If a UID is unsafe; callers check first, this is the last line of defence.
        """
        for uid in (study_uid, series_uid, sop_uid):
            problem = uid_problem(uid)
            if problem:
                raise ValueError(f"unsafe UID for a path: it {problem}")
        return Path(area, study_uid, series_uid, f"{sop_uid}.dcm")

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
        final = self.root / relative
        _make_dirs_durable(final.parent)
        tmp = self.root / TMP / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return final

    def remove(self, relative: str | Path) -> None:
        """Delete a file if it exists (used to undo a write whose row failed).

        Parameters
        ----------
        relative : str or Path
            Path relative to the root.
        """
        (self.root / relative).unlink(missing_ok=True)

    def clean_tmp(self) -> int:
        """Delete leftovers of writes a crash interrupted.

        Returns
        -------
        int
            How many partial files were removed.
        """
        count = 0
        for part in (self.root / TMP).glob("*.part"):
            part.unlink(missing_ok=True)
            count += 1
        return count


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
        try:
            folder.mkdir()
        except FileExistsError:  # another association created it meanwhile
            continue
        _fsync_dir(folder.parent)
