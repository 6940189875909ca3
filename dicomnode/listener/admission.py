"""Admission: nothing but a selector entry until a whole A-ASSOCIATE-RQ has arrived.

pynetdicom gives every accepted TCP connection two threads and counts it against the
association limit at once, before a byte of the request has arrived, and its sockets
have no timeout. Forty connections that send half a request (or thirty-three that
send nothing) therefore kept every scanner out for as long as they were held, a
PDU header claiming 2 GB made the listener buffer whatever followed it, and a few
hundred idle connections used up the process's file descriptors.

Here the listener's one accepting thread does the early part of every connection
itself, on non-blocking sockets and one selector, without a thread per connection:

* the TLS handshake, when the port speaks TLS;
* reading the A-ASSOCIATE-RQ, which must start with its PDU header, stay under
  :attr:`Limits.max_request_bytes` and be complete within
  :attr:`Limits.request_timeout` of the connection being accepted;
* checking its AE titles for characters no AE title may hold, before pynetdicom
  (which logs a bad one verbatim) ever sees them.

A connection still waiting costs one descriptor and a small buffer. Their number is
capped globally and per peer address; when a cap is reached the *oldest* waiting
connection makes room, so connections that stall cannot keep a real client out: a
real client sends its request within milliseconds of connecting and is gone from
the waiting set long before it could become the oldest.

Only then does the listener decide (:class:`Rejection` or admission) and, if it
admits, hand the socket and the decoded request to pynetdicom, which starts the
association's threads. Rejections are answered here with an A-ASSOCIATE-RJ, so a
refused peer costs no thread either.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_RQ

from dicomnode.dimse import PDU_HEADER, encode_abort

log = logging.getLogger(__name__)

_ASSOCIATE_RQ = 0x01
# Called and Calling AE Title: bytes 11-26 and 27-42 of an A-ASSOCIATE-RQ (PS3.8 9.3.2).
_CALLED = slice(10, 26)
_CALLING = slice(26, 42)
_MIN_REQUEST = 74  # header, protocol version, titles and reserved field: nothing less is one
_ACCEPTS_PER_TICK = 64  # then the waiting connections get a turn
_DROP_REPORT_SECONDS = 60.0
# A rejection is sent this long after the request arrived. pynetdicom as a client
# checks that its connection is still up only after it has sent its request; an
# A-ASSOCIATE-RJ that arrives (and closes the connection) before that check is
# reported as an abort, not a rejection (seen 3 times in 200 on a busy machine).
# The delay also slows down a peer trying AE titles one after another.
REJECT_DELAY = 0.1
_MAX_REJECTING = 256  # past this many, rejections go out at once


@dataclass(frozen=True)
class Limits:
    """How long and how much a connection may take before it is an association.

    Parameters
    ----------
    request_timeout : float
        Seconds from accept for the TLS handshake and the whole A-ASSOCIATE-RQ.
    max_pending : int
        Connections waiting for their request, in all.
    max_pending_per_address : int
        Connections waiting for their request, per peer address.
    max_request_bytes : int
        The longest A-ASSOCIATE-RQ taken. A request proposing 128 presentation
        contexts, each with a dozen transfer syntaxes, is about 60 KiB.
    """

    request_timeout: float = 10.0
    max_pending: int = 256
    max_pending_per_address: int = 64
    max_request_bytes: int = 256 * 1024


@dataclass(frozen=True)
class Request:
    """A complete A-ASSOCIATE-RQ and where it came from."""

    sock: socket.socket
    address: tuple[Any, ...]
    pdu: A_ASSOCIATE_RQ
    called_ae: str
    calling_ae: str

    @property
    def host(self) -> str:
        """Return the peer's IP address."""
        return str(self.address[0])


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4) and the reason we log and count for it."""

    result: int
    source: int
    diagnostic: int
    reason: str


# The calling or called AE title holds characters no AE title may (PS3.5 6.2: no
# control characters, no backslash): rejected-permanent, service user, with the
# diagnostic of the title concerned.
CALLING_AE_INVALID = Rejection(0x01, 0x01, 0x03, "calling_ae")
CALLED_AE_INVALID = Rejection(0x01, 0x01, 0x07, "called_ae")


def encode_reject(rejection: Rejection) -> bytes:
    """Return the A-ASSOCIATE-RJ PDU for a rejection.

    Parameters
    ----------
    rejection : Rejection
        Result, source and diagnostic.

    Returns
    -------
    bytes
        The 10-byte PDU.
    """
    return struct.pack(
        ">BBIBBBB", 0x03, 0, 4, 0, rejection.result, rejection.source, rejection.diagnostic
    )


def ae_title(raw: bytes) -> str | None:
    """Decode a 16-byte AE title field, or None if no AE title may look like it.

    Parameters
    ----------
    raw : bytes
        The field as received.

    Returns
    -------
    str or None
        The title without its padding; None if it is empty or holds a control
        character, a backslash or a byte outside ASCII.
    """
    if any(b < 0x20 or b > 0x7E or b == 0x5C for b in raw):
        return None
    title = raw.decode("ascii").strip()
    return title or None


@dataclass(eq=False)
class _Waiting:
    """A connection whose request has not arrived yet."""

    sock: socket.socket
    address: tuple[Any, ...]
    deadline: float
    handshaking: bool
    buffer: bytearray = field(default_factory=bytearray)
    needed: int = PDU_HEADER
    writing: bool = False  # registered for EVENT_WRITE (TLS wants to send)

    @property
    def host(self) -> str:
        return str(self.address[0])


class _Drops:
    """Connections closed before they were associations, logged once a minute.

    One warning per connection would let anyone who can open connections write the
    log; one line a minute with the counts and the busiest peer says the same.
    """

    def __init__(self) -> None:
        self.reasons: collections.Counter[str] = collections.Counter()
        self.peers: collections.Counter[str] = collections.Counter()
        self.since = time.monotonic()

    def add(self, reason: str, host: str) -> None:
        self.reasons[reason] += 1
        if len(self.peers) < 1024 or host in self.peers:  # bounded, whoever connects
            self.peers[host] += 1

    def report(self, now: float, force: bool = False) -> None:
        if not self.reasons or (not force and now - self.since < _DROP_REPORT_SECONDS):
            return
        counts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.reasons.items()))
        busiest, n = self.peers.most_common(1)[0] if self.peers else ("-", 0)
        log.warning(
            "connections dropped before association in the last %.0f s: %s; busiest peer=%s (%d)",
            now - self.since,
            counts,
            busiest,
            n,
        )
        self.reasons.clear()
        self.peers.clear()
        self.since = now


class Gate:
    """Accept connections and read their association requests, on one thread.

    Parameters
    ----------
    listening : socket.socket
        The bound, listening socket.
    limits : Limits
        Deadlines and caps.
    admit : callable
        Called with each complete :class:`Request` on this thread; returns None to
        take the connection (it then owns the socket) or a :class:`Rejection`.
    refused : callable
        Called with ``(calling_ae, called_ae, host, reason)`` for every rejection
        answered here, so the listener can log, count and audit it; a title that is
        not one comes as sent (whoever shows it escapes it), one never read as ``"-"``.
    ssl_context : ssl.SSLContext, optional
        The server's TLS context; connections then speak TLS only.
    address_allowed : callable, optional
        Whether a peer address may associate at all; with TLS, a peer that may not
        is closed at once, before its handshake costs anything.
    """

    def __init__(
        self,
        listening: socket.socket,
        limits: Limits,
        *,
        admit: Callable[[Request], Rejection | None],
        refused: Callable[[str, str, str, str], None],
        ssl_context: ssl.SSLContext | None = None,
        address_allowed: Callable[[str], bool] | None = None,
    ) -> None:
        self.listening = listening
        self.limits = limits
        self._admit = admit
        self._refused = refused
        self._ssl = ssl_context
        self._address_allowed = address_allowed or (lambda host: True)
        # Insertion order is accept order, and every deadline is accept + timeout:
        # the first entry is always the oldest and the next to expire.
        self._waiting: collections.OrderedDict[_Waiting, None] = collections.OrderedDict()
        self._per_host: collections.Counter[str] = collections.Counter()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._accept_paused_until = 0.0
        self._drops = _Drops()
        # Rejections waiting for REJECT_DELAY: (when, socket, A-ASSOCIATE-RJ).
        self._rejecting: collections.deque[tuple[float, socket.socket, bytes]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Return how many connections are waiting for their request."""
        return len(self._waiting)

    def run(self) -> None:
        """Serve until :meth:`stop` is called."""
        self.listening.setblocking(False)
        self._selector.register(self.listening, selectors.EVENT_READ, None)
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._stopping.is_set():
                try:
                    self._tick()
                except Exception:
                    # This thread is the port: whatever one connection did to it, the
                    # next scanner must still get in.
                    log.exception("admission: unexpected error, going on")
                    time.sleep(0.1)
        finally:
            for waiting in list(self._waiting):
                self._close(waiting)
            while self._rejecting:
                _, sock, pdu = self._rejecting.popleft()
                _send_and_close(sock, pdu)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
            self._drops.report(time.monotonic(), force=True)
            self._stopped.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, close the connections still waiting, and wait for the thread."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._stopped.wait(timeout)

    def _tick(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self.listening, selectors.EVENT_READ, None)
        timeout = 0.5
        if self._waiting:
            oldest = next(iter(self._waiting))
            timeout = max(0.0, min(timeout, oldest.deadline - now))
        if self._rejecting:
            timeout = max(0.0, min(timeout, self._rejecting[0][0] - now))
        if self._accept_paused_until:
            timeout = max(0.0, min(timeout, self._accept_paused_until - now))
        for key, _mask in self._selector.select(timeout):
            if key.fileobj is self.listening:
                self._accept()
            elif key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            elif key.data in self._waiting:
                self._advance(key.data)
        now = time.monotonic()
        while self._waiting:
            oldest = next(iter(self._waiting))
            if oldest.deadline > now:
                break
            self._drop(oldest, "timeout")
        while self._rejecting and self._rejecting[0][0] <= now:
            _, sock, pdu = self._rejecting.popleft()
            _send_and_close(sock, pdu)
        self._drops.report(now)

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_TICK):
            try:
                sock, address = self.listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._out_of_descriptors()
                # ECONNABORTED and the like: that connection is gone, the next may not be
                return
            self._take(sock, address)

    def _out_of_descriptors(self) -> None:
        # The kernel keeps the connection queued while we cannot accept it. Giving up
        # the oldest waiting connection frees a descriptor for it; with none waiting,
        # stop looking at the port for a moment instead of spinning on it.
        if self._waiting:
            self._drop(next(iter(self._waiting)), "no_descriptors")
            return
        self._drops.add("no_descriptors", "-")
        self._selector.unregister(self.listening)
        self._accept_paused_until = time.monotonic() + 0.1

    def _take(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        host = str(address[0])
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None and not self._address_allowed(host):
            # No handshake for a peer that may not associate: it cannot be told why
            # without one, and it should cost us nothing.
            self._refused("-", "-", host, "address")
            _close_quietly(sock)
            return
        if self._per_host[host] >= self.limits.max_pending_per_address:
            self._drop(next(w for w in self._waiting if w.host == host), "evicted")
        if len(self._waiting) >= self.limits.max_pending:
            self._drop(next(iter(self._waiting)), "evicted")
        handshaking = False
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):
                _close_quietly(sock)
                self._drops.add("tls", host)
                return
            handshaking = True
        waiting = _Waiting(
            sock,
            address,
            deadline=time.monotonic() + self.limits.request_timeout,
            handshaking=handshaking,
        )
        self._waiting[waiting] = None
        self._per_host[host] += 1
        self._selector.register(sock, selectors.EVENT_READ, waiting)
        self._advance(waiting)  # the request may be there already

    def _advance(self, waiting: _Waiting) -> None:
        sock = waiting.sock
        if waiting.handshaking:
            assert isinstance(sock, ssl.SSLSocket)
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                if waiting.writing:
                    waiting.writing = False
                    self._selector.modify(sock, selectors.EVENT_READ, waiting)
                return
            except ssl.SSLWantWriteError:
                waiting.writing = True
                self._selector.modify(sock, selectors.EVENT_WRITE, waiting)
                return
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.debug("TLS handshake failed peer=%s: %s", waiting.host, type(exc).__name__)
                self._drop(waiting, "tls")
                return
            waiting.handshaking = False
        if waiting.writing:
            waiting.writing = False
            self._selector.modify(sock, selectors.EVENT_READ, waiting)
        while True:
            try:
                chunk = sock.recv(waiting.needed - len(waiting.buffer))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:  # TLS wants to send first (a key update)
                waiting.writing = True
                self._selector.modify(sock, selectors.EVENT_WRITE, waiting)
                return
            except OSError:
                self._drop(waiting, "closed")
                return
            if not chunk:
                self._drop(waiting, "closed")
                return
            waiting.buffer += chunk
            if len(waiting.buffer) < waiting.needed:
                continue  # with TLS, more may be decrypted already; select would not say
            if waiting.needed == PDU_HEADER and not self._header_ok(waiting):
                return
            if len(waiting.buffer) == waiting.needed:
                self._complete(waiting)
                return

    def _header_ok(self, waiting: _Waiting) -> bool:
        kind, _, length = struct.unpack(">BBI", bytes(waiting.buffer))
        if kind != _ASSOCIATE_RQ:
            self._drop(waiting, "not_a_request", encode_abort(0x02, 0x02))
            return False
        if length > self.limits.max_request_bytes or PDU_HEADER + length < _MIN_REQUEST:
            self._drop(waiting, "oversized_request", encode_abort(0x02, 0x06))
            return False
        waiting.needed = PDU_HEADER + length
        return True

    def _complete(self, waiting: _Waiting) -> None:
        self._forget(waiting)
        data = bytes(waiting.buffer)
        called = ae_title(data[_CALLED])
        calling = ae_title(data[_CALLING])
        if called is None or calling is None:
            # pynetdicom would log such a title verbatim: it never gets to see it.
            invalid = CALLING_AE_INVALID if calling is None else CALLED_AE_INVALID
            self._reject(waiting, _as_sent(data[_CALLING]), _as_sent(data[_CALLED]), invalid)
            return
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(data)
        except Exception:  # any malformed item: pynetdicom would abort the same way
            self._drops.add("malformed_request", waiting.host)
            _send_and_close(waiting.sock, encode_abort(0x02, 0x06))
            return
        request = Request(waiting.sock, waiting.address, pdu, called, calling)
        try:
            rejection = self._admit(request)
        except Exception:
            log.exception("admission failed peer=%s", waiting.host)
            _close_quietly(waiting.sock)
            return
        if rejection is not None:
            self._reject(waiting, calling, called, rejection)

    def _reject(self, waiting: _Waiting, calling: str, called: str, rejection: Rejection) -> None:
        self._refused(calling, called, waiting.host, rejection.reason)
        if len(self._rejecting) >= _MAX_REJECTING:
            _send_and_close(waiting.sock, encode_reject(rejection))
            return
        due = time.monotonic() + REJECT_DELAY
        self._rejecting.append((due, waiting.sock, encode_reject(rejection)))

    def _drop(self, waiting: _Waiting, reason: str, last_words: bytes = b"") -> None:
        self._drops.add(reason, waiting.host)
        self._close(waiting, last_words)

    def _forget(self, waiting: _Waiting) -> None:
        del self._waiting[waiting]
        self._per_host[waiting.host] -= 1
        if not self._per_host[waiting.host]:
            del self._per_host[waiting.host]
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(waiting.sock)

    def _close(self, waiting: _Waiting, last_words: bytes = b"") -> None:
        if waiting in self._waiting:
            self._forget(waiting)
        if last_words:
            _send_and_close(waiting.sock, last_words)
        else:
            _close_quietly(waiting.sock)


def _as_sent(raw: bytes) -> str:
    """Return a title field that is no AE title as text, unescaped ("-" if empty).

    Whoever logs or keeps it escapes it (:func:`dicomnode.logs.shown`), once.
    """
    return raw.decode("latin-1").strip(" ") or "-"


def _send_and_close(sock: socket.socket, pdu: bytes) -> None:
    """Send a short PDU without waiting for the peer, then close the connection."""
    with contextlib.suppress(OSError, ValueError):
        sock.send(pdu)  # 10 bytes always fit an empty send buffer
    with contextlib.suppress(OSError, ValueError):
        sock.shutdown(socket.SHUT_WR)
    _close_quietly(sock)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError, ValueError):
        sock.close()
