"""The lung U-Net over a whole CT: our runner against plain eager PyTorch, same run.

Reference: the shipped TorchScript model, eager fp32, batches of 8 slices, all CPU
threads, each slice pre-processed as the package says (HU + 1024). Ours: the
segmentation step the worker runs (``segment``), with ``worker.backend`` and
``worker.precision`` as given, after one warm-up (models stay loaded between
jobs, and the first batch of a new back-end is also checked against PyTorch).

Prints slices/s for both, their ratio, and the Dice of our final lung mask (both
lungs) against the mask thresholded from the eager output.

Usage::

    python bench/inference.py [--series DIR] [--backend auto|torch|openvino]
                              [--precision auto|fp32|bf16|int8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.imaging.manifest import ModelSpec, load_registry  # noqa: E402
from dicomnode.imaging.volume import Volume, load_series  # noqa: E402
from dicomnode.inference.device import configure_threads  # noqa: E402
from dicomnode.inference.segment import ModelCache, predict_slices, segment  # noqa: E402
from tests.testdata import restored_case  # noqa: E402


def eager(pixels: np.ndarray, model_path: Path, offset: float, batch: int) -> np.ndarray:
    """Plain eager fp32: the reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(model_path)).eval()
    out = np.empty(pixels.shape, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, pixels.shape[0], batch):
            x = torch.from_numpy(pixels[start : start + batch])[:, None] + offset
            out[start : start + batch] = module(x)[:, 0].numpy()
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=Path, help="default: tests/data/ct/LIDC-IDRI-0001")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    threads = configure_threads(0)
    spec = load_registry(None)["lung-unet2d"]
    series = args.series or restored_case("LIDC-IDRI-0001")  # the uncompressed originals
    files = sorted(p for p in series.rglob("*.dcm"))
    volume = load_series(files)
    slices = volume.shape[0]
    print(f"{slices} slices of {volume.shape[1]}x{volume.shape[2]}, {threads} CPU threads")

    eager(volume.pixels[:8], spec.weights_path, spec.input.offset, 8)  # warm-up
    started = time.perf_counter()
    reference = eager(volume.pixels, spec.weights_path, spec.input.offset, 8)
    eager_s = time.perf_counter() - started
    reference_mask = reference >= spec.output.threshold

    cache = ModelCache(torch.device("cpu"), args.backend, args.precision, threads)
    segment(spec, volume, cache)  # warm-up: load, compile, the agreement check
    fast = cache.fast(spec)
    backend = "PyTorch" if fast is None else f"OpenVINO {fast.precision}"
    best = float("inf")
    labels = None
    for _ in range(args.repeat):
        result = segment(spec, volume, cache)
        best = min(best, result.timings["inference_s"])
        labels = result.labels
    assert labels is not None
    # The same post-processing on the eager output, so that the second Dice measures
    # only what the back-end changed.
    eager_labels = segment(spec, volume, ModelCache(torch.device("cpu"), "torch")).labels
    ours_raw = raw_mask(cache, spec, volume)
    print(f"eager fp32 TorchScript  : {slices / eager_s:7.2f} slices/s")
    print(f"dicomnode ({backend:<13}): {slices / best:7.2f} slices/s  "
          f"ratio {eager_s / best:5.2f}x")  # fmt: skip
    print(f"Dice vs eager, raw masks (threshold only): {dice(ours_raw, reference_mask):.4f}")
    print(f"Dice vs eager, lung labels after post-processing: "
          f"{dice(labels > 0, eager_labels > 0):.4f}")  # fmt: skip


def raw_mask(cache: ModelCache, spec: ModelSpec, volume: Volume) -> np.ndarray:
    """Our back-end's thresholded output, before post-processing."""
    fast = cache.fast(spec)
    module = fast if fast is not None else cache.get(spec)
    prob = predict_slices(module, spec, volume.pixels, cache.device)
    return prob >= spec.output.threshold


if __name__ == "__main__":
    main()
