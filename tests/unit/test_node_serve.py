"""Running a node until it is told to stop: start, the "serving:" line, stop, signals."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from dicomnode import node as node_module
from dicomnode.config import parse_settings
from dicomnode.node import Node, serve_until_signal


class FakeNode:
    """What :meth:`Node.run_until` uses of a node, recording its calls."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.settings = parse_settings({}, environ={})
        self.listener = SimpleNamespace(port=11112)
        self.workers = [object()]
        self.models = {"b": None, "a": None}
        self.calls: list[str] = []
        self.fail = fail

    def start(self) -> None:
        self.calls.append("start")
        if self.fail is not None:
            raise self.fail

    def stop(self) -> None:
        self.calls.append("stop")

    def run_until(self, stop: threading.Event) -> None:
        Node.run_until(self, stop)  # type: ignore[arg-type]


def test_run_until_serves_until_the_event_then_stops(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNode()
    stop = threading.Event()
    stop.set()
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        fake.run_until(stop)
    assert fake.calls == ["start", "stop"]
    (line,) = [r for r in caplog.records if "serving:" in r.getMessage()]
    assert line.name == "dicomnode"  # the documented logger name
    assert line.getMessage().endswith(
        f" serving: listener={fake.settings.listener.ae_title}@11112 workers=1 models=a,b"
    )


def test_a_node_that_fails_to_start_stops_what_did_start() -> None:
    fake = FakeNode(fail=OSError("port in use"))
    with pytest.raises(OSError, match="port in use"):
        fake.run_until(threading.Event())
    assert fake.calls == ["start", "stop"]


def test_sigterm_stops_the_node_and_the_handlers_are_restored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: dict[str, Any] = {}

    class Signalled(FakeNode):
        def run_until(self, stop: threading.Event) -> None:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            seen["stopped"] = stop.wait(5)

    def from_settings(settings: Any, *, listen: bool, work: bool) -> Signalled:
        seen["roles"] = (listen, work)
        return Signalled()

    monkeypatch.setattr(node_module.Node, "from_settings", from_settings)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        serve_until_signal(parse_settings({}, environ={}), listen=False, work=True)
    assert seen["roles"] == (False, True)
    assert seen["stopped"] is True
    assert seen["handler"] is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before
    assert "received SIGTERM, shutting down" in caplog.text


def test_sigusr1_writes_every_threads_stack(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    class Dumped(FakeNode):
        def run_until(self, stop: threading.Event) -> None:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)  # the dump is written by the signal's C handler, at once

    monkeypatch.setattr(node_module.Node, "from_settings", lambda *a, **k: Dumped())
    serve_until_signal(parse_settings({}, environ={}), listen=False, work=True)
    err = capfd.readouterr().err
    assert "Current thread" in err and "run_until" in err
    # Unregistered afterwards: a later SIGUSR1 is not ours to answer.
    assert faulthandler.unregister(signal.SIGUSR1) is False
