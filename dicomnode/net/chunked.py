"""Receive C-STORE datasets straight into the spool instead of into memory.

With pynetdicom's ``STORE_RECV_CHUNKED_DATASET``, each incoming dataset is written
fragment by fragment to a temporary file (with preamble and file meta), so a 1 GB
multi-frame never sits in memory whole, and eight busy associations cost eight
small buffers. pynetdicom puts that file in the system's temporary folder; we want it
in the spool's ``tmp/`` so that keeping it is a rename on the same filesystem, not
a second copy. pynetdicom creates the file on the association's DUL thread, so the
folder is looked up on the calling thread: a listener marks the DUL threads of its
associations with its spool's folder, and every other receiver (a test SCP, a
second AE in the process) keeps the default.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

import pynetdicom.dimse_messages
from pynetdicom import _config

_FOLDER = "_dicomnode_receive_folder"
PREFIX = "rx-"


def _named_temporary_file(*args: Any, **kwargs: Any) -> IO[bytes]:
    folder = getattr(threading.current_thread(), _FOLDER, None)
    if folder is not None:
        kwargs.setdefault("dir", folder)
        kwargs.setdefault("prefix", PREFIX)
    return tempfile.NamedTemporaryFile(*args, **kwargs)  # pynetdicom closes it


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
    _config.STORE_RECV_CHUNKED_DATASET = True
    if _installed:
        return True
    module: Any = pynetdicom.dimse_messages
    if getattr(module, "NamedTemporaryFile", None) is not tempfile.NamedTemporaryFile:
        return False
    module.NamedTemporaryFile = functools.wraps(tempfile.NamedTemporaryFile)(_named_temporary_file)
    _installed = True
    return True


def receive_into(dul: threading.Thread, folder: Path) -> None:
    """Make one association's incoming datasets land in ``folder``.

    Parameters
    ----------
    dul : threading.Thread
        The association's DUL thread (``assoc.dul``).
    folder : Path
        A folder on the spool's filesystem.
    """
    setattr(dul, _FOLDER, str(folder))


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
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    with contextlib.suppress(OSError):
        partial.close()
    with contextlib.suppress(OSError):
        os.unlink(partial.name)
