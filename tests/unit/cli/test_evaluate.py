"""``dicomnode evaluate``: bad input is one line and a non-zero exit; the progress bar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicomnode.cli.main import main
from dicomnode.evaluate.geometry import grid_from_datasets
from dicomnode.evaluate.nifti import affine_of
from dicomnode.imaging.volume import volume_from_datasets
from tests.factories import ct_series, lung_phantom
from tests.unit.evaluate.test_seg_reference import write_seg


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):
    hu = lung_phantom(slices=6, size=32)
    datasets = ct_series(hu)
    labels = (hu == -850.0).astype(np.uint8)
    folder = tmp_path_factory.mktemp("cli")
    seg = write_seg(folder / "ours" / "seg.dcm", volume_from_datasets(datasets), labels, "o")
    return dict(folder=folder, seg=seg, labels=labels, grid=grid_from_datasets(datasets))


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("dicomnode: "), err
    return err.strip()


def test_missing_paths(case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gone = tmp_path / "gone"
    assert main(["evaluate", str(gone), str(case["seg"])]) == 1
    assert one_line_error(capsys) == f"dicomnode: no such file or folder: {gone}"
    assert main(["evaluate", str(case["seg"]), str(gone)]) == 1
    assert one_line_error(capsys) == f"dicomnode: no such file or folder: {gone}"
    argv = ["evaluate", str(case["seg"]), str(case["seg"]), "--images", str(gone)]
    assert main(argv) == 1
    assert one_line_error(capsys) == f"dicomnode: no such file or folder: {gone}"


def test_a_folder_without_references(
    case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("nothing to compare with")
    assert main(["evaluate", str(case["seg"]), str(tmp_path)]) == 1
    assert one_line_error(capsys) == (
        f"dicomnode: no reference (DICOM SEG, NIfTI or LIDC XML) found in {tmp_path}"
    )


def test_xml_that_is_not_lidc(case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.xml"
    other.write_text("<?xml version='1.0'?><Annotations><box/></Annotations>")
    assert main(["evaluate", str(case["seg"]), str(other)]) == 1
    assert "not an LIDC read message (root is Annotations)" in one_line_error(capsys)
    assert main(["evaluate", str(case["seg"]), str(tmp_path)]) == 1
    assert one_line_error(capsys).endswith("no LIDC XML among its 1 XML file(s)")
    broken = tmp_path / "broken.xml"
    broken.write_text("<LidcReadMessage")
    assert main(["evaluate", str(case["seg"]), str(broken)]) == 1
    assert "not readable as LIDC XML" in one_line_error(capsys)


def test_a_nifti_of_the_wrong_shape(
    case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    half = case["labels"][:, :16, :].transpose(2, 1, 0).astype(np.int16)  # half the rows
    path = tmp_path / "half.nii.gz"
    nib.save(nib.Nifti1Image(half, affine_of(case["grid"])), path)
    assert main(["evaluate", str(case["seg"]), str(path)]) == 1
    err = one_line_error(capsys)
    assert "(shape (32, 16, 6)) does not cover the source series (32x32, 4 slices)" in err


def test_bad_options_exit_2(case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nifti = tmp_path / "ref.nii.gz"
    labels = case["labels"].transpose(2, 1, 0).astype(np.int16)
    nib.save(nib.Nifti1Image(labels, affine_of(case["grid"])), nifti)
    seg = str(case["seg"])
    assert main(["evaluate", seg, str(nifti), "--label-map", "one=Left lung"]) == 2
    assert one_line_error(capsys) == (
        "dicomnode: --label-map: 'one=Left lung' is not N=LABEL (N a label value > 0), "
        'e.g. 1="Left lung"'
    )
    assert main(["evaluate", seg, seg, "--label-map", "1=Left lung"]) == 2
    assert one_line_error(capsys) == "dicomnode: --label-map applies to NIfTI references only"
    assert main(["evaluate", seg, seg, "--min-readers", "0"]) == 2
    assert "--min-readers must be 1 to 4" in one_line_error(capsys)
    assert main(["evaluate", seg, seg, "--threshold", "1.5"]) == 2
    assert "--threshold must lie in [0, 1]" in one_line_error(capsys)
    assert main(["evaluate", seg, str(nifti), "--label-map", "1=Left lung"]) == 0
    capsys.readouterr()


def test_bad_findings(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xml = data_dir / "ct/LIDC-IDRI-0001/069.xml"
    findings = tmp_path / "f.json"
    findings.write_text(json.dumps([{"center": [1, 2], "probability": 0.5}]))
    assert main(["evaluate", str(findings), str(xml)]) == 1
    assert 'a finding needs "center": [x, y, z]' in one_line_error(capsys)
    findings.write_text("{not json")
    assert main(["evaluate", str(tmp_path), str(xml)]) == 1
    assert "not readable JSON" in one_line_error(capsys)
    # A plain list names no series: fine for one reference case, not for two.
    findings.write_text(json.dumps([]))
    two = tmp_path / "refs"
    two.mkdir()
    shutil.copy(xml, two / "069.xml")
    shutil.copy(data_dir / "ct/LIDC-IDRI-0003/072.xml", two / "072.xml")
    assert main(["evaluate", str(findings), str(two)]) == 1
    assert "needs exactly one reference case" in one_line_error(capsys)
    # One case but no geometry: no images beside a lone XML, no SEG of ours.
    assert main(["evaluate", str(findings), str(xml)]) == 1
    assert one_line_error(capsys).endswith(
        "no source geometry for its series; give the source images with --images"
    )


def test_progress_only_when_asked_or_on_a_terminal(
    case, capsys: pytest.CaptureFixture[str]
) -> None:
    seg = str(case["seg"])
    assert main(["evaluate", seg, seg]) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    assert main(["evaluate", seg, seg, "--json", "--progress"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays clean JSON
    assert captured.err.startswith("\r[1/1] #################### 100% 00:00 elapsed")
    assert captured.err.endswith("\n")
