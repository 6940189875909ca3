"""Every output type from two real chest CTs, through the real pipeline, into Orthanc.

LIDC-IDRI-0001 and LIDC-IDRI-0003 run through the shipped lung U-Net and nodule
model. What Orthanc kept is downloaded through its REST API, passes dciodvfy, and is
read back with highdicom; each SR measurement is compared with numpy on the mask read
back from the SEG and the HU read from the source files.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from sqlalchemy import select

from dicomnode.db import Job, JobState
from dicomnode.evaluate.sr_findings import read_verdicts
from dicomnode.outputs.codes import LAA_950
from tests.integration.inprocess import node_sending_to
from tests.integration.orthanc import Orthanc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("Orthanc", "dciodvfy")),
        reason="orthanc and dicom3tools are installed by .ci/run",
    ),
]


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]


@pytest.mark.parametrize("case", ["LIDC-IDRI-0001", "LIDC-IDRI-0003"])
def test_every_output_of_a_real_ct_validates_and_measures_right(
    tmp_path: Path, real_ct: Callable[[str], Path], case: str
) -> None:
    sources = sorted(real_ct(case).glob("*.dcm"))
    routes = [
        {"name": "lungs", "models": ["lung-unet2d"], "overlay": True,
         "seg": {"compression": "jpeg2000"}},
        {"name": "nodules", "models": ["lung-nodule-cnn"]},
    ]  # fmt: skip
    with (
        Orthanc(tmp_path / "orthanc") as pacs,
        node_sending_to(tmp_path, pacs.dicom_port, routes) as node,
    ):
        node.receive(sources)
        assert node.sweep() == 1  # one series, two jobs
        node.run(jobs=2)
        with node.sessions() as s:
            jobs = {j.model: j for j in s.scalars(select(Job))}
            for job in jobs.values():
                s.expunge(job)
        received = {}
        for series in pacs.get("/series?expand"):
            for instance in series["Instances"]:
                data = pacs.download(instance)
                ds = pydicom.dcmread(BytesIO(data))
                received[(str(ds.SeriesDescription).split()[1], str(ds.Modality))] = data

    assert all(j.state == JobState.DONE for j in jobs.values()), [
        j.last_error for j in jobs.values()
    ]
    assert set(received) == {
        ("lung-unet2d", "SEG"), ("lung-unet2d", "SR"), ("lung-unet2d", "OT"),
        ("lung-nodule-cnn", "SEG"), ("lung-nodule-cnn", "SR"),
    }  # fmt: skip
    for (model, modality), data in received.items():
        path = tmp_path / f"{model}-{modality}.dcm"
        path.write_bytes(data)
        assert dciodvfy_errors(path) == [], (model, modality)

    # --- the lungs: every SR value equals numpy on the SEG read back and the source HU
    seg = hd.seg.segread(tmp_path / "lung-unet2d-SEG.dcm")
    assert seg.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    headers = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, sources)}
    uids = sorted(headers, key=lambda u: float(headers[u].ImagePositionPatient[2]))
    mask = np.asarray(
        seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=[1, 2],
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
    )
    hu = np.stack(
        [
            headers[u].pixel_array * float(headers[u].RescaleSlope)
            + float(headers[u].RescaleIntercept)
            for u in uids
        ]
    )
    first = headers[uids[0]]
    voxel_ml = (
        float(first.PixelSpacing[0])
        * float(first.PixelSpacing[1])
        * abs(
            float(headers[uids[1]].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
        )
        / 1000
    )
    report = hd.sr.srread(tmp_path / "lung-unet2d-SR.dcm").content
    groups = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    assert set(groups) == {"Left lung", "Right lung"}
    for number, name in ((1, "Left lung"), (2, "Right lung")):
        values = hu[mask == number]
        assert values.size * voxel_ml > 800  # a real lung, not a speck
        got = {
            (m.name.meaning, None if m.derivation is None else m.derivation.meaning): float(m.value)
            for m in groups[name].get_measurements()
        }
        assert got[("Volume", None)] == pytest.approx(values.size * voxel_ml, abs=0.01)
        assert got[("Attenuation Coefficient", "Mean")] == pytest.approx(values.mean(), abs=1e-3)
        assert got[("Attenuation Coefficient", "Standard Deviation")] == pytest.approx(
            values.std(), abs=1e-3
        )
        laa = float(groups[name].get_measurements(name=LAA_950)[0].value)
        assert laa == pytest.approx(100 * (values < -950).mean(), abs=1e-3)
        assert groups[name].referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID

    # --- the overlay: RGB frames of the slices with lung, each naming its source image
    overlay = pydicom.dcmread(tmp_path / "lung-unet2d-OT.dcm")
    assert overlay.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7.4"
    assert overlay.PhotometricInterpretation == "RGB" and overlay.SamplesPerPixel == 3
    with_lung = [u for k, u in enumerate(uids) if mask[k].any()]
    assert int(overlay.NumberOfFrames) == len(with_lung)
    assert [str(i.ReferencedSOPInstanceUID) for i in overlay.SourceImageSequence] == with_lung

    # --- the nodules: each finding's circle, diameter and probability as in the job
    findings = jobs["lung-nodule-cnn"].summary["detection"]["findings"]
    assert findings, "both scans have nodules the model finds (see its card)"
    nodule_report = hd.sr.srread(tmp_path / "lung-nodule-cnn-SR.dcm").content
    circles = nodule_report.get_planar_roi_measurement_groups()
    assert len(circles) == len(findings)
    for group, finding in zip(circles, findings, strict=True):
        assert group.roi.GraphicType == "CIRCLE"
        diameter = float(group.get_measurements(name=codes.SCT.Diameter)[0].value)
        probability = float(group.get_measurements(name=codes.DCM.Probability)[0].value)
        assert diameter == pytest.approx(finding["diameter_mm"], abs=0.05)
        assert probability == pytest.approx(finding["probability"], abs=1e-4)
    # --- each finding's diameters and volume describe one object: its SEG segment
    nodule_seg = hd.seg.segread(tmp_path / "lung-nodule-cnn-SEG.dcm")
    spacing = [float(v) for v in headers[uids[0]].PixelSpacing]
    slice_mm = abs(float(headers[uids[1]].ImagePositionPatient[2]) - float(
        headers[uids[0]].ImagePositionPatient[2]))  # fmt: skip
    volumes = {
        int(g.referenced_segment.referenced_segment_numbers[0]): float(
            g.get_measurements(name=codes.SCT.Volume)[0].value
        )
        for g in nodule_report.get_volumetric_roi_measurement_groups()
    }
    for number, finding in enumerate(findings, start=1):
        voxels = np.argwhere(
            np.asarray(
                nodule_seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=uids, segment_numbers=[number], combine_segments=True
                )
            )
            > 0
        )
        volume_mm3 = len(voxels) * spacing[0] * spacing[1] * slice_mm
        assert volumes[number] == pytest.approx(volume_mm3 / 1000, abs=0.001)
        # The long axis is the longest in-plane chord of these voxels (edge to edge).
        longest = (
            max(
                float(np.max(np.hypot(*((p[:, None] - p[None]) * spacing).transpose(2, 0, 1))))
                for k in np.unique(voxels[:, 0])
                for p in [voxels[voxels[:, 0] == k][:, 1:].astype(float)]
            )
            + spacing[0]
        )
        assert finding["diameter_mm"] == pytest.approx(longest, abs=0.1)
        assert finding["short_axis_mm"] <= finding["diameter_mm"]
        # The sphere as large as the volume is neither larger than the long axis nor
        # much smaller (a 51.5 mm "nodule" of 5.7 mL, a vessel tree, would be 0.43).
        equivalent = (6 * volume_mm3 / np.pi) ** (1 / 3)
        assert 0.5 * finding["diameter_mm"] <= equivalent <= 1.05 * finding["diameter_mm"], (
            finding,
            volume_mm3,
        )
    assert nodule_report.get_image_measurement_groups() == []
    verdicts = read_verdicts(pydicom.dcmread(tmp_path / "lung-nodule-cnn-SR.dcm"))
    assert verdicts["Pulmonary nodule"][0] == codes.SCT.Present
    assert verdicts["Pulmonary nodule"][1] == pytest.approx(max(f["probability"] for f in findings))
