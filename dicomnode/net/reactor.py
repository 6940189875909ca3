"""Event-driven wake-ups for pynetdicom's reactor threads.

pynetdicom runs two threads per association, and both poll: the DUL thread sleeps
about 1 ms whenever its socket and queues are empty, and the association thread
sleeps 1 ms on every loop before it looks for a DIMSE message. A C-STORE therefore
waits for up to three such naps (request in, handler, response out) even when the
machine is idle. On a 0.5 MB CT slice that is as long as the fsync, and it halved
our single-association throughput against dcmtk's ``storescp``. Shortening the naps
costs CPU instead: about a quarter of a core per idle association at 0.1 ms.

Here each nap is kept as the *longest* wait but ends as soon as there is work
(and, while we are at it, a PDU is read with a few large reads instead of
pynetdicom's 4 KiB ones):

* the association thread waits on an :class:`threading.Event` that is set when a
  DIMSE message or a release/abort primitive is queued for it;
* the DUL thread waits in ``select`` on its socket and on a pipe that is written
  when the association queues a PDU to send.

pynetdicom calls ``time.sleep`` through its modules' ``time`` attribute; we give
those two modules a stand-in whose ``sleep`` dispatches to the calling thread's
waiter and falls back to :func:`time.sleep` for every other thread. Nothing else in
pynetdicom changes, and if its internals ever differ from what we expect,
:func:`install` leaves them alone and the node runs at pynetdicom's own speed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

_WAITER = "_dicomnode_wait"


class _Time:
    """Stands in for the ``time`` module inside pynetdicom's reactor modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        waiter: Callable[[float], None] | None = getattr(threading.current_thread(), _WAITER, None)
        if waiter is None:
            time.sleep(seconds)
        else:
            waiter(seconds)


_installed = False
_install_lock = threading.Lock()


def install() -> bool:
    """Route the reactor modules' sleeps through per-thread waiters (idempotent).

    Returns
    -------
    bool
        Whether the fast path is active; ``False`` if this pynetdicom is laid out
        differently, in which case nothing was changed.
    """
    global _installed
    with _install_lock:
        if _installed:
            return True
        modules = (pynetdicom.association, pynetdicom.dul)
        if not all(getattr(m, "time", None) is time for m in modules):
            log.warning("pynetdicom layout not recognised: association wake-ups stay polled")
            return False
        for module in modules:
            module.time = _Time()  # type: ignore[attr-defined]
        if callable(getattr(AssociationSocket, "recv", None)):
            AssociationSocket.recv = _recv  # type: ignore[method-assign]
        _installed = True
        return True


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` from the socket, or fewer if the peer closes it.

    pynetdicom's own version reads 4 KiB per call and appends; a 4 MiB P-DATA PDU
    took a thousand system calls and as many Python iterations. This reads as much
    as the kernel has each time, straight into the buffer. The buffer grows with
    what arrives, never ahead of it by more than one step: the length comes from the
    peer, and a PDU header claiming 4 GiB must not cost 4 GiB before a byte of it.
    """
    sock = cast(socket.socket, self.socket)
    buffer = bytearray()
    received = 0
    while received < nr_bytes:
        if len(buffer) == received:
            buffer.extend(bytes(min(nr_bytes - received, _RECV_STEP, max(received, 65536))))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[received:])
        if not count:  # the connection was broken: return what arrived, as pynetdicom does
            break
        received += count
    del buffer[received:]
    return buffer


_RECV_STEP = 4 * 2**20  # the most the buffer grows ahead of the data it has


def _waking_put(q: queue.Queue[Any], wake: Callable[[], None]) -> None:
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    q.put = put_and_wake  # type: ignore[method-assign]


def attach(assoc: Any) -> bool:
    """Give one new association's two threads event-driven waiters.

    Call it from ``EVT_CONN_OPEN``, before the association's threads start.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association.

    Returns
    -------
    bool
        Whether the waiters were attached.
    """
    dul = getattr(assoc, "dul", None)
    dimse = getattr(assoc, "dimse", None)
    if not _installed or dul is None or dimse is None:
        return False
    queues = (
        getattr(dimse, "msg_queue", None),
        getattr(dul, "to_user_queue", None),
        getattr(dul, "to_provider_queue", None),
    )
    if not all(isinstance(q, queue.Queue) for q in queues):
        return False

    # Association thread: woken when a message or an ACSE primitive arrives for it.
    arrived = threading.Event()

    def assoc_wait(seconds: float) -> None:
        arrived.wait(seconds)
        arrived.clear()  # the reactor looks at its queues right after this returns

    _waking_put(dimse.msg_queue, arrived.set)
    _waking_put(dul.to_user_queue, arrived.set)
    setattr(assoc, _WAITER, assoc_wait)
    if getattr(assoc, "is_requestor", False):
        _keep_responses_for_the_caller(assoc, dimse)

    # DUL thread: woken by incoming bytes or by a PDU the association queued to send.
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)

    def poke() -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already wakes
            os.write(write_fd, b"\0")

    def dul_wait(seconds: float) -> None:
        sock = getattr(dul.socket, "socket", None)
        if sock is None:
            time.sleep(seconds)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select would not see them
        try:
            ready, _, _ = select.select([sock, read_fd], [], [], seconds)
        except (OSError, ValueError):  # the socket was closed under us
            time.sleep(seconds)
            return
        if read_fd in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(read_fd, 4096)

    _waking_put(dul.to_provider_queue, poke)
    setattr(dul, _WAITER, dul_wait)
    # The pipe lives as long as the DUL object; its thread holds a reference while
    # it runs, so the descriptors are never closed under a running select.
    weakref.finalize(dul, _close, read_fd, write_fd)
    return True


def _keep_responses_for_the_caller(assoc: Any, dimse: Any) -> None:
    """Stop an association we opened from taking its own responses off the queue.

    pynetdicom's ``send_c_store`` pauses the association thread with a handshake
    (clear an event, spin until a flag says "paused") that has a window: the
    thread can set the flag, pass the event just before it is cleared, and then
    take the C-STORE response meant for the caller, log it as "unexpected" and
    drop it. The caller then waits out the whole DIMSE timeout and the delivery is
    retried, so the PACS gets the objects twice. Waking that thread as soon as a
    message arrives makes the window easy to hit under load (8 in 200 two-object
    sends, against none without the wake-ups).

    On associations we open we only ever send requests and wait for their
    responses, never serve the peer's requests, so the association thread has no
    business reading DIMSE messages at all: its non-blocking reads return nothing,
    and every message waits for the blocking read of the thread that sent the
    request.
    """
    get_msg = dimse.get_msg

    def caller_only(block: bool = False) -> Any:
        if not block and threading.current_thread() is assoc:
            return None, None
        return get_msg(block)

    dimse.get_msg = caller_only


def set_nodelay(event: Any) -> None:
    """Turn off Nagle's algorithm on an association's socket.

    Without it, dcmtk-based peers (Orthanc, storescu) and pynetdicom stall for the
    delayed-ACK timeout (about 40 ms) on every small PDU exchange.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The ``EVT_CONN_OPEN`` event.
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # the peer may already be gone
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tune_connection(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler for both our SCP and our SCU: no Nagle, no polling.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The ``EVT_CONN_OPEN`` event.
    """
    set_nodelay(event)
    if install():
        attach(event.assoc)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
