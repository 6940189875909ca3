"""Model packages that tests build themselves (nothing is downloaded)."""

from __future__ import annotations

import hashlib
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
batch_size = 3

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


def build_package(
    root: Path,
    name: str = "test-lungs",
    module: torch.nn.Module | None = None,
    matrix: tuple[int, int] = (64, 64),
    kind: str = "probability",
) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    scripted = torch.jit.script(module or LungWindow())
    torch.jit.save(scripted, str(folder / "model.ts.pt"))
    sha = hashlib.sha256((folder / "model.ts.pt").read_bytes()).hexdigest()
    (folder / "model.toml").write_text(
        MANIFEST.format(name=name, sha=sha, rows=matrix[0], cols=matrix[1], kind=kind)
    )
    return folder
