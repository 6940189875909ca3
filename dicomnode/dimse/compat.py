"""Everything dicomnode does to pynetdicom below its public API, in this one module.

The listener reaches below pynetdicom's public API in three places, each for a
reason given where it happens, and every access of that kind is a function here:

* admission hands pynetdicom an association request it has already read
  (:func:`start_admitted`, for :mod:`dicomnode.listener.scp`);
* the reactor threads wake on events instead of polling, and PDUs are read with
  large reads that refuse an oversized PDU (:func:`replace_sleep`,
  :func:`replace_socket_io`, :func:`socket_connected`, :func:`connection_lost`,
  :func:`reactor_parts_known`, :func:`wake_association_thread`,
  :func:`wake_dul_thread`, :func:`when_dul_thread_ends`,
  :func:`keep_responses_for_the_caller`, for :mod:`dicomnode.dimse.reactor`);
* datasets stream into the spool (:func:`receive_datasets_in_files`,
  :func:`replace_dataset_file`, :func:`partial_dataset_file`, for
  :mod:`dicomnode.listener.chunked`).

What those functions rely on is listed in :data:`INTERNALS`, and one guard,
:func:`_problem`, looks at each piece: :func:`check` runs it over all of them when a
listener starts, since a pynetdicom laid out differently could quietly undo what those
places guarantee, a hostile peer's limits among them; the listener refuses to start
with any other version than the tested one, or with a piece missing, and names it.
The reactor's and the chunked receive's replacements also run it, once per process
(and once per association for the queues the wake-ups are attached to), and are made
only where it finds pynetdicom as expected; elsewhere pynetdicom keeps its own
behaviour (an outgoing association, which :func:`check` does not stop, then runs at
pynetdicom's pace). The functions used per message or per connection
(:func:`start_admitted`, :func:`socket_connected`, :func:`partial_dataset_file`) run
no guard: :func:`check` has found their pieces.
``tests/unit/dimse/test_compat.py`` fails if any other module of dicomnode uses a
private name of pynetdicom's, or sets anything on its modules and classes.

What those modules keep of their own on pynetdicom's objects (the ``_dicomnode_...``
attributes on an association's threads that say how each thread waits and where its
datasets go) takes nothing of pynetdicom's but their being threads.
"""

from __future__ import annotations

import importlib
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import pydicom.filewriter
import pynetdicom
import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dsutils
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicomnode.errors import ConfigError

TESTED = "3.0"  # pynetdicom 3.0.x; pyproject.toml pins the same range (a test compares them)
REQUIREMENT = "pynetdicom>=3.0,<3.1"


class Expect(NamedTuple):
    """What a piece of pynetdicom must be for dicomnode to use it."""

    text: str  # for the message: "<piece> is not <text>"
    test: Callable[[Any], bool]


ANYTHING = Expect("present", lambda value: True)
CALLABLE = Expect("callable", callable)
A_PROPERTY = Expect("a property", lambda value: isinstance(value, property))
A_QUEUE = Expect("a queue.Queue", lambda value: isinstance(value, queue.Queue))
A_FLAG = Expect("a bool", lambda value: isinstance(value, bool))
THE_TIME_MODULE = Expect("the time module", lambda value: value is time)
TEMPFILES_FACTORY = Expect(
    "tempfile.NamedTemporaryFile", lambda value: value is tempfile.NamedTemporaryFile
)


@dataclass(frozen=True)
class Internal:
    """A piece of pynetdicom that dicomnode uses below its public API.

    Parameters
    ----------
    owner : str
        Where it is, within the pynetdicom package: a module (``"fsm"``) or a class
        in one (``"dul.DULServiceProvider"``).
    name : str
        The attribute.
    why : str
        What dicomnode uses it for.
    instance : bool
        Whether pynetdicom sets it on each instance (in ``__init__``) instead of on
        the class or module.
    expect : Expect
        What it must be to be used (or replaced).
    """

    owner: str
    name: str
    why: str
    instance: bool = False
    expect: Expect = ANYTHING

    def __str__(self) -> str:
        return f"{self.owner.rsplit('.', 1)[-1]}.{self.name}"


# Admission (dicomnode.listener.scp).
CREATE_ASSOCIATION = Internal(
    "transport.RequestHandler",
    "_create_association",
    "builds the acceptor association of a connection admission has read the request of",
    expect=CALLABLE,
)
FINISH_REQUEST = Internal(
    "transport.AssociationServer",
    "finish_request",
    "starts an admitted connection (the listener has no accept loop of socketserver's)",
    expect=CALLABLE,
)
RECEIVED_PDUS = Internal(
    "dul.DULServiceProvider",
    "_recv_pdu",
    "where the state machine takes a received PDU from: the admitted request goes there",
    instance=True,
    expect=A_QUEUE,
)
EVENTS = Internal(
    "dul.DULServiceProvider",
    "event_queue",
    "the state machine's events: Evt6 for the admitted request, Evt17 for a lost connection",
    instance=True,
    expect=A_QUEUE,
)
ASSOCIATE_RQ_ACTION = Internal(
    "fsm",
    "AE_6",
    "the state machine's action on Evt6, which takes the admitted request from _recv_pdu",
    expect=CALLABLE,
)
# The reactor (dicomnode.dimse.reactor).
ASSOCIATION_TIME = Internal(
    "association",
    "time",
    "the association thread sleeps through it: the stand-in wakes it on events",
    expect=THE_TIME_MODULE,
)
DUL_TIME = Internal(
    "dul",
    "time",
    "the DUL thread sleeps through it: the stand-in wakes it on events",
    expect=THE_TIME_MODULE,
)
READ_PDU = Internal(
    "dul.DULServiceProvider",
    "_read_pdu_data",
    "reads a PDU as its 6-byte header, then the rest: the replaced recv limits the rest",
    expect=CALLABLE,
)
SOCKET_RECV = Internal(
    "transport.AssociationSocket",
    "recv",
    "replaced: large reads, and a PDU longer than we announced is refused unread",
    expect=CALLABLE,
)
SOCKET_READY = Internal(
    "transport.AssociationSocket",
    "ready",
    "replaced: asks poll, as select fails for descriptors numbered 1024 and up",
    expect=A_PROPERTY,
)
SOCKET_CONNECTED = Internal(
    "transport.AssociationSocket",
    "_is_connected",
    "read by the replaced ready, as pynetdicom's own reads it",
    instance=True,
    expect=A_FLAG,
)
MESSAGES = Internal(
    "dimse.DIMSEServiceProvider",
    "msg_queue",
    "DIMSE messages for the association thread: queueing one wakes it",
    instance=True,
    expect=A_QUEUE,
)
TO_USER = Internal(
    "dul.DULServiceProvider",
    "to_user_queue",
    "ACSE primitives for the association thread: queueing one wakes it",
    instance=True,
    expect=A_QUEUE,
)
TO_PROVIDER = Internal(
    "dul.DULServiceProvider",
    "to_provider_queue",
    "PDUs for the DUL thread to send: queueing one wakes it",
    instance=True,
    expect=A_QUEUE,
)
GET_MESSAGE = Internal(
    "dimse.DIMSEServiceProvider",
    "get_msg",
    "wrapped on associations we open: responses are left to the caller",
    expect=CALLABLE,
)
DUL_RUN = Internal(
    "dul.DULServiceProvider",
    "run",
    "wrapped: the DUL thread's wake-up descriptor is closed when the thread ends",
    expect=CALLABLE,
)
# Chunked receive (dicomnode.listener.chunked).
CHUNKED_RECEIVE = Internal(
    "_config",
    "STORE_RECV_CHUNKED_DATASET",
    "datasets are received into a file, not into memory",
    expect=A_FLAG,
)
EVENT_LOGGING = Internal(
    "_config",
    "LOG_HANDLER_LEVEL",
    "none unless the pynetdicom logger shows INFO: its handlers format lines nobody sees",
    expect=Expect("standard or none", lambda value: value in ("standard", "none")),
)
DATASET_FILE = Internal(
    "dimse_messages",
    "NamedTemporaryFile",
    "replaced: the file lands in the spool and stops growing at the listener's limits",
    expect=TEMPFILES_FACTORY,
)
FILE_META = Internal(
    "dimse_messages",
    "create_file_meta",
    "replaced with write_file_meta_info: a received dataset's file meta written in one step",
    expect=Expect(
        "pynetdicom.dsutils.create_file_meta",
        lambda value: value is pynetdicom.dsutils.create_file_meta,
    ),
)
FILE_META_WRITER = Internal(
    "dimse_messages",
    "write_file_meta_info",
    "replaced with create_file_meta: a received dataset's file meta written in one step",
    expect=Expect(
        "pydicom.filewriter.write_file_meta_info",
        lambda value: value is pydicom.filewriter.write_file_meta_info,
    ),
)
_PYNETDICOM_SEND_MSG: Callable[..., None] = pynetdicom.dimse.DIMSEServiceProvider.send_msg
SEND_MESSAGE = Internal(
    "dimse.DIMSEServiceProvider",
    "send_msg",
    "wrapped: a C-STORE response with a status alone is encoded in one step",
    expect=Expect(
        "pynetdicom's own send_msg",
        lambda value: value is _PYNETDICOM_SEND_MSG,
    ),
)
CURRENT_MESSAGE = Internal(
    "dimse.DIMSEServiceProvider",
    "message",
    "the message being received, whose file a broken transfer leaves behind",
    instance=True,
)
PARTIAL_FILE = Internal(
    "dimse_messages.DIMSEMessage",
    "_data_set_file",
    "the file of the dataset being received, removed when the transfer breaks off",
    instance=True,
)

INTERNALS: tuple[Internal, ...] = (
    CREATE_ASSOCIATION,
    FINISH_REQUEST,
    RECEIVED_PDUS,
    EVENTS,
    ASSOCIATE_RQ_ACTION,
    ASSOCIATION_TIME,
    DUL_TIME,
    READ_PDU,
    SOCKET_RECV,
    SOCKET_READY,
    SOCKET_CONNECTED,
    MESSAGES,
    TO_USER,
    TO_PROVIDER,
    GET_MESSAGE,
    DUL_RUN,
    CHUNKED_RECEIVE,
    EVENT_LOGGING,
    DATASET_FILE,
    FILE_META,
    FILE_META_WRITER,
    SEND_MESSAGE,
    CURRENT_MESSAGE,
    PARTIAL_FILE,
)

_MISSING = object()
# What this module put in place of pynetdicom's own, by piece: counted as expected
# when a later listener in the process checks again.
_ours: dict[Internal, object] = {}
_replace_lock = threading.Lock()


def resolve(owner: str) -> Any:
    """Return a pynetdicom module or class by its place in the package.

    Parameters
    ----------
    owner : str
        ``"fsm"`` or ``"dul.DULServiceProvider"``, as in :attr:`Internal.owner`.

    Returns
    -------
    module or type
        It.

    Raises
    ------
    ImportError, AttributeError
        If this pynetdicom has no such module or class.
    """
    module, _, name = owner.partition(".")
    found = importlib.import_module(f"pynetdicom.{module}")
    return getattr(found, name) if name else found


def _problem(internal: Internal, on: object = _MISSING) -> str | None:
    """Return what keeps ``internal`` from being used, or None: the one guard.

    Parameters
    ----------
    internal : Internal
        The piece.
    on : object, optional
        For a piece set on instances, the instance; else its module or class.

    Returns
    -------
    str or None
        ``"no <piece>"`` or ``"<piece> is not <what it must be>"``, in one line.
    """
    if on is _MISSING:
        try:
            on = resolve(internal.owner)
        except (ImportError, AttributeError):
            return f"no {internal.owner}"
    value = getattr(on, internal.name, _MISSING)
    if value is _MISSING:
        return f"no {internal}"
    if value is _ours.get(internal, _MISSING) or internal.expect.test(value):
        return None
    return f"{internal} is not {internal.expect.text}"


def _usable(internal: Internal, on: object = _MISSING) -> bool:
    return _problem(internal, on) is None


def _instances() -> tuple[dict[str, object], str | None]:
    """Make the objects pynetdicom makes for an incoming association, not started.

    The pieces pynetdicom sets on its instances are looked for on these (which are
    dropped afterwards): its classes alone do not have them.

    Returns
    -------
    tuple
        The instances made, by :attr:`Internal.owner`, and why the rest could not be
        made (None when all were).
    """
    made: dict[str, object] = {}
    try:
        made["dimse_messages.DIMSEMessage"] = DIMSEMessage()
        assoc = Association(pynetdicom.AE(), "acceptor")
        made["dul.DULServiceProvider"] = assoc.dul
        made["dimse.DIMSEServiceProvider"] = assoc.dimse
        ours, theirs = socket.socketpair()
        try:
            made["transport.AssociationSocket"] = AssociationSocket(assoc, client_socket=ours)
        finally:
            ours.close()
            theirs.close()
    except Exception as exc:  # a constructor that changed: say so, check the rest
        reason = (str(exc).splitlines() or [""])[0]
        return made, f"cannot make an association to look at ({type(exc).__name__}: {reason})"
    return made, None


def problems() -> list[str]:
    """Return what differs from the pynetdicom the listener was tested with.

    Returns
    -------
    list of str
        Empty when this pynetdicom is the tested one, with every piece of
        :data:`INTERNALS` as expected (or replaced by this module).
    """
    found = []
    version = installed_version()
    if version.split(".")[:2] != TESTED.split("."):
        found.append(f"version {version} (tested: {TESTED}.x)")
    instances, unmade = _instances()
    if unmade is not None:
        found.append(unmade)
    for internal in INTERNALS:
        if internal.instance:
            instance = instances.get(internal.owner, _MISSING)
            if instance is _MISSING:
                continue  # its class could not be made: reported above
            problem = _problem(internal, instance)
        else:
            problem = _problem(internal)
        if problem is not None:
            found.append(problem)
    return found


def installed_version() -> str:
    """Return the installed pynetdicom's version.

    Returns
    -------
    str
        ``pynetdicom.__version__``, or ``"unknown"``.
    """
    return str(getattr(pynetdicom, "__version__", "unknown"))


def check() -> None:
    """Refuse to go on with a pynetdicom other than the tested one.

    Called when a listener starts, before it replaces anything; what an earlier
    listener in the process replaced counts as expected.

    Raises
    ------
    ConfigError
        In one line: the installed version (or what is missing from it, and the
        version) and the requirement to install.
    """
    found = problems()
    if found:
        version = installed_version()
        where = "" if found[0].startswith("version ") else f" in pynetdicom {version}"
        raise ConfigError(
            f"pynetdicom is not the version dicomnode was tested with: {'; '.join(found)}"
            f"{where}; install '{REQUIREMENT}'"
        )


# --- Admission: an association for a request that has already been read -------------


def start_admitted(handler: RequestHandler, request: A_ASSOCIATE_RQ) -> None:
    """Start the association of a connection whose A-ASSOCIATE-RQ has been read.

    What pynetdicom's ``RequestHandler.handle`` does, except that the request has
    arrived and been decoded (see :mod:`dicomnode.listener.admission`): it is queued
    for the state machine as if the DUL had just read it (event 6, "A-ASSOCIATE-RQ
    PDU received", after the event 5 the socket queues itself).

    Parameters
    ----------
    handler : RequestHandler
        The server's handler for the connection.
    request : A_ASSOCIATE_RQ
        The decoded request.
    """
    assoc = handler._create_association()
    dul = assoc.dul
    dul._recv_pdu.put(request)
    dul.event_queue.put("Evt6")
    evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": handler.client_address})
    assoc.start()


# --- The reactor: event-driven wake-ups and PDU reads -------------------------------


def replace_sleep(stand_in: object) -> bool:
    """Give pynetdicom's two reactor modules ``stand_in`` for their ``time`` module.

    pynetdicom's association and DUL threads nap through ``time.sleep`` of their
    modules; ``stand_in.sleep`` decides how each thread waits.

    Parameters
    ----------
    stand_in : object
        Has what the ``time`` module has.

    Returns
    -------
    bool
        Whether both modules now use it; if either is not as expected, neither
        was changed.
    """
    with _replace_lock:
        pieces = (ASSOCIATION_TIME, DUL_TIME)
        if not all(_usable(piece) for piece in pieces):
            return False
        for piece in pieces:
            setattr(resolve(piece.owner), piece.name, stand_in)
            _ours[piece] = stand_in
        return True


def replace_socket_io(
    recv: Callable[[AssociationSocket, int], bytearray],
    ready: Callable[[AssociationSocket], bool],
) -> None:
    """Replace how pynetdicom's socket wrapper reads a PDU and asks for data.

    Each is replaced if pynetdicom's is as expected, independently of the other.

    Parameters
    ----------
    recv : callable
        ``recv(self, nr_bytes)``, for ``AssociationSocket.recv``.
    ready : callable
        ``ready(self)``, made the ``AssociationSocket.ready`` property.
    """
    with _replace_lock:
        if _usable(SOCKET_RECV):
            AssociationSocket.recv = recv  # type: ignore[method-assign,assignment]
            _ours[SOCKET_RECV] = recv
        if _usable(SOCKET_READY):
            replaced = property(ready)
            AssociationSocket.ready = replaced  # type: ignore[method-assign,assignment]
            _ours[SOCKET_READY] = replaced


def socket_connected(sock: AssociationSocket) -> bool:
    """Return whether pynetdicom still counts the socket as connected.

    Parameters
    ----------
    sock : AssociationSocket
        The socket wrapper.

    Returns
    -------
    bool
        True unless it was closed (or this pynetdicom does not say).
    """
    return bool(getattr(sock, "_is_connected", True))


def connection_lost(sock: AssociationSocket) -> None:
    """Tell the socket's state machine the connection is gone (event 17).

    Parameters
    ----------
    sock : AssociationSocket
        The socket wrapper.
    """
    sock.event_queue.put("Evt17")


def reactor_parts_known(assoc: Any) -> bool:
    """Return whether an association has the parts the wake-ups are attached to.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association, not started.

    Returns
    -------
    bool
        Whether its DIMSE and DUL queues, ``get_msg`` and the DUL's ``run`` are as
        expected.
    """
    dul = getattr(assoc, "dul", None)
    dimse = getattr(assoc, "dimse", None)
    if dul is None or dimse is None:
        return False
    return (
        _usable(MESSAGES, dimse)
        and _usable(TO_USER, dul)
        and _usable(TO_PROVIDER, dul)
        and _usable(GET_MESSAGE, dimse)
        and _usable(DUL_RUN, dul)
    )


def _wake_on_put(q: queue.Queue[Any], wake: Callable[[], None]) -> None:
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    q.put = put_and_wake  # type: ignore[method-assign]


def wake_association_thread(assoc: Any, wake: Callable[[], None]) -> None:
    """Call ``wake`` whenever a DIMSE message or an ACSE primitive is queued for it.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association (see :func:`reactor_parts_known`).
    wake : callable
        Called after each item is queued.
    """
    _wake_on_put(assoc.dimse.msg_queue, wake)
    _wake_on_put(assoc.dul.to_user_queue, wake)


def wake_dul_thread(assoc: Any, wake: Callable[[], None]) -> None:
    """Call ``wake`` whenever the association queues a PDU for its DUL thread to send.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association (see :func:`reactor_parts_known`).
    wake : callable
        Called after each item is queued.
    """
    _wake_on_put(assoc.dul.to_provider_queue, wake)


def when_dul_thread_ends(assoc: Any, finish: Callable[[], None]) -> None:
    """Call ``finish`` on the association's DUL thread when that thread ends.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association, not started (see :func:`reactor_parts_known`).
    finish : callable
        Called last on the DUL thread, however it ends.
    """
    dul = assoc.dul
    run = dul.run

    def run_then_finish() -> None:
        try:
            run()
        finally:
            finish()

    dul.run = run_then_finish


def keep_responses_for_the_caller(assoc: Any) -> None:
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

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        An association we request, not started (see :func:`reactor_parts_known`).
    """
    dimse = assoc.dimse
    get_msg = dimse.get_msg

    def caller_only(block: bool = False) -> Any:
        if not block and threading.current_thread() is assoc:
            return None, None
        return get_msg(block)

    dimse.get_msg = caller_only


# --- Chunked receive: datasets into files on the spool --------------------------------


def receive_datasets_in_files() -> None:
    """Have pynetdicom write each incoming dataset to a file as it arrives.

    A process-wide setting of pynetdicom's (``STORE_RECV_CHUNKED_DATASET``): the
    C-STORE handler gets the file's path instead of a dataset in memory.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True


def log_events(enabled: bool) -> None:
    """Turn pynetdicom's own event logging (its "standard" handlers) on or off.

    A process-wide setting of pynetdicom's (``LOG_HANDLER_LEVEL``), read when an
    association is made. Its handlers format every DIMSE message into lines for the
    ``pynetdicom`` logger, which the node keeps at WARNING unless DEBUG is asked for:
    about 3% of the listener's Python time in a py-spy profile of C-STOREs, spent on
    lines nobody sees.

    Parameters
    ----------
    enabled : bool
        Whether the ``pynetdicom`` logger would show them.
    """
    with _replace_lock:
        if _usable(EVENT_LOGGING):
            _config.LOG_HANDLER_LEVEL = "standard" if enabled else "none"


def replace_dataset_file(factory: Callable[..., Any]) -> bool:
    """Make pynetdicom create the file of an incoming dataset with ``factory``.

    Parameters
    ----------
    factory : callable
        Called as :func:`tempfile.NamedTemporaryFile` is, on the association's DUL
        thread.

    Returns
    -------
    bool
        Whether it is used; if pynetdicom is laid out differently, nothing changed
        and its files go to the system's temporary folder.
    """
    with _replace_lock:
        if not _usable(DATASET_FILE):
            return False
        pynetdicom.dimse_messages.NamedTemporaryFile = factory
        _ours[DATASET_FILE] = factory
        return True


class _FileMeta(NamedTuple):
    """What pynetdicom's ``create_file_meta`` was asked for, kept for the writer."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str
    implementation_version: str


def replace_file_meta(encode: Callable[..., bytes | None]) -> bool:
    """Make pynetdicom write a received dataset's file meta with ``encode``.

    pynetdicom builds a pydicom dataset and writes it (two module-level names in
    ``dimse_messages``, used only there); both are replaced together. Where
    ``encode`` returns None the values go through pydicom as before.

    Parameters
    ----------
    encode : callable
        :func:`dicomnode.dimse.file_meta.encode_file_meta`.

    Returns
    -------
    bool
        Whether it is used; if pynetdicom is laid out differently, nothing changed.
    """
    create = pynetdicom.dsutils.create_file_meta
    write = pydicom.filewriter.write_file_meta_info

    def create_file_meta(
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        implementation_uid: str = pynetdicom.PYNETDICOM_IMPLEMENTATION_UID,
        implementation_version: str = pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION,
    ) -> _FileMeta:
        return _FileMeta(
            sop_class_uid, sop_instance_uid, transfer_syntax, implementation_uid,
            implementation_version,
        )  # fmt: skip

    def write_file_meta_info(fp: Any, meta: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(meta, _FileMeta):
            write(fp, meta, *args, **kwargs)
            return
        encoded = encode(*meta)
        if encoded is None:
            write(fp, create(**meta._asdict()), *args, **kwargs)
        else:
            fp.write(encoded)

    with _replace_lock:
        if not (_usable(FILE_META) and _usable(FILE_META_WRITER)):
            return False
        # A stand-in pair: what one returns only the other reads (types differ on purpose).
        pynetdicom.dimse_messages.create_file_meta = create_file_meta  # type: ignore[assignment]
        pynetdicom.dimse_messages.write_file_meta_info = write_file_meta_info  # type: ignore[assignment]
        _ours[FILE_META] = create_file_meta
        _ours[FILE_META_WRITER] = write_file_meta_info
        return True


def replace_store_response(encode: Callable[[int, object, object, int], bytes | None]) -> bool:
    """Make pynetdicom send a C-STORE response that carries a status alone with ``encode``.

    The command set goes out as one PDV, exactly as pynetdicom would send it, with
    no pydicom dataset built or encoded. Any other message (a request, a response
    with an error comment, one on an association with a handler for
    ``EVT_DIMSE_SENT``, which expects pynetdicom's message object) is sent by
    pynetdicom itself.

    Parameters
    ----------
    encode : callable
        :func:`dicomnode.dimse.responses.encode_store_response`.

    Returns
    -------
    bool
        Whether it is used; if pynetdicom is laid out differently, nothing changed.
    """
    original = _PYNETDICOM_SEND_MSG

    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        command = None
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and isinstance(primitive.Status, int)
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode(
                primitive.MessageIDBeingRespondedTo,
                primitive.AffectedSOPClassUID,
                primitive.AffectedSOPInstanceUID,
                primitive.Status,
            )
        limit = self.maximum_pdu_size
        if command is None or (limit and len(command) + 1 > limit - 6):
            original(self, primitive, context_id)
            return
        pdata = P_DATA()
        # A list [ID, PDV], which P_DATA checks for, though its annotation says a tuple.
        pdata.presentation_data_value_list = [cast(Any, [context_id, b"\x03" + command])]
        self.dul.send_pdu(pdata)

    with _replace_lock:
        if not _usable(SEND_MESSAGE):
            return False
        pynetdicom.dimse.DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]
        _ours[SEND_MESSAGE] = send_msg
        return True


def partial_dataset_file(assoc: Any) -> Any | None:
    """Return the file of a dataset the association was still receiving, or None.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association.

    Returns
    -------
    file object or None
        The open file (with its ``name``), or None when no transfer was under way.
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    return getattr(message, "_data_set_file", None)
