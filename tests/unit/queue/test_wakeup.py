"""Announcements cross processes: PostgreSQL NOTIFY, and datagrams on one SQLite host."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dicomnode.queue import Announcer, Doorbell, WakeListener

ANNOUNCE = """
import sys
from pathlib import Path
from dicomnode.db.engine import make_engine
from dicomnode.queue.wakeup import Announcer
engine = make_engine(sys.argv[1])
Announcer(engine, Path(sys.argv[2])).announce()
"""


def announce_from_another_process(url: str, spool: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", ANNOUNCE, url, str(spool)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "could not announce" not in done.stderr


def test_an_announcement_from_another_process_rings_the_bell(engine, tmp_path: Path) -> None:
    bell, stop = Doorbell(), threading.Event()
    listener = WakeListener(engine, tmp_path, bell, stop)
    listener.start()
    try:
        assert listener.ready.wait(10)
        for _ in range(3):  # repeatedly: the listener keeps listening after a ring
            seen = bell.rings
            announce_from_another_process(
                engine.url.render_as_string(hide_password=False), tmp_path
            )
            assert bell.wait(seen, timeout=5)
    finally:
        stop.set()
        listener.join(5)
    assert not listener.is_alive()
    # A stopped listener takes its registration with it (SQLite).
    assert not list((tmp_path / "run" / "wake").glob("dicomnode-wake-*"))


def test_silence_does_not_ring(engine, tmp_path: Path) -> None:
    bell, stop = Doorbell(), threading.Event()
    listener = WakeListener(engine, tmp_path, bell, stop)
    listener.start()
    try:
        assert listener.ready.wait(10)
        assert not bell.wait(bell.rings, timeout=1.5)
    finally:
        stop.set()
        listener.join(5)


@pytest.mark.system
def test_a_dead_processs_registration_is_removed(tmp_path: Path) -> None:
    from dicomnode.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    registry = tmp_path / "run" / "wake"
    registry.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = f"dicomnode-wake-{gone.stdout.strip()}-dead"
    # Alive but unreachable (another network namespace, say): must be kept.
    unreachable = f"dicomnode-wake-{os.getpid()}-elsewhere"
    for name in (dead, unreachable):
        (registry / name).write_text(name)
    announcer = Announcer(engine, tmp_path)
    started = time.monotonic()
    announcer.announce()
    announcer.close()
    assert time.monotonic() - started < 1
    assert not (registry / dead).exists()
    assert (registry / unreachable).exists()


def test_doorbell_announce_rings_here_and_calls_remote() -> None:
    calls: list[int] = []
    bell = Doorbell(remote=lambda: calls.append(1))
    seen = bell.rings
    bell.announce()
    assert bell.rings == seen + 1 and calls == [1]
    bell.ring()  # a plain ring stays in this process
    assert calls == [1]
