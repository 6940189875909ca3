"""The job queue's moving parts: completion, routing, workers, the scheduler.

A series (or study) is complete after its quiet period; routes decide which models
run; workers claim jobs with a lease and hand them to the pipeline; wake-ups cross
processes so an idle worker need not poll.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.queue.scheduler import make_scheduler
    from dicomnode.queue.wakeup import Announcer, Doorbell, WakeListener
    from dicomnode.queue.worker import ModelSlots, Worker

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "Announcer": "dicomnode.queue.wakeup",
    "Doorbell": "dicomnode.queue.wakeup",
    "ModelSlots": "dicomnode.queue.worker",
    "WakeListener": "dicomnode.queue.wakeup",
    "Worker": "dicomnode.queue.worker",
    "make_scheduler": "dicomnode.queue.scheduler",
}

__all__ = [
    "Announcer",
    "Doorbell",
    "ModelSlots",
    "WakeListener",
    "Worker",
    "make_scheduler",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
