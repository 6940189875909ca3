"""Make the package's INT8 OpenVINO weights: post-training quantization with NNCF.

The shipped TorchScript model is converted to OpenVINO and quantized by NNCF
(``nncf.quantize``: 8-bit weights and activations, the mixed preset, full bias
correction), calibrated on every second slice of one real CT, LIDC-IDRI-0003 from
``tests/data/ct``. The first and the last convolutions stay in floating point: the
first sees raw HU + 1024 (a range 8 bits cut coarsely) and the last gives the
probabilities that are thresholded. With fast bias correction, or with those two
layers quantized, the masks differed from fp32 on 1.5% of their union, above the
1% the node's agreement check allows; as written they differ on about 0.2%.

It writes ``lung_unet2d.int8.xml`` and ``.bin`` beside this file and prints the
``weights.openvino_int8_sha256`` to put in ``model.toml``, then checks the result
on LIDC-IDRI-0001 (held out) and on any series given with ``--check``, printing
Dice against eager fp32 PyTorch and slices/s of both OpenVINO models.

NNCF is needed only here, not by the node: ``pip install nncf==3.4.0`` (the version
that made the shipped files; OpenVINO 2026.4).

Usage::

    python models/lung-unet2d/quantize.py [--calibration DIR] [--check DIR ...]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.misc import is_dicom

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.evaluate.scores import dice  # noqa: E402
from dicomnode.imaging.manifest import ModelSpec, load_model_spec  # noqa: E402
from dicomnode.imaging.volume import load_series  # noqa: E402
from dicomnode.inference.backends import compile_openvino, load_openvino_int8  # noqa: E402
from dicomnode.inference.segment import predict_slices  # noqa: E402
from dicomnode.inference.weights import openvino_ir_sha256  # noqa: E402
from tests.testdata import restored_case  # noqa: E402

OUT = HERE / "lung_unet2d.int8.xml"
CPU = torch.device("cpu")


def pixels(folder: Path) -> np.ndarray:
    """Return a series' slices in HU, ``[slices, rows, columns]``."""
    return load_series(sorted(p for p in folder.rglob("*") if p.is_file() and is_dicom(p))).pixels


def timed(module: Any, spec: ModelSpec, slices: np.ndarray) -> tuple[np.ndarray, float]:
    """Run the node's slice loop with ``module``; return its output and slices/s."""
    predict_slices(module, spec, slices[: spec.input.batch_size], CPU)  # warm-up
    started = time.perf_counter()
    out = predict_slices(module, spec, slices, CPU)
    return out, len(slices) / (time.perf_counter() - started)


def main() -> None:
    """Quantize (unless ``--check-only``), then check."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=Path, help="default: LIDC-IDRI-0003")
    parser.add_argument("--check", type=Path, nargs="*", help="series besides LIDC-IDRI-0001")
    parser.add_argument("--check-only", action="store_true", help="check the shipped files")
    args = parser.parse_args()
    spec = load_model_spec(HERE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(spec.weights_path)).eval()
    if not args.check_only:
        quantize(module, args.calibration, spec)
    check(module, [restored_case("LIDC-IDRI-0001"), *(args.check or [])], spec)


def quantize(module: torch.jit.ScriptModule, folder: Path | None, spec: ModelSpec) -> None:
    """Quantize ``module`` on ``folder`` (default LIDC-IDRI-0003); write the IR files."""
    import nncf
    import openvino as ov

    offset = spec.input.offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(module, example_input=torch.zeros(1, 1, *spec.input.matrix))
    model.reshape({0: ov.PartialShape([-1, 1, *spec.input.matrix])})

    convolutions = [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Convolution"
    ]
    calibration = pixels(folder or restored_case("LIDC-IDRI-0003"))
    items = [
        (calibration[i : i + 1, None] + offset).astype(np.float32)
        for i in range(0, len(calibration), 2)
    ]
    quantized = nncf.quantize(
        model,
        nncf.Dataset(items),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(items),
        fast_bias_correction=False,
        ignored_scope=nncf.IgnoredScope(names=[convolutions[0], convolutions[-1]]),
    )
    ov.save_model(quantized, OUT, compress_to_fp16=False)
    print(f"wrote {OUT.name} and {OUT.with_suffix('.bin').name}")
    print(f'openvino_int8_sha256 = "{openvino_ir_sha256(OUT)}"')


def check(module: torch.jit.ScriptModule, folders: list[Path], spec: ModelSpec) -> None:
    """Print Dice against eager fp32 and slices/s of both OpenVINO models per series.

    The OpenVINO models are compiled and run as the node runs them.
    """
    example = torch.zeros(spec.input.batch_size, 1, *spec.input.matrix)
    fp32 = compile_openvino(module, example, 0, "fp32")
    int8 = load_openvino_int8(OUT, 0)
    for folder in folders:
        slices = pixels(folder)
        eager = predict_slices(module, spec, slices, CPU) >= spec.output.threshold
        _, fp32_rate = timed(fp32, spec, slices)
        out, int8_rate = timed(int8, spec, slices)
        ours = out >= spec.output.threshold
        differ = int((eager ^ ours).sum()) / max(int((eager | ours).sum()), 1)
        print(
            f"{folder.name}: {len(slices)} slices; OpenVINO fp32 {fp32_rate:.1f} slices/s, "
            f"int8 {int8_rate:.1f} slices/s; int8 vs eager fp32: Dice {dice(eager, ours):.4f}, "
            f"masks differ on {100 * differ:.2f}% of their union"
        )


if __name__ == "__main__":
    main()
