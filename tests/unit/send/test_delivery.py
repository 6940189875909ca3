"""A job's deliveries without the network: the Delivery rows, the trail, what is raised.

The C-STOREs are replaced here; delivering to real peers (a PACS that is down, TLS,
storage commitment) is tested through the pipeline in tests/integration/test_delivery.py
and tests/integration/test_commitment_orthanc.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicomnode.config import Destination, Settings, parse_settings
from dicomnode.db import Claim, Delivery, DeliveryState, Job, JobState, transaction
from dicomnode.db.models import AuditEvent
from dicomnode.errors import DeliveryFailed, PermanentJobError, TransientJobError
from dicomnode.send import deliver, delivery
from tests.factories import add_series

FILES = [Path("/spool/results/1.dcm"), Path("/spool/results/2.dcm")]


def settings_for(tmp_path: Path, db_url: str) -> Settings:
    return parse_settings(
        {
            "database": {"url": db_url},
            "storage": {"path": str(tmp_path / "spool")},
            "destinations": [
                {"name": name, "ae_title": name.upper(), "host": "127.0.0.1", "port": 104}
                for name in ("a", "b")
            ],
        }
    )


@pytest.fixture
def claim(sessions: Any) -> Claim:
    with transaction(sessions) as s:
        series = add_series(s)
        job = Job(
            series_id=series.id, route="r", model="m", model_version="1",
            idempotency_key="k", state=JobState.SENDING, attempts=1,
        )  # fmt: skip
        s.add(job)
        s.flush()
        return Claim(job_id=job.id, owner="worker-1", attempt=1)


def run(settings: Settings, sessions: Any, claim: Claim, checked: list[str]) -> None:
    deliver(
        settings,
        sessions,
        claim,
        ["a", "b"],
        FILES,
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        checkpoint=lambda: checked.append("checked"),
    )


def test_each_destination_has_its_delivery_and_its_trail(
    tmp_path: Path, sessions: Any, db_url: str, claim: Claim, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []

    def send_files(destination: Destination, paths: list[Path], calling_ae: str) -> list[int]:
        sent.append(destination.name)
        assert (list(paths), calling_ae) == (FILES, "DICOMNODE")
        if destination.name == "b":
            raise TransientJobError("destination b: cannot connect to 127.0.0.1:104")
        return [0, 0xB000]

    monkeypatch.setattr(delivery.scu, "send_files", send_files)
    settings, checked = settings_for(tmp_path, db_url), []
    with pytest.raises(DeliveryFailed, match=r"^destination b: cannot connect"):
        run(settings, sessions, claim, checked)
    assert sent == ["a", "b"] and checked == ["checked"] * 2

    with sessions() as s:
        rows = {d.destination: d for d in s.scalars(select(Delivery))}
        assert rows["a"].state == DeliveryState.SENT and rows["a"].attempts == 1
        assert rows["a"].warning == "1 object(s) stored with warning 0xB000"
        assert rows["b"].state == DeliveryState.PENDING
        assert rows["b"].last_error == "destination b: cannot connect to 127.0.0.1:104"
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.event == "results-sent").order_by(AuditEvent.id)
        ).all()
        assert [(e.destination, e.outcome, e.detail) for e in events] == [
            ("a", "warning", "1 object(s) stored with warning 0xB000"),
            ("b", "failure", "destination b: cannot connect to 127.0.0.1:104"),
        ]
        who = {(e.actor, e.peer, e.job_id, e.count, e.study_uid, e.series_uid) for e in events}
        assert who == {
            ("worker-1", "A@127.0.0.1:104", claim.job_id, 2, "1.2.3", "1.2.3.4"),
            ("worker-1", "B@127.0.0.1:104", claim.job_id, 2, "1.2.3", "1.2.3.4"),
        }

    # The retry sends to b only: a was delivered.
    sent.clear()
    with pytest.raises(DeliveryFailed):
        run(settings, sessions, claim, checked)
    assert sent == ["b"]
    with sessions() as s:
        rows = {d.destination: d for d in s.scalars(select(Delivery))}
        assert (rows["a"].attempts, rows["b"].attempts) == (1, 2)


def test_only_permanent_failures_fail_the_job_for_good(
    tmp_path: Path, sessions: Any, db_url: str, claim: Claim, monkeypatch: pytest.MonkeyPatch
) -> None:
    def send_files(destination: Destination, *args: object) -> list[int]:
        raise PermanentJobError(f"destination {destination.name}: C-STORE failed")

    monkeypatch.setattr(delivery.scu, "send_files", send_files)
    with pytest.raises(PermanentJobError) as info:
        run(settings_for(tmp_path, db_url), sessions, claim, [])
    assert str(info.value) == "destination a: C-STORE failed; destination b: C-STORE failed"
    with sessions() as s:
        assert {d.state for d in s.scalars(select(Delivery))} == {DeliveryState.FAILED}
