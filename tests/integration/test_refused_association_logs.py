"""A PACS that is down: one WARNING of ours per failed try, no pynetdicom ERROR lines.

A real association attempt to a closed port on 127.0.0.1 (connection refused).
"""

from __future__ import annotations

import logging

import pytest
from pynetdicom import AE

from dicomnode.config import Destination
from dicomnode.errors import TransientJobError
from dicomnode.send.scu import associate
from tests.conftest import free_port

VERIFICATION = "1.2.840.10008.1.1"


def _refused(port: int) -> str:
    ae = AE(ae_title="DICOMNODE")
    ae.add_requested_context(VERIFICATION)
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port,
                              timeout_seconds=3)  # fmt: skip
    with pytest.raises(TransientJobError) as info:
        associate(ae, destination)
    return str(info.value)


def test_a_refused_association_logs_no_pynetdicom_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    # at_level restores both levels: a level left set would leak into later tests.
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="dicomnode"):
        error = _refused(port)
        _refused(port)  # a retry: the same again
    assert error == f"destination pacs: cannot connect to 127.0.0.1:{port}"
    pynetdicom = [r for r in caplog.records if r.name.startswith("pynetdicom")]
    assert [r for r in pynetdicom if r.levelno >= logging.ERROR] == [], [
        r.getMessage() for r in pynetdicom
    ]


def test_at_debug_they_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="dicomnode"):
        _refused(free_port())
    messages = [r.getMessage() for r in caplog.records if r.name == "pynetdicom.transport"]
    assert any(m.startswith("TCP Initialisation Error") for m in messages), messages
