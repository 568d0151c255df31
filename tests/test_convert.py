"""convert{case} on the real DICOM in shared testdata and on series written with pydicom."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.misc import is_dicom
import pytest
import SimpleITK as sitk

from hnct.common import read_sidecar, write_json
from hnct.convert import convert_case
from test_dicomio import COLS, ROWS, write_ct_series, write_rtstruct, square

REPO = Path(__file__).resolve().parents[1]
# Lungs first, GTV-1 last: the tumour lies inside the lung contour and must be painted on top.
LUNG1_STRUCTURES = ["Lung-Left", "Lung-Right", "Spinal-Cord", "GTV-1"]


def run(case_dir, tmp_path, **kw):
    out = tmp_path / "out"
    kw.setdefault("structures", LUNG1_STRUCTURES)
    sidecar = convert_case("C", case_dir, out / "volumes" / "C.nrrd", out / "labels" / "C.nrrd",
                           out / "volumes" / "C.json", **kw)
    assert read_sidecar(out / "volumes" / "C.json") == json.loads(json.dumps(sidecar, default=str))
    return sidecar, out


@pytest.fixture(scope="module")
def lung1(testdata_dir, tmp_path_factory):
    case_dir = testdata_dir / "nsclc-radiomics-LUNG1-001" / "LUNG1-001"
    sidecar, out = run(case_dir, tmp_path_factory.mktemp("lung1"))
    return case_dir, sidecar, out


def test_lung1_ct_geometry_matches_an_independent_pydicom_read(lung1):
    case_dir, sidecar, out = lung1
    assert sidecar["status"] == "ok", sidecar.get("reason")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((case_dir / "image").glob("*.dcm"))]
    headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # axial series: normal is +z
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in headers])
    image = sitk.ReadImage(str(out / "volumes" / "C.nrrd"))
    assert image.GetPixelID() == sitk.sitkInt16
    assert image.GetSize() == (int(headers[0].Columns), int(headers[0].Rows), len(headers)) == (512, 512, 134)
    assert np.allclose(image.GetOrigin(), [float(v) for v in headers[0].ImagePositionPatient], atol=1e-4)
    row_mm, col_mm = (float(v) for v in headers[0].PixelSpacing)
    assert np.allclose(image.GetSpacing(), [col_mm, row_mm, np.median(np.diff(z))], atol=1e-5)
    assert np.allclose(image.GetDirection(), np.eye(3).ravel())
    assert sidecar["series_uid"] == headers[0].SeriesInstanceUID and sidecar["n_files"] == 134
    assert sidecar["manufacturer"] == "SIEMENS" and sidecar["kernel"] == "B19f"
    assert sidecar["slice_positions"]["check"] == "ok"
    # HU: the independent decode of one slice (rescale applied by pydicom) equals the NRRD slice.
    k = 67
    ds = pydicom.dcmread(case_dir / "image" / Path(headers[k].filename).name)
    hu = pydicom.pixels.apply_rescale(ds.pixel_array, ds)
    assert np.array_equal(sitk.GetArrayViewFromImage(image)[k], np.clip(hu, -32768, 32767).astype(np.int16))


def test_lung1_rtstruct_label_volumes_are_plausible(lung1):
    _, sidecar, out = lung1
    label = sitk.ReadImage(str(out / "labels" / "C.nrrd"))
    assert label.GetPixelID() == sitk.sitkUInt8
    assert label.GetOrigin() == sitk.ReadImage(str(out / "volumes" / "C.nrrd")).GetOrigin()
    assert sidecar["labels"] == {"1": "Lung-Left", "2": "Lung-Right", "3": "Spinal-Cord", "4": "GTV-1"}
    assert sidecar["structures_present"] == LUNG1_STRUCTURES
    cm3 = np.prod(label.GetSpacing()) / 1000
    array = sitk.GetArrayViewFromImage(label)
    volumes = {name: (array == int(value)).sum() * cm3 for value, name in sidecar["labels"].items()}
    # Shoelace area x 3 mm over its 21 contours gives 156.3 cm3 for GTV-1.
    assert 145 < volumes["GTV-1"] < 170
    assert 1500 < volumes["Lung-Left"] < 4000 and 1500 < volumes["Lung-Right"] < 4000
    assert 10 < volumes["Spinal-Cord"] < 80


BROKEN = [
    # (folder, convert options, reason pattern, why)
    ("dicom2nifti-failing/gantrytilting/001", {"gantry_tilt": "exclude"}, r"gantry tilt: .* 14\.00 deg",
     "tilted planes"),
    ("dicom2nifti-failing/notavolume/001", {}, r"not a volume: 4 of 4 slices .* share a position", "dup"),
    ("dicom2nifti-failing/sliceincrement/001", {}, r"missing slice\(s\) between z=28\.11 and z=38\.11", "gap"),
    # 002 is both tilted (15.5 deg) and missing a slice; the tilt is found first.
    ("dicom2nifti-failing/sliceincrement/002", {"gantry_tilt": "exclude"}, r"gantry tilt: .* 15\.50 deg", "tilt+gap"),
    ("rt-utils/one_slice_data", {}, r"too few slices: series .* has 1 slice", "one slice"),
    ("rt-utils/empty", {}, r"no CT series under .*; found modalities: RTSTRUCT", "only an RTSTRUCT"),
]


@pytest.mark.parametrize("folder,options,reason,why", BROKEN, ids=[f"{b[0]}-{b[3]}" for b in BROKEN])
def test_broken_real_inputs_are_excluded_with_a_readable_reason(testdata_dir, tmp_path, folder, options, reason, why):
    sidecar, out = run(testdata_dir / folder, tmp_path, **options)
    assert sidecar["status"] == "excluded" and sidecar["stage"] == "convert"
    assert re.search(reason, sidecar["reason"]), sidecar["reason"]
    assert sidecar["file"]
    assert not list(out.rglob("*.nrrd")), "an excluded case must leave no NRRD"


REPAIRED = [
    # (folder, convert options, tilt degrees, original steps mm, resampled step mm)
    ("dicom2nifti-failing/gantrytilting/001", {}, 14.0, [4.852] * 3, 4.852),
    ("dicom2nifti-failing/sliceincrement/002", {}, 15.5, [0.75, 0.75, 1.499], 0.75),
    ("dicom2nifti-failing/sliceincrement/001", {"max_slice_gap_mm": 10.0}, 0.0, [5.0, 5.0, 10.0], 5.0),
]


@pytest.mark.parametrize("folder,options,tilt_deg,steps,step", REPAIRED, ids=[r[0] for r in REPAIRED])
def test_tilted_and_uneven_real_series_convert_resampled(testdata_dir, tmp_path, folder, options, tilt_deg,
                                                         steps, step):
    sidecar, out = run(testdata_dir / folder, tmp_path, labels="none", **options)
    assert sidecar["status"] == "ok", sidecar.get("reason")
    positions = sidecar["slice_positions"]
    assert np.diff(positions["original_positions_mm"]) == pytest.approx(steps, abs=2e-3)
    assert positions["spacing_mm"] == pytest.approx(step, abs=2e-3)
    image = sitk.ReadImage(str(out / "volumes" / "C.nrrd"))
    assert image.GetSpacing()[2] == pytest.approx(step, abs=2e-3)
    assert image.GetSize()[2] == round(sum(steps) / step) + 1
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-6), "the grid must be orthogonal"
    if tilt_deg:
        assert positions["tilt"]["angle_deg"] == pytest.approx(tilt_deg, abs=0.01)
        assert "gantry tilt" in positions["resampled"]["why"]
    else:
        assert "tilt" not in positions and positions["resampled"]["why"] == ["uneven slice spacing"]


def test_oriented_data_converts_correctly_as_an_oblique_volume(testdata_dir, tmp_path):
    # Oblique planes stacked along their own normal: a regular volume, not a tilt.
    folder = testdata_dir / "rt-utils" / "oriented_data"
    sidecar, out = run(folder, tmp_path, labels="none")
    assert sidecar["status"] == "ok" and sidecar["label"] is None
    assert not (out / "labels" / "C.nrrd").exists()
    image = sitk.ReadImage(str(out / "volumes" / "C.nrrd"))
    first = pydicom.dcmread(folder / "0.dcm", stop_before_pixels=True)
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction[:, 0], iop[:3] / np.linalg.norm(iop[:3]), atol=1e-4)
    assert np.allclose(direction[:, 1], iop[3:] / np.linalg.norm(iop[3:]), atol=1e-4)
    for k, name in enumerate(["0.dcm", "1.dcm", "2.dcm"]):
        ipp = [float(v) for v in pydicom.dcmread(folder / name, stop_before_pixels=True).ImagePositionPatient]
        assert np.allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), ipp, atol=1e-3)


def test_rt_utils_mock_data_uses_the_rtstruct_that_resolves(testdata_dir, tmp_path):
    sidecar, out = run(testdata_dir / "rt-utils" / "mock_data", tmp_path, structures=["ROI-1"])
    assert sidecar["status"] == "ok"
    matching = sidecar["label_matching"]
    assert Path(matching["file"]).name == "rt.dcm"
    assert sorted(Path(i["file"]).name for i in matching["ignored"]) == [
        "invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"]
    assert sidecar["structures_present"] == ["ROI-1"]


@pytest.mark.parametrize("rt_name", ["invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"])
def test_rt_utils_unresolvable_reference_alone_is_excluded(testdata_dir, tmp_path, rt_name):
    mock = testdata_dir / "rt-utils" / "mock_data"
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    for name in ("ct_1.dcm", "ct_2.dcm", rt_name):
        shutil.copy(mock / name, case_dir / name)
    sidecar, out = run(case_dir, tmp_path, structures=["ROI-1"])
    assert sidecar["status"] == "excluded"
    assert f"RTSTRUCT {case_dir / rt_name} references SOP instances not in series" in sidecar["reason"]
    assert not list(out.rglob("*.nrrd"))


def test_empty_or_missing_folder_is_excluded(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        sidecar, _ = run(folder, tmp_path)
        assert sidecar["status"] == "excluded" and sidecar["reason"].startswith(f"no DICOM image series under {folder}")


def test_required_structure_missing_excludes_and_removes_stale_outputs(tmp_path):
    ct = write_ct_series(tmp_path / "dicom", 4, origin=(0.0, 0.0, 0.0))
    write_rtstruct(tmp_path / "dicom" / "rt.dcm", ct, {"Larynx": [square((4.0, 4.0), 2.0, 2.0)]})
    sidecar, out = run(tmp_path / "dicom", tmp_path, structures=["Larynx", "GTVp"])
    assert sidecar["status"] == "ok" and sidecar["structures_present"] == ["Larynx"]
    assert (out / "volumes" / "C.nrrd").exists()
    sidecar, out = run(tmp_path / "dicom", tmp_path, structures=["Larynx", "GTVp"], required_structures=["GTVp"])
    assert sidecar["status"] == "excluded" and "required structure(s) ['GTVp'] missing" in sidecar["reason"]
    assert not list(out.rglob("*.nrrd"))


def test_corrupt_pixel_data_is_excluded_naming_the_file(tmp_path):
    ct = write_ct_series(tmp_path / "dicom", 4)
    bad = ct["files"][2]
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[:100]  # truncated pixel data
    ds.save_as(bad)
    sidecar, out = run(tmp_path / "dicom", tmp_path, labels="none")
    assert sidecar["status"] == "excluded" and "cannot decode pixel data" in sidecar["reason"]
    assert sidecar["file"] == str(bad)
    assert not list(out.rglob("*.nrrd"))


def test_upstream_exclusion_is_passed_on(tmp_path):
    upstream = write_json(tmp_path / "fetch.json", {"status": "excluded", "stage": "fetch", "file": "x",
                                                    "reason": "series not on TCIA", "excluded_at": "fetch"})
    sidecar, out = run(tmp_path / "nothing", tmp_path, upstream=upstream)
    assert sidecar["status"] == "excluded" and sidecar["excluded_at"] == "fetch"
    assert sidecar["reason"] == "series not on TCIA"


def test_cli_converts_a_series_with_a_localizer_beside_it(tmp_path):
    ct = write_ct_series(tmp_path / "dicom" / "ct", 5, origin=(0.0, 0.0, 0.0))
    write_ct_series(tmp_path / "dicom" / "scout", 2, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    write_rtstruct(tmp_path / "dicom" / "rt" / "rt.dcm", ct, {"LARYNX": [square((4.0, 4.0), 2.0, 4.0)]})
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "hnct.convert", "--case", "C", "--dicom-dir", str(tmp_path / "dicom"),
         "--volume", str(out / "v.nrrd"), "--label", str(out / "l.nrrd"), "--sidecar", str(out / "v.json"),
         "--series-uid", "", "--upstream", "", "--mask-dir", "", "--structures", "Larynx", "GTVp",
         "--required-structures", "", "--log", str(out / "log.txt")],
        env={"PYTHONPATH": str(REPO / "workflow"), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    sidecar = read_sidecar(out / "v.json")
    assert sidecar["status"] == "ok" and sidecar["series_uid"] == ct["series_uid"]
    assert len(sidecar["series_choice"]["candidates"]) == 3
    assert sidecar["structures_present"] == ["Larynx"] and sidecar["label"] == str(out / "l.nrrd")
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(out / "l.nrrd"))) == 1).sum() > 0


# Imports that cost a plain CT conversion (orthogonal, even spacing, no labels) a large share of
# dcm2niix's whole run (benchmarks/convert_vs_dcm2niix.py): that path must not load them.
HEAVY_IMPORTS = ("SimpleITK", "scipy", "pandas", "matplotlib", "torch", "highdicom", "requests",
                 # pydicom (0.15-0.25 s): GDCM's compiled scanner reads the headers (hnct.gdcm_index),
                 # so python-gdcm (0.05 s) is on this path as the header index, no longer as a codec
                 "pydicom",
                 # pydicom's other pixel-data codecs: only for a compressed transfer syntax
                 "pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls", "PIL",
                 "numpy.ma")  # np.median's NaN check imports it (~0.02 s)


def test_plain_ct_conversion_imports_no_heavy_library(tmp_path):
    ct = write_ct_series(tmp_path / "dicom" / "ct", 4, origin=(0.0, 0.0, 0.0))
    out = tmp_path / "out"
    script = (
        "import sys\n"
        "from hnct.convert import main\n"
        f"main(['--case', 'C', '--dicom-dir', {str(tmp_path / 'dicom')!r}, '--volume', {str(out / 'v.nrrd')!r},"
        f" '--sidecar', {str(out / 'v.json')!r}, '--labels', 'none'])\n"
        f"print(sorted(({{m.split('.')[0] for m in sys.modules}} | set(sys.modules)) & set({HEAVY_IMPORTS!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env={"PYTHONPATH": str(REPO / "workflow"),
                          "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"plain CT path imported {proc.stdout.strip()}"
    sidecar = read_sidecar(out / "v.json")
    assert sidecar["status"] == "ok" and sidecar["series_uid"] == ct["series_uid"]
    # The pynrrd-written volume reads back through SimpleITK with the sidecar's geometry and the HU.
    image = sitk.ReadImage(str(out / "v.nrrd"))
    assert list(image.GetSize()) == sidecar["size"]
    assert np.allclose(image.GetSpacing(), sidecar["spacing"]) and np.allclose(image.GetOrigin(), sidecar["origin"])
    assert np.allclose(image.GetDirection(), sidecar["direction"])
    hu = sitk.GetArrayFromImage(image)  # write_ct_series: HU = row - 1000, pixel (0, 0) of slice k 10 * k
    assert hu.dtype == np.int16 and hu.shape == (4, ROWS, COLS)
    assert np.array_equal(hu[:, 1:, :], np.broadcast_to(np.arange(1, ROWS)[None, :, None] - 1000, (4, ROWS - 1, COLS)))
    assert hu[:, 0, 0].tolist() == [0, 10, 20, 30]


@pytest.fixture(scope="module")
def demo_cohort():
    yaml = pytest.importorskip("yaml")
    import hnct.demo

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return hnct.demo.plan_cohort(**config["demo"])


def test_demo_case_with_localizer_converts_and_matches_pydicom(demo_cohort, tmp_path):
    import hnct.demo

    row = demo_cohort[(demo_cohort["demo_kind"] == "ct") & (demo_cohort["localizer_series_uid"] != "")].iloc[0]
    hnct.demo.write_case(row, tmp_path / "dicom", tmp_path / "manifest.json")
    sidecar, out = run(tmp_path / "dicom" / row["dicom_dir"], tmp_path, structures=["Larynx", "GTVp", "GTVn"],
                       series_uid=row["series_uid"])
    assert sidecar["status"] == "ok", sidecar.get("reason")
    assert sidecar["series_uid"] == row["ct_series_uid"]  # not the localizer
    headers = [ds for ds in (pydicom.dcmread(f, stop_before_pixels=True)
                             for f in (tmp_path / "dicom").rglob("*") if f.is_file() and is_dicom(f))
               if ds.SeriesInstanceUID == row["ct_series_uid"]]
    headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    image = sitk.ReadImage(str(out / "volumes" / "C.nrrd"))
    z = [float(ds.ImagePositionPatient[2]) for ds in headers]
    row_mm, col_mm = (float(v) for v in headers[0].PixelSpacing)
    assert image.GetSize() == (headers[0].Columns, headers[0].Rows, len(headers))
    assert np.allclose(image.GetOrigin(), [float(v) for v in headers[0].ImagePositionPatient], atol=1e-4)
    assert np.allclose(image.GetSpacing(), [col_mm, row_mm, (z[-1] - z[0]) / (len(z) - 1)], atol=1e-4)
    assert "Larynx" in sidecar["structures_present"]


def test_demo_broken_cases_are_excluded(demo_cohort, tmp_path):
    import hnct.demo

    # The gap case lost a slice file that its RTSTRUCT still references: within max_slice_gap_mm
    # the CT is interpolated and the RTSTRUCT's reference to the lost slice excludes it; beyond, the gap does.
    gap_thickness = float(demo_cohort[demo_cohort["demo_kind"] == "gap"].iloc[0]["slice_thickness"])
    gap_reason = (r"missing slice\(s\) between" if 2 * gap_thickness > 5.0
                  else r"references SOP instances not in series .*1 of \d+ unresolved")
    cases = [("gap", {}, gap_reason), ("gap", {"max_slice_gap_mm": 1.0}, r"missing slice\(s\) between"),
             ("no_ct", {}, r"no CT series .* found modalities: MR")]
    for n, (kind, options, pattern) in enumerate(cases):
        row = demo_cohort[demo_cohort["demo_kind"] == kind].iloc[0]
        hnct.demo.write_case(row, tmp_path / f"{kind}{n}", tmp_path / f"{kind}{n}.json")
        sidecar, out = run(tmp_path / f"{kind}{n}" / row["dicom_dir"], tmp_path / f"out-{n}", structures=["Larynx"],
                           **options)
        assert sidecar["status"] == "excluded" and re.search(pattern, sidecar["reason"]), sidecar
        assert not list(out.rglob("*.nrrd"))


@pytest.mark.parametrize("dtype,shape", [("int16", (3, 4, 5)), ("uint8", (2, 7, 3))])
def test_write_nrrd_writes_the_bytes_of_pynrrd_with_the_write_time_blanked(tmp_path, dtype, shape):
    """write_nrrd writes the voxels from the array's memory: the file is byte for byte what
    nrrd.write gives (header included), with only the write-time comment blanked."""
    import nrrd

    from hnct.convert import _blank_write_time, write_nrrd

    array = (np.arange(np.prod(shape)) * 37 - 50).astype(dtype).reshape(shape)
    direction = [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    geometry = {"direction": direction, "spacing": [0.5, 0.75, 2.5], "origin": [-10.0, 20.5, -300.25]}
    write_nrrd(array[:, ::-1, :], geometry, tmp_path / "hnct.nrrd")  # a view, not C-contiguous
    axes = np.reshape(direction, (3, 3)) * np.asarray(geometry["spacing"])
    nrrd.write(str(tmp_path / "pynrrd.nrrd"), np.ascontiguousarray(array[:, ::-1, :]),
               {"space": "left-posterior-superior", "space directions": axes.T,
                "space origin": np.asarray(geometry["origin"]), "kinds": ["domain"] * 3, "encoding": "raw"},
               index_order="C")
    written, reference = (tmp_path / "hnct.nrrd").read_bytes(), (tmp_path / "pynrrd.nrrd").read_bytes()
    assert b"\n# on " in reference and b"\n# on " not in written
    assert written == _blank_write_time(reference)
    data, header = nrrd.read(str(tmp_path / "hnct.nrrd"), index_order="C")
    assert np.array_equal(data, array[:, ::-1, :]) and data.dtype == np.dtype(dtype)
