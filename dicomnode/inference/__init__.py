"""Running models: weights, devices, back-ends, segmentation, classification, detection.

Arrays in, arrays out: nothing here touches the database or the network. Models are
loaded once per worker and kept warm (:class:`~dicomnode.inference.segment.ModelCache`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.inference.device import configure_threads, select_device
    from dicomnode.inference.segment import ModelCache
    from dicomnode.inference.transforms import example_shapes
    from dicomnode.inference.weights import load_model

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "ModelCache": "dicomnode.inference.segment",
    "configure_threads": "dicomnode.inference.device",
    "example_shapes": "dicomnode.inference.transforms",
    "load_model": "dicomnode.inference.weights",
    "select_device": "dicomnode.inference.device",
}

__all__ = [
    "ModelCache",
    "configure_threads",
    "example_shapes",
    "load_model",
    "select_device",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
