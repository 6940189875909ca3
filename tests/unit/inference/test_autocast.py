"""The GPU fast path (autocast + channels-last), exercised on the CPU in bf16.

No GPU is available to the test machines; torch's CPU autocast runs the same wrapper
code, so what is checked here is the wrapper and the precision choice. CUDA speed and
fp16 behaviour are not measured by these tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicomnode.inference.autocast import AutocastModel, autocast_dtype
from dicomnode.inference.backends import masks_agree
from tests.factories import lung_phantom
from tests.unit.inference.packages import LungWindow, monai_unet


@pytest.mark.parametrize(
    ("precision", "bf16", "expected"),
    [
        ("fp32", True, None),
        ("auto", True, torch.bfloat16),
        ("auto", False, torch.float16),
        ("bf16", False, torch.bfloat16),
        ("fp16", True, torch.float16),
    ],
)
def test_precision_choice(precision: str, bf16: bool, expected: torch.dtype | None) -> None:
    assert autocast_dtype(precision, bf16) is expected


def test_bf16_autocast_agrees_with_fp32_and_returns_fp32() -> None:
    hu = torch.from_numpy(lung_phantom(slices=4, size=64))[:, None] + 1024.0
    reference = torch.jit.script(LungWindow())
    with torch.inference_mode():
        expected = reference(hu)
        fast = AutocastModel(reference, "cpu", torch.bfloat16)
        got = fast(hu)
    assert fast.precision == "bf16"
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert masks_agree(expected, got, 0.5)


def test_a_monai_network_in_channels_last_gives_the_same_masks() -> None:
    torch.manual_seed(0)
    network = monai_unet(seed=3)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        expected = torch.sigmoid(network(x))
        fast = AutocastModel(network, "cpu", torch.bfloat16)
        got = torch.sigmoid(fast(x))
        # The reference shares the (now channels-last) weights and still gives fp32 values.
        again = torch.sigmoid(network(x))
    np.testing.assert_allclose(again.numpy(), expected.numpy(), atol=1e-5)
    assert masks_agree(expected, got, 0.5)
