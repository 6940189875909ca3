"""Faster CPU back-ends for a loaded model, used only where they agree with PyTorch.

On the CPU, OpenVINO runs the shipped lung U-Net about 4x faster than eager PyTorch
in fp32 with the same outputs, and far faster again in bf16 on processors with AMX
or AVX-512 BF16 (see the README's figures). It is optional (``pip install
dicomnode[openvino]``): without it, or on a GPU, models run in PyTorch.

A compiled model is trusted only after it has agreed with the PyTorch model on the
first batch of real data it sees (:func:`masks_agree`); if it does not, the node
logs a warning and keeps that model on PyTorch.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# Thresholded masks may differ on at most this fraction of their union of voxels
# (or, for nearly empty batches, of all voxels) for a back-end to count as agreeing.
AGREEMENT_TOLERANCE = 0.01
EMPTY_TOLERANCE = 1e-4


def openvino_available() -> bool:
    """Return whether OpenVINO can be imported.

    Returns
    -------
    bool
        True when the ``openvino`` package is installed.
    """
    return importlib.util.find_spec("openvino") is not None


class OpenVINOModel:
    """A model compiled by OpenVINO that takes and returns torch tensors.

    Parameters
    ----------
    compiled : openvino.CompiledModel
        The compiled model.
    precision : str
        The inference precision OpenVINO chose (``bf16``, ``f32``, ...), for the logs.
    """

    def __init__(self, compiled: Any, precision: str) -> None:
        self.compiled = compiled
        self.precision = precision
        self._local = threading.local()  # an infer request is not thread-safe

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run one batch.

        Parameters
        ----------
        x : torch.Tensor
            ``[N, C, H, W]`` float32 on the CPU.

        Returns
        -------
        torch.Tensor
            The model's output as float32.
        """
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({0: x.detach().cpu().numpy()})
        return torch.from_numpy(np.array(result[0], dtype=np.float32, copy=True))


def compile_openvino(
    module: torch.nn.Module, example: torch.Tensor, threads: int, precision: str
) -> OpenVINOModel:
    """Convert and compile a PyTorch or TorchScript model for the CPU.

    Parameters
    ----------
    module : torch.nn.Module
        The loaded model, in eval mode on the CPU.
    example : torch.Tensor
        An input of the right shape, to trace it (the batch size stays dynamic).
    threads : int
        CPU threads to use; 0 lets OpenVINO decide.
    precision : str
        ``auto`` (bf16 where the CPU has it), ``fp32`` or ``bf16`` (``int8``, for a
        package without INT8 weights, compiles in fp32).

    Returns
    -------
    OpenVINOModel
        The compiled model.
    """
    import openvino as ov

    core = ov.Core()
    with torch.inference_mode(), warnings.catch_warnings():
        # Converting traces the model; its tracer warnings are about Python control
        # flow that the fixed input contract (one matrix size) never exercises.
        warnings.simplefilter("ignore")
        converted = ov.convert_model(module, example_input=example)
    rank = len(example.shape)
    converted.reshape({0: ov.PartialShape([-1, *example.shape[1:rank]])})
    config = _cpu_config(threads)
    if precision != "auto":
        # int8 reaches here only for a package without INT8 weights: it runs in fp32.
        config["INFERENCE_PRECISION_HINT"] = "bf16" if precision == "bf16" else "f32"
    compiled = core.compile_model(converted, "CPU", config)
    chosen = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = chosen.get_type_name() if hasattr(chosen, "get_type_name") else str(chosen)
    return OpenVINOModel(compiled, str(name))


def _cpu_config(threads: int) -> dict[str, Any]:
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def load_openvino_int8(xml: Path, threads: int) -> OpenVINOModel:
    """Compile a package's INT8 OpenVINO IR (quantized offline) for the CPU.

    Parameters
    ----------
    xml : Path
        The IR's .xml file; its .bin lies beside it.
    threads : int
        CPU threads to use; 0 lets OpenVINO decide.

    Returns
    -------
    OpenVINOModel
        The compiled model, its precision reported as ``int8``.
    """
    import openvino as ov

    core = ov.Core()
    model = core.read_model(xml)
    model.reshape({0: ov.PartialShape([-1, *model.input(0).get_partial_shape()[1:]])})
    return OpenVINOModel(core.compile_model(model, "CPU", _cpu_config(threads)), "int8")


def cpu_has_bf16() -> bool:
    """Return whether OpenVINO computes in bf16 on this CPU (AMX or AVX-512 BF16)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def wants_int8(precision: str, bf16: bool) -> bool:
    """Return whether a package's INT8 weights should run, where it ships them.

    Parameters
    ----------
    precision : str
        ``worker.precision``.
    bf16 : bool
        Whether the CPU computes in bf16 (:func:`cpu_has_bf16`).

    Returns
    -------
    bool
        True for ``int8``, and for ``auto`` on a CPU without bf16: there INT8 with
        VNNI ran the lung U-Net about 3x faster than OpenVINO fp32, while bf16, where
        the CPU has it, is faster still and closer to fp32.
    """
    return precision == "int8" or (precision == "auto" and not bf16)


def masks_agree(reference: torch.Tensor, candidate: torch.Tensor, threshold: float) -> bool:
    """Return whether two outputs give the same masks, within tolerance.

    Parameters
    ----------
    reference, candidate : torch.Tensor
        Probabilities (or logits with ``threshold`` 0) of the same batch.
    threshold : float
        The foreground threshold.

    Returns
    -------
    bool
        True if the thresholded masks differ on at most 1% of their union (or on at
        most 0.01% of all voxels, for nearly empty batches).
    """
    if reference.shape != candidate.shape:
        return False
    a = reference >= threshold
    b = candidate >= threshold
    differ = int((a ^ b).sum())
    union = int((a | b).sum())
    return differ <= max(AGREEMENT_TOLERANCE * union, EMPTY_TOLERANCE * a.numel())


def labels_agree(reference: torch.Tensor, candidate: torch.Tensor) -> bool:
    """Return whether two label maps (argmax of a multi-class output) agree, within tolerance.

    Parameters
    ----------
    reference, candidate : torch.Tensor
        Integer labels of the same batch.

    Returns
    -------
    bool
        True if they differ on at most 1% of the voxels either calls foreground (or on
        at most 0.01% of all voxels, for nearly empty batches).
    """
    if reference.shape != candidate.shape:
        return False
    differ = int((reference != candidate).sum())
    union = int(((reference > 0) | (candidate > 0)).sum())
    return differ <= max(AGREEMENT_TOLERANCE * union, EMPTY_TOLERANCE * reference.numel())
