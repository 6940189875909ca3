"""A claimed job's work: load the series, check it, run the model, write and send results.

:mod:`~dicomnode.pipeline.run` holds :class:`Pipeline`, which a worker calls once per
claimed job; :mod:`~dicomnode.pipeline.content` the checks a series must pass before a
route's models run on it; :mod:`~dicomnode.pipeline.preview` draws a job's SEG over its
source series from the spool (``jobs show --preview``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.pipeline.preview import preview_seg_path, render_job_preview
    from dicomnode.pipeline.run import BuiltOutput, JobContext, Pipeline, encode

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "BuiltOutput": "dicomnode.pipeline.run",
    "JobContext": "dicomnode.pipeline.run",
    "Pipeline": "dicomnode.pipeline.run",
    "encode": "dicomnode.pipeline.run",
    "preview_seg_path": "dicomnode.pipeline.preview",
    "render_job_preview": "dicomnode.pipeline.preview",
}

__all__ = [
    "BuiltOutput",
    "JobContext",
    "Pipeline",
    "encode",
    "preview_seg_path",
    "render_job_preview",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
