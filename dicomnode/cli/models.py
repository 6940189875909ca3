"""``dicomnode models``: list, show and check the installed model packages."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from dicomnode.cli.output import print_json, print_table
from dicomnode.config import Settings
from dicomnode.errors import ModelPackageError
from dicomnode.imaging import ModelSpec, load_registry


def model_record(spec: ModelSpec) -> dict[str, Any]:
    """Return a package's description as a JSON-ready mapping.

    Parameters
    ----------
    spec : ModelSpec
        The package.

    Returns
    -------
    dict[str, Any]
        Its manifest, with the folder it was read from.
    """
    record = dataclasses.asdict(spec)
    record["path"] = str(spec.path)
    return record


def _registry(settings: Settings) -> dict[str, ModelSpec]:
    return load_registry(settings.models.path)


def _one(settings: Settings, name: str) -> ModelSpec:
    models = _registry(settings)
    if name not in models:
        known = ", ".join(sorted(models)) or "none installed"
        raise LookupError(f"no model named {name!r} (installed: {known})")
    return models[name]


def list_models(settings: Settings, args: argparse.Namespace) -> int:
    """Print the installed packages (``dicomnode models list``).

    Parameters
    ----------
    settings : Settings
        Where the packages are (``models.path``).
    args : argparse.Namespace
        ``json``.

    Returns
    -------
    int
        Exit code 0.
    """
    models = _registry(settings)
    if args.json:
        print_json([model_record(m) for m in models.values()])
        return 0
    if not models:
        print("no models installed")
        return 0
    print_table(
        ["NAME", "VERSION", "TASK", "WEIGHTS", "MODALITY", "FINDS", "LICENCE"],
        [
            [
                m.name,
                m.version,
                m.task,
                m.weights.format,
                ",".join(m.input.modality),
                shorten(finds(m), FINDS_WIDTH),
                shorten(m.licence, LICENCE_WIDTH),
            ]
            for m in models.values()
        ],
    )
    return 0


FINDS_WIDTH = 40
LICENCE_WIDTH = 48


def finds(spec: ModelSpec) -> str:
    """Say what a package reports, by task.

    A detection package has no fixed segments (it outlines each finding): a segment
    count of 0 read as "finds nothing", so each task names its own output.

    Parameters
    ----------
    spec : ModelSpec
        The package.

    Returns
    -------
    str
        ``segments: A, B``, ``classes: A, B`` or ``findings: MEANING``.
    """
    if spec.task == "detection":
        return f"findings: {spec.detection.finding.meaning}"
    if spec.task == "classification":
        return "classes: " + (", ".join(c.label for c in spec.output.classes) or "-")
    return "segments: " + (", ".join(s.label for s in spec.output.segments) or "-")


def shorten(text: str, width: int) -> str:
    """Shorten ``text`` to ``width`` characters at a word boundary, marked with "...".

    Parameters
    ----------
    text : str
        One line.
    width : int
        The most characters to print.

    Returns
    -------
    str
        ``text`` when it fits; else its words up to the last that fits, then ``...``
        (a single word longer than ``width`` is cut, the only case with no boundary).
    """
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[: width - 3]
    if text[width - 3] != " ":  # the cut is inside a word: drop that word
        space = cut.rfind(" ")
        if space > 0:
            cut = cut[:space]
    return cut.rstrip(" ,;:") + "..."


def show_model(settings: Settings, args: argparse.Namespace) -> int:
    """Print one package in full (``dicomnode models show NAME``).

    Parameters
    ----------
    settings : Settings
        Where the packages are.
    args : argparse.Namespace
        ``name`` and ``json``.

    Returns
    -------
    int
        Exit code 0; an unknown name raises a one-line error.
    """
    spec = _one(settings, args.name)
    if args.json:
        print_json(model_record(spec))
        return 0
    rows: list[tuple[str, object]] = [
        ("name", spec.name),
        ("version", spec.version),
        ("task", spec.task),
        ("summary", spec.summary),
        ("licence", spec.licence),
        ("intended use", spec.intended_use),
        ("clinical use", "yes" if spec.clinical_use else "no (outputs say 'not for clinical use')"),
        ("folder", spec.path),
        ("weights", f"{spec.weights.file} ({spec.weights.format})"),
    ]
    if spec.weights.format == "state_dict":
        rows.append(("network", f"monai.networks.nets.{spec.network.name} {spec.network.args}"))
    inp = spec.input
    clip = f"clip {inp.clip[0]:g}..{inp.clip[1]:g}, then " if inp.clip else ""
    rows += [
        ("modality", ", ".join(inp.modality)),
        ("dimensions", inp.dimensions),
    ]
    if inp.dimensions == 3:
        spacing = "x".join(f"{v:g}" for v in inp.spacing) + " mm" if inp.spacing else "as acquired"
        rows += [
            ("window", f"{'x'.join(map(str, inp.roi))} ({inp.axes}), overlap {inp.overlap:g}"),
            ("spacing", spacing),
        ]
    else:
        rows.append(("matrix", "x".join(map(str, inp.matrix))))
    rows += [
        ("intensity", f"{clip}(value + {inp.offset:g}) x {inp.scale:g}"),
        ("batch size", inp.batch_size),
        ("output", _output_line(spec)),
    ]
    if spec.task == "detection":
        det = spec.detection
        rows += [
            ("mask model", det.lung_model),
            (
                "candidates",
                f"up to {det.max_candidates}; patches {det.patch_mm:g} mm at "
                f"{', '.join(f'{v:g}' for v in det.slice_offsets_mm)} mm",
            ),
            ("findings", f"{det.finding.meaning} ({det.finding.scheme} {det.finding.value}), "
             f">= {det.min_diameter_mm:g} mm, merged within {det.merge_mm:g} mm"),
        ]  # fmt: skip
    for key, value in rows:
        print(f"{key:<14}{value}")
    for i, seg in enumerate(spec.output.segments, 1):
        print(
            f"segment {i:<6}{seg.label}: {seg.type.scheme} {seg.type.value} "
            f"'{seg.type.meaning}', colour {tuple(seg.color)}"
        )
    return 0


def _output_line(spec: ModelSpec) -> str:
    out = spec.output
    if out.kind == "softmax":
        # No threshold: the argmax of the channels decides.
        if spec.task == "classification":
            return f"softmax, argmax of {len(out.classes)} classes"
        return f"softmax, argmax of {len(out.segments) + 1} channels (background first)"
    return f"{out.kind}, threshold {out.threshold:g}, post-processing {out.postprocess}"


def check_models(settings: Settings, args: argparse.Namespace) -> int:
    """Load each package's weights and run one batch (``dicomnode models check``).

    Parameters
    ----------
    settings : Settings
        Where the packages are.
    args : argparse.Namespace
        ``names`` (all when empty).

    Returns
    -------
    int
        0 if every package loaded and answered with the promised shape, else 1.
    """
    import torch

    from dicomnode.inference import example_shapes, load_model

    models = _registry(settings)
    names = args.names or sorted(models)
    failed = 0
    for name in names:
        spec = _one(settings, name) if name not in models else models[name]
        started = time.perf_counter()
        try:
            module = load_model(spec, torch.device("cpu"))
            given, wanted = example_shapes(spec)
            with torch.inference_mode():
                y = module(torch.zeros(given))
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != wanted:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ModelPackageError(
                    f"model {name}: for input {list(given)} expected output {list(wanted)}, "
                    f"got {got}"
                )
        except ModelPackageError as exc:
            print(f"FAILED {exc}")
            failed += 1
            continue
        except Exception as exc:  # a forward pass can raise anything
            print(f"FAILED model {name}: forward pass: {type(exc).__name__}")
            failed += 1
            continue
        seconds = time.perf_counter() - started
        print(f"ok     {name} {spec.version}: loaded and ran one batch in {seconds:.2f} s")
    return 1 if failed else 0
