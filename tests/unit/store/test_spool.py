from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.store import Spool
from dicomnode.store.spool import INCOMING, TMP


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


@pytest.mark.system
def test_a_second_listener_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    import subprocess

    from dicomnode.errors import NodeAlreadyRunning
    from dicomnode.store import ListenerLock
    from dicomnode.store.spool import LISTENER_LOCK

    held = ListenerLock(tmp_path, "pid 1 on host h, started 2024-01-01T00:00:00Z")
    # flock locks belong to the open file: a second open conflicts even in one process.
    with pytest.raises(NodeAlreadyRunning) as info:
        ListenerLock(tmp_path, "pid 2 on host h, started 2024-01-02T00:00:00Z")
    assert str(info.value) == (
        f"storage.path {tmp_path} is in use by another listening dicomnode "
        "(pid 1 on host h, started 2024-01-01T00:00:00Z); one listening node per spool"
    )
    # A child process (which inherits whatever descriptors are inheritable) must not
    # keep the lock once its parent lets go of it.
    child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        held.release()
        held.release()  # twice is harmless
        again = ListenerLock(tmp_path, "pid 3 on host h, started 2024-01-03T00:00:00Z")
    finally:
        child.kill()
        child.wait()
    again.release()
    assert (tmp_path / LISTENER_LOCK).read_text().startswith("pid 3 ")  # never removed
