"""A claimed job's work: load the series, check it, run the model, write and send results.

:mod:`~dicomnode.pipeline.run` holds :class:`Pipeline`, which a worker calls once per
claimed job; :mod:`~dicomnode.pipeline.content` the checks a series must pass before a
route's models run on it.
"""

from dicomnode.pipeline.run import BuiltOutput, JobContext, Pipeline, encode

__all__ = ["BuiltOutput", "JobContext", "Pipeline", "encode"]
