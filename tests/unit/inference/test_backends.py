"""OpenVINO on the CPU: same masks as PyTorch, trusted only after agreeing on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.inference import ModelCache
from dicomnode.inference.backends import masks_agree, openvino_available
from dicomnode.inference.segment import segment
from tests.factories import ct_series, lung_phantom
from tests.unit.inference.packages import build_package, build_state_dict_package

CPU = torch.device("cpu")
needs_openvino = pytest.mark.skipif(
    not openvino_available(), reason="openvino is a test dependency"
)


def volume(slices: int = 10, size: int = 64):
    return volume_from_datasets(ct_series(lung_phantom(slices=slices, size=size)))


@needs_openvino
@pytest.mark.parametrize("build", [build_package, build_state_dict_package])
def test_openvino_gives_the_same_labels_and_is_then_trusted(tmp_path: Path, build) -> None:
    spec = load_model_spec(build(tmp_path))
    vol = volume(slices=10)  # batches of 3 or 4 do not divide it: a dynamic batch size
    reference = segment(spec, vol, ModelCache(CPU, backend="torch")).labels
    cache = ModelCache(CPU, backend="openvino", precision="fp32")
    assert cache.fast(spec) is not None and not cache.trusted(spec)
    first = segment(spec, vol, cache).labels
    assert cache.trusted(spec)
    again = segment(spec, vol, cache).labels  # now without the PyTorch check
    assert np.array_equal(first, reference) and np.array_equal(again, reference)


class Inverted:
    """A 'faster back-end' that gets everything wrong: the check must catch it."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 1.0 - self.module(x)


def test_a_back_end_that_disagrees_is_dropped(tmp_path: Path) -> None:
    spec = load_model_spec(build_package(tmp_path))
    vol = volume()
    reference = segment(spec, vol, ModelCache(CPU, backend="torch")).labels
    cache = ModelCache(CPU, backend="openvino")
    bad = Inverted(cache.get(spec))
    cache._fast[(spec.name, spec.version)] = bad  # type: ignore[assignment]
    labels = segment(spec, vol, cache).labels
    assert np.array_equal(labels, reference)  # PyTorch's answer, not the bad one
    assert bad.calls == 1  # one batch decided
    assert cache.fast(spec) is None and not cache.trusted(spec)


def test_torch_backend_and_gpus_never_compile(tmp_path: Path) -> None:
    spec = load_model_spec(build_package(tmp_path))
    assert ModelCache(CPU, backend="torch").fast(spec) is None
    assert ModelCache(torch.device("meta"), backend="openvino").fast(spec) is None


def test_masks_agree_within_tolerance() -> None:
    a = torch.zeros(2, 1, 100, 100)
    a[:, :, 20:80, 20:80] = 0.9  # 7200 foreground voxels
    b = a.clone()
    b[0, 0, 20, 20:60] = 0.1  # 40 voxels differ: 0.6% of the union
    assert masks_agree(a, b, 0.5)
    b[0, 0, 21:25, 20:80] = 0.1  # 280 differ: 3.9%
    assert not masks_agree(a, b, 0.5)
    empty = torch.zeros(2, 1, 100, 100)
    speck = empty.clone()
    speck[0, 0, 0, 0] = 1.0  # one voxel in 20000: 0.005%, tolerated
    assert masks_agree(empty, speck, 0.5)
    assert not masks_agree(a, a[:1], 0.5)
