"""Engines and sessions for SQLite (embedded default) and PostgreSQL.

SQLite is set up for a multi-threaded node: WAL so readers never block the
writer, ``synchronous=FULL`` so a committed row survives power loss (a C-STORE
success depends on it), a busy timeout, and ``BEGIN IMMEDIATE`` for every
transaction. Deferred transactions that later write can deadlock each other in
a way no busy timeout resolves; taking the write lock up front trades a little
read concurrency for never seeing "database is locked" under load.

Sessions that only read (:func:`read_only`: the admin commands, an export, a scrape)
begin a plain deferred transaction instead: under WAL they read a snapshot and never
take the write lock, so an export paused in a pager cannot hold up the listener.

Times the node writes and compares across hosts come from the database's clock
(:func:`database_now`), read once per transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from dicomnode.errors import DatabaseNotFound

SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY = "dicomnode_read_only"  # execution option: see read_only()
# Where database_now() keeps the transaction's time, in Session.info.
_NOW = "dicomnode_database_now"


def is_sqlite(engine: Engine | Connection) -> bool:
    """Return whether ``engine`` talks to SQLite.

    Parameters
    ----------
    engine : Engine or Connection
        The engine, or a connection of one (what a session is bound to).

    Returns
    -------
    bool
        True for SQLite.
    """
    return engine.dialect.name == "sqlite"


# SQLite's clock as text (its "now" is the host's clock: every process sharing an
# SQLite file runs on that one host). Milliseconds, read back into a Python datetime
# so that the value is stored the way UTCDateTime stores every other one.
_SQLITE_NOW = text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")


def database_now(session: Session) -> datetime:
    """Return the database's time for the current transaction, as an aware UTC datetime.

    Lease expiries, back-off times, the job history and the commitment timeouts are set
    and compared with it, so that hosts whose clocks disagree still agree on which lease
    lapsed. It is read once per transaction and then kept in ``session.info`` until the
    transaction ends: a transaction that stamps many rows (a series' jobs, their events)
    asks the database once, and stamps them all alike. That is PostgreSQL's own rule
    (``now()`` is the start of the transaction); SQLite's ``'now'`` moves with each
    statement, and follows the same rule here.

    Parameters
    ----------
    session : Session
        The session, in the transaction that uses the time.

    Returns
    -------
    datetime
        Now, by the database's clock, the same for the whole transaction.
    """
    cached = session.info.get(_NOW)
    if isinstance(cached, datetime):
        return cached
    if is_sqlite(session.get_bind()):
        value = session.scalar(_SQLITE_NOW)
        now = datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
    else:
        read = session.scalar(select(func.now()))
        assert isinstance(read, datetime)
        now = read.astimezone(UTC)
    session.info[_NOW] = now
    return now


@event.listens_for(Session, "after_transaction_end")
def _forget_now(session: Session, transaction: SessionTransaction) -> None:
    # The next transaction reads the clock again. Only the outermost transaction's end
    # counts: a savepoint's is still inside the database's transaction, whose time holds.
    if transaction.parent is None:
        session.info.pop(_NOW, None)


def _setup_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves instead of the sqlite3 module's implicit one.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


# Connections beyond the threads a caller counts: the scheduler's sweeps (each one at
# a time), metrics scrapes, announcements of new work.
POOL_HEADROOM = 8


def make_engine(
    url: str, *, connections: int | None = None, create: bool = True, **kwargs: Any
) -> Engine:
    """Create an engine for ``url`` with the settings this node needs.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, ``sqlite:///PATH`` or ``postgresql+psycopg://...``.
    connections : int, optional
        How many threads may hold a connection at once (associations, workers and
        their heartbeats). The pool keeps that many plus :data:`POOL_HEADROOM`, so
        a busy listener never waits for a connection another thread could have
        had; SQLAlchemy's default (5, and 10 more on demand) is less than the 32
        associations a listener takes by default. Not for in-memory SQLite, which
        has one connection per thread anyway.
    create : bool
        For a file-backed SQLite URL: create the file and its folder when missing
        (``db upgrade``, the node). False for commands that only use an existing
        database: they raise instead of leaving an empty file behind.
    **kwargs
        Passed on to :func:`sqlalchemy.create_engine`.

    Returns
    -------
    Engine
        The engine. For a file-backed SQLite URL the parent folder is created.

    Raises
    ------
    DatabaseNotFound
        With ``create=False``, for a SQLite file that does not exist.
    """
    parsed = make_url(url)
    in_memory = parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")
    if connections is not None and not in_memory:
        kwargs.setdefault("pool_size", connections + POOL_HEADROOM)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            if not create and not Path(parsed.database).is_file():
                raise DatabaseNotFound(parsed.database)
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **kwargs,
        )
        _setup_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory whose objects stay readable after commit.

    Parameters
    ----------
    engine : Engine
        The engine to bind.

    Returns
    -------
    sessionmaker[Session]
        The factory.
    """
    return sessionmaker(engine, expire_on_commit=False)


def read_only(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Return a factory of sessions for reading only, on the same engine and pool.

    On SQLite their transactions are deferred (no write lock); writing in one is a
    bug, and SQLite then takes the lock late, with the deadlock risk described above.
    PostgreSQL needs no such help, and its sessions are unchanged.

    Parameters
    ----------
    factory : sessionmaker[Session]
        The node's session factory.

    Returns
    -------
    sessionmaker[Session]
        Sessions for reads.
    """
    engine: Engine = factory.kw["bind"]
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


P = ParamSpec("P")
T = TypeVar("T")


def read(
    engine: Engine, query: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run one read in a read-only session of its own and return what it returns.

    For a caller that holds an engine but should not hold a session (the CLI): the
    query returns plain values, and the session is closed before they are used.

    Parameters
    ----------
    engine : Engine
        The node's database.
    query : Callable
        ``query(session, *args, **kwargs)``.
    *args, **kwargs
        Passed on to ``query``.

    Returns
    -------
    T
        What ``query`` returned.
    """
    with read_only(session_factory(engine))() as session:
        return query(session, *args, **kwargs)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Open a session in a transaction that commits on success and rolls back on error.

    Parameters
    ----------
    factory : sessionmaker[Session]
        Where sessions come from.

    Yields
    ------
    Session
        The session; the transaction commits when the block ends without error.
    """
    with factory() as session, session.begin():
        yield session
