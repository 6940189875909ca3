from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from dicomnode.listener import chunked


def capped(tmp_path: Path, max_bytes: int, space_ok=lambda: True) -> chunked.CappedFile:
    inner = tempfile.NamedTemporaryFile(dir=tmp_path, delete=False)  # noqa: SIM115
    return chunked.CappedFile(inner, chunked._Limits(max_bytes, space_ok))


def test_stops_one_byte_past_the_size_limit(tmp_path: Path) -> None:
    f = capped(tmp_path, max_bytes=10_000)
    for _ in range(50):
        assert f.write(b"x" * 1000) == 1000  # pynetdicom is never told about the limit
    f.close()
    assert f.stopped
    assert Path(f.name).stat().st_size == 10_001  # enough for the handler to say "too big"


def test_stops_when_the_disk_runs_low(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "SPACE_CHECK_BYTES", 4096)
    space = iter([True, False])
    f = capped(tmp_path, max_bytes=0, space_ok=lambda: next(space))
    for _ in range(20):
        f.write(b"x" * 1024)
    f.close()
    assert f.stopped
    assert Path(f.name).stat().st_size == 8 * 1024  # the second check said no


def test_no_limits_writes_everything(tmp_path: Path) -> None:
    f = capped(tmp_path, max_bytes=0)
    for _ in range(10):
        f.write(b"y" * 100_000)
    f.close()
    assert not f.stopped and Path(f.name).stat().st_size == 1_000_000
