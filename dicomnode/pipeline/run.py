"""Run one job: the only place that knows the order of the stages.

priors (found here or retrieved) -> load series -> model -> post-process -> measure
-> SEG -> SR -> validate -> write -> send to each destination of the route.

Outputs are written durably and recorded before anything is sent. A retry after
a failed delivery therefore re-sends the recorded objects instead of running the
model again, and deterministic UIDs make a re-sent object the same object to the
PACS, never a duplicate.

A full disk while the results are written is the node's condition, not the job's:
the job is retried by time like a delivery to a destination that is down, its
attempts given back, and the model does not run again until the spool has space.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.config import Route, Settings
from dicomnode.db import (
    Claim,
    Job,
    JobState,
    Output,
    Series,
    SeriesState,
    database_now,
    failing_since,
    masks,
    merge_timings,
    set_state,
    transaction,
    utcnow,
)
from dicomnode.db.queries import series_input
from dicomnode.errors import (
    DISK_FULL,
    JobInterrupted,
    JobSuperseded,
    PermanentJobError,
    ResultsDiskFull,
    UnusableSeg,
    is_disk_full,
)
from dicomnode.imaging import (
    ClassificationResult,
    DetectionResult,
    ModelSpec,
    Volume,
    load_series,
    segment_stats,
)
from dicomnode.inference import ModelCache
from dicomnode.inference.classify import classify
from dicomnode.inference.detect import detect
from dicomnode.inference.segment import segment
from dicomnode.outputs import (
    PriorComparison,
    Provenance,
    build_measurement_report,
    build_overlay_capture,
    build_rejection_note,
    build_segmentation,
    detection_summary,
    finding_segments,
    read_labels,
    repair_source_headers,
    reported_findings,
    segment_outlines,
    series_class,
    study_finding,
    validate_file,
)
from dicomnode.pipeline import content, priors
from dicomnode.pipeline.follow_up import FollowUp, compare_with_prior
from dicomnode.pipeline.priors import Priors
from dicomnode.send import deliver
from dicomnode.store import REJECTED, RESULTS, Spool

log = logging.getLogger(__name__)

REJECTION = "rejection"  # the output kind of an IOCM rejection note


@dataclass
class JobContext:
    """What a job needs from the database, read once at the start."""

    job_id: int
    series_id: int
    generation: int
    route: str
    model: str
    model_version: str
    series_uid: str
    study_uid: str
    input_digest: str  # identifies exactly which instance contents went in
    instance_paths: list[str]
    first_received_at: datetime
    last_received_at: datetime
    started_at: datetime
    timings: dict[str, Any]
    outputs: list[tuple[str, str]]  # (kind, spool-relative path)


@dataclass
class BuiltOutput:
    """An object made by the job, before it is written."""

    kind: str
    dataset: Dataset


def encode(dataset: Dataset) -> bytes:
    """Encode a dataset as a DICOM file (preamble, file meta, dataset).

    Parameters
    ----------
    dataset : Dataset
        A dataset with file meta.

    Returns
    -------
    bytes
        The Part 10 file.
    """
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


class Pipeline:
    """Runs claimed jobs end to end.

    Parameters
    ----------
    settings : Settings
        Routes, destinations, output settings.
    sessions : sessionmaker[Session]
        Database sessions.
    spool : Spool
        Where instances lie and results go.
    models : Mapping[str, ModelSpec]
        The model registry.
    cache : ModelCache
        Warm models.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        spool: Spool,
        models: Mapping[str, ModelSpec],
        cache: ModelCache,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.spool = spool
        self.models = models
        self.cache = cache

    def run(self, claim: Claim, should_stop: Callable[[], bool]) -> dict[str, float]:
        """Run a claimed job to the end: outputs made, recorded and delivered.

        Parameters
        ----------
        claim : Claim
            The job and our lease on it.
        should_stop : callable
            True when the worker must stop or lost its lease; asked between stages.

        Returns
        -------
        dict[str, float]
            Seconds per stage of this attempt.

        Raises
        ------
        JobInterrupted
            If ``should_stop`` said so; the job is left as it was at the last stage boundary.
        PermanentJobError, TransientJobError
            If the attempt failed; the worker records it and decides on a retry.
        """

        def checkpoint() -> None:
            if should_stop():
                raise JobInterrupted(f"job {claim.job_id} interrupted")

        ctx = self._context(claim)
        route = self._route(ctx)
        timings: dict[str, float] = {}
        if "wait_s" not in ctx.timings:
            timings["receive_s"] = (ctx.last_received_at - ctx.first_received_at).total_seconds()
            timings["wait_s"] = (ctx.started_at - ctx.last_received_at).total_seconds()

        outputs = ctx.outputs
        if not outputs:
            checkpoint()
            with self.sessions() as session:
                content.check_verdict(session, route.requires, ctx.series_id, ctx.generation)
                self._check_space(session, ctx.job_id)
            found_priors: Priors | None = None
            # Only a detection model compares with a prior; the others need none fetched.
            if route.priors.destination and self._spec(ctx).task == "detection":
                started = time.perf_counter()
                current = pydicom.dcmread(
                    self.spool.absolute(ctx.instance_paths[0]), stop_before_pixels=True
                )
                found_priors = priors.resolve(
                    self.settings, self.sessions, self.spool, route, ctx.job_id, current, checkpoint
                )
                timings["priors_s"] = time.perf_counter() - started
            built, summary, stage_times = self._make_outputs(ctx, route, checkpoint, found_priors)
            built += self._rejection(ctx, built)
            timings.update(stage_times)
            checkpoint()
            outputs = self._store_outputs(claim, ctx, built, summary, timings)
        else:
            log.info("job %d: outputs exist from an earlier attempt; sending them", claim.job_id)

        started = time.perf_counter()
        deliver(
            self.settings,
            self.sessions,
            claim,
            route.send_to,
            [self.spool.absolute(p) for _, p in outputs],
            study_uid=ctx.study_uid,
            series_uid=ctx.series_uid,
            checkpoint=checkpoint,
        )
        elapsed = time.perf_counter() - started
        # A re-send keeps the run's own send_s: the job's record then still says how long
        # the run took, and the re-send's duration is beside it (`studies show`).
        timings["send_s" if not ctx.outputs else "resend_s"] = elapsed
        with transaction(self.sessions) as session:
            merge_timings(session, claim, timings)
        # earlier attempts' too; the metric's send stage is this attempt's sending
        metrics.job_finished(ctx.model, {**ctx.timings, **timings, "send_s": elapsed})
        return timings

    # -- stages ------------------------------------------------------------

    def _context(self, claim: Claim) -> JobContext:
        with self.sessions() as session:
            job = session.get(Job, claim.job_id)
            if job is None:
                raise PermanentJobError(f"job {claim.job_id} vanished")
            series = session.get(Series, job.series_id)
            assert series is not None
            if series.generation != job.generation or series.state != SeriesState.COMPLETE:
                raise JobSuperseded(
                    "superseded: a late instance re-opened the series; a newer job replaces this"
                )
            inputs = series_input(session, series.id)
            outputs = session.execute(
                select(Output.kind, Output.path).where(Output.job_id == job.id).order_by(Output.id)
            ).all()
            return JobContext(
                job_id=job.id,
                series_id=series.id,
                generation=job.generation,
                route=job.route,
                model=job.model,
                model_version=job.model_version,
                series_uid=series.series_uid,
                study_uid=series.study.study_uid,
                input_digest=inputs.digest,
                instance_paths=inputs.paths,
                first_received_at=series.first_received_at,
                last_received_at=series.last_received_at,
                started_at=job.started_at or utcnow(),
                timings=dict(job.timings or {}),
                outputs=[(k, p) for k, p in outputs],
            )

    def _results_folder(self) -> Path:
        return self.spool.absolute(RESULTS)

    def _check_space(self, session: Session, job_id: int) -> None:
        """Refuse to run the model again while the disk that was full still is.

        "Full" is below ``storage.min_free_mb`` (the listener's own watermark), or no
        space at all when that is 0: a model run whose results cannot be written is
        only wasted time on a busy GPU. Only a retry after a full disk is held back: a
        job that never met one still runs on a low disk, and its results are written if
        they fit. So the job's history is read only when the disk is low.
        """
        need = max(self.settings.storage.min_free_mb * 2**20, 1)
        if self.spool.has_free(need):
            return
        _, disk_full_failures = failing_since(session, job_id, DISK_FULL)
        if disk_full_failures:
            free = self.spool.free_bytes()
            raise ResultsDiskFull(
                f"no space left on device in the results folder ({self._results_folder()}): "
                f"{free / 2**20:.1f} MiB free, the model runs again once "
                f"{need / 2**20:.0f} MiB are (storage.min_free_mb)"
            )

    def _disk_full(self, written: int, of: int) -> ResultsDiskFull:
        free = self.spool.free_bytes()
        return ResultsDiskFull(
            f"no space left on device in the results folder ({self._results_folder()}): "
            f"{written} of {of} object(s) written, {free / 2**20:.1f} MiB free"
            "; retried when space is freed"
        )

    def _route(self, ctx: JobContext) -> Route:
        for route in self.settings.routes:
            if route.name == ctx.route:
                return route
        raise PermanentJobError(f"route {ctx.route} is no longer configured")

    def _spec(self, ctx: JobContext) -> ModelSpec:
        spec = self.models.get(ctx.model)
        if spec is None:
            raise PermanentJobError(f"model {ctx.model} is not installed")
        if spec.version != ctx.model_version:
            raise PermanentJobError(
                f"model {ctx.model} is now version {spec.version}, job wants {ctx.model_version}"
            )
        return spec

    def _series_base(self, route: str, spec: ModelSpec) -> int:
        """Return the first Series Number of a route's model's results: 10 apart each.

        The (route, model) pairs are counted in configuration order, which every host
        sharing the configuration sees alike: two models on one series then never share
        a Series Number (SEG +1, SR +2, overlay +3, rejection notes +9), and a model
        keeps its numbers across re-runs and model installs.
        """
        pairs = [(r.name, m) for r in self.settings.routes for m in r.models]
        index = pairs.index((route, spec.name)) if (route, spec.name) in pairs else len(pairs)
        return self.settings.outputs.series_number + 10 * index

    def _mask_spec(self, spec: ModelSpec) -> ModelSpec:
        mask = self.models.get(spec.detection.lung_model)
        if mask is None:
            raise PermanentJobError(
                f"model {spec.name} needs mask model {spec.detection.lung_model}, "
                "which is not installed"
            )
        return mask

    def _reusable_mask(
        self, ctx: JobContext, mask_spec: ModelSpec, volume: Volume
    ) -> tuple[int, np.ndarray] | None:
        """Return the mask model's labels as a job on this series already made them.

        The mask model's route usually ran on the same series just before (a nodule
        route waits for the lung route's verdict), and its SEG holds the very labels
        running the model again would give: same model, same version, same series
        generation (so the same instances). Reading the SEG back takes a fraction of a
        second where the model takes many.

        Returns
        -------
        tuple[int, np.ndarray] or None
            The job that made the mask and its labels on ``volume``; None when there is
            none to reuse, or it does not fit or read (the caller runs the model then).
        """
        with self.sessions() as session:
            found = masks.find_mask(
                session,
                series_id=ctx.series_id,
                generation=ctx.generation,
                model=mask_spec.name,
                version=mask_spec.version,
            )
        if found is None:
            return None
        try:
            labels = read_labels(
                self.spool.absolute(found.path),
                volume,
                [segment.label for segment in mask_spec.output.segments],
            )
        except UnusableSeg as exc:
            log.info(
                "job %d: not reusing the mask of job %d (%s); running the mask model",
                ctx.job_id,
                found.job_id,
                exc,
            )
            return None
        log.info("job %d: reusing the mask of job %d", ctx.job_id, found.job_id)
        return found.job_id, labels

    def _provenance(self, spec: ModelSpec) -> Provenance:
        return Provenance(
            model_name=spec.name,
            model_version=spec.version,
            clinical_use=spec.clinical_use,
            uid_root=self.settings.outputs.uid_root,
        )

    def _make_outputs(
        self,
        ctx: JobContext,
        route: Route,
        checkpoint: Callable[[], None],
        found_priors: Priors | None = None,
    ) -> tuple[list[BuiltOutput], dict[str, Any], dict[str, float]]:
        spec = self._spec(ctx)
        timings: dict[str, float] = {}

        started = time.perf_counter()
        volume = load_series([self.spool.absolute(p) for p in ctx.instance_paths])
        timings["load_s"] = time.perf_counter() - started
        content.check_images(route.requires, volume.shape[0], volume.normal)
        checkpoint()

        detection: DetectionResult | None = None
        found: dict[str, Any] = {}
        follow: FollowUp | None = None
        mask_from_job: int | None = None
        classification: ClassificationResult | None = None
        if spec.task == "classification":
            classification = classify(spec, volume, self.cache, checkpoint=checkpoint)
            timings.update(classification.timings)
            labels, segments = np.zeros((0,), dtype=np.uint8), []
        elif spec.task == "detection":
            mask_spec = self._mask_spec(spec)
            started = time.perf_counter()
            reused = self._reusable_mask(ctx, mask_spec, volume)
            mask: np.ndarray | None = None
            if reused is not None:
                mask_from_job, mask = reused
                # Instead of mask_inference_s and mask_postprocess_s, which detect()
                # records only when it runs the mask model itself.
                timings["mask_load_s"] = time.perf_counter() - started
            detection = detect(
                spec, mask_spec, volume, self.cache, checkpoint=checkpoint, mask=mask
            )
            timings.update(detection.timings)
            labels = detection.labels(volume.shape)
            segments = finding_segments(spec, len(detection.findings))
            found = detection_summary(detection, volume)  # the comparison and the summary
            if found_priors is not None:
                checkpoint()
                started = time.perf_counter()
                follow = compare_with_prior(
                    sessions=self.sessions,
                    spool=self.spool,
                    cache=self.cache,
                    provenance=self._provenance(spec),
                    route=ctx.route,
                    spec=spec,
                    mask_spec=mask_spec,
                    volume=volume,
                    findings=found["findings"],
                    priors=found_priors,
                    checkpoint=checkpoint,
                    summarize=detection_summary,
                )
                timings["compare_s"] = time.perf_counter() - started
        else:
            result = segment(spec, volume, self.cache, checkpoint=checkpoint)
            timings.update(result.timings)
            labels, segments = result.labels, list(spec.output.segments)
        checkpoint()

        names = [s.label for s in segments]
        stats = (
            segment_stats(labels, volume.pixels, volume.voxel_volume_ml, names) if segments else []
        )
        provenance = self._provenance(spec)
        # Series UIDs depend on the input series, the route and the model only, so
        # every re-run addresses the same result series (and two routes running one
        # model with different encodings never share one). Instance UIDs also depend
        # on the model version and on exactly which instance contents went in: the same
        # input gives the same object (a resend is no duplicate), different input a new one.
        identity = (ctx.series_uid, ctx.route, spec.name)
        version = (spec.version, ctx.input_digest)
        base_number = self._series_base(ctx.route, spec)

        repaired = repair_source_headers(volume.datasets)
        if repaired:
            log.info(
                "job %d: repaired %d non-conformant source header values", ctx.job_id, repaired
            )

        seg: Dataset | None = None
        if segments:  # a detection that found nothing has nothing to segment
            started = time.perf_counter()
            with _building("SEG"):
                seg = build_segmentation(
                    volume.datasets,
                    labels,
                    segments,
                    provenance,
                    series_uid=provenance.uid(*identity, "seg"),
                    sop_uid=provenance.uid(*identity, *version, "seg"),
                    series_number=base_number + 1,
                    frames=volume.frames,
                    options=route.seg,
                    tracking_key="" if detection is None else ctx.input_digest,
                    # A nodule matched with the prior's keeps its identity.
                    tracking_uids=None if follow is None else follow.tracking_uids,
                )
            timings["seg_s"] = time.perf_counter() - started
            checkpoint()

        started = time.perf_counter()
        with _building("SR"):
            report = build_measurement_report(
                seg,
                volume.datasets,
                stats,
                segments,
                provenance,
                series_uid=provenance.uid(*identity, "sr"),
                sop_uid=provenance.uid(*identity, *version, "sr"),
                series_number=base_number + 2,
                findings=[] if detection is None else reported_findings(detection, volume),
                # Findings have their circles; other segments are drawn by outline.
                outlines=(
                    segment_outlines(labels, len(segments), volume) if detection is None else []
                ),
                study=(
                    study_finding(spec, detection)
                    if detection is not None
                    else None
                    if classification is None
                    else series_class(spec, classification)
                ),
                comparison=(
                    None
                    if follow is None
                    else PriorComparison(follow.prior_study_uid, follow.heading, follow.lines)
                ),
                other_evidence=[] if follow is None else follow.evidence,
            )
        timings["sr_s"] = time.perf_counter() - started

        summary = {
            "segments": [
                {
                    "label": s.label,
                    "voxels": s.voxels,
                    "volume_ml": round(s.volume_ml, 2),
                    "mean": None if s.voxels == 0 else round(s.mean, 2),
                    "std": None if s.voxels == 0 else round(s.std, 2),
                    "below_950_percent": None if s.voxels == 0 else round(s.below_950, 2),
                }
                for s in stats
            ],
            "total_volume_ml": round(sum(s.volume_ml for s in stats), 2),
            "slices": volume.shape[0],
        }
        if detection is not None:
            # Each finding's identity as its SEG segment has it: a later study's job
            # keeps it for the same nodule (see pipeline.follow_up).
            tracking = (
                {}
                if seg is None
                else {int(i.SegmentNumber): str(i.TrackingUID) for i in seg.SegmentSequence}
            )
            for finding in found["findings"]:
                finding["tracking_uid"] = tracking.get(finding["number"])
            # Which job's mask bounded the search (None: this job ran the mask model).
            found["mask_from_job"] = mask_from_job
            summary["detection"] = found
        if follow is not None:
            summary["comparison"] = {
                "heading": follow.heading,
                **follow.summary,
                "lines": follow.lines,
            }
        if classification is not None:
            summary["classification"] = {
                "class": None if classification.chosen is None else classification.chosen.label,
                "probabilities": {k: round(v, 4) for k, v in classification.probabilities.items()},
            }
        built = [] if seg is None else [BuiltOutput("seg", seg)]
        built.append(BuiltOutput("sr", report))
        if route.overlay and segments:  # for PACS viewers that cannot show SEG
            checkpoint()
            started = time.perf_counter()
            with _building("SC"):
                overlay = build_overlay_capture(
                    volume,
                    labels,
                    segments,
                    provenance,
                    series_uid=provenance.uid(*identity, "sc"),
                    sop_uid=provenance.uid(*identity, *version, "sc"),
                    series_number=base_number + 3,
                    summary=summary,
                )
            timings["sc_s"] = time.perf_counter() - started
            built.append(BuiltOutput("sc", overlay))
        return built, summary, timings

    def _rejection(self, ctx: JobContext, built: list[BuiltOutput]) -> list[BuiltOutput]:
        """Return an IOCM rejection note for the previous run's results this one replaces.

        Every earlier job of the same route and model on this series (only earlier
        ones: a job never rejects a newer job's results) had its results delivered to
        the same destinations; all of them that this run does not re-make with the same
        UIDs are rejected, so a link of the chain whose note never left (a run
        cancelled before sending) leaves nothing visible behind. Rejecting an instance
        twice is harmless to an IOCM receiver.
        """
        made = {str(out.dataset.SOPInstanceUID) for out in built}
        with self.sessions() as session:
            rows = session.execute(
                select(Output.path, Output.sop_instance_uid)
                .join(Job, Output.job_id == Job.id)
                .where(
                    Job.series_id == ctx.series_id,
                    Job.route == ctx.route,
                    Job.model == ctx.model,
                    Job.id < ctx.job_id,
                    Output.kind != REJECTION,
                )
                .order_by(Output.id)
            ).all()
        seen: set[str] = set()
        superseded = []
        for path, uid in rows:
            if uid in made or uid in seen or not self.spool.absolute(path).exists():
                continue
            seen.add(uid)
            superseded.append(self.spool.absolute(path))
        if not superseded:
            return []
        spec = self._spec(ctx)
        provenance = self._provenance(spec)
        identity = (ctx.series_uid, ctx.route, spec.name)
        with _building("rejection note"):
            note = build_rejection_note(
                superseded,
                provenance,
                series_uid=provenance.uid(*identity, REJECTION),
                sop_uid=provenance.uid(*identity, spec.version, ctx.input_digest, REJECTION),
                series_number=self._series_base(ctx.route, spec) + 9,
            )
        log.info("job %d: rejecting %d superseded instance(s)", ctx.job_id, len(superseded))
        return [BuiltOutput(REJECTION, note)]

    def _store_outputs(
        self,
        claim: Claim,
        ctx: JobContext,
        built: list[BuiltOutput],
        summary: dict[str, Any],
        timings: dict[str, float],
    ) -> list[tuple[str, str]]:
        started = time.perf_counter()
        written: list[tuple[BuiltOutput, str, int]] = []
        for out in built:
            ds = out.dataset
            relative = self.spool.relative_path(
                RESULTS, ctx.study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            )
            try:
                final, size = self._write_once(relative, ds)
                try:
                    validate_file(final, self.settings.outputs.validate)
                except PermanentJobError as exc:
                    # Never sent, but kept where an admin can look at it.
                    kept = self.spool.move(relative, REJECTED)
                    raise PermanentJobError(f"{exc}; the object is kept at {kept}") from None
            except OSError as exc:
                if is_disk_full(exc):
                    raise self._disk_full(len(written), len(built)) from None
                raise
            written.append((out, relative.as_posix(), size))
        timings["write_validate_s"] = time.perf_counter() - started

        with transaction(self.sessions) as session:
            series = session.get(Series, ctx.series_id)
            if series is None or series.generation != ctx.generation:
                # A late image re-opened the series while this job ran: its results
                # describe an incomplete series, and a newer job replaces them.
                raise JobSuperseded(
                    "superseded: a late instance re-opened the series; a newer job replaces this"
                )
            # The database's clock, like the job's started_at it is compared with (which
            # attempt made the outputs decides whether a retry only re-sends them).
            now = database_now(session)
            for out, path, size in written:
                session.add(
                    Output(
                        job_id=claim.job_id,
                        kind=out.kind,
                        sop_class_uid=str(out.dataset.SOPClassUID),
                        sop_instance_uid=str(out.dataset.SOPInstanceUID),
                        series_uid=str(out.dataset.SeriesInstanceUID),
                        path=path,
                        size_bytes=size,
                        created_at=now,
                    )
                )
            job = session.get(Job, claim.job_id)
            if job is not None:
                job.summary = summary
            merge_timings(session, claim, timings)
            if not set_state(session, claim, JobState.SENDING):
                raise JobInterrupted(f"job {claim.job_id}: lease lost before sending")
        return [(out.kind, path) for out, path, _ in written]

    def _write_once(self, relative: Path, dataset: Dataset) -> tuple[Path, int]:
        """Write an object unless an earlier attempt of the job already did; return it and its size.

        The object's SOP Instance UID, and so its path, is fixed by the input, the route,
        the model and its version: a file already there is this very object, written
        whole (fsynced, then renamed into place) by an attempt that the disk filling up
        stopped before it could record it. It is validated again by the caller.
        """
        final = self.spool.absolute(relative)
        try:
            # Touched: the orphan sweep takes its change time for when it was written,
            # and must not take a file this attempt is about to record.
            os.utime(final)
            return final, final.stat().st_size
        except FileNotFoundError:
            pass
        data = encode(dataset)
        return self.spool.write(relative, data), len(data)


@contextmanager
def _building(kind: str) -> Iterator[None]:
    """Turn a builder's complaint about the source headers into a job failure.

    highdicom validates eagerly and raises ValueError or TypeError for what it cannot
    encode; its message may quote a header value, so only the type is kept.
    """
    try:
        yield
    except (ValueError, TypeError, AttributeError) as exc:
        log.debug("building the %s failed", kind, exc_info=True)
        raise PermanentJobError(
            f"cannot build the {kind} from these source headers ({type(exc).__name__})"
        ) from None
