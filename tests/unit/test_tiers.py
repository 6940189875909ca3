"""The fast tier (tests/conftest.py): which tests are in it, and the guard that keeps them fast."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import sqlalchemy

from tests.conftest import TESTS, NotFast, pytest_collection_modifyitems


class Item:
    """What the marking hook reads of a collected test, and the markers it adds."""

    def __init__(self, path: Path, markers: tuple[str, ...] = (), fixtures: tuple[str, ...] = ()):
        self.path = path
        self.markers = set(markers)
        self.fixturenames = list(fixtures)

    def get_closest_marker(self, name: str) -> str | None:
        return name if name in self.markers else None

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.markers.add(marker.name)


def marked_fast(item: Item) -> bool:
    pytest_collection_modifyitems(None, [item])  # type: ignore[arg-type, list-item]
    return "fast" in item.markers


def test_this_test_is_in_the_fast_tier(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("fast") is not None


@pytest.mark.system
def test_a_marked_test_is_not(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("fast") is None


def test_which_tests_are_fast() -> None:
    unit = TESTS / "unit" / "test_x.py"
    assert marked_fast(Item(unit))
    assert marked_fast(Item(unit, fixtures=("tmp_path", "capsys")))
    for marker in ("system", "slow", "postgres"):
        assert not marked_fast(Item(unit, markers=(marker,))), marker
    for fixture in ("db_url", "engine", "sessions", "pg_url"):
        assert not marked_fast(Item(unit, fixtures=("tmp_path", fixture))), fixture
    assert not marked_fast(Item(TESTS / "integration" / "test_x.py"))
    # An item from outside tests/ (a doctest of the package) is left alone, not an error.
    assert not marked_fast(Item(TESTS.parent / "dicomnode" / "node.py"))


def refused(what: str) -> AbstractContextManager[object]:
    return pytest.raises(NotFast, match=f"a fast test may not {what}")


def test_a_fast_test_may_not_open_a_socket() -> None:
    with socket.socket() as s:
        with refused("open a network connection"):
            s.connect(("127.0.0.1", 9))
        with refused("open a network connection"):
            s.connect_ex(("127.0.0.1", 9))
        with refused("listen on a socket"):
            s.bind(("127.0.0.1", 0))


def test_a_fast_test_may_not_start_a_child_process() -> None:
    with refused("start a child process"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with refused("fork"):
        if os.fork() == 0:  # only were the guard gone: the child leaves at once
            os._exit(0)
    # The listener's processes are started from a "spawn" context, which uses neither.
    with refused("start a child process"):
        multiprocessing.get_context("spawn").Process(target=print).start()


def test_a_fast_test_may_not_open_a_database() -> None:
    with refused("open a database"):
        sqlalchemy.create_engine("sqlite://")


@pytest.mark.system
def test_outside_the_fast_tier_nothing_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
    assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0
    sqlalchemy.create_engine("sqlite://").dispose()
