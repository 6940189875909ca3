"""The listener's audit tallies: per series per association, late stores, bounded rejections."""

from __future__ import annotations

import pytest

from dicomnode.db import audit
from dicomnode.dimse import Receipts
from dicomnode.dimse import audit_trail as receipts
from dicomnode.store import StoreOutcome


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
    told = []
    for _ in range(50):  # a modality retrying every second
        told.append(r.rejected("CT9", "WRONG", "10.0.0.9", "called_ae"))
        clock[0] += 1
    assert told == [True] + [False] * 49  # the caller logs the first line only
    assert r.rejected("MR1", "WRONG", "10.0.0.8", "called_ae")  # 50 s later: another peer
    clock[0] += 30  # past the first peer's minute
    assert not r.rejected("MR1", "WRONG", "10.0.0.8", "called_ae")  # within MR1's minute
    assert r.rejected("US1", "WRONG", "10.0.0.7", "called_ae")
    r.flush()
    rows = [(e["actor"], e["peer"], e["count"]) for e in trail(sessions, "association-rejected")]
    assert rows == [
        ("CT9", "10.0.0.9", 1),
        ("MR1", "10.0.0.8", 1),
        ("CT9", "10.0.0.9", 49),  # written once its minute had passed (at MR1's next try)
        ("US1", "10.0.0.7", 1),
        ("MR1", "10.0.0.8", 1),  # written at the stop
    ]
    assert trail(sessions, "association-rejected")[2]["detail"] == (
        "calling_ae='CT9' called_ae='WRONG' reason=called_ae (x49)"
    )


def test_a_scan_that_stopped_is_written_when_its_minute_passes(
    sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(receipts.time, "monotonic", lambda: clock[0])
    r = Receipts(sessions)
    for _ in range(30):  # then nothing more from anyone
        r.rejected("SCAN", "DICOMNODE", "10.0.0.5", "calling_ae")
        clock[0] += 1
    r.write_due()
    assert [e["count"] for e in trail(sessions, "association-rejected")] == [1]  # not yet
    clock[0] += 31
    r.write_due()  # the listener calls it while no refusal comes; no stop needed
    assert [e["count"] for e in trail(sessions, "association-rejected")] == [1, 29]


def test_every_ae_title_from_one_address_shares_its_minute(
    sessions, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(receipts.time, "monotonic", lambda: clock[0])
    r = Receipts(sessions)
    with caplog.at_level("WARNING", logger="dicomnode.dimse.audit_trail"):
        for minute in range(3):
            for i in range(200):  # a new AE title every time, as a scan would try
                r.rejected(f"AE{minute}-{i}", "DICOMNODE", "10.6.6.6", "calling_ae")
                clock[0] += 0.25
            clock[0] += 10  # 60 s per minute in all
        r.flush()
    rows = trail(sessions, "association-rejected")
    # At most one entry a minute: the first at once, then one per minute with its count.
    assert [e["count"] for e in rows] == [1, 199, 200, 200]
    assert sum(e["count"] for e in rows) == 600
    assert {e["peer"] for e in rows} == {"10.6.6.6"}
    assert rows[0]["actor"] == "AE0-0" and all(e["actor"] is None for e in rows[1:])
    assert all(len(e["detail"]) < 700 for e in rows)  # eight AE titles named, the rest counted
    assert rows[2]["detail"].endswith("; and 192 more")
    # The first line is the caller's; this module logs one per later entry.
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 3


def test_peer_strings_are_escaped_in_the_trail(sessions) -> None:
    r = Receipts(sessions)
    r.rejected("EVIL\n2026-01-01 INFO forged", "X\x1b[2J", "10.0.0.5", "called_ae")
    [entry] = trail(sessions, "association-rejected")
    assert entry["actor"] == "EVIL\\n2026-01-01 INFO forged"
    assert entry["detail"] == (
        "calling_ae='EVIL\\n2026-01-01 INFO forged' called_ae='X\\x1b[2J' reason=called_ae"
    )


def test_a_scan_from_many_addresses_costs_bounded_memory(
    sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(receipts, "MAX_ADDRESSES", 4)
    r = Receipts(sessions)
    for i in range(10):
        r.rejected("SCAN", "DICOMNODE", f"10.1.0.{i}", "calling_ae")
    assert len(r._rejections._windows) == 5  # four addresses and the shared rest
    r.flush()
    rows = [(e["peer"], e["count"]) for e in trail(sessions, "association-rejected")]
    assert rows[:5] == [(f"10.1.0.{i}", 1) for i in range(4)] + [("(other addresses)", 1)]
    assert rows[5:] == [("(other addresses)", 5)]
