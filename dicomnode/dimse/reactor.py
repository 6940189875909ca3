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
* the DUL thread waits in ``poll`` on its socket and on an eventfd that is written
  when the association queues a PDU to send; the eventfd is closed when that
  thread ends.

pynetdicom calls ``time.sleep`` through its modules' ``time`` attribute; we give
those two modules a stand-in whose ``sleep`` dispatches to the calling thread's
waiter and falls back to :func:`time.sleep` for every other thread.

Every change to pynetdicom itself (the stand-in, the socket wrapper's methods, the
queues that wake the threads) is made by :mod:`dicomnode.dimse.compat`, which makes
it only where pynetdicom is as expected: otherwise :func:`install` and
:func:`attach` leave it alone and the node runs at pynetdicom's own speed (and
:func:`dicomnode.dimse.compat.check` refuses to listen with an untested pynetdicom
at all). This module holds what is put there.

Two more replacements on pynetdicom's socket wrapper, for every association:

* ``recv`` reads a PDU in a few large reads, and refuses one longer than we
  announced we would receive before reading a byte of it;
* ``ready`` asks ``poll`` instead of ``select``, which fails for descriptors
  numbered 1024 and up (a listener with a few hundred connections has them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

from pynetdicom.transport import AssociationSocket

from dicomnode.dimse import compat
from dicomnode.dimse.pdu import PDU_HEADER, encode_abort

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
        if not compat.replace_sleep(_Time()):
            log.warning("pynetdicom layout not recognised: association wake-ups stay polled")
            return False
        compat.replace_socket_io(recv=_recv, ready=_ready)
        logging.getLogger("pynetdicom.dul").addFilter(_known_read_failures)
        _installed = True
        return True


def _known_read_failures(record: logging.LogRecord) -> bool:
    """Drop pynetdicom's traceback for a read this module ended on purpose.

    An oversized PDU is logged here in one line, and a read that timed out is the
    socket timeout doing its job; pynetdicom would add a traceback for each (one
    line above it still says the PDU did not arrive whole).
    """
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, PDUTooLong | TimeoutError)


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` from the socket, or fewer if the peer closes it.

    pynetdicom's own version reads 4 KiB per call and appends; a 4 MiB P-DATA PDU
    took a thousand system calls and as many Python iterations. This reads as much
    as the kernel has each time, straight into the buffer. The buffer grows with
    what arrives, never ahead of it by more than one step: the length comes from the
    peer, and a PDU header claiming 4 GiB must not cost 4 GiB before a byte of it.

    pynetdicom reads each PDU as its 6-byte header, then the rest at the length the
    header gives. A length beyond what we announced we would receive (the Maximum
    Length Received of our side of the association) is refused here, before a byte
    of it is read: the peer gets an A-ABORT and the connection is closed.
    """
    sock = cast(socket.socket, self.socket)
    if nr_bytes == PDU_HEADER:
        limit = None
    else:
        limit = _receive_limit(self)
        if limit is not None and nr_bytes > limit:
            _refuse_oversized(self, sock, nr_bytes, limit)
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
    if nr_bytes == PDU_HEADER and received == PDU_HEADER:
        setattr(self, _PDU_TYPE, buffer[0])
    return buffer


_PDU_TYPE = "_dicomnode_pdu_type"
_P_DATA_TF = 0x04
# Some implementations count the PDV item header inside the maximum they were given;
# a few bytes over it cost nothing and are not worth an abort.
_PDU_SLACK = 64
# Every other PDU (association request, accept, reject, release, abort) is small; an
# A-ASSOCIATE-AC or -RQ with 128 presentation contexts is well under this.
MAX_CONTROL_PDU = 1 * 2**20


def _receive_limit(sock: AssociationSocket) -> int | None:
    """Return the longest PDU body this socket's association will read, or None."""
    kind = getattr(sock, _PDU_TYPE, None)
    if kind != _P_DATA_TF:
        return MAX_CONTROL_PDU
    assoc = getattr(sock, "assoc", None)
    local = getattr(
        assoc, "acceptor" if getattr(assoc, "is_acceptor", False) else "requestor", None
    )
    maximum = getattr(local, "maximum_length", None)
    if not maximum:
        return None  # we announced no limit (listener.max_pdu = 0)
    return int(maximum) + _PDU_SLACK


class PDUTooLong(OSError):
    """A peer sent a PDU longer than we announced we would receive."""


def _refuse_oversized(
    owner: AssociationSocket, sock: socket.socket, length: int, limit: int
) -> None:
    peer = getattr(getattr(getattr(owner, "assoc", None), "requestor", None), "address", "?")
    log.warning(
        "PDU of %d bytes refused (longer than the %d we announced): association aborted peer=%s",
        length,
        limit - _PDU_SLACK,
        peer,
    )
    with contextlib.suppress(OSError):
        # A-ABORT, service provider, invalid PDU parameter value (PS3.8 9.3.8).
        sock.sendall(encode_abort(0x02, 0x06))
    # pynetdicom treats a failed read as the connection closing: the association ends.
    raise PDUTooLong(f"PDU of {length} bytes is longer than the maximum we announced")


_RECV_STEP = 4 * 2**20  # the most the buffer grows ahead of the data it has


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
    if not _installed or not compat.reactor_parts_known(assoc):
        return False
    dul = assoc.dul

    # Association thread: woken when a message or an ACSE primitive arrives for it.
    arrived = threading.Event()

    def assoc_wait(seconds: float) -> None:
        arrived.wait(seconds)
        arrived.clear()  # the reactor looks at its queues right after this returns

    compat.wake_association_thread(assoc, arrived.set)
    setattr(assoc, _WAITER, assoc_wait)
    if getattr(assoc, "is_requestor", False):
        # Responses are for the thread that sent the request (compat says why).
        compat.keep_responses_for_the_caller(assoc)

    # DUL thread: woken by incoming bytes or by a PDU the association queued to send.
    wakeup = _Wakeup()

    def dul_wait(seconds: float) -> None:
        sock = getattr(dul.socket, "socket", None)
        if sock is None:
            time.sleep(seconds)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: poll would not see them
        try:
            woken = _poll((sock.fileno(), wakeup.fileno()), seconds)
        except (OSError, ValueError):  # the socket was closed under us
            time.sleep(seconds)
            return
        if wakeup.fileno() in woken:
            wakeup.clear()

    compat.wake_dul_thread(assoc, wakeup.set)
    setattr(dul, _WAITER, dul_wait)
    # The wake-up descriptor is closed when the DUL thread ends, on that thread: never
    # under a running select, and not whenever the garbage collector gets to it (a few
    # hundred finished associations held that many descriptors until it did).
    compat.when_dul_thread_ends(assoc, wakeup.close)
    weakref.finalize(dul, wakeup.close)  # in case the thread never starts
    return True


_POLL_IN = select.POLLIN | select.POLLPRI


def _poll(fds: tuple[int, ...], seconds: float) -> set[int]:
    """Wait until one of ``fds`` is readable (or closed), for at most ``seconds``.

    ``poll``, not ``select``: ``select`` cannot watch a descriptor numbered 1024 or
    more, and a listener that holds a few hundred connections has such numbers.
    """
    poller = select.poll()
    for fd in fds:
        if fd < 0:
            raise ValueError("closed descriptor")
        poller.register(fd, _POLL_IN)
    return {fd for fd, _ in poller.poll(max(0, int(seconds * 1000 + 0.999)))}


def _ready(self: AssociationSocket) -> bool:
    """Return whether the socket has data to read (pynetdicom's, on ``poll``).

    pynetdicom's own version asks ``select``, which raises for a descriptor numbered
    1024 or more; the association then ends as if the peer had closed it.
    """
    sock = self.socket
    if sock is None or not compat.socket_connected(self):
        return False
    try:
        ready = bool(_poll((sock.fileno(),), 0))
    except (OSError, ValueError):
        compat.connection_lost(self)  # as pynetdicom does: the connection is gone
        return False
    # An SSLSocket may hold decrypted bytes that poll does not know about.
    return ready or (isinstance(sock, ssl.SSLSocket) and bool(sock.pending()))


class _Wakeup:
    """A descriptor that ``select`` sees as readable once :meth:`set` was called.

    An eventfd where the platform has one (one descriptor), else a pipe. Writes
    after :meth:`close` are dropped: the descriptor number may belong to another
    file by then, and a stray byte in someone else's socket would be a bug hard to
    find.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        if hasattr(os, "eventfd"):
            self._read = self._write = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            self._read, self._write = os.pipe()
            os.set_blocking(self._read, False)
            os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError, OSError):  # already readable
                if self._read == self._write:
                    os.eventfd_write(self._write, 1)
                else:
                    os.write(self._write, b"\0")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._read, 4096)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _close(*{self._read, self._write})


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
