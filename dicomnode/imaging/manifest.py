"""Model packages: ``models/<name>/model.toml`` read, validated and described.

A package says what a model takes, what it gives, where its weights lie and under
which licence, so that a site can add a model without writing Python. A bad
package is a one-line :class:`~dicomnode.errors.ModelPackageError` naming the
file and the field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.config.fields import build, field_doc, one_of, positive
from dicomnode.errors import ConfigError, ModelPackageError

MANIFEST = "model.toml"
_SHIPPED = Path(__file__).resolve().parent.parent


def shipped_models_path() -> Path:
    """Return the folder of the models that come with dicomnode.

    Returns
    -------
    Path
        ``models/`` of a source checkout, or its copy inside an installed wheel.
    """
    for candidate in (_SHIPPED.parent / "models", _SHIPPED / "_data" / "models"):
        if candidate.is_dir():
            return candidate
    return _SHIPPED.parent / "models"


def _rgb(value: list[int]) -> str | None:
    if len(value) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        return f"must be three integers 0-255, got {value!r}"
    return None


def _matrix(value: list[int]) -> str | None:
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        return f"must be [rows, columns] of positive integers, got {value!r}"
    return None


def _triple_int(value: list[int]) -> str | None:
    if value and (len(value) != 3 or not all(isinstance(v, int) and v > 0 for v in value)):
        return f"must be three positive integers, got {value!r}"
    return None


def _triple_positive(value: list[float]) -> str | None:
    if value and (len(value) != 3 or not all(v > 0 for v in value)):
        return f"must be three positive numbers, got {value!r}"
    return None


def _probability(value: float) -> str | None:
    return None if 0 < value < 1 else f"must be between 0 and 1, got {value}"


def _sha256(value: str) -> str | None:
    return None if re.fullmatch(r"[0-9a-f]{64}", value) else "must be 64 lowercase hex digits"


@dataclass(frozen=True)
class CodeSpec:
    """A coded concept, e.g. SNOMED CT 44029006 "Left lung"."""

    scheme: str = field(metadata=field_doc("Coding scheme designator: SCT, DCM, ..."))
    value: str = field(metadata=field_doc("Code value."))
    meaning: str = field(metadata=field_doc("Code meaning."))


@dataclass(frozen=True)
class SegmentSpec:
    """One output segment."""

    label: str = field(metadata=field_doc("Segment label shown in viewers."))
    category: CodeSpec = field(metadata=field_doc("Segmented property category."))
    type: CodeSpec = field(metadata=field_doc("Segmented property type."))
    color: list[int] = field(
        default_factory=lambda: [255, 0, 0], metadata=field_doc("Display colour, RGB.", _rgb)
    )
    side: str = field(
        default="",
        metadata=field_doc(
            "For split-left-right: which patient side this segment is.",
            one_of("", "left", "right"),
        ),
    )


@dataclass(frozen=True)
class ClassSpec:
    """One class of a classification model."""

    label: str = field(metadata=field_doc("Class name shown in reports."))
    code: CodeSpec = field(metadata=field_doc("What the class means, as a code."))


WEIGHT_FORMATS = ("torchscript", "state_dict", "monai_bundle")


@dataclass(frozen=True)
class WeightsSpec:
    """Where the weights lie and in which format."""

    file: str = field(
        metadata=field_doc(
            "Weights file relative to the package; for monai_bundle, the bundle folder."
        )
    )
    format: str = field(
        default="torchscript",
        metadata=field_doc(
            "torchscript (a TorchScript file), state_dict (a PyTorch state dict for the "
            "MONAI network in [network]) or monai_bundle (a MONAI bundle folder: "
            "configs/inference.json and models/model.pt).",
            one_of(*WEIGHT_FORMATS),
        ),
    )
    sha256: str = field(
        default="",
        metadata=field_doc("Expected SHA-256 of the file (of models/model.pt in a bundle)."),
    )
    openvino_int8: str = field(
        default="",
        metadata=field_doc(
            "Optional: an INT8 OpenVINO IR of the same 2D network (the .xml; its .bin "
            "beside it), post-training quantized. Used on CPUs without bf16 "
            "(worker.precision auto or int8), once it agrees with PyTorch on the first "
            "batch of real data."
        ),
    )
    openvino_int8_sha256: str = field(
        default="",
        metadata=field_doc(
            "Expected SHA-256 over the IR's .xml then its .bin; a mismatch keeps it unused."
        ),
    )


@dataclass(frozen=True)
class NetworkSpec:
    """A MONAI network to build before loading a state dict into it."""

    name: str = field(
        default="",
        metadata=field_doc("A class of monai.networks.nets, e.g. UNet, BasicUNet, DenseNet121."),
    )
    args: dict[str, Any] = field(
        default_factory=dict,
        metadata=field_doc("Its constructor arguments, e.g. { spatial_dims = 2, ... }."),
    )


@dataclass(frozen=True)
class InputSpec:
    """What the model accepts."""

    modality: list[str] = field(metadata=field_doc('Accepted modalities, e.g. ["CT"].'))
    dimensions: int = field(
        default=2,
        metadata=field_doc(
            "2: the model sees one slice at a time; 3: it sees 3D patches of the volume "
            "(sliding window, see roi).",
            lambda v: None if v in (2, 3) else f"must be 2 or 3, got {v}",
        ),
    )
    matrix: list[int] = field(
        default_factory=lambda: [512, 512],
        metadata=field_doc(
            "2D: [rows, columns] the network expects; others are resampled.", _matrix
        ),
    )
    roi: list[int] = field(
        default_factory=list,
        metadata=field_doc(
            "3D: the sliding-window patch in voxels, in the order of axes.", _triple_int
        ),
    )
    spacing: list[float] = field(
        default_factory=list,
        metadata=field_doc(
            "3D: voxel spacing in mm the network was trained at, in the order of axes; "
            "the volume is resampled to it and the labels back. Empty: as acquired.",
            _triple_positive,
        ),
    )
    overlap: float = field(
        default=0.25,
        metadata=field_doc(
            "3D: overlap of neighbouring windows (0 to 0.9).",
            lambda v: None if 0 <= v <= 0.9 else f"must be between 0 and 0.9, got {v}",
        ),
    )
    axes: str = field(
        default="slice-row-column",
        metadata=field_doc(
            "3D: array order the network expects: slice-row-column (as stored), or ras "
            "(x, y, z with increasing indices towards the patient's right, anterior and "
            "superior, as MONAI's Orientationd(axcodes='RAS') makes from NIfTI).",
            one_of("slice-row-column", "ras"),
        ),
    )
    clip: list[float] = field(
        default_factory=list,
        metadata=field_doc(
            "[low, high]: values are clipped to this range (HU for CT) before offset and "
            "scale, e.g. [-57, 164] with offset 57 and scale 1/221 for MONAI's "
            "ScaleIntensityRanged(a_min=-57, a_max=164, b_min=0, b_max=1, clip=True).",
            lambda v: (
                None
                if len(v) == 2 and v[0] < v[1]
                else f"must be [low, high] with low < high, got {v!r}"
            ),
        ),
    )
    offset: float = field(
        default=0.0, metadata=field_doc("Added to the rescaled values (HU) before the model.")
    )
    scale: float = field(default=1.0, metadata=field_doc("Multiplies (value + offset).", positive))
    batch_size: int = field(default=8, metadata=field_doc("Slices per forward pass.", positive))


@dataclass(frozen=True)
class OutputSpec:
    """What the model returns and how it is turned into segments."""

    kind: str = field(
        default="probability",
        metadata=field_doc(
            "probability (one channel, activation applied), logits (one channel), or "
            "softmax (one channel per segment plus background first; labels by argmax "
            "on the network's grid, before any resampling).",
            one_of("probability", "logits", "softmax"),
        ),
    )
    threshold: float = field(
        default=0.5, metadata=field_doc("Foreground probability threshold.", _probability)
    )
    postprocess: str = field(
        default="none",
        metadata=field_doc(
            "none, or split-left-right: largest components, split by patient side.",
            one_of("none", "split-left-right"),
        ),
    )
    min_component_fraction: float = field(
        default=0.1,
        metadata=field_doc(
            "Components smaller than this fraction of the largest are dropped.", _probability
        ),
    )
    segments: list[SegmentSpec] = field(
        default_factory=list, metadata=field_doc("The output segments, in label order.")
    )
    classes: list[ClassSpec] = field(
        default_factory=list,
        metadata=field_doc(
            "For task = classification: the classes in output-channel order. With one "
            "channel (probability or logits) there is one class, present or not."
        ),
    )
    aggregate: str = field(
        default="mean",
        metadata=field_doc(
            "For task = classification: how slice scores make the series' score: mean, "
            "or max (a finding on any slice counts).",
            one_of("mean", "max"),
        ),
    )


@dataclass(frozen=True)
class DetectionSpec:
    """How a detection model finds and reports its findings (lung nodules, today)."""

    lung_model: str = field(
        default="",
        metadata=field_doc(
            "The segmentation model whose mask bounds the candidate search (its segments "
            "together); it runs first, from the same warm cache."
        ),
    )
    patch_mm: float = field(
        default=48.0, metadata=field_doc("Width of each candidate's patches, in mm.", positive)
    )
    slice_offsets_mm: list[float] = field(
        default_factory=lambda: [-5.0, -2.5, 0.0, 2.5, 5.0],
        metadata=field_doc(
            "Where the stacked axial patches lie relative to the candidate, in mm; their "
            "number is the network's input channels."
        ),
    )
    max_candidates: int = field(
        default=300, metadata=field_doc("Candidates scored per series, strongest first.", positive)
    )
    merge_mm: float = field(
        default=10.0, metadata=field_doc("Findings closer than this are one finding.", positive)
    )
    min_diameter_mm: float = field(
        default=3.0, metadata=field_doc("Smaller findings are not reported.")
    )
    finding: CodeSpec = field(
        default_factory=lambda: CodeSpec("SCT", "786838002", "Pulmonary nodule"),
        metadata=field_doc("What a finding is, as a code."),
    )


@dataclass(frozen=True)
class ModelSpec:
    """A validated model package."""

    name: str = field(metadata=field_doc("Model name; routes refer to it."))
    version: str = field(metadata=field_doc("Model version; part of the job's identity."))
    task: str = field(
        metadata=field_doc(
            "What the model does: segmentation (labels per voxel), classification (one "
            "class for the series) or detection (findings with a position, a size and a "
            "probability).",
            one_of("segmentation", "classification", "detection"),
        ),
    )
    summary: str = field(default="", metadata=field_doc("One line saying what it does."))
    licence: str = field(default="", metadata=field_doc("Licence of the weights."))
    intended_use: str = field(default="", metadata=field_doc("Intended use statement."))
    clinical_use: bool = field(
        default=False,
        metadata=field_doc("False marks every output 'not for clinical use'."),
    )
    weights: WeightsSpec = field(
        default_factory=lambda: WeightsSpec(file=""), metadata=field_doc("Weights.")
    )
    network: NetworkSpec = field(
        default_factory=NetworkSpec,
        metadata=field_doc("The network, for state_dict weights."),
    )
    input: InputSpec = field(
        default_factory=lambda: InputSpec(modality=[]), metadata=field_doc("Input contract.")
    )
    output: OutputSpec = field(default_factory=OutputSpec, metadata=field_doc("Outputs."))
    detection: DetectionSpec = field(
        default_factory=DetectionSpec, metadata=field_doc("For task = detection.")
    )
    path: Path = field(default=Path("."), metadata={"internal": True})

    @property
    def weights_path(self) -> Path:
        """Return the absolute path of the weights file (a bundle's model.pt)."""
        if self.weights.format == "monai_bundle":
            return self.path / self.weights.file / "models" / "model.pt"
        return self.path / self.weights.file

    @property
    def int8_path(self) -> Path | None:
        """Return the absolute path of the INT8 OpenVINO IR (.xml), if the package has one."""
        return self.path / self.weights.openvino_int8 if self.weights.openvino_int8 else None


def _check_package(spec: ModelSpec, folder: Path) -> None:
    if spec.name != folder.name:
        raise ConfigError(f"name: {spec.name!r} differs from its folder name {folder.name!r}")
    if not spec.weights.file:
        raise ConfigError("weights.file: required key is missing")
    if spec.weights.sha256 and _sha256(spec.weights.sha256):
        raise ConfigError(f"weights.sha256: {_sha256(spec.weights.sha256)}")
    if not spec.input.modality:
        raise ConfigError("input.modality: at least one modality is required")
    if spec.task == "segmentation" and not spec.output.segments:
        raise ConfigError("output.segments: a segmentation model needs at least one segment")
    if spec.task == "classification":
        if not spec.output.classes:
            raise ConfigError("output.classes: a classification model needs at least one class")
        if spec.input.dimensions != 2:
            raise ConfigError("input.dimensions: classification models see slices (2)")
        if spec.output.kind != "softmax" and len(spec.output.classes) != 1:
            raise ConfigError(
                "output.classes: one-channel outputs (probability, logits) have one class; "
                "use kind = softmax for several"
            )
    if spec.task == "detection":
        if not spec.detection.lung_model:
            raise ConfigError("detection.lung_model: a detection model needs a mask model")
        if spec.detection.lung_model == spec.name:
            raise ConfigError("detection.lung_model: must name another model")
        if not spec.detection.slice_offsets_mm:
            raise ConfigError("detection.slice_offsets_mm: at least one offset is needed")
        if spec.input.dimensions != 2:
            raise ConfigError("input.dimensions: detection models see stacks of slices (2)")
    if spec.input.dimensions == 3 and not spec.input.roi:
        raise ConfigError("input.roi: a 3D model needs its sliding-window patch size")
    if spec.output.kind == "softmax" and spec.output.postprocess != "none":
        raise ConfigError("output.postprocess: must be none for softmax (multi-class) outputs")
    if spec.output.postprocess == "split-left-right":
        sides = sorted(s.side for s in spec.output.segments)
        if sides != ["left", "right"]:
            raise ConfigError(
                "output.segments: split-left-right needs exactly one 'left' and one 'right' segment"
            )
    weights = folder / spec.weights.file
    if spec.weights.format == "monai_bundle":
        for part in ("configs/inference.json", "models/model.pt"):
            if not (weights / part).is_file():
                raise ConfigError(f"weights.file: bundle {spec.weights.file} has no {part}")
    elif not weights.is_file():
        raise ConfigError(f"weights.file: {spec.weights.file} not found in the package")
    if spec.weights.format == "state_dict" and not spec.network.name:
        raise ConfigError("network.name: state_dict weights need the MONAI network to build")
    _check_int8(spec, folder)


def _check_int8(spec: ModelSpec, folder: Path) -> None:
    weights = spec.weights
    if not weights.openvino_int8:
        if weights.openvino_int8_sha256:
            raise ConfigError("weights.openvino_int8_sha256: set without weights.openvino_int8")
        return
    if spec.input.dimensions != 2:
        raise ConfigError("weights.openvino_int8: only for 2D models")
    xml = folder / weights.openvino_int8
    if xml.suffix != ".xml":
        raise ConfigError("weights.openvino_int8: must name the IR's .xml file")
    for part in (xml, xml.with_suffix(".bin")):
        if not part.is_file():
            raise ConfigError(f"weights.openvino_int8: {part.name} not found in the package")
    if weights.openvino_int8_sha256 and _sha256(weights.openvino_int8_sha256):
        raise ConfigError(f"weights.openvino_int8_sha256: {_sha256(weights.openvino_int8_sha256)}")


def load_model_spec(folder: Path) -> ModelSpec:
    """Read and validate one model package.

    Parameters
    ----------
    folder : Path
        The package folder, holding ``model.toml``.

    Returns
    -------
    ModelSpec
        The validated description.

    Raises
    ------
    ModelPackageError
        Naming the file and the field that is wrong.
    """
    manifest = folder / MANIFEST
    try:
        with manifest.open("rb") as fh:
            data = tomllib.load(fh)
        spec: ModelSpec = build(ModelSpec, data)
        _check_package(spec, folder)
    except FileNotFoundError:
        raise ModelPackageError(f"{manifest}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelPackageError(f"{manifest}: not valid TOML: {exc}") from None
    except ConfigError as exc:
        raise ModelPackageError(f"{manifest}: {exc}") from None
    return ModelSpec(**{**spec.__dict__, "path": folder.resolve()})


def load_registry(root: Path | None) -> dict[str, ModelSpec]:
    """Load every model package under ``root``.

    Parameters
    ----------
    root : Path, optional
        The folder holding one sub-folder per model; the shipped models if None.

    Returns
    -------
    dict[str, ModelSpec]
        Packages by name.

    Raises
    ------
    ModelPackageError
        If the folder is missing or any package in it is bad.
    """
    folder = root if root is not None else shipped_models_path()
    if not folder.is_dir():
        raise ModelPackageError(f"{folder}: models folder not found")
    registry: dict[str, ModelSpec] = {}
    for sub in sorted(p for p in folder.iterdir() if (p / MANIFEST).is_file()):
        spec = load_model_spec(sub)
        registry[spec.name] = spec
    for spec in registry.values():
        if spec.task != "detection":
            continue
        mask = registry.get(spec.detection.lung_model)
        if mask is None or mask.task != "segmentation":
            raise ModelPackageError(
                f"{spec.path / MANIFEST}: detection.lung_model: {spec.detection.lung_model!r} "
                "is not an installed segmentation model"
            )
    return registry
