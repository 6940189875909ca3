from __future__ import annotations

import pynetdicom
import pytest

from dicomnode.config import ListenerSettings
from dicomnode.errors import ConfigError
from dicomnode.net import compat
from dicomnode.net.scp import Listener
from tests.conftest import free_port


def test_the_installed_pynetdicom_is_the_tested_one() -> None:
    assert compat.problems() == []


def test_another_pynetdicom_is_named_and_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path, sessions
) -> None:
    from dicomnode.store.ingest import Ingestor
    from dicomnode.store.spool import Spool

    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    settings = ListenerSettings(host="127.0.0.1", port=free_port())
    listener = Listener(settings, Ingestor(Spool(tmp_path), sessions))
    with pytest.raises(ConfigError, match=r"version 3\.1\.0 \(tested: 3\.0\.x\).*<3\.1"):
        listener.start()


def test_a_missing_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynetdicom.fsm

    monkeypatch.delattr(pynetdicom.fsm, "AE_6")
    assert compat.problems() == ["no fsm.AE_6"]
