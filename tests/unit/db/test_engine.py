from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from dicomnode.db import database_now, transaction


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[str]]:
    """Every statement the engine sends, while the test runs."""
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    yield sent
    event.remove(engine, "before_cursor_execute", count)


def now_twice(session: Session, statements: list[str]) -> tuple[datetime, int]:
    """Ask for the time twice; return it and how many statements that took."""
    session.connection()  # the transaction is begun: its BEGIN is not the time's
    before = len(statements)
    first = database_now(session)
    assert database_now(session) == first
    return first, len(statements) - before


def test_the_database_time_is_read_once_a_transaction(sessions, statements: list[str]) -> None:
    with transaction(sessions) as s:
        first, asked = now_twice(s, statements)
    assert asked == 1  # the second time came from the session, not the database
    time.sleep(0.01)  # SQLite's clock counts milliseconds
    with transaction(sessions) as s:
        second, asked = now_twice(s, statements)
    assert asked == 1 and second > first  # a new transaction, a new time
    with sessions() as s:  # a rollback ends one too
        third, _ = now_twice(s, statements)
        s.rollback()
        time.sleep(0.01)
        assert database_now(s) > third


def test_a_savepoint_keeps_the_transaction_time(sessions) -> None:
    with transaction(sessions) as s:
        before = database_now(s)
        with s.begin_nested():
            assert database_now(s) == before
        time.sleep(0.01)
        assert database_now(s) == before  # a savepoint's end is not the transaction's
