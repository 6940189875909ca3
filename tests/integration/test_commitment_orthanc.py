"""Storage Commitment end to end with a real Orthanc.

Results are sent to Orthanc with ``storage_commitment = true``; Orthanc answers the
N-ACTION and later calls our listener back (it knows the node from its
"DicomModalities") with an N-EVENT-REPORT, which must confirm the delivery. A
commitment request naming an instance Orthanc never received must come back as a
failure that re-opens the delivery.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from dicomnode.cli.job_output import job_record
from dicomnode.config import ListenerSettings
from dicomnode.db import Delivery, DeliveryState, JobState, Output, queries, transaction
from dicomnode.db import commitment as commitment_db
from dicomnode.imaging import load_registry
from dicomnode.inference import ModelCache
from dicomnode.listener import Listener
from dicomnode.pipeline import Pipeline
from dicomnode.queue import Worker
from dicomnode.send import commitment
from dicomnode.store import Ingestor, Spool
from tests.conftest import free_port, wait_for
from tests.integration.orthanc import Orthanc
from tests.integration.test_pipeline import job_row, make_settings, receive_phantom

pytestmark = pytest.mark.skipif(shutil.which("Orthanc") is None, reason="needs Orthanc")


def the_delivery(sessions) -> Delivery:
    with sessions() as s:
        row = s.scalars(select(Delivery)).one()
        s.expunge(row)
        return row


def test_commitment_confirmed_by_orthanc_and_a_missing_instance_fails(
    tmp_path: Path, db_url: str, sessions, request: pytest.FixtureRequest
) -> None:
    port = free_port()  # Orthanc is told where to report before our listener starts
    modalities = {"dicomnode": ["DICOMNODE", "127.0.0.1", port]}
    with Orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        settings = make_settings(tmp_path, db_url, pacs.dicom_port)
        dest = dataclasses.replace(
            settings.destinations[0], ae_title=pacs.aet, storage_commitment=True
        )
        settings = dataclasses.replace(settings, destinations=[dest])
        # Receives Orthanc's reports, as `dicomnode serve` does: from this destination only.
        listener = Listener(
            ListenerSettings(ae_title="DICOMNODE", host="127.0.0.1", port=port),
            Ingestor(Spool(settings.storage.path), sessions),
            destinations=settings.destinations,
        )
        listener.start()
        request.addfinalizer(listener.stop)
        models = load_registry(settings.models.path)
        spool = Spool(settings.storage.path)
        pipeline = Pipeline(settings, sessions, spool, models, ModelCache(torch.device("cpu")))
        worker = Worker(sessions, pipeline, settings.worker, threading.Event())
        node = {"settings": settings, "models": models, "spool": spool, "sessions": sessions}
        receive_phantom(node)
        assert worker.run_once()
        job = job_row(sessions)
        assert job.state == JobState.DONE, job.last_error
        delivery = the_delivery(sessions)
        assert delivery.state == DeliveryState.SENT and delivery.commitment_uid
        assert wait_for(lambda: the_delivery(sessions).confirmed_at is not None, timeout=30), (
            tmp_path / "orthanc" / "orthanc.log"
        ).read_text()[-3000:]
        assert the_delivery(sessions).commitment_failed is None

        # Ask again for the same objects plus one Orthanc never got.
        with sessions() as s:
            refs = [(o.sop_class_uid, o.sop_instance_uid) for o in s.scalars(select(Output))]
        refs.append((refs[0][0], "1.2.826.0.1.3680043.8.498.1.999999"))
        uid = commitment.new_transaction_uid()
        with transaction(sessions) as s:
            commitment_db.request(s, s.scalars(select(Delivery)).one(), uid)
        commitment.request_commitment(dest, refs, uid, settings.listener.ae_title, sessions)
        assert wait_for(lambda: the_delivery(sessions).commitment_failed is not None, timeout=30)
        delivery = the_delivery(sessions)
        assert delivery.commitment_failed.startswith("1 object(s) not committed (reason 0x")
        assert delivery.state == DeliveryState.PENDING and delivery.confirmed_at is None
        assert job_row(sessions).state == JobState.QUEUED  # the objects are sent again
        assert worker.run_once()
        assert job_row(sessions).state == JobState.DONE
        assert wait_for(lambda: the_delivery(sessions).confirmed_at is not None, timeout=30)
        delivery = the_delivery(sessions)
        assert delivery.state == DeliveryState.SENT and delivery.commitment_failed is None
        with sessions() as s:
            record = job_record(queries.job_detail(s, job_row(sessions).id))
        assert record["deliveries"][0]["commitment"] == "confirmed"
