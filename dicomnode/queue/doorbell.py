"""A doorbell: idle workers in this process wake when new work is queued.

Workers that find the queue empty sleep ``worker.poll_seconds`` before they look
again, so a job queued by the completion sweep of the same process (``serve``)
waited up to a whole poll interval. The sweep now rings, and the sleepers answer
at once. :meth:`Doorbell.announce` also tells other processes and hosts, through
:mod:`dicomnode.queue.wakeup`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Doorbell:
    """Rings counted, so a ring between a waiter's look and its wait is not missed."""

    def __init__(self, remote: Callable[[], None] | None = None) -> None:
        self._condition = threading.Condition()
        self._rings = 0
        self.remote = remote  # tells other processes; set by the node

    @property
    def rings(self) -> int:
        """Return how many times the bell has rung; pass it to :meth:`wait`."""
        with self._condition:
            return self._rings

    def ring(self) -> None:
        """Wake every waiter."""
        with self._condition:
            self._rings += 1
            self._condition.notify_all()

    def announce(self) -> None:
        """Wake every waiter here and, when the node set it up, in other processes."""
        self.ring()
        if self.remote is not None:
            self.remote()

    def wait(self, seen: int, timeout: float) -> bool:
        """Wait until the bell rings after ``seen`` rings, or ``timeout`` seconds.

        Parameters
        ----------
        seen : int
            :attr:`rings` as it was when the caller last looked for work.
        timeout : float
            The longest wait in seconds.

        Returns
        -------
        bool
            True if it rang.
        """
        with self._condition:
            return self._condition.wait_for(lambda: self._rings != seen, timeout)
