"""The receiving side: the C-STORE and C-ECHO SCP.

Admission of connections before any thread is spent on them, TLS, allow-lists,
streaming of datasets to the spool, and receiver processes. What it stores goes through
:mod:`dicomnode.store`; nothing is acknowledged before it is durable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.listener.processes import Receivers, build_listener
    from dicomnode.listener.scp import Listener, make_ssl_context

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "Listener": "dicomnode.listener.scp",
    "Receivers": "dicomnode.listener.processes",
    "build_listener": "dicomnode.listener.processes",
    "make_ssl_context": "dicomnode.listener.scp",
}

__all__ = [
    "Listener",
    "Receivers",
    "build_listener",
    "make_ssl_context",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
