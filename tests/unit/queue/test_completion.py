from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicomnode.config import parse_settings
from dicomnode.db import URGENT, Job, JobState, Series, SeriesState, jobs, utcnow
from dicomnode.imaging import load_registry
from dicomnode.pipeline import encode
from dicomnode.queue.completion import NotYetDue, sweep
from dicomnode.store import Ingestor, Spool
from tests.factories import ct_series

SETTINGS = parse_settings(
    {
        "completion": {"quiet_seconds": 30},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "routes": [
            {
                "name": "lungs",
                "match": {"Modality": "CT"},
                "models": ["lung-unet2d"],
                "send_to": ["pacs"],
            },
            {
                "name": "brain",
                "match": {"Modality": "MR"},
                "models": ["lung-unet2d"],
                "send_to": ["pacs"],
            },
        ],
    },
    environ={},
)
MODELS = load_registry(None)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def receive(spool: Spool, sessions, datasets: list[Dataset]) -> None:
    ingestor = Ingestor(spool, sessions)
    for ds in datasets:
        ingestor.store(encode(ds))


def test_series_completes_after_quiet_period_and_queues_jobs(spool: Spool, sessions) -> None:
    ct = ct_series(np.zeros((3, 8, 8), np.float32))
    mr = ct_series(np.zeros((2, 8, 8), np.float32), modality="MR")
    receive(spool, sessions, ct + mr)

    assert sweep(sessions, SETTINGS, MODELS, spool) == 0  # still inside the quiet period
    later = utcnow() + timedelta(seconds=31)
    assert sweep(sessions, SETTINGS, MODELS, spool, now=later) == 2
    with sessions() as s:
        assert {x.state for x in s.scalars(select(Series))} == {SeriesState.COMPLETE}
        jobs = s.scalars(select(Job)).all()
        routes = sorted(j.route for j in jobs)
        assert routes == ["brain", "lungs"]
        assert all(j.state == JobState.QUEUED and j.model == "lung-unet2d" for j in jobs)
        assert all(j.model_version == MODELS["lung-unet2d"].version for j in jobs)
    # A second sweep finds nothing more to do.
    assert sweep(sessions, SETTINGS, MODELS, spool, now=later) == 0


def test_unmatched_series_completes_without_jobs(spool: Spool, sessions) -> None:
    receive(spool, sessions, ct_series(np.zeros((2, 8, 8), np.float32), modality="PT"))
    assert sweep(sessions, SETTINGS, MODELS, spool, now=utcnow() + timedelta(seconds=31)) == 1
    with sessions() as s:
        assert s.scalars(select(Job)).all() == []


def test_late_instance_reopens_and_queues_a_new_job(spool: Spool, sessions) -> None:
    series = ct_series(np.zeros((4, 8, 8), np.float32))
    receive(spool, sessions, series[:3])
    sweep(sessions, SETTINGS, MODELS, spool, now=utcnow() + timedelta(seconds=31))
    receive(spool, sessions, series[3:])
    with sessions() as s:
        reopened = s.scalars(select(Series)).one()
        assert reopened.state == SeriesState.RECEIVING and reopened.generation == 1
    sweep(sessions, SETTINGS, MODELS, spool, now=utcnow() + timedelta(seconds=31))
    with sessions() as s:
        keys = sorted(j.idempotency_key for j in s.scalars(select(Job)))
        assert len(keys) == 2 and keys[0] != keys[1]
        assert s.scalars(select(Series)).one().instance_count == 4


def test_two_routes_with_one_model_each_get_a_job(spool: Spool, sessions) -> None:
    settings = parse_settings(
        {
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
                {"name": "research", "ae_title": "RES", "host": "127.0.0.1", "port": 4243},
            ],
            "routes": [
                {"name": "clinical", "match": {"Modality": "CT"}, "models": ["lung-unet2d"],
                 "send_to": ["pacs"]},
                {"name": "study", "match": {"Modality": "CT"}, "models": ["lung-unet2d"],
                 "send_to": ["research"]},
            ],
        },
        environ={},
    )  # fmt: skip
    receive(spool, sessions, ct_series(np.zeros((2, 8, 8), np.float32)))
    sweep(sessions, settings, MODELS, spool, now=utcnow() + timedelta(seconds=31))
    with sessions() as s:
        assert sorted(j.route for j in s.scalars(select(Job))) == ["clinical", "study"]


def test_urgent_route_queues_urgent_jobs(spool: Spool, sessions) -> None:
    settings = parse_settings(
        {
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                              "port": 4242}],
            "routes": [
                {"name": "trauma", "match": {"Modality": "CT"}, "models": ["lung-unet2d"],
                 "send_to": ["pacs"], "priority": "urgent"},
                {"name": "routine", "match": {"Modality": "MR"}, "models": ["lung-unet2d"],
                 "send_to": ["pacs"]},
            ],
        },
        environ={},
    )  # fmt: skip
    ct = ct_series(np.zeros((2, 8, 8), np.float32))
    mr = ct_series(np.zeros((2, 8, 8), np.float32), modality="MR")
    receive(spool, sessions, mr + ct)
    sweep(sessions, settings, MODELS, spool, now=utcnow() + timedelta(seconds=31))
    with sessions() as s:
        priorities = {j.route: j.priority for j in s.scalars(select(Job))}
    assert priorities == {"trauma": URGENT, "routine": 0}
    # The CT arrived last but its job is claimed first.
    claim = jobs.claim(sessions, "w1", 60)
    assert claim is not None
    with sessions() as s:
        assert s.get(Job, claim.job_id).route == "trauma"


def test_late_instance_cancels_the_queued_job_of_the_old_generation(spool: Spool, sessions) -> None:
    series = ct_series(np.zeros((4, 8, 8), np.float32))
    receive(spool, sessions, series[:3])
    sweep(sessions, SETTINGS, MODELS, spool, now=utcnow() + timedelta(seconds=31))
    receive(spool, sessions, series[3:])  # before the first job ran
    with sessions() as s:
        old = s.scalars(select(Job)).one()
        assert old.state == JobState.CANCELLED and old.generation == 0
        assert "late instance" in old.last_error
    sweep(sessions, SETTINGS, MODELS, spool, now=utcnow() + timedelta(seconds=31))
    with sessions() as s:
        states = {j.generation: j.state for j in s.scalars(select(Job))}
        assert states == {0: JobState.CANCELLED, 1: JobState.QUEUED}


def test_unreadable_header_leaves_the_series_for_the_next_sweep(spool: Spool, sessions) -> None:
    receive(spool, sessions, ct_series(np.zeros((2, 8, 8), np.float32)))
    files = sorted((spool.root / "incoming").rglob("*.dcm"))
    hidden = [f.rename(f.with_suffix(".hidden")) for f in files]  # storage hiccup
    later = utcnow() + timedelta(seconds=31)
    assert sweep(sessions, SETTINGS, MODELS, spool, now=later) == 0
    with sessions() as s:
        assert s.scalars(select(Series)).one().state == SeriesState.RECEIVING
        assert s.scalars(select(Job)).all() == []
    for f in hidden:
        f.rename(f.with_suffix(".dcm"))
    assert sweep(sessions, SETTINGS, MODELS, spool, now=later) == 1
    with sessions() as s:
        assert len(s.scalars(select(Job)).all()) == 1


def test_quiet_period_per_modality_and_per_route(spool: Spool, sessions) -> None:
    settings = parse_settings(
        {
            "completion": {"quiet_seconds": 30, "modality_quiet_seconds": {"MR": 90}},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                              "port": 4242}],
            "routes": [
                {"name": "fast-ct", "match": {"Modality": "CT"}, "models": ["lung-unet2d"],
                 "send_to": ["pacs"], "quiet_seconds": 5},
            ],
        },
        environ={},
    )  # fmt: skip
    ct = ct_series(np.zeros((2, 8, 8), np.float32))
    mr = ct_series(np.zeros((2, 8, 8), np.float32), modality="MR")
    pt = ct_series(np.zeros((2, 8, 8), np.float32), modality="PT")
    receive(spool, sessions, ct + mr + pt)

    def states(after: float) -> dict[str, SeriesState]:
        sweep(sessions, settings, MODELS, spool, now=utcnow() + timedelta(seconds=after))
        with sessions() as s:
            return {x.modality: x.state for x in s.scalars(select(Series))}

    receiving, complete = SeriesState.RECEIVING, SeriesState.COMPLETE
    assert states(6) == {"CT": complete, "MR": receiving, "PT": receiving}  # the route's 5 s
    assert states(31) == {"CT": complete, "MR": receiving, "PT": complete}  # the default
    assert states(91) == {"CT": complete, "MR": complete, "PT": complete}  # MR's 90 s


def test_localizer_series_completes_without_model_jobs(spool: Spool, sessions) -> None:
    scout = ct_series(np.zeros((2, 8, 8), np.float32))
    for ds in scout:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    axial = ct_series(np.zeros((3, 8, 8), np.float32))
    receive(spool, sessions, scout + axial)
    assert sweep(sessions, SETTINGS, MODELS, spool, now=utcnow() + timedelta(seconds=31)) == 2
    with sessions() as s:
        (job,) = s.scalars(select(Job)).all()  # the CT route matched both; one is a volume
        assert s.get(Series, job.series_id).series_uid == axial[0].SeriesInstanceUID
        assert {x.state for x in s.scalars(select(Series))} == {SeriesState.COMPLETE}


def test_counted_series_completes_early_and_a_disagreeing_one_waits(spool: Spool, sessions) -> None:
    counted = ct_series(np.zeros((3, 8, 8), np.float32))
    partial = ct_series(np.zeros((3, 8, 8), np.float32))
    mixed = ct_series(np.zeros((3, 8, 8), np.float32))
    for ds in counted + partial:
        ds.ImagesInAcquisition = 3
    for ds, n in zip(mixed, (3, 3, 4), strict=True):
        ds.ImagesInAcquisition = n  # the series contradicts itself: not trustworthy
    receive(spool, sessions, counted + partial[:2] + mixed)

    def complete_after(seconds: float) -> set[str]:
        sweep(sessions, SETTINGS, MODELS, spool, now=utcnow() + timedelta(seconds=seconds))
        with sessions() as s:
            rows = s.scalars(select(Series).where(Series.state == SeriesState.COMPLETE))
            return {x.series_uid for x in rows}

    uid = {name: series[0].SeriesInstanceUID for name, series in
           (("counted", counted), ("partial", partial), ("mixed", mixed))}  # fmt: skip
    with sessions() as s:
        expected = {x.series_uid: x.expected_instances for x in s.scalars(select(Series))}
    assert expected == {uid["counted"]: 3, uid["partial"]: 3, uid["mixed"]: -1}
    assert complete_after(1) == set()  # even a counted series gets its short quiet period
    assert complete_after(4) == {uid["counted"]}  # 3 of 3 are in
    assert complete_after(31) == set(uid.values())  # the others wait the full period


def one_slice_series(count: int, modality: str = "CT", description: str = "") -> list[Dataset]:
    """``count`` series of one 4x4 slice each (cheap to receive; none is a volume)."""
    out = []
    for _ in range(count):
        (ds,) = ct_series(np.zeros((1, 4, 4), np.float32), modality=modality)
        if description:
            ds.SeriesDescription = description
        out.append(ds)
    return out


def complete_uids(sessions) -> set[str]:
    with sessions() as s:
        rows = s.scalars(select(Series).where(Series.state == SeriesState.COMPLETE))
        return {x.series_uid for x in rows}


def test_series_waiting_for_their_modalitys_long_period_hold_back_nothing(
    spool: Spool, sessions
) -> None:
    settings = parse_settings(
        {"completion": {"quiet_seconds": 30, "modality_quiet_seconds": {"MR": 3600}}},
        environ={},
    )
    mr = one_slice_series(150, modality="MR")  # older, and more than the old code looked at (100)
    ct = one_slice_series(150)
    receive(spool, sessions, mr + ct)
    later = utcnow() + timedelta(seconds=31)
    assert sweep(sessions, settings, MODELS, spool, now=later) == 150
    assert complete_uids(sessions) == {ds.SeriesInstanceUID for ds in ct}
    assert sweep(sessions, settings, MODELS, spool, now=utcnow() + timedelta(seconds=3601)) == 150


# A route that holds the series it matches (only their header tells which) for an hour.
HOLDING = parse_settings(
    {
        "completion": {"quiet_seconds": 30},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": 4242}],
        "routes": [
            {"name": "perfusion", "match": {"SeriesDescription": "PERFUSION"},
             "models": ["lung-unet2d"], "send_to": ["pacs"], "quiet_seconds": 3600},
        ],
    },
    environ={},
)  # fmt: skip


def test_series_a_route_holds_back_do_not_hold_back_those_behind(
    spool: Spool, sessions, caplog: pytest.LogCaptureFixture
) -> None:
    settings = HOLDING
    # Only the header tells which series the route wants quiet for an hour: all 300
    # are candidates after 30 s, the older half for a route that waits longer.
    held = one_slice_series(150, description="PERFUSION")
    plain = one_slice_series(150)
    receive(spool, sessions, held + plain)
    not_yet = NotYetDue()
    later = utcnow() + timedelta(seconds=31)
    assert sweep(sessions, settings, MODELS, spool, now=later, not_yet=not_yet) == 150
    assert complete_uids(sessions) == {ds.SeriesInstanceUID for ds in plain}
    assert len(not_yet.until) == 150
    # Their headers are not read again before their time: with the files gone, a read
    # would log an error.
    for f in (spool.root / "incoming").rglob("*.dcm"):
        f.rename(f.with_suffix(".hidden"))
    caplog.clear()
    assert sweep(sessions, settings, MODELS, spool, now=later, not_yet=not_yet) == 0
    assert "cannot read a header" not in caplog.text
    for f in (spool.root / "incoming").rglob("*.hidden"):
        f.rename(f.with_suffix(".dcm"))
    hour = utcnow() + timedelta(seconds=3601)
    assert sweep(sessions, settings, MODELS, spool, now=hour, not_yet=not_yet) == 150
    assert not_yet.until == {}


def test_a_held_series_whose_last_instance_arrives_completes_when_counted(
    spool: Spool, sessions
) -> None:
    series = ct_series(np.zeros((2, 8, 8), np.float32))
    for ds in series:
        ds.SeriesDescription = "PERFUSION"
        ds.ImagesInAcquisition = 2
    receive(spool, sessions, series[:1])
    not_yet = NotYetDue()
    later = utcnow() + timedelta(seconds=31)
    assert sweep(sessions, HOLDING, MODELS, spool, now=later, not_yet=not_yet) == 0
    assert len(not_yet.until) == 1  # remembered as not due before the route's hour
    receive(spool, sessions, series[1:])  # 2 of 2: due after the counted period
    # What was remembered was about the series as it was before this instance: the
    # sweep must look again, not skip it until the hour is up.
    soon = utcnow() + timedelta(seconds=HOLDING.completion.counted_quiet_seconds + 1)
    assert sweep(sessions, HOLDING, MODELS, spool, now=soon, not_yet=not_yet) == 1
    assert complete_uids(sessions) == {series[0].SeriesInstanceUID}
    assert not_yet.until == {}
