"""Shared fixtures: real databases (SQLite and PostgreSQL), test data, free ports."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.testdata import CT, DATA, restore_series

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "DICOMNODETEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repository's test data, ``tests/data`` (see its ATTRIBUTION.md)."""
    return DATA


@pytest.fixture(scope="session")
def real_ct(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Give the original files of a case in ``tests/data/ct`` (images and readers' XML).

    The repository keeps the LIDC-IDRI images JPEG-LS compressed; each case is restored
    once per session, byte for byte as published (Explicit VR Little Endian).
    """
    restored: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in restored:
            source = CT / case
            if not source.is_dir():
                pytest.fail(f"no test data at {source}", pytrace=False)
            restored[case] = restore_series(source, tmp_path_factory.mktemp(case))
        return restored[case]

    return get


@pytest.fixture(scope="session")
def lidc1(real_ct: Callable[[str], Path]) -> list[Path]:
    """LIDC-IDRI-0001's 133 CT images, as published, in file-name order."""
    return sorted(real_ct("LIDC-IDRI-0001").glob("*.dcm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def fresh_pg_database(
    admin_url: str = PG_ADMIN_URL, prefix: str = "dicomnode_test"
) -> Iterator[str]:
    """Create an empty PostgreSQL database, yield its URL, and drop it afterwards.

    Used by the ``pg_url`` fixture and by the benchmarks.
    """
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    with fresh_pg_database() as url:
        yield url


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def proc_status(pid: int | str, field: str) -> int:
    """Return a number from /proc/PID/status: ``Threads``, or ``VmHWM`` in kB, ..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def memory_bytes(pid: int | str = "self", field: str = "VmHWM") -> int:
    """Return a process's memory figure from /proc: VmHWM (peak resident) or VmRSS (now)."""
    return proc_status(pid, field) * 1024


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test on the embedded SQLite database and on a real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dicomnode.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[object]:
    """An engine on a migrated database."""
    from dicomnode.db import make_engine, migrate

    eng = make_engine(db_url)
    migrate.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine):
    from dicomnode.db import session_factory

    return session_factory(engine)


@pytest.fixture
def make_listener(tmp_path: Path, sessions) -> Iterator[Callable[..., object]]:
    """Start in-process listeners on loopback (each with its own spool); stopped after.

    ``make_listener(ingest={...}, destinations=[...], sessions=..., **listener_settings)``:
    ``ingest`` goes to the Ingestor (``min_free_bytes``, ``max_instance_bytes``),
    ``destinations`` to the Listener (whose commitment reports it takes), ``sessions``
    (the fixture's by default) to the Ingestor, the rest to ListenerSettings.
    """
    from dicomnode.config import ListenerSettings
    from dicomnode.listener import Listener
    from dicomnode.store import Ingestor, Spool

    started: list[Listener] = []
    shared = sessions

    def make(
        ingest: dict | None = None,
        destinations: Sequence[object] = (),
        sessions: object = None,
        **settings: object,
    ) -> Listener:
        config = ListenerSettings(
            ae_title="DICOMNODE",
            host="127.0.0.1",
            port=free_port(),
            **settings,  # type: ignore[arg-type]
        )
        spool = Spool(tmp_path / ("spool" if not started else f"spool{len(started)}"))
        node = Listener(
            config,
            Ingestor(spool, sessions or shared, **(ingest or {})),  # type: ignore[arg-type]
            destinations=destinations,  # type: ignore[arg-type]
        )
        node.start()
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


@pytest.fixture
def listener(make_listener: Callable[..., object]) -> object:
    """One in-process listener with default settings, AE title DICOMNODE."""
    return make_listener()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what an in-process ``dicomnode`` command did to the root logger.

    ``main()`` installs a handler on the stderr it finds, which under capsys is a
    capture that closes with the test; a later test logging through that handler
    would print "--- Logging error ---".
    """
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    # Only plain StreamHandlers (what setup_logging adds): pytest's own capture handlers
    # come and go with each phase of a test and are pytest's to manage.
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


# --- Test tiers --------------------------------------------------------------------------
# `pytest -m fast` runs what needs no database, no network and no subprocess: the tier a
# change is checked against in seconds. A test is fast unless it lives outside
# tests/unit, asks for a database fixture, or carries one of the markers below; the
# guard that follows makes the promise hold, failing a fast test that reaches for a
# socket, a child process or an engine, instead of trusting a list kept by hand.
TESTS = Path(__file__).resolve().parent
DATABASE_FIXTURES = frozenset({"db_url", "engine", "sessions", "pg_url"})
NOT_FAST_MARKERS = ("system", "slow", "postgres")


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test that may run in the fast tier with ``fast``."""
    for item in items:
        # Only tests/unit; an item from outside tests/ (a doctest in dicomnode/) neither.
        if not item.path.resolve().is_relative_to(TESTS / "unit"):
            continue
        if any(item.get_closest_marker(name) for name in NOT_FAST_MARKERS):
            continue
        if DATABASE_FIXTURES & set(getattr(item, "fixturenames", ())):
            continue
        item.add_marker(pytest.mark.fast)


class NotFast(AssertionError):
    """A fast test reached for a database, the network or a child process."""


def _refuse(what: str) -> Callable[..., object]:
    def refuse(*args: object, **kwargs: object) -> object:
        raise NotFast(f"a fast test may not {what}; mark it @pytest.mark.system")

    return refuse


@pytest.fixture(scope="session")
def _font_cache() -> None:
    """Let matplotlib build its font cache, which runs ``fc-list`` once per machine.

    That child process is the library's own first-use work, not the test's: it
    happens wherever matplotlib is first imported, so it is done here, unguarded.
    """
    with contextlib.suppress(ImportError):  # the evaluate extra may not be installed
        import matplotlib.font_manager  # noqa: F401


@pytest.fixture(autouse=True)
def _fast_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse sockets, child processes and database engines inside fast tests."""
    if request.node.get_closest_marker("fast") is None:
        return
    request.getfixturevalue("_font_cache")
    import multiprocessing.process
    import subprocess

    import sqlalchemy.engine.base

    monkeypatch.setattr(socket.socket, "connect", _refuse("open a network connection"))
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse("open a network connection"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("listen on a socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a child process"))
    monkeypatch.setattr(os, "fork", _refuse("fork"))
    # A "spawn" context (the listener's processes) starts its child without Popen or fork.
    monkeypatch.setattr(
        multiprocessing.process.BaseProcess, "start", _refuse("start a child process")
    )
    monkeypatch.setattr(sqlalchemy.engine.base.Engine, "__init__", _refuse("open a database"))
