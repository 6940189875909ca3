"""A job re-sent after a delivery failure: its attempts and its run times, as the CLI shows them.

``jobs list`` said 0/5 (or 1/5) where the history said attempt 1 (or 2): an attempt
that only re-sent stored results is given back after its history entry was written.
``studies show`` replaced the run's start with the re-send's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from dicomnode.db import Delivery, Job, Output, transaction, utcnow
from dicomnode.db import jobs as queue
from tests.factories import add_series
from tests.unit.cli.test_main import run, write_config

RETRY = queue.DeliveryRetry(give_up_seconds=3600, max_delay_seconds=60)
ERROR = "destination pacs: cannot connect to 127.0.0.1:4242"


def _resent_job(sessions) -> tuple[int, list]:
    """Run a job (outputs made, the PACS down), then re-send it once, still down, then ok."""
    with transaction(sessions) as s:
        job = queue.enqueue(s, add_series(s), route="r", model="m", version="1", max_attempts=5)
        assert job is not None
        job_id = job.id
    claims = []
    claim = queue.claim(sessions, "worker-1", 60)
    assert claim is not None
    claims.append(claim)
    with transaction(sessions) as s:
        s.add(Output(job_id=job_id, kind="SEG", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                     sop_instance_uid="1.2.3.9", series_uid="1.2.3.9.1", path="out/seg.dcm",
                     size_bytes=10, created_at=utcnow()))  # fmt: skip
        s.add(Delivery(job_id=job_id, destination="pacs", attempts=1, last_error=ERROR))
    assert queue.fail(sessions, claim, ERROR, retryable=True, base_seconds=1, delivery=RETRY)
    for _ in range(2):  # two re-sends: the first fails again, the second is not ended yet
        time.sleep(0.02)  # the outputs are older than this claim: it only re-sends
        with transaction(sessions) as s:
            s.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow()))
        claim = queue.claim(sessions, "worker-2", 60)
        assert claim is not None and claim.job_id == job_id
        claims.append(claim)
        if len(claims) == 2:
            queue.fail(sessions, claim, ERROR, retryable=True, base_seconds=0.01, delivery=RETRY)
    return job_id, claims


def test_the_attempts_shown_agree_with_the_history(
    tmp_path: Path, db_url: str, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id, _ = _resent_job(sessions)
    with sessions() as s:
        counted = s.get(Job, job_id).attempts
    config = str(write_config(tmp_path, db_url))
    _, out, _ = run(capsys, "--config", config, "jobs", "list", "--json")
    [listed] = json.loads(out)
    assert listed["attempts"] == counted == 2  # the run, and the re-send under way
    _, out, _ = run(capsys, "--config", config, "jobs", "show", str(job_id), "--json")
    history = json.loads(out)["history"]
    # Every entry that counts names an attempt within the count the list shows; the
    # failed re-send's entries say they did not count.
    assert all(e["attempt"] <= counted for e in history if e["counted"])
    given_back = [e for e in history if not e["counted"]]
    assert [(e["to"], e["attempt"]) for e in given_back] == [("running", 2), ("queued", 2)]
    _, out, _ = run(capsys, "--config", config, "jobs", "show", str(job_id))
    lines = [ln for ln in out.splitlines() if "attempt 2" in ln]
    assert len(lines) == 3
    assert [("(not counted)" in ln) for ln in lines] == [True, True, False]
    assert "attempts      2/5" in out


def test_studies_show_keeps_the_run_times_and_shows_the_resend(
    tmp_path: Path, db_url: str, sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id, _ = _resent_job(sessions)
    with sessions() as s:
        job = s.get(Job, job_id)
        claimed = [e.at for e in job.events if e.to_state == "running"]
        assert job.started_at == claimed[-1]  # the claim moved it to the re-send
    config = str(write_config(tmp_path, db_url))
    _, out, _ = run(capsys, "--config", config, "studies", "show", "1.2.3", "--json")
    [record] = json.loads(out)["jobs"]
    assert record["id"] == job_id
    assert record["started_at"] == claimed[0].isoformat()  # the run's own start
    assert record["resent_at"] == claimed[-1].isoformat()
    _, out, _ = run(capsys, "--config", config, "studies", "show", "1.2.3")
    header = next(ln for ln in out.splitlines() if ln.startswith("ID "))
    assert "STARTED" in header and "RE-SENT" in header
    row = next(ln for ln in out.splitlines() if ln.startswith(f"{job_id} "))
    started = claimed[0].strftime("%Y-%m-%d %H:%M:%S")
    resent = claimed[-1].strftime("%Y-%m-%d %H:%M:%S")
    at = header.index("STARTED"), header.index("RE-SENT")
    assert (row[at[0] : at[0] + 19], row[at[1] : at[1] + 19]) == (started, resent)
    _, out, _ = run(capsys, "--config", config, "jobs", "show", str(job_id))
    assert f"started_at    {started}" in out and f"resent_at     {resent}" in out
