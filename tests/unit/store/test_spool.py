from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.store.spool import INCOMING, TMP, Spool


def test_write_is_complete_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    rel = spool.relative_path(INCOMING, "1.2", "1.2.3", "1.2.3.4")
    assert rel == Path("incoming/1.2/1.2.3/1.2.3.4.dcm")
    final = spool.write(rel, b"x" * 100_000)
    assert final.read_bytes() == b"x" * 100_000
    assert list((tmp_path / TMP).iterdir()) == []


def test_write_replaces_atomically(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    rel = spool.relative_path(INCOMING, "1", "2", "3")
    spool.write(rel, b"old")
    spool.write(rel, b"new")
    assert spool.absolute(rel).read_bytes() == b"new"


@pytest.mark.parametrize("bad", ["../x", "1/2", "", "1.2.a"])
def test_unsafe_uid_never_becomes_a_path(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(ValueError, match="unsafe UID"):
        spool.relative_path(INCOMING, "1.2", bad, "1.2.3")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    # A directory where the file should go makes the final rename fail.
    rel = spool.relative_path(INCOMING, "1", "2", "3")
    spool.absolute(rel).mkdir(parents=True)
    with pytest.raises(OSError):
        spool.write(rel, b"data")
    assert list((tmp_path / TMP).iterdir()) == []


def test_clean_tmp_removes_partial_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (tmp_path / TMP / "abc.part").write_bytes(b"half")
    assert spool.clean_tmp(older_than=3600) == 0  # may be another process's write
    assert spool.clean_tmp(older_than=-1) == 1
    assert list((tmp_path / TMP).iterdir()) == []
