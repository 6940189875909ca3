from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.imaging import segment_stats


def test_matches_direct_numpy() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.normal(-800, 60, (5, 20, 20)).astype(np.float32)
    labels = rng.integers(0, 3, (5, 20, 20)).astype(np.uint8)
    stats = segment_stats(labels, pixels, 0.002, ["a", "b"])
    for s in stats:
        values = pixels[labels == s.number].astype(np.float64)
        assert s.voxels == values.size
        assert s.volume_ml == pytest.approx(values.size * 0.002)
        assert s.mean == pytest.approx(values.mean(), rel=1e-9)
        assert s.std == pytest.approx(values.std(), rel=1e-6)
    assert [s.label for s in stats] == ["a", "b"]


def test_empty_segment_is_nan_not_an_error() -> None:
    stats = segment_stats(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2)), 1.0, ["x"])
    assert stats[0].voxels == 0 and stats[0].volume_ml == 0 and math.isnan(stats[0].mean)
