"""Routes checked against the installed model packages at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import parse_settings
from dicomnode.errors import ConfigError
from dicomnode.imaging import load_registry
from dicomnode.node import check_routes
from tests.unit.inference.packages import build_classification_package, build_package


def test_requires_model_must_be_a_segmentation_model(tmp_path: Path) -> None:
    build_package(tmp_path, "test-lungs")
    build_classification_package(tmp_path, "test-classes")
    models = load_registry(tmp_path)
    settings = parse_settings(
        {
            "routes": [
                {"name": "classes", "match": {}, "models": ["test-classes"]},
                {"name": "lungs", "match": {}, "models": ["test-lungs"],
                 "requires": {"model": "test-classes"}},
            ]
        },
        environ={},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"routes\[1\].requires.model: 'test-classes' is a "):
        check_routes(settings, models)


@pytest.mark.system
def test_a_second_port_lock_is_refused_naming_the_holder_by_its_pid() -> None:
    import os
    import re
    import socket

    from dicomnode.errors import NodeAlreadyRunning
    from dicomnode.node import PortLock, holder_line
    from tests.conftest import free_port

    port = free_port()
    held = PortLock(port, holder_line())
    try:
        # Many refusals in a row (a unit restarting every few seconds) each still learn
        # who holds the port: the holder answers and closes every probe.
        for _ in range(40):
            with pytest.raises(NodeAlreadyRunning) as info:
                PortLock(port, "pid 1 on host elsewhere, started never")
            assert re.fullmatch(
                rf"listener port {port} is in use by another dicomnode on this host "
                rf"\(pid {os.getpid()} on host {re.escape(socket.gethostname())}, "
                r"started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\); one node per port",
                str(info.value),
            ), str(info.value)
    finally:
        held.release()
    held.release()  # twice is harmless
    PortLock(port, holder_line()).release()  # free again once released
