"""Model packages that tests build themselves (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

MANIFEST = """
name = "{name}"
version = "0.1"
task = "segmentation"
licence = "test"
intended_use = "tests only"

[weights]
file = "model.ts.pt"
format = "torchscript"
sha256 = "{sha}"

[input]
modality = ["CT"]
matrix = [{rows}, {cols}]
offset = 1024.0
batch_size = {batch_size}

[output]
kind = "{kind}"
threshold = 0.5
postprocess = "split-left-right"

[[output.segments]]
label = "Left lung"
side = "left"
color = [0, 255, 0]
category = {{ scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }}
type = {{ scheme = "SCT", value = "44029006", meaning = "Left lung" }}

[[output.segments]]
label = "Right lung"
side = "right"
color = [0, 0, 255]
category = {{ scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }}
type = {{ scheme = "SCT", value = "3341006", meaning = "Right lung" }}
"""


class LungWindow(torch.nn.Module):
    """'Segments' lung-like tissue: HU between about -930 and -770 (input is HU + 1024)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((80.0 - torch.abs(x - 174.0)) / 5.0)


class WrongShape(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2]


class SlowLungWindow(torch.nn.Module):
    """LungWindow that first burns CPU: ``iterations`` matrix products per forward pass.

    For tests that must catch a job in the middle of inference. The products are few
    and large (each is one parallel region of torch's thread pool), so a busy machine
    slows a batch in proportion instead of stalling it at thousands of thread
    barriers. They multiply by the identity, so the values stay finite, and their
    result feeds the output, so TorchScript cannot drop the loop.
    """

    def __init__(self, iterations: int, size: int = 1024) -> None:
        super().__init__()
        self.iterations = iterations
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.eye(self.size, device=x.device)
        acc = weight
        for _ in range(self.iterations):
            acc = torch.mm(acc, weight)
        return torch.sigmoid((80.0 - torch.abs(x - 174.0)) / 5.0) + 0.0 * acc[0, 0]


def slow_iterations(seconds: float) -> int:
    """Return how many SlowLungWindow iterations take about ``seconds`` on this machine.

    Measured here, with this process's torch threads; a loaded machine only makes a
    batch slower, which is what the slow-model tests want.
    """
    probe = torch.jit.script(SlowLungWindow(10))
    x = torch.zeros(1, 1, 64, 64)
    with torch.inference_mode():
        probe(x)  # the first calls profile and compile
        probe(x)
        started = time.perf_counter()
        probe(x)
        per_iteration = (time.perf_counter() - started) / 10
    return max(1, round(seconds / per_iteration))


def build_package(
    root: Path,
    name: str = "test-lungs",
    module: torch.nn.Module | None = None,
    matrix: tuple[int, int] = (64, 64),
    kind: str = "probability",
    batch_size: int = 3,
) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    scripted = torch.jit.script(module or LungWindow())
    torch.jit.save(scripted, str(folder / "model.ts.pt"))
    sha = hashlib.sha256((folder / "model.ts.pt").read_bytes()).hexdigest()
    (folder / "model.toml").write_text(
        MANIFEST.format(
            name=name, sha=sha, rows=matrix[0], cols=matrix[1], kind=kind, batch_size=batch_size
        )
    )
    return folder


def build_slow_package(
    root: Path, name: str = "test-lungs", seconds_per_slice: float = 1.0
) -> Path:
    """Build a package whose forward pass takes about ``seconds_per_slice`` per slice.

    One slice per batch, so the worker reaches a checkpoint (lease heartbeat, stop
    check) after every slice.
    """
    module = SlowLungWindow(slow_iterations(seconds_per_slice))
    return build_package(root, name, module=module, batch_size=1)
