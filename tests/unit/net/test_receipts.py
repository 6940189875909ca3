"""The listener's audit tallies: per series per association, late stores, bounded rejections."""

from __future__ import annotations

import pytest

from dicomnode.db import audit
from dicomnode.net import receipts
from dicomnode.net.receipts import Receipts
from dicomnode.store.ingest import StoreOutcome


class Assoc:
    """Stands in for a pynetdicom Association: only its identity is used."""


def stored(series: str, size: int = 100, **flags: bool) -> StoreOutcome:
    return StoreOutcome("1.2.9", series, "p", study_uid="1.2.1", size_bytes=size, **flags)


def trail(sessions, event: str) -> list[dict]:
    with sessions() as s:
        return list(audit.entries(s, events=(event,)))


def test_one_entry_per_series_and_a_late_store_gets_its_own(sessions) -> None:
    r = Receipts(sessions)
    a, b = Assoc(), Assoc()
    r.stored(a, "CT01", "10.0.0.1", stored("1.2.1.1"))
    r.stored(a, "CT01", "10.0.0.1", stored("1.2.1.1", duplicate=True))
    r.stored(b, "CT02", "10.0.0.2", stored("1.2.1.2"))  # another association, same time
    r.closed(a)
    r.stored(a, "CT01", "10.0.0.1", stored("1.2.1.1", size=7))  # finished after the close
    r.closed(b)
    rows = [(e["actor"], e["series_uid"], e["count"], e["size_bytes"], e["detail"])
            for e in trail(sessions, "instances-received")]  # fmt: skip
    assert rows == [
        ("CT01", "1.2.1.1", 2, 200, "1 identical resend(s)"),
        ("CT01", "1.2.1.1", 1, 7, None),
        ("CT02", "1.2.1.2", 1, 100, None),
    ]
    assert len(r._open) == 0  # nothing left behind


def test_a_peer_rejected_in_a_loop_is_one_entry_a_minute(
    sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(receipts.time, "monotonic", lambda: clock[0])
    r = Receipts(sessions)
    for _ in range(50):  # a modality retrying every second
        r.rejected("CT9", "WRONG", "10.0.0.9", "called_ae")
        clock[0] += 1
    r.rejected("MR1", "WRONG", "10.0.0.8", "called_ae")  # 50 s later: another peer
    clock[0] += 30  # past the first peer's minute
    r.rejected("MR1", "WRONG", "10.0.0.8", "called_ae")  # within MR1's minute: counted
    r.rejected("US1", "WRONG", "10.0.0.7", "called_ae")
    r.flush()
    rows = [(e["actor"], e["count"]) for e in trail(sessions, "association-rejected")]
    assert rows == [("CT9", 1), ("MR1", 1), ("US1", 1), ("CT9", 49), ("MR1", 1)]
    assert "49 more within a minute" in trail(sessions, "association-rejected")[3]["detail"]
