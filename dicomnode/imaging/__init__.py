"""What the models and the outputs share: volumes, model packages, results.

:mod:`~dicomnode.imaging.volume` turns a series into a volume and back (the one home of
geometry), :mod:`~dicomnode.imaging.manifest` reads model packages' ``model.toml``,
:mod:`~dicomnode.imaging.results` and :mod:`~dicomnode.imaging.measurements` hold
what a model found; :mod:`~dicomnode.imaging.routing`,
:mod:`~dicomnode.imaging.volumetric` and :mod:`~dicomnode.imaging.selection` judge
series from their headers (which routes match, whether a series is a volume, which
series of a study is best). It sits below both :mod:`dicomnode.inference` and
:mod:`dicomnode.outputs`, so that neither imports the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.imaging.manifest import (
        ClassSpec,
        CodeSpec,
        ModelSpec,
        SegmentSpec,
        load_registry,
    )
    from dicomnode.imaging.measurements import SegmentStats, segment_stats
    from dicomnode.imaging.results import ClassificationResult, DetectionResult, Finding
    from dicomnode.imaging.volume import Volume, frame_order, is_enhanced, load_series

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "ClassSpec": "dicomnode.imaging.manifest",
    "ClassificationResult": "dicomnode.imaging.results",
    "CodeSpec": "dicomnode.imaging.manifest",
    "DetectionResult": "dicomnode.imaging.results",
    "Finding": "dicomnode.imaging.results",
    "ModelSpec": "dicomnode.imaging.manifest",
    "SegmentSpec": "dicomnode.imaging.manifest",
    "SegmentStats": "dicomnode.imaging.measurements",
    "Volume": "dicomnode.imaging.volume",
    "frame_order": "dicomnode.imaging.volume",
    "is_enhanced": "dicomnode.imaging.volume",
    "load_registry": "dicomnode.imaging.manifest",
    "load_series": "dicomnode.imaging.volume",
    "segment_stats": "dicomnode.imaging.measurements",
}

__all__ = [
    "ClassSpec",
    "ClassificationResult",
    "CodeSpec",
    "DetectionResult",
    "Finding",
    "ModelSpec",
    "SegmentSpec",
    "SegmentStats",
    "Volume",
    "frame_order",
    "is_enhanced",
    "load_registry",
    "load_series",
    "segment_stats",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
