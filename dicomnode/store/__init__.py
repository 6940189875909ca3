"""The durable spool: where instances are written and how they are recorded.

Spool layout and durable writes (file fsynced, then row committed, then the
acknowledgement), UID safety, ingest, staging of imported files, the orphan sweep and
retention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.store.ingest import Ingestor, StoreOutcome
    from dicomnode.store.orphans import remove_orphans
    from dicomnode.store.spool import REJECTED, RESULTS, ListenerLock, Spool
    from dicomnode.store.staging import (
        DICOMDIR,
        MEDIA_STORAGE_DIRECTORY,
        NOT_DICOM,
        Accepted,
        ProgressSink,
        SourceFile,
        find_files,
        import_files,
        uid_name,
    )
    from dicomnode.store.uids import is_safe_uid

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "Accepted": "dicomnode.store.staging",
    "DICOMDIR": "dicomnode.store.staging",
    "Ingestor": "dicomnode.store.ingest",
    "ListenerLock": "dicomnode.store.spool",
    "MEDIA_STORAGE_DIRECTORY": "dicomnode.store.staging",
    "NOT_DICOM": "dicomnode.store.staging",
    "ProgressSink": "dicomnode.store.staging",
    "REJECTED": "dicomnode.store.spool",
    "RESULTS": "dicomnode.store.spool",
    "SourceFile": "dicomnode.store.staging",
    "Spool": "dicomnode.store.spool",
    "StoreOutcome": "dicomnode.store.ingest",
    "find_files": "dicomnode.store.staging",
    "import_files": "dicomnode.store.staging",
    "is_safe_uid": "dicomnode.store.uids",
    "remove_orphans": "dicomnode.store.orphans",
    "uid_name": "dicomnode.store.staging",
}

__all__ = [
    "DICOMDIR",
    "MEDIA_STORAGE_DIRECTORY",
    "NOT_DICOM",
    "REJECTED",
    "RESULTS",
    "Accepted",
    "Ingestor",
    "ListenerLock",
    "ProgressSink",
    "SourceFile",
    "Spool",
    "StoreOutcome",
    "find_files",
    "import_files",
    "is_safe_uid",
    "remove_orphans",
    "uid_name",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
