"""Receive C-STORE datasets straight into the spool instead of into memory.

With pynetdicom's ``STORE_RECV_CHUNKED_DATASET``, each incoming dataset is written
fragment by fragment to a temporary file (with preamble and file meta), so a 1 GB
multi-frame never sits in memory whole, and eight busy associations cost eight
small buffers. pynetdicom puts that file in the system's temporary folder; we want it
in the spool's ``tmp/`` so that keeping it is a rename on the same filesystem, not
a second copy. pynetdicom creates the file on the association's DUL thread, so the
folder is looked up on the calling thread: a listener marks the DUL threads of its
associations with its spool's folder, and every other receiver (a test SCP, a
second AE in the process) keeps the default. The settings and the file factory are
put in pynetdicom by :mod:`dicomnode.dimse.compat`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dicomnode.dimse import compat
from dicomnode.dimse.file_meta import encode_file_meta

_FOLDER = "_dicomnode_receive_folder"
_LIMITS = "_dicomnode_receive_limits"
PREFIX = "rx-"
SPACE_CHECK_BYTES = 64 * 2**20  # how often a growing file looks at the free space


class _Limits:
    """What one listener allows a dataset in transit: a size, and a disk to keep."""

    def __init__(self, max_bytes: int, space_ok: Callable[[], bool]) -> None:
        self.max_bytes = max_bytes
        self.space_ok = space_ok


class CappedFile:
    """The file a dataset is received into, which stops growing at the listener's limits.

    The size limit and the free-space watermark are checked by the C-STORE handler,
    but only once the whole dataset has arrived; a sender streaming gigabytes would
    meanwhile fill the disk they protect. Past the size limit (or with the disk below
    its watermark) the rest of the dataset is discarded as it arrives, and the
    handler refuses the instance with the matching status.
    """

    def __init__(self, inner: Any, limits: _Limits) -> None:
        self._inner = inner
        self._limits = limits
        self.name: str = inner.name
        self.file = inner.file  # pynetdicom flushes through this
        self.written = 0
        self.stopped = False
        self._next_space_check = SPACE_CHECK_BYTES

    def write(self, data: bytes) -> int:
        """Append a fragment, or count it and drop it once a limit is reached.

        Parameters
        ----------
        data : bytes
            A fragment of the dataset.

        Returns
        -------
        int
            ``len(data)``: to pynetdicom the write always succeeds.
        """
        if self.stopped:
            return len(data)
        limit = self._limits.max_bytes
        if limit and self.written + len(data) > limit:
            # One byte past the limit stays, so the handler sees the instance is too big.
            self._inner.write(data[: limit - self.written + 1])
            self.written = limit + 1
            self.stopped = True
            return len(data)
        self._inner.write(data)
        self.written += len(data)
        if self.written >= self._next_space_check:
            self._next_space_check += SPACE_CHECK_BYTES
            if not self._limits.space_ok():
                self.stopped = True
        return len(data)

    def close(self) -> None:
        """Close the file (pynetdicom does, after the handler)."""
        self._inner.close()


def _named_temporary_file(*args: Any, **kwargs: Any) -> IO[bytes] | CappedFile:
    thread = threading.current_thread()
    folder = getattr(thread, _FOLDER, None)
    if folder is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    kwargs.setdefault("dir", folder)
    kwargs.setdefault("prefix", PREFIX)
    inner = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 - pynetdicom closes it
    limits: _Limits | None = getattr(thread, _LIMITS, None)
    return CappedFile(inner, limits) if limits is not None else inner


_installed = False


def install() -> bool:
    """Turn on chunked receive with per-listener folders (idempotent).

    Returns
    -------
    bool
        Whether pynetdicom was laid out as expected. If not, chunked receive still
        works, with files in the system's temporary folder.
    """
    global _installed
    compat.receive_datasets_in_files()
    if _installed:
        return True
    compat.replace_file_meta(encode_file_meta)  # a speed-up only: pydicom's path otherwise
    factory = functools.wraps(tempfile.NamedTemporaryFile)(_named_temporary_file)
    if not compat.replace_dataset_file(factory):
        return False
    _installed = True
    return True


def receive_into(
    dul: threading.Thread,
    folder: Path,
    *,
    max_bytes: int = 0,
    space_ok: Callable[[], bool] | None = None,
) -> None:
    """Make one association's incoming datasets land in ``folder``, within limits.

    Parameters
    ----------
    dul : threading.Thread
        The association's DUL thread (``assoc.dul``).
    folder : Path
        A folder on the spool's filesystem.
    max_bytes : int
        Stop writing a dataset past this size; 0 means no limit.
    space_ok : callable, optional
        Returns False when the disk is below its free-space watermark.
    """
    setattr(dul, _FOLDER, str(folder))
    setattr(dul, _LIMITS, _Limits(max_bytes, space_ok or (lambda: True)))


def discard_partial(assoc: Any) -> None:
    """Delete the file of a dataset whose transfer never finished.

    pynetdicom hands a complete dataset's file to the C-STORE handler (which keeps
    or deletes it); a transfer cut off by an abort or a dropped connection leaves
    its file behind, which this removes when the connection closes.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association whose connection closed.
    """
    partial = compat.partial_dataset_file(assoc)
    if partial is None:
        return
    with contextlib.suppress(OSError):
        partial.close()
    with contextlib.suppress(OSError):
        os.unlink(partial.name)
