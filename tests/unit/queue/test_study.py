"""Study-scope routes: one job per study, on the series the route's selection picks."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.config import Settings, parse_settings
from dicomnode.db import Instance, Job, JobState, Series, Study, utcnow
from dicomnode.imaging import load_registry
from dicomnode.pipeline import encode
from dicomnode.queue.completion import sweep
from dicomnode.queue.study import study_quiet_seconds, sweep_studies
from dicomnode.store import Ingestor, Spool
from tests.factories import ct_series

MODELS = load_registry(None)
PACS = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]


def settings(**route: object) -> Settings:
    return parse_settings(
        {
            "completion": {"quiet_seconds": 30, "study_quiet_seconds": 60},
            "destinations": PACS,
            "routes": [
                {
                    "name": "lung-study",
                    "scope": "study",
                    "match": {"Modality": "CT"},
                    "models": ["lung-unet2d"],
                    "send_to": ["pacs"],
                    "select": {
                        "axial": True,
                        "max_slice_thickness": 3,
                        "prefer": {"ConvolutionKernel": "re:(?i)lung"},
                    },
                    **route,
                },
                {
                    "name": "every-ct",
                    "match": {"Modality": "CT"},
                    "models": ["lung-unet2d"],
                    "send_to": ["pacs"],
                },
            ],
        },
        environ={},
    )


SETTINGS = settings()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def series_in(
    study_uid: str,
    number: int,
    *,
    slices: int,
    thickness: float,
    kernel: str,
    image_type: list[str] | None = None,
) -> list[Dataset]:
    datasets = ct_series(np.zeros((slices, 8, 8), np.float32), slice_spacing=thickness)
    for ds in datasets:
        ds.StudyInstanceUID = study_uid
        ds.SeriesNumber = number
        ds.SliceThickness = thickness
        ds.ConvolutionKernel = kernel
        if image_type is not None:
            ds.ImageType = image_type
    return datasets


def three_series(study_uid: str) -> dict[str, list[Dataset]]:
    return {
        "localizer": series_in(
            study_uid, 1, slices=2, thickness=1, kernel="LUNG",
            image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ),
        "thin lung": series_in(study_uid, 2, slices=6, thickness=1, kernel="LUNG"),
        "thick soft tissue": series_in(study_uid, 3, slices=4, thickness=5, kernel="STANDARD"),
    }  # fmt: skip


def receive(spool: Spool, sessions, datasets: list[Dataset]) -> None:
    ingestor = Ingestor(spool, sessions)
    for ds in datasets:
        ingestor.store(encode(ds))


def complete(spool: Spool, sessions, settings: Settings, at: datetime) -> tuple[int, int]:
    """Sweep series, then studies, as the scheduler does."""
    series = sweep(sessions, settings, MODELS, spool, now=at)
    return series, sweep_studies(sessions, settings, MODELS, spool, now=at)


def settled(spool: Spool, sessions, datasets: list[Dataset]) -> None:
    """Receive, then sweep once the series (31 s) and then the study (61 s) are quiet."""
    receive(spool, sessions, datasets)
    start = utcnow()
    complete(spool, sessions, SETTINGS, start + timedelta(seconds=31))
    complete(spool, sessions, SETTINGS, start + timedelta(seconds=61))


def study_jobs(sessions) -> list[tuple[str, str, JobState]]:
    with sessions() as s:
        rows = s.execute(
            select(Job.route, Series.series_uid, Job.state)
            .join(Series, Series.id == Job.series_id)
            .where(Job.route == "lung-study")
            .order_by(Job.id)
        ).all()
    return [tuple(r) for r in rows]


def test_a_study_of_three_series_runs_once_on_the_thin_lung_series(spool: Spool, sessions) -> None:
    study_uid = generate_uid()
    parts = three_series(study_uid)
    receive(spool, sessions, [ds for part in parts.values() for ds in part])
    start = utcnow()
    # Series complete after 30 s; the study waits for 60 s of quiet.
    assert complete(spool, sessions, SETTINGS, start + timedelta(seconds=31)) == (3, 0)
    assert study_jobs(sessions) == []
    assert complete(spool, sessions, SETTINGS, start + timedelta(seconds=61)) == (0, 1)
    thin = parts["thin lung"][0].SeriesInstanceUID
    assert study_jobs(sessions) == [("lung-study", thin, JobState.QUEUED)]
    # The series route still runs on each volume of the study (not the localizer).
    with sessions() as s:
        assert len(s.scalars(select(Job).where(Job.route == "every-ct")).all()) == 2
        job = s.scalars(select(Job).where(Job.route == "lung-study")).one()
        verdicts = {e["series_number"]: e["verdict"] for e in job.selection["series"]}
        study = s.scalars(select(Study)).one()
        assert study.selections["lung-study"]["chosen"] == thin
        assert study.generation == 0 and study.pending_since is None
    assert job.selection["chosen"] == thin
    assert verdicts == {
        1: "not a volume (localizer)",
        2: "chosen",
        3: "refused: 5 mm slices, above 3 mm",
    }
    assert job.selection["why"].startswith("best of 1 fitting series (3 judged)")
    # Nothing more to do at the next sweep.
    assert complete(spool, sessions, SETTINGS, start + timedelta(seconds=62)) == (0, 0)


def test_a_study_waits_while_any_of_its_series_receives(spool: Spool, sessions) -> None:
    study_uid = generate_uid()
    parts = three_series(study_uid)
    receive(spool, sessions, parts["thin lung"])
    start = utcnow()
    assert complete(spool, sessions, SETTINGS, start + timedelta(seconds=31)) == (1, 0)
    receive(spool, sessions, parts["thick soft tissue"])  # a second series starts
    # The study has been quiet long enough, but a series of it is still receiving.
    assert sweep_studies(sessions, SETTINGS, MODELS, spool, now=start + timedelta(seconds=61)) == 0
    assert study_jobs(sessions) == []
    # Once that series is complete, so is the study.
    assert complete(spool, sessions, SETTINGS, start + timedelta(seconds=61)) == (1, 1)
    assert [j[1] for j in study_jobs(sessions)] == [parts["thin lung"][0].SeriesInstanceUID]


def test_a_late_fourth_series_reopens_the_study_and_a_better_one_replaces_the_choice(
    spool: Spool, sessions
) -> None:
    study_uid = generate_uid()
    parts = three_series(study_uid)
    settled(spool, sessions, [ds for part in parts.values() for ds in part])
    first = parts["thin lung"][0].SeriesInstanceUID

    # A late single image (not a volume): the study is judged again, the choice
    # stays, and nothing runs twice.
    scout = series_in(study_uid, 4, slices=1, thickness=1, kernel="LUNG")
    receive(spool, sessions, scout)
    later = utcnow()
    assert complete(spool, sessions, SETTINGS, later + timedelta(seconds=31)) == (1, 0)
    with sessions() as s:
        assert s.scalars(select(Study)).one().pending_since is not None
    assert complete(spool, sessions, SETTINGS, later + timedelta(seconds=61)) == (0, 1)
    assert study_jobs(sessions) == [("lung-study", first, JobState.QUEUED)]

    # A late thinner lung series with more slices: chosen now; the queued job for the
    # old choice is cancelled so that the model runs once per study.
    better = series_in(study_uid, 5, slices=9, thickness=0.6, kernel="LUNG")
    receive(spool, sessions, better)
    later = utcnow()
    complete(spool, sessions, SETTINGS, later + timedelta(seconds=31))
    assert complete(spool, sessions, SETTINGS, later + timedelta(seconds=61)) == (0, 1)
    assert study_jobs(sessions) == [
        ("lung-study", first, JobState.CANCELLED),
        ("lung-study", better[0].SeriesInstanceUID, JobState.QUEUED),
    ]
    with sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.generation == 2
        cancelled = s.scalars(select(Job).where(Job.state == JobState.CANCELLED)).one()
        assert "another series chosen" in (cancelled.last_error or "")


def test_a_late_image_in_the_chosen_series_runs_it_again(spool: Spool, sessions) -> None:
    study_uid = generate_uid()
    parts = three_series(study_uid)
    thin = parts["thin lung"]
    receive(spool, sessions, parts["localizer"] + parts["thick soft tissue"] + thin[:-1])
    start = utcnow()
    complete(spool, sessions, SETTINGS, start + timedelta(seconds=31))
    complete(spool, sessions, SETTINGS, start + timedelta(seconds=61))
    receive(spool, sessions, thin[-1:])  # the missing slice, late
    later = utcnow()
    complete(spool, sessions, SETTINGS, later + timedelta(seconds=31))
    complete(spool, sessions, SETTINGS, later + timedelta(seconds=61))
    uid = thin[0].SeriesInstanceUID
    assert study_jobs(sessions) == [
        ("lung-study", uid, JobState.CANCELLED),  # superseded by the late image
        ("lung-study", uid, JobState.QUEUED),
    ]


def test_no_fitting_series_queues_nothing_and_says_why(spool: Spool, sessions) -> None:
    study_uid = generate_uid()
    receive(spool, sessions, three_series(study_uid)["thick soft tissue"])
    start = utcnow()
    complete(spool, sessions, SETTINGS, start + timedelta(seconds=31))
    assert complete(spool, sessions, SETTINGS, start + timedelta(seconds=61)) == (0, 1)
    assert study_jobs(sessions) == []
    with sessions() as s:
        choice = s.scalars(select(Study)).one().selections["lung-study"]
    assert choice["chosen"] is None
    assert choice["why"] == "no series fits (1 judged)"


def test_a_route_s_own_quiet_period_holds_the_study_longer(spool: Spool, sessions) -> None:
    slow = settings(quiet_seconds=300)
    assert study_quiet_seconds(slow) == 300
    assert study_quiet_seconds(SETTINGS) == 60
    receive(spool, sessions, three_series(generate_uid())["thin lung"])
    start = utcnow()
    assert complete(spool, sessions, slow, start + timedelta(seconds=61)) == (1, 0)
    assert complete(spool, sessions, slow, start + timedelta(seconds=301)) == (0, 1)


def test_without_study_routes_studies_are_never_pending(spool: Spool, sessions) -> None:
    series_only = parse_settings(
        {"destinations": PACS, "routes": [
            {"name": "every-ct", "match": {"Modality": "CT"}, "models": ["lung-unet2d"],
             "send_to": ["pacs"]}]},
        environ={},
    )  # fmt: skip
    receive(spool, sessions, three_series(generate_uid())["thin lung"])
    assert complete(spool, sessions, series_only, utcnow() + timedelta(seconds=61)) == (1, 0)
    with sessions() as s:
        # A study route added later does not run on this older study.
        assert s.scalars(select(Study)).one().pending_since is None
    assert complete(spool, sessions, SETTINGS, utcnow() + timedelta(seconds=120)) == (0, 0)


def test_a_route_s_shorter_quiet_period_applies_too() -> None:
    assert study_quiet_seconds(settings(quiet_seconds=10)) == 10


def test_a_choice_undone_brings_its_cancelled_job_back(spool: Spool, sessions) -> None:
    study_uid = generate_uid()
    parts = three_series(study_uid)
    settled(spool, sessions, [ds for part in parts.values() for ds in part])
    first = parts["thin lung"][0].SeriesInstanceUID
    # A better series arrives: the first choice's queued job is cancelled.
    better = series_in(study_uid, 5, slices=9, thickness=0.6, kernel="LUNG")
    receive(spool, sessions, better)
    later = utcnow()
    complete(spool, sessions, SETTINGS, later + timedelta(seconds=31))
    complete(spool, sessions, SETTINGS, later + timedelta(seconds=61))
    # That series gets a late image with a 5 mm slice thickness: it is refused now,
    # and the first choice is chosen again; its job comes back rather than none.
    late = series_in(study_uid, 5, slices=1, thickness=5.0, kernel="LUNG")[0]
    late.SeriesInstanceUID = better[0].SeriesInstanceUID
    late.InstanceNumber = 0  # sorts first: the header the selection reads
    receive(spool, sessions, [late])
    later = utcnow()
    complete(spool, sessions, SETTINGS, later + timedelta(seconds=31))
    assert complete(spool, sessions, SETTINGS, later + timedelta(seconds=61)) == (0, 1)
    jobs_now = study_jobs(sessions)
    assert jobs_now[0] == ("lung-study", first, JobState.QUEUED)
    assert all(state != JobState.QUEUED for _, uid, state in jobs_now if uid != first)
    with sessions() as s:
        job = s.scalars(select(Job).where(Job.route == "lung-study").order_by(Job.id)).first()
        assert job.selection["chosen"] == first


def test_a_series_whose_header_cannot_be_read_is_listed_not_chosen(spool: Spool, sessions) -> None:
    study_uid = generate_uid()
    parts = three_series(study_uid)
    receive(spool, sessions, [ds for part in parts.values() for ds in part])
    start = utcnow()
    complete(spool, sessions, SETTINGS, start + timedelta(seconds=31))
    thick = parts["thick soft tissue"][0].SeriesInstanceUID
    with sessions() as s:
        query = select(Instance.path).join(Series).where(Series.series_uid == thick)
        for path in s.scalars(query):
            spool.absolute(path).unlink()  # after its completion, e.g. removed by hand
    assert complete(spool, sessions, SETTINGS, start + timedelta(seconds=61))[1] == 1
    with sessions() as s:
        choice = s.scalars(select(Study)).one().selections["lung-study"]
    verdicts = {e["series_uid"]: e["verdict"] for e in choice["series"]}
    assert verdicts[thick] == "header unreadable"
    assert choice["chosen"] == parts["thin lung"][0].SeriesInstanceUID
