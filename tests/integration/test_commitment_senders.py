"""Storage Commitment reports over real associations: only the destination asked may answer.

A delivery whose commitment is awaited keeps its job, its results and its source
series. Before, any peer allowed to associate could send an N-EVENT-REPORT for a
known Transaction UID and mark the delivery committed, and `jobs purge --state done`
deleted the job of an awaited commitment: either way retention then deleted the
source series. Here the reports come from pynetdicom SCUs over loopback, and the
purge and the retention run are `dicomnode` processes of their own.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE, build_role
from sqlalchemy import select, update

from dicomnode.config import Destination
from dicomnode.db import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Output,
    Series,
    SeriesState,
    audit,
    jobs,
    transaction,
    utcnow,
)
from dicomnode.db import commitment as commitment_db
from dicomnode.listener import Listener
from dicomnode.pipeline import encode
from dicomnode.send import STORAGE_COMMITMENT_PUSH
from dicomnode.send.commitment import REFUSED_SENDER, STORAGE_COMMITMENT_INSTANCE, request_dataset
from dicomnode.store import Ingestor, Spool
from tests.conftest import REPO
from tests.factories import ct_series

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
T_PACS, T_ARCHIVE = "1.2.826.0.1.3680043.8.498.77.1", "1.2.826.0.1.3680043.8.498.77.2"
# "localhost" resolves to 127.0.0.1 and ::1 here: a name with several addresses.
PACS = Destination(name="pacs", ae_title="PACS", host="localhost", port=104)
ARCHIVE = Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.9", port=104)


@dataclass
class Site:
    listener: Listener
    sessions: object
    spool: Spool
    config: Path
    job_id: int
    series_uid: str
    output_uid: str


@pytest.fixture
def site(tmp_path: Path, db_url: str, sessions, make_listener) -> Site:
    """A done job, 40 days old, sent to 'pacs' and 'archive', both commitments awaited."""
    spool = Spool(tmp_path / "spool")
    datasets = ct_series(np.zeros((2, 8, 8)), patient_id="PHI-COMMIT-1")
    ingestor = Ingestor(spool, sessions)
    for ds in datasets:
        ingestor.store(encode(ds), calling_ae="CT01")
    series_uid = str(datasets[0].SeriesInstanceUID)
    long_ago = utcnow() - timedelta(days=40)
    with transaction(sessions) as s:
        series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        series.state = SeriesState.COMPLETE
        series.completed_at = series.last_received_at = long_ago
        job = jobs.enqueue(s, series, route="r", model="m", version="1", max_attempts=1)
        assert job is not None
        job.state, job.finished_at, job.updated_at = JobState.DONE, long_ago, long_ago
        result = spool.write(Path("results", "1.2", "1", "seg.dcm"), b"x" * 100)
        output_uid = "1.2.826.0.1.3680043.8.498.77.9"
        s.add(
            Output(
                job_id=job.id, kind="seg", sop_class_uid=SEG, sop_instance_uid=output_uid,
                series_uid="1.2.826.0.1.3680043.8.498.77", size_bytes=100,
                path=result.relative_to(spool.root).as_posix(),
            )
        )  # fmt: skip
        for name, uid in (("pacs", T_PACS), ("archive", T_ARCHIVE)):
            delivery = Delivery(
                job_id=job.id, destination=name, state=DeliveryState.SENT, attempts=1,
                sent_at=long_ago,
            )  # fmt: skip
            s.add(delivery)
            s.flush()
            commitment_db.request(s, delivery, uid)
        job_id = job.id
    config = tmp_path / "node.toml"
    config.write_text(
        f'[database]\nurl = "{db_url}"\n[storage]\npath = "{spool.root}"\n'
        + "".join(
            f'[[destinations]]\nname = "{d.name}"\nae_title = "{d.ae_title}"\n'
            f'host = "{d.host}"\nport = {d.port}\nstorage_commitment = true\n'
            for d in (PACS, ARCHIVE)
        )
    )
    listener = make_listener(destinations=[PACS, ARCHIVE])  # on the same spool
    assert listener.ingestor.spool.root == spool.root
    return Site(listener, sessions, spool, config, job_id, series_uid, output_uid)


def send_report(site: Site, calling_ae: str, transaction_uid: str) -> int:
    """Report every object committed, as a PACS does on an association of its own."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    assoc = ae.associate("127.0.0.1", site.listener.port, ae_title="DICOMNODE", ext_neg=[role])
    assert assoc.is_established
    try:
        info = request_dataset(transaction_uid, [(SEG, site.output_uid)])
        reply, _ = assoc.send_n_event_report(
            info, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        return int(reply.Status)
    finally:
        assoc.release()


def confirmed(site: Site) -> dict[str, bool]:
    with site.sessions() as s:  # type: ignore[operator]
        rows = s.scalars(select(Delivery).where(Delivery.job_id == site.job_id)).all()
        return {d.destination: d.confirmed_at is not None for d in rows}


def dicomnode(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "--config", str(site.config), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip


def test_only_the_destination_asked_confirms_and_awaited_jobs_survive_purges(
    site: Site,
) -> None:
    # Another AE title, from an address of the destination's host: refused.
    assert send_report(site, "INTRUDER", T_PACS) == REFUSED_SENDER
    # The archive's AE title, but not from the archive's address (127.0.0.9): refused.
    assert send_report(site, "ARCHIVE", T_ARCHIVE) == REFUSED_SENDER
    # The PACS itself, answering for the archive's transaction: refused.
    assert send_report(site, "PACS", T_ARCHIVE) == REFUSED_SENDER
    assert confirmed(site) == {"pacs": False, "archive": False}
    # The PACS for its own transaction, from a new source port, as PACS do: confirmed.
    assert send_report(site, "PACS", T_PACS) == 0
    assert confirmed(site) == {"pacs": True, "archive": False}

    with site.sessions() as s:  # type: ignore[operator]
        [entry] = list(audit.entries(s, events=("commitment-report-refused",)))
    assert (entry["peer"], entry["actor"], entry["count"]) == ("127.0.0.1", "INTRUDER", 1)
    assert "PHI-COMMIT-1" not in str(entry)

    # The archive's commitment is still awaited: no purge, of any state, takes the job.
    purged = dicomnode(site, "jobs", "purge", "--state", "done", "--older-than", "1d")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("purged 0 done job(s)")
    assert "kept 1 done job(s) whose storage commitment is still awaited" in purged.stdout
    with site.sessions() as s:  # type: ignore[operator]
        assert s.get(Job, site.job_id) is not None
    # ... and retention keeps the series and the results, however long ago it ended.
    kept = dicomnode(site, "purge")
    assert kept.returncode == 0, kept.stderr
    with site.sessions() as s:  # type: ignore[operator]
        series = s.scalars(select(Series).where(Series.series_uid == site.series_uid)).one()
        assert series.purged_at is None
    assert all(p.is_file() for p in site.spool.root.rglob("*.dcm"))

    # Once the archive confirms (here: by hand), both go as before: they were due.
    with transaction(site.sessions) as s:  # type: ignore[arg-type]
        s.execute(update(Delivery).values(confirmed_at=utcnow()))
    assert dicomnode(site, "purge").returncode == 0
    with site.sessions() as s:  # type: ignore[operator]
        series = s.scalars(select(Series).where(Series.series_uid == site.series_uid)).one()
        assert series.purged_at is not None
    purged = dicomnode(site, "jobs", "purge", "--state", "done", "--older-than", "1d")
    assert purged.returncode == 0 and purged.stdout.startswith("purged 1 done job(s)")
    assert "kept" not in purged.stdout
