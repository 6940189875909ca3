"""Which device a model runs on, and how many CPU threads it may use."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """Return the device to run models on.

    Parameters
    ----------
    preference : str
        ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.

    Returns
    -------
    torch.device
        The chosen device. ``cuda`` without a GPU falls back to the CPU with a warning,
        so a node configured for a GPU host still works on a CPU-only spare.
    """
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        log.warning("worker.device is cuda but no CUDA device is available; using the CPU")
    return torch.device("cpu")


def configure_threads(threads: int) -> int:
    """Set the number of CPU threads torch uses for inference.

    Parameters
    ----------
    threads : int
        Threads to use; 0 means one per available core.

    Returns
    -------
    int
        The number set.
    """
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    torch.set_num_threads(threads)
    return threads
