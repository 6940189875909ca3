"""The GPU fast path: mixed precision (bf16 or fp16) and channels-last memory layout.

On a CUDA device a model runs under ``torch.autocast`` with its 4D inputs and weights
in channels-last layout, which lets cuDNN pick tensor-core kernels. Like the OpenVINO
back-end on the CPU, it is trusted only after its first batch of real data agrees
with the model in fp32 (the ModelCache's agreement check); otherwise the model stays
in fp32.
"""

from __future__ import annotations

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, bf16_supported: bool) -> torch.dtype | None:
    """Return the reduced precision to run in, or None for plain fp32.

    Parameters
    ----------
    precision : str
        ``worker.precision``: ``auto``, ``bf16``, ``fp16``, ``fp32`` or ``int8`` (INT8
        weights are a CPU path: on a GPU it means ``auto``).
    bf16_supported : bool
        Whether the device computes in bf16 (``torch.cuda.is_bf16_supported()``).

    Returns
    -------
    torch.dtype or None
        bf16 where asked for or, with ``auto``, where supported (its range is that of
        fp32, so no overflow); fp16 otherwise; None for ``fp32``.
    """
    if precision == "fp32":
        return None
    if precision in ("auto", "int8"):
        return torch.bfloat16 if bf16_supported else torch.float16
    return _DTYPES[precision]


class AutocastModel:
    """A PyTorch model run under autocast with channels-last inputs.

    Parameters
    ----------
    module : torch.nn.Module
        The loaded model (its 4D weights are switched to channels-last in place, which
        changes no value, so the fp32 reference can share them).
    device_type : str
        ``cuda`` (``cpu`` works too, for tests).
    dtype : torch.dtype
        ``torch.bfloat16`` or ``torch.float16``.
    """

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
        # torch's stubs omit the memory_format overload of Module.to.
        self.module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.device_type = device_type
        self.dtype = dtype
        self.precision = "bf16" if dtype == torch.bfloat16 else "fp16"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run one batch; the output is fp32 whatever precision ran inside.

        Parameters
        ----------
        x : torch.Tensor
            The input batch.

        Returns
        -------
        torch.Tensor
            The network's output as float32.
        """
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            y = self.module(x)
        return y.float()
