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


MONAI_MANIFEST = """
name = "{name}"
version = "0.1"
task = "segmentation"
licence = "test"
intended_use = "tests only"

[weights]
file = "{file}"
format = "{format}"
{network}
[input]
modality = ["CT"]
matrix = [32, 32]
offset = 1024.0
scale = 0.001
batch_size = 4

[output]
kind = "logits"
threshold = 0.5

[[output.segments]]
label = "Lung"
color = [0, 255, 0]
category = {{ scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }}
type = {{ scheme = "SCT", value = "39607008", meaning = "Lung" }}
"""

# A small 2D MONAI U-Net: one input channel, one output channel (logits).
UNET_ARGS = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
}
UNET_TOML = (
    '[network]\nname = "UNet"\n'
    "args = { spatial_dims = 2, in_channels = 1, out_channels = 1, channels = [4, 8, 16], "
    "strides = [2, 2], num_res_units = 1 }\n"
)


def monai_unet(seed: int = 0) -> torch.nn.Module:
    """The network of the state-dict and bundle test packages, with seeded weights."""
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(**UNET_ARGS).eval()  # type: ignore[arg-type]


def build_state_dict_package(
    root: Path, name: str = "test-unet", network_toml: str = UNET_TOML, seed: int = 0
) -> Path:
    """A package of a state dict plus the MONAI network named in model.toml."""
    folder = root / name
    folder.mkdir(parents=True)
    torch.save(monai_unet(seed).state_dict(), folder / "weights.pt")
    (folder / "model.toml").write_text(
        MONAI_MANIFEST.format(
            name=name, file="weights.pt", format="state_dict", network=network_toml
        )
    )
    return folder


def build_bundle_package(
    root: Path, name: str = "test-bundle", network_def: dict | None = None, seed: int = 0
) -> Path:
    """A package wrapping a MONAI bundle folder (configs/inference.json, models/model.pt).

    The network definition uses an @reference, as real bundles do.
    """
    import json

    folder = root / name
    bundle = folder / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    torch.save(monai_unet(seed).state_dict(), bundle / "models" / "model.pt")
    args = {k: v for k, v in UNET_ARGS.items() if k != "channels"}
    config = {
        "unet_channels": UNET_ARGS["channels"],
        "network_def": network_def
        or {"_target_": "UNet", "channels": "@unet_channels", "_requires_": "@x", **args},
        "x": None,
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32]},
    }
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    (folder / "model.toml").write_text(
        MONAI_MANIFEST.format(name=name, file="bundle", format="monai_bundle", network="")
    )
    return folder


DETECTION_MANIFEST = """
name = "{name}"
version = "0.1"
task = "detection"
licence = "test"
intended_use = "tests only"

[weights]
file = "model.ts.pt"
format = "torchscript"

[input]
modality = ["CT"]
matrix = [32, 32]
batch_size = 16

[output]
kind = "logits"
threshold = 0.5

[detection]
lung_model = "{lung_model}"
patch_mm = 40.0
max_candidates = 50
"""


class CentreDensity(torch.nn.Module):
    """A stand-in CNN: the denser the centre of the middle patch, the likelier a nodule.

    Soft tissue (about 0 HU, 0.71 after the 0..1 window) scores near 1, lung (-850 HU,
    0.11) near 0: the phantom's nodule is found, and nothing else in its lungs is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        middle = x.shape[1] // 2
        centre = x[:, middle, 14:18, 14:18].mean(dim=(1, 2))
        return ((centre - 0.4) * 40.0)[:, None]


class TwoScores(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2, 0, 0]


def build_detection_package(
    root: Path,
    name: str = "test-nodules",
    module: torch.nn.Module | None = None,
    lung_model: str = "test-lungs",
) -> Path:
    """A detection package whose candidates are searched in ``lung_model``'s mask."""
    folder = root / name
    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(module or CentreDensity()), str(folder / "model.ts.pt"))
    (folder / "model.toml").write_text(DETECTION_MANIFEST.format(name=name, lung_model=lung_model))
    return folder


CLASSIFICATION_MANIFEST = """
name = "{name}"
version = "0.1"
task = "classification"
licence = "test"
intended_use = "tests only"

[weights]
file = "model.ts.pt"
format = "torchscript"

[input]
modality = ["CT"]
matrix = [32, 32]
offset = 1024.0
batch_size = 4

[output]
kind = "{kind}"
threshold = 0.5
aggregate = "{aggregate}"
{classes}
"""

LUNG_CLASS = """
[[output.classes]]
label = "Lungs visible"
code = {{ scheme = "SCT", value = "39607008", meaning = "Lung" }}
"""

TWO_CLASSES = """
[[output.classes]]
label = "No lungs"
code = {{ scheme = "SCT", value = "272519000", meaning = "Absent" }}

[[output.classes]]
label = "Lungs visible"
code = {{ scheme = "SCT", value = "39607008", meaning = "Lung" }}
"""


class LungPresence(torch.nn.Module):
    """A stand-in slice classifier: lungs visible when over 5% of the slice is lung.

    Input is HU + 1024, so lung (-850 HU) is about 174. ``two`` returns the logits of
    [no lungs, lungs] for softmax; otherwise one logit.
    """

    def __init__(self, two: bool = False) -> None:
        super().__init__()
        self.two = two

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lung = (torch.abs(x - 174.0) < 80.0).float().mean(dim=(1, 2, 3))
        logit = (lung - 0.05) * 200.0
        if self.two:
            return torch.stack([-logit, logit], dim=1)
        return logit[:, None]


def build_classification_package(
    root: Path,
    name: str = "test-classes",
    kind: str = "logits",
    aggregate: str = "mean",
    module: torch.nn.Module | None = None,
) -> Path:
    """A slice classifier package: one class (logits) or two (softmax)."""
    folder = root / name
    folder.mkdir(parents=True)
    two = kind == "softmax"
    scripted = torch.jit.script(module or LungPresence(two=two))
    torch.jit.save(scripted, str(folder / "model.ts.pt"))
    (folder / "model.toml").write_text(
        CLASSIFICATION_MANIFEST.format(
            name=name,
            kind=kind,
            aggregate=aggregate,
            classes=(TWO_CLASSES if two else LUNG_CLASS).format(),
        )
    )
    return folder


MULTICLASS_MANIFEST = """
name = "{name}"
version = "0.1"
task = "segmentation"
licence = "test"
intended_use = "tests only"

[weights]
file = "model.ts.pt"
format = "torchscript"

[input]
modality = ["CT"]
{input}
offset = 1024.0
batch_size = {batch_size}

[output]
kind = "{kind}"
threshold = 0.5
postprocess = "{postprocess}"
{segments}
"""

LUNG_SEGMENT = """
[[output.segments]]
label = "Lung"
color = [0, 255, 0]
category = {{ scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }}
type = {{ scheme = "SCT", value = "39607008", meaning = "Lung" }}
"""

TISSUE_SEGMENT = """
[[output.segments]]
label = "Soft tissue"
color = [255, 128, 0]
category = {{ scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }}
type = {{ scheme = "SCT", value = "87784001", meaning = "Soft tissue" }}
"""

SIDED_SEGMENTS = """
[[output.segments]]
label = "Left lung"
side = "left"
category = {{ scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }}
type = {{ scheme = "SCT", value = "44029006", meaning = "Left lung" }}

[[output.segments]]
label = "Right lung"
side = "right"
category = {{ scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }}
type = {{ scheme = "SCT", value = "3341006", meaning = "Right lung" }}
"""


class TissueClasses(torch.nn.Module):
    """Three channels: background, lung (HU -930..-770), soft tissue (HU -60..140).

    Input is HU + 1024. Element-wise, so it takes slices ``[N, 1, H, W]`` and windows
    ``[N, 1, D, H, W]`` alike; on the phantom (-1000, -850 and 40 HU) the argmax is
    exactly background, lung and tissue.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lung = 80.0 - torch.abs(x - 174.0)
        tissue = 100.0 - torch.abs(x - 1064.0)
        return torch.cat([torch.zeros_like(x), lung, tissue], dim=1)


class AirOrTissue(torch.nn.Module):
    """Three channels whose middle one never wins: labels are only 0 (air) or 2 (tissue).

    Labels interpolated between 0 and 2 would show a 1 at every edge; argmax labels
    resampled by nearest neighbour never do.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        edge = x - 544.0  # half-way between air (24) and tissue (1064)
        return torch.cat([-edge, torch.full_like(x, -1e4), edge], dim=1)


class TissueProbability(torch.nn.Module):
    """One channel: the probability of soft tissue (HU -60..140), any dimensionality."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((100.0 - torch.abs(x - 1064.0)) / 5.0)


class LowHalfOfFirstAxis(torch.nn.Module):
    """Probability 1 in the half of the window with low indices along its first axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[:, :, : x.shape[2] // 2] = 1.0
        return out


class Failing(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:
            raise RuntimeError("simulated kernel failure")
        return x


def build_multiclass_package(
    root: Path,
    name: str = "test-tissue",
    module: torch.nn.Module | None = None,
    matrix: tuple[int, int] = (64, 64),
    postprocess: str = "none",
    batch_size: int = 4,
) -> Path:
    """A 2D softmax package: segments Lung (1) and Soft tissue (2), TissueClasses."""
    segments = (
        SIDED_SEGMENTS if postprocess == "split-left-right" else LUNG_SEGMENT + TISSUE_SEGMENT
    )
    return _build_custom(
        root,
        name,
        module or TissueClasses(),
        input_toml=f"matrix = [{matrix[0]}, {matrix[1]}]",
        kind="softmax",
        postprocess=postprocess,
        segments=segments,
        batch_size=batch_size,
    )


def build_volume_package(
    root: Path,
    name: str = "test-3d",
    module: torch.nn.Module | None = None,
    roi: tuple[int, int, int] = (8, 32, 32),
    spacing: tuple[float, float, float] | None = None,
    axes: str = "slice-row-column",
    clip: tuple[float, float] | None = None,
    overlap: float = 0.25,
    kind: str = "probability",
    batch_size: int = 2,
) -> Path:
    """A 3D package (sliding window): one Soft tissue segment, or Lung + Soft tissue
    for ``kind = "softmax"``; TissueProbability or TissueClasses by default."""
    lines = ["dimensions = 3", f"roi = {list(roi)}", f"overlap = {overlap}", f'axes = "{axes}"']
    if spacing is not None:
        lines.append(f"spacing = {list(spacing)}")
    if clip is not None:
        lines.append(f"clip = {list(clip)}")
    multi = kind == "softmax"
    default: torch.nn.Module = TissueClasses() if multi else TissueProbability()
    return _build_custom(
        root,
        name,
        module or default,
        input_toml="\n".join(lines),
        kind=kind,
        postprocess="none",
        segments=LUNG_SEGMENT + TISSUE_SEGMENT if multi else TISSUE_SEGMENT,
        batch_size=batch_size,
    )


def _build_custom(
    root: Path,
    name: str,
    module: torch.nn.Module,
    *,
    input_toml: str,
    kind: str,
    postprocess: str,
    segments: str,
    batch_size: int,
) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(folder / "model.ts.pt"))
    (folder / "model.toml").write_text(
        MULTICLASS_MANIFEST.format(
            name=name,
            input=input_toml,
            kind=kind,
            postprocess=postprocess,
            segments=segments.format(),
            batch_size=batch_size,
        )
    )
    return folder
