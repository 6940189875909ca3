"""Everything that leaves the node: C-STORE SCU, storage commitment, send planning, delivery.

Used by both the pipeline (a job's results, with per-destination retries and
delivery rows) and the CLI (``dicomnode send``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.send.commitment import STORAGE_COMMITMENT_PUSH, ReportHandler
    from dicomnode.send.delivery import deliver
    from dicomnode.send.planning import send_source
    from dicomnode.send.scu import echo

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "ReportHandler": "dicomnode.send.commitment",
    "STORAGE_COMMITMENT_PUSH": "dicomnode.send.commitment",
    "deliver": "dicomnode.send.delivery",
    "echo": "dicomnode.send.scu",
    "send_source": "dicomnode.send.planning",
}

__all__ = [
    "STORAGE_COMMITMENT_PUSH",
    "ReportHandler",
    "deliver",
    "echo",
    "send_source",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
