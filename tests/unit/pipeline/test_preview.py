"""A job's preview from the spool: its SEG, its source files and the header lines."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest

from dicomnode.db import JobDetail, PreviewSource
from dicomnode.db.queries import JobView
from dicomnode.errors import PreviewError
from dicomnode.imaging import load_series
from dicomnode.outputs import preview_montage
from dicomnode.pipeline import preview_seg_path, render_job_preview
from dicomnode.pipeline.preview import headline
from dicomnode.store import Spool
from tests.factories import ct_series, lung_phantom, write_series
from tests.unit.outputs.test_preview import make_seg, phantom_labels

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def detail(summary: dict[str, Any], *, state: str = "done") -> JobDetail:
    job = JobView(
        id=7,
        state=state,
        route="lungs",
        model="lung-unet2d",
        model_version="1.0",
        series_uid="1.2.3.4",
        study_uid="1.2.3",
        priority=0,
        attempts=1,
        max_attempts=3,
        created_at=NOW,
        started_at=NOW,
        finished_at=NOW,
        last_error=None,
        patient_id=None,
        accession_number=None,
    )
    return JobDetail(
        job=job,
        run_started_at=NOW,
        resent_at=None,
        lease_owner=None,
        claimed_by=None,
        lease_expires_at=None,
        run_after=NOW,
        timings={},
        summary=summary,
        selection=None,
        priors=None,
        outputs=(),
        deliveries=(),
        history=(),
    )


@pytest.fixture
def spooled(tmp_path: Path) -> tuple[Spool, PreviewSource]:
    """A job's SEG and its 10 source instances in a spool, as the database lists them."""
    spool = Spool(tmp_path / "spool")
    written = write_series(ct_series(lung_phantom(slices=10, size=48)), spool.absolute("in"))
    paths = [f"in/{path.name}" for path in written]
    volume = load_series(written)
    seg = make_seg(volume, phantom_labels(volume))
    spool.absolute("results/seg.dcm").parent.mkdir(parents=True)
    seg.save_as(spool.absolute("results/seg.dcm"), enforce_file_format=True)
    summary = {"total_volume_ml": 12.34, "segments": [{"volume_ml": 5.0}, {"volume_ml": 7.3}]}
    # In no particular order, as preview_source returns them.
    return spool, PreviewSource(detail(summary), "results/seg.dcm", tuple(reversed(paths)))


def test_the_seg_path_or_why_there_is_none() -> None:
    source = PreviewSource(detail({}), "results/seg.dcm", ())
    assert preview_seg_path(source) == "results/seg.dcm"
    queued = PreviewSource(detail({}, state="queued"), None, ("a.dcm",))
    with pytest.raises(PreviewError) as info:
        preview_seg_path(queued)
    assert str(info.value) == "job 7 has no SEG output yet (state queued); nothing to preview"


@pytest.mark.parametrize(
    ("summary", "second"),
    [
        ({}, None),
        ({"total_volume_ml": 2650.349}, "total segment volume 2650.3 mL"),
        (
            {"detection": {"findings": [{}, {}], "candidates": 9, "best_probability": 0.876}},
            "2 finding(s) of 9 candidates, best probability 0.88",
        ),
        ({"detection": {}, "total_volume_ml": 1.0}, "0 finding(s) of ? candidates"),
        (
            {"comparison": {"prior_study_uid": "1.2", "prior_study_date": "2023-01-01",
                            "matched": 1, "new": 2, "no_longer_seen": 0}},
            "vs prior of 2023-01-01: 1 matched, 2 new, 0 no longer seen",
        ),
        (
            {"comparison": {"reason": "no earlier study of the patient on pacs"}},
            "no comparison: no earlier study of the patient on pacs",
        ),
    ],
)  # fmt: skip
def test_the_headline_is_the_job_and_its_key_result(
    summary: dict[str, Any], second: str | None
) -> None:
    lines = headline(detail(summary))
    assert lines[0] == "job 7  lung-unet2d 1.0  (done)"
    assert lines[1:] == ([] if second is None else [second])


def test_render_job_preview_draws_the_spooled_seg_over_its_series(
    spooled: tuple[Spool, PreviewSource],
) -> None:
    spool, source = spooled
    image, shown = render_job_preview(spool, source)
    # The same montage as drawn from the objects themselves: the files in, nothing else.
    volume = load_series([spool.absolute(p) for p in sorted(source.instance_paths)])
    seg = hd.seg.segread(spool.absolute("results/seg.dcm"))
    expected, count = preview_montage(
        seg,
        volume,
        source.detail.summary,
        ["job 7  lung-unet2d 1.0  (done)", "total segment volume 12.3 mL"],
    )
    assert shown == count == 7
    assert image.size == expected.size
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


def test_render_job_preview_refuses_a_job_without_a_seg(
    spooled: tuple[Spool, PreviewSource],
) -> None:
    spool, source = spooled
    none = PreviewSource(detail({}, state="failed"), None, source.instance_paths)
    with pytest.raises(PreviewError, match=r"^job 7 has no SEG output yet \(state failed\)"):
        render_job_preview(spool, none)


def test_render_job_preview_refuses_files_gone_from_the_spool(
    spooled: tuple[Spool, PreviewSource],
) -> None:
    spool, source = spooled
    spool.absolute(source.instance_paths[0]).unlink()
    spool.absolute(source.instance_paths[1]).unlink()
    with pytest.raises(PreviewError) as info:
        render_job_preview(spool, source)
    assert str(info.value) == "job 7: 2 of its files are no longer in the spool"
    spool.absolute("results/seg.dcm").unlink()
    with pytest.raises(PreviewError, match=r"^job 7: 3 of its files are no longer"):
        render_job_preview(spool, source)


def test_render_job_preview_refuses_a_series_without_instances(
    spooled: tuple[Spool, PreviewSource],
) -> None:
    spool, source = spooled
    empty = PreviewSource(source.detail, source.seg_path, ())
    with pytest.raises(PreviewError) as info:
        render_job_preview(spool, empty)
    assert str(info.value) == "job 7: its series has no instances left"
