"""The audit trail against a peer that tries AE title after AE title, and its retention.

Before, each new calling AE title from one address added an audit row (and a WARNING
line): anyone could grow the append-only table without bound. Rejections are now
counted per address, whatever the AE titles, in one entry a minute. The trail's one
way out is ``dicomnode audit prune``, run here as a process of its own, which deletes
only what an export holds and leaves an entry of its own.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode.db import audit
from tests.conftest import REPO, wait_for

TRIES = 40


def trail(sessions, *events: str) -> list[dict]:
    with sessions() as s:
        return list(audit.entries(s, events=events))


def test_many_ae_titles_from_one_address_are_one_entry_a_minute(make_listener, sessions) -> None:
    listener = make_listener(allowed_calling_aets=["CT01"])
    try:
        for i in range(TRIES):  # a scan: a new calling AE title every time
            ae = AE(ae_title=f"SCAN{i:04d}")
            ae.acse_timeout = ae.network_timeout = 10
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assert not ae.associate("127.0.0.1", listener.port, ae_title="DICOMNODE").is_established
        # A sender it lets in still gets in.
        ae = AE(ae_title="CT01")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="DICOMNODE")
        assert assoc.is_established
        assoc.release()
        assert wait_for(lambda: trail(sessions, "association-rejected") != [], 10)
    finally:
        listener.stop()  # writes what is still counted
    rows = trail(sessions, "association-rejected")
    # The first at once, the rest of its minute in one more entry: not one per AE title.
    assert [r["count"] for r in rows] == [1, TRIES - 1]
    assert {r["peer"] for r in rows} == {"127.0.0.1"}
    assert rows[0]["actor"] == "SCAN0000" and rows[1]["actor"] is None
    assert rows[1]["detail"].endswith(f"; and {TRIES - 1 - 8} more")
    assert "calling_ae='SCAN0001' called_ae='DICOMNODE' reason=calling_ae" in rows[1]["detail"]


def test_audit_prune_deletes_only_what_an_export_holds(
    tmp_path: Path, db_url: str, sessions
) -> None:
    from datetime import timedelta

    from dicomnode.db import transaction, utcnow

    now = utcnow()
    with transaction(sessions) as s:
        for days in (400, 390, 380, 10):
            audit.record(s, "admin", actor="someone", detail=f"{days} days ago",
                         at=now - timedelta(days=days))  # fmt: skip
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{db_url}"\n')

    def dicomnode(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode", "--config", str(config), "audit", *args],
            capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
        )  # fmt: skip

    cutoff = (now - timedelta(days=385)).isoformat()
    partial = tmp_path / "partial.csv"  # only one of the two entries before the cutoff
    until = (now - timedelta(days=395)).isoformat()
    assert dicomnode("export", "--until", until, "-o", str(partial)).returncode == 0
    refused = dicomnode("prune", "--before", cutoff, "--exported-to", str(partial))
    assert refused.returncode == 1 and "is not in the export" in refused.stderr
    assert len(trail(sessions, "admin")) == 4  # nothing went

    archive = tmp_path / "audit-year.csv"
    assert dicomnode("export", "--until", cutoff, "-o", str(archive)).returncode == 0
    done = dicomnode("prune", "--before", cutoff, "--exported-to", str(archive))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 2 audit entries before")
    assert [r["detail"] for r in trail(sessions, "admin")] == ["380 days ago", "10 days ago"]
    [pruned] = trail(sessions, "audit-pruned")
    assert pruned["count"] == 2 and str(archive) in pruned["detail"]
    assert pruned["actor"].startswith("admin ")
    with archive.open() as f:
        assert [r["detail"] for r in csv.DictReader(f)] == ["400 days ago", "390 days ago"]
