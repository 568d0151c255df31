"""hnct.crop: boxes from masks and tables, LaryngealCT bbox3d conversion, 1 mm resampling of the box only."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hnct import crop
from hnct.common import InputError, excluded_sidecar, ok_sidecar, read_json, write_json
from hnct.laryngealct import BBOX_COLUMNS, AnnotationError, parse_bbox3d

# A rotated (15 degrees about z), anisotropic scan with a non-trivial origin.
ANGLE = math.radians(15.0)
DIRECTION = (
    math.cos(ANGLE), -math.sin(ANGLE), 0.0,
    math.sin(ANGLE), math.cos(ANGLE), 0.0,
    0.0, 0.0, 1.0,
)
SPACING = (0.5, 0.5, 2.5)
ORIGIN = (-31.7, 12.3, -402.5)
SIZE = (120, 100, 24)  # x, y, z voxels
LARYNX = (slice(8, 14), slice(40, 60), slice(50, 80))  # z, y, x index ranges of the planted structure


def make_scan(direction=DIRECTION, origin=ORIGIN, spacing=SPACING, size=SIZE):
    """Smooth HU background (soft tissue ~40 HU with a gradient) and a planted 'Larynx' block at 300 HU."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    hu = (40 + 0.8 * x - 0.5 * y + 3.0 * z).astype(np.int16)
    label = np.zeros(hu.shape, np.uint8)
    label[LARYNX] = 1
    hu[LARYNX] = 300
    images = []
    for array in (hu, label):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        images.append(image)
    return images


def write_case(tmp_path: Path, case="CASE-1", patient="PAT-1", **geometry) -> Path:
    """A convert-stage output: volume + label NRRD and an ok sidecar in the contract's form."""
    volume, label = make_scan(**geometry)
    volume_path = tmp_path / "volumes" / f"{case}.nrrd"
    label_path = tmp_path / "labels" / f"{case}.nrrd"
    volume_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume, str(volume_path), useCompression=False)
    sitk.WriteImage(label, str(label_path), useCompression=False)
    sidecar = tmp_path / "volumes" / f"{case}.json"
    write_json(sidecar, ok_sidecar(
        case, "convert", patient_id=patient, size=list(volume.GetSize()), spacing=list(volume.GetSpacing()),
        origin=list(volume.GetOrigin()), direction=list(volume.GetDirection()),
        labels={"1": "Larynx", "2": "GTVp", "3": "GTVn"}, structures_present=["Larynx"],
        volume=str(volume_path), label=str(label_path),
    ))
    return sidecar


def run_crop(tmp_path: Path, source: Path, case="CASE-1", **kwargs):
    out = tmp_path / "crops"
    sidecar = crop.crop_case(
        case, source, out / f"{case}.nrrd", out / f"{case}_label.nrrd", out / f"{case}.json", **kwargs
    )
    return sidecar, out


def physical_points(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """LPS mm of the centres of the voxels where ``mask`` (z, y, x) is true."""
    zyx = np.argwhere(mask)
    ijk = zyx[:, ::-1].astype(float)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (ijk * np.asarray(image.GetSpacing())) @ d.T


def write_lps_table(path: Path, rows):
    lines = ["\t".join(crop.LPS_COLUMNS)]
    lines += ["\t".join([case] + [f"{v:.4f}" for v in (*lo, *hi)]) for case, lo, hi in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- mask boxes


def test_mask_crop_holds_planted_structure_at_its_physical_place(tmp_path):
    source = write_case(tmp_path)
    sidecar, out = run_crop(tmp_path, source, structures=["larynx"], margin_mm=5.0)
    assert sidecar["status"] == "ok", sidecar
    ct = sitk.ReadImage(str(out / "CASE-1.nrrd"))
    lab = sitk.ReadImage(str(out / "CASE-1_label.nrrd"))
    assert ct.GetSpacing() == (1.0, 1.0, 1.0) and lab.GetSpacing() == (1.0, 1.0, 1.0)
    assert ct.GetDirection() == crop.IDENTITY
    assert ct.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
    assert list(ct.GetSize()) == sidecar["size"] and list(ct.GetOrigin()) == pytest.approx(sidecar["origin"])
    assert sidecar["box_source"] == "mask" and sidecar["padded"] is False

    original_volume, original_label = make_scan()
    orig_points = physical_points(original_label, sitk.GetArrayFromImage(original_label) == 1)
    crop_points = physical_points(lab, sitk.GetArrayFromImage(lab) == 1)
    # Same place in LPS mm: centroids agree within a voxel of the coarsest grid, extents within one voxel.
    assert np.allclose(orig_points.mean(axis=0), crop_points.mean(axis=0), atol=1.0)
    # The planted bright block lies where the label says, in the CT crop too.
    hot = physical_points(ct, sitk.GetArrayFromImage(ct) > 250)
    assert np.allclose(hot.mean(axis=0), orig_points.mean(axis=0), atol=1.0)
    # Every labelled voxel centre of the scan lies inside the box, with the margin on every side.
    lo, hi = np.asarray(sidecar["crop_box_lps"]["min"]), np.asarray(sidecar["crop_box_lps"]["max"])
    assert np.all(orig_points.min(axis=0) - lo >= 5.0) and np.all(hi - orig_points.max(axis=0) >= 5.0)
    # Outer faces of the voxels plus 5 mm: not more than one output voxel beyond that.
    assert np.all(orig_points.min(axis=0) - lo <= 5.0 + 0.5 * np.sqrt(2) * 2.5 + 1.0)


def test_missing_structure_is_excluded_with_labels_named(tmp_path):
    source = write_case(tmp_path)
    sidecar, out = run_crop(tmp_path, source, structures=["Epiglottis"])
    assert sidecar["status"] == "excluded"
    assert "Epiglottis" in sidecar["reason"] and "Larynx" in sidecar["reason"]
    assert not (out / "CASE-1.nrrd").exists() and read_json(out / "CASE-1.json")["status"] == "excluded"
    # Named in the label map but without a voxel: excluded, naming what is present.
    sidecar, _ = run_crop(tmp_path, source, structures=["GTVn"])
    assert sidecar["status"] == "excluded" and "GTVn" in sidecar["reason"] and "present: Larynx" in sidecar["reason"]


def test_upstream_exclusion_is_passed_on(tmp_path):
    source = tmp_path / "volumes" / "CASE-1.json"
    write_json(source, excluded_sidecar("CASE-1", "convert", "dicom/x", "missing slice", excluded_at="convert"))
    sidecar, out = run_crop(tmp_path, source)
    assert sidecar["status"] == "excluded" and sidecar["excluded_at"] == "convert"
    assert sidecar["reason"] == "missing slice"
    assert not (out / "CASE-1.nrrd").exists()


# --------------------------------------------------------------------------- lps tables, padding


def test_partly_outside_box_is_padded_and_flagged(tmp_path):
    # Identity direction so the expected share outside is simple arithmetic.
    origin = (0.0, 0.0, 0.0)
    source = write_case(tmp_path, direction=crop.IDENTITY, origin=origin)
    scan_max_face = np.array(SIZE) * np.array(SPACING) - 0.5 * np.array(SPACING)  # last voxel's outer face
    lo = np.array([40.0, 10.0, 20.0])
    hi = np.array([79.0, 39.0, 49.0])  # 40 x 30 x 30 voxel centres; x runs 40..79, scan ends at 59.75
    table = write_lps_table(tmp_path / "boxes.tsv", [("CASE-1", lo, hi)])
    sidecar, out = run_crop(tmp_path, source, method="table", table=str(table), table_format="lps", pad_hu=-1000)
    assert sidecar["status"] == "ok", sidecar
    assert sidecar["size"] == [40, 30, 30] and sidecar["padded"] is True
    inside_x = np.sum(np.arange(40.0, 80.0) <= scan_max_face[0])
    assert sidecar["outside_fraction"] == pytest.approx(1 - inside_x / 40, abs=1e-6)
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "CASE-1.nrrd")))
    assert np.all(ct[:, :, inside_x:] == -1000) and np.all(ct[:, :, :inside_x] > -1000)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "CASE-1_label.nrrd")))
    assert np.all(lab[:, :, inside_x:] == 0)


def test_wholly_outside_box_is_excluded(tmp_path):
    source = write_case(tmp_path)
    table = write_lps_table(tmp_path / "boxes.tsv", [("CASE-1", (500.0, 500.0, 0.0), (560.0, 560.0, 40.0))])
    sidecar, out = run_crop(tmp_path, source, method="table", table=str(table), table_format="lps")
    assert sidecar["status"] == "excluded" and "wholly outside" in sidecar["reason"]
    assert not (out / "CASE-1.nrrd").exists()


def test_case_missing_from_table_is_excluded(tmp_path):
    source = write_case(tmp_path)
    table = write_lps_table(tmp_path / "boxes.tsv", [("OTHER", (0, 0, 0), (10, 10, 10))])
    sidecar, _ = run_crop(tmp_path, source, method="table", table=str(table), table_format="lps")
    assert sidecar["status"] == "excluded" and "no crop box" in sidecar["reason"]


def test_crop_box_round_trips_through_an_lps_table(tmp_path):
    source = write_case(tmp_path)
    first, out = run_crop(tmp_path, source, structures=["Larynx"], margin_mm=3.0)
    box = first["crop_box_lps"]
    table = write_lps_table(tmp_path / "boxes.tsv", [("CASE-1", box["min"], box["max"])])
    second, _ = run_crop(tmp_path, source, method="table", table=str(table), table_format="lps")
    assert second["size"] == first["size"]
    assert second["origin"] == pytest.approx(first["origin"], abs=1e-3)


def test_crop_grid_size_is_ceil_of_extent_plus_one():
    origin, size = crop.crop_grid(np.array([0.0, 0.0, 0.0]), np.array([10.0, 10.2, 0.0]), 1.0)
    assert size == [11, 12, 1] and origin == [0.0, 0.0, 0.0]
    # Float noise on a whole number of voxels does not add a voxel.
    assert crop.crop_grid(np.zeros(3), np.array([9.0000000001, 3.0, 3.0]), 1.0)[1] == [10, 4, 4]


# --------------------------------------------------------------------------- resample only the box


@pytest.mark.parametrize("interpolation, tolerance_hu", [("linear", 1), ("bspline", 2)])
def test_box_resample_equals_whole_volume_resample_then_crop(interpolation, tolerance_hu):
    # A smooth field (no step edges) so B-spline's sub-region prefilter is compared fairly.
    z, y, x = np.meshgrid(*(np.arange(n) for n in SIZE[::-1]), indexing="ij")
    smooth = (200 * np.sin(x / 9.0) * np.cos(y / 7.0) + 20 * z).astype(np.int16)
    volume = sitk.GetImageFromArray(smooth)
    volume.SetSpacing(SPACING)
    volume.SetOrigin(ORIGIN)
    volume.SetDirection(DIRECTION)
    box_origin = [-20.0, 30.0, -390.0]
    size = [18, 16, 20]
    box = crop.to_int16_hu(crop.resample_box(volume, box_origin, size, 1.0, interpolation, -1024, sitk.sitkFloat32))
    # Whole scan to a 1 mm grid aligned with the box (so the box is a sub-grid), then cropped.
    lo, hi = crop.index_box_to_lps(volume, np.full(3, -0.5), np.array(SIZE) - 0.5)
    shift = np.floor((np.array(box_origin) - lo) / 1.0)
    whole_origin = list(np.array(box_origin) - shift)
    whole_size = [int(v) for v in np.ceil((hi - np.array(whole_origin)) / 1.0) + 1]
    whole = sitk.Resample(volume, whole_size, sitk.Transform(), crop.INTERPOLATORS[interpolation], whole_origin,
                          [1.0] * 3, crop.IDENTITY, -1024.0, sitk.sitkFloat32)
    start = [int(v) for v in shift]
    whole_crop = crop.to_int16_hu(sitk.RegionOfInterest(whole, size, start))
    a = sitk.GetArrayFromImage(box).astype(int)
    b = sitk.GetArrayFromImage(whole_crop).astype(int)
    assert np.abs(a - b).max() <= tolerance_hu
    assert np.array(sitk.GetArrayViewFromImage(box) > -1024).all()


# --------------------------------------------------------------------------- LaryngealCT bbox3d


def test_bbox3d_worked_example_converts_with_the_scan_geometry():
    """HN_018 (the repository's worked example HN_018_01): x, y, z = 216, 213, 67; size 90, 60, 32.

    The geometry here is a typical axial H&N scan (0.9766 mm pixels, 2.5 mm slices, head first):
    the box must become origin + index * spacing for its first and last voxel CENTRES.
    """
    scan = sitk.Image(512, 512, 120, sitk.sitkUInt8)
    scan.SetSpacing((0.9765625, 0.9765625, 2.5))
    scan.SetOrigin((-250.0, -229.5, -587.0))
    lo, hi = crop.bbox3d_to_lps(scan, (216, 213, 67), (90, 60, 32))
    assert lo == pytest.approx([-250.0 + 216 * 0.9765625, -229.5 + 213 * 0.9765625, -587.0 + 67 * 2.5])
    assert hi == pytest.approx([-250.0 + 305 * 0.9765625, -229.5 + 272 * 0.9765625, -587.0 + 98 * 2.5])
    assert lo == pytest.approx([-39.0625, -21.4921875, -419.5]) and hi == pytest.approx([47.8515625, 36.125, -342.0])
    # At 1 mm: 86.9 x 57.6 x 77.5 mm between the outer voxel centres -> 88 x 59 x 79 voxels.
    assert crop.crop_grid(lo, hi, 1.0)[1] == [88, 59, 79]
    # Feet first (slice axis pointing inferior) and mirrored in-plane: the box is the same set of
    # voxels, so it is the min/max over the corners, not origin + start * spacing.
    scan.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0))
    lo2, hi2 = crop.bbox3d_to_lps(scan, (216, 213, 67), (90, 60, 32))
    assert lo2 == pytest.approx([-250.0 - 305 * 0.9765625, -229.5 - 272 * 0.9765625, -587.0 - 98 * 2.5])
    assert hi2 == pytest.approx([-250.0 - 216 * 0.9765625, -229.5 - 213 * 0.9765625, -587.0 - 67 * 2.5])


def test_published_bbox3d_parses_with_collection_counts(laryngealct_dir):
    table = parse_bbox3d(laryngealct_dir / "bbox3d.txt")
    assert len(table) == 1029 and table["case_id"].is_unique
    counts = Counter(table["collection"])
    assert counts == {
        "RADCURE": 867, "HEAD-NECK-RADIOMICS-HN1": 49, "QIN-HEADNECK": 46,
        "Head-Neck-PET-CT": 44, "HNSCC": 19, "Head-Neck-3DCT-RT": 4,
    }
    # The worked example, matched from hnct's case ID with a repeat-scan suffix or the TCIA patient.
    for case, patient in [("HN_018_01", "HN-018"), ("HN-018", "HN-018"), ("scan-a", "HN-018")]:
        row = crop.find_bbox3d_row(table, case, patient, "bbox3d.txt")
        assert row["case_id"] == "HN_018"
        assert [row[c] for c in BBOX_COLUMNS[1:]] == [216, 213, 67, 90, 60, 32]
    row = crop.find_bbox3d_row(table, "RADCURE-0724", "RADCURE-0724", "bbox3d.txt")
    assert [row[c] for c in BBOX_COLUMNS[1:]] == [223, 174, 41, 71, 67, 39]
    assert crop.find_bbox3d_row(table, "HNSCC-01-0165", None, "x")["case_id"] == "HNSCC_01_0165"
    with pytest.raises(InputError, match="no crop box"):
        crop.find_bbox3d_row(table, "RADCURE-9999", "RADCURE-9999", "bbox3d.txt")


def test_bbox3d_table_crop_end_to_end(tmp_path):
    """A bbox3d line in the published form crops the scan voxels it names (patient match, '_' for '-')."""
    source = write_case(tmp_path, case="HN-090_01", patient="HN-090", direction=crop.IDENTITY)
    # The planted block: x 50..79, y 40..59, z 8..13 in scan voxels.
    table = tmp_path / "bbox3d.txt"
    table.write_text("RADCURE_0001,1,2,3,4,5,6\nHN_090,50,40,8,30,20,6\n")
    sidecar, out = run_crop(tmp_path, source, case="HN-090_01", method="table", table=str(table),
                            table_format="bbox3d")
    assert sidecar["status"] == "ok", sidecar
    assert sidecar["box_source"] == "bbox3d table"
    assert sidecar["box_detail"]["bbox3d_case_id"] == "HN_090"
    volume, label = make_scan(direction=crop.IDENTITY)
    lo, hi = crop.bbox3d_to_lps(volume, (50, 40, 8), (30, 20, 6))
    assert sidecar["requested_box_lps"]["min"] == pytest.approx(list(lo))
    assert lo == pytest.approx([ORIGIN[0] + 25.0, ORIGIN[1] + 20.0, ORIGIN[2] + 20.0])
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "HN-090_01_label.nrrd")))
    # x = column, y = row, z = slice: the box is exactly the planted block. 14.5 x 9.5 x 12.5 mm
    # between the outer voxel centres -> 16 x 11 x 14 voxels at 1 mm (ceil + 1); every output
    # voxel centre within the requested box is labelled, the ceil's last voxel lies past the block.
    assert lab.shape == (14, 11, 16)
    assert lab[:13, :10, :15].all()
    assert not lab[:, :, 15].any() and not lab[:, 10, :].any()


def test_cli_runs_a_case(tmp_path):
    source = write_case(tmp_path)
    out = tmp_path / "crops"
    rc = crop.main([
        "--case", "CASE-1", "--source-sidecar", str(source), "--out-volume", str(out / "CASE-1.nrrd"),
        "--out-label", str(out / "CASE-1_label.nrrd"), "--sidecar", str(out / "CASE-1.json"),
        "--method", "mask", "--structures", "Larynx", "--margin-mm", "2", "--spacing-mm", "1.5",
        "--interpolation", "bspline", "--pad-hu", "-1024", "--table", "",
    ])
    assert rc == 0
    sidecar = read_json(out / "CASE-1.json")
    assert sidecar["status"] == "ok" and sidecar["spacing"] == [1.5, 1.5, 1.5]
    assert sitk.ReadImage(str(out / "CASE-1.nrrd")).GetSpacing() == (1.5, 1.5, 1.5)


@pytest.mark.parametrize("line,reason", [
    ("HN_090,50,40,8,30,0,6", "box sizes must be positive"),
    ("LUNG1_001,50,40,8,30,20,6", "none of the six LaryngealCT collections"),
    ("HN_090,50,40,8,30,20", "expected case_id and 6 integers"),
    ("RADCURE_0001,9,9,9,9,9,9", "duplicate case IDs"),
])
def test_bad_bbox3d_table_fails_the_crop_naming_file_and_line(tmp_path, line, reason):
    """crop reads bbox3d.txt through hnct.laryngealct's parser: the same checks as the cohort table.

    A broken table is no case's fault (it would misplace every box): the job fails, naming the file.
    """
    source = write_case(tmp_path, case="HN-090_01", patient="HN-090", direction=crop.IDENTITY)
    table = tmp_path / "bbox3d.txt"
    table.write_text(f"RADCURE_0001,1,2,3,4,5,6\n{line}\n")
    where = "bbox3d.txt" if reason == "duplicate case IDs" else "bbox3d.txt:2"
    with pytest.raises(AnnotationError, match=f"{where}: .*{reason}"):
        run_crop(tmp_path, source, case="HN-090_01", method="table", table=str(table), table_format="bbox3d")
    assert not (tmp_path / "crops" / "HN-090_01.json").exists()


def test_case_folder_is_emptied_and_stays_empty_when_excluded(tmp_path):
    """With the case's declared folder (the workflow's results/crops/{case}/): a previous run's
    files never survive; an excluded case leaves the folder, empty, and its sidecar."""
    source = write_case(tmp_path)
    folder = tmp_path / "crops" / "CASE-1"
    folder.mkdir(parents=True)
    (folder / "old.nrrd").write_bytes(b"from an earlier run")
    ok = crop.crop_case("CASE-1", source, folder / "volume.nrrd", folder / "label.nrrd",
                        tmp_path / "crops" / "CASE-1.json", structures=["Larynx"], out_dir=folder)
    assert ok["status"] == "ok" and ok["volume"] == str(folder / "volume.nrrd")
    assert sorted(p.name for p in folder.iterdir()) == ["label.nrrd", "volume.nrrd"]
    table = write_lps_table(tmp_path / "boxes.tsv", [("CASE-1", (500.0, 500.0, 0.0), (560.0, 560.0, 40.0))])
    excluded = crop.crop_case("CASE-1", source, folder / "volume.nrrd", folder / "label.nrrd",
                              tmp_path / "crops" / "CASE-1.json", method="table", table=str(table),
                              table_format="lps", out_dir=folder)
    assert excluded["status"] == "excluded" and "wholly outside" in excluded["reason"]
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert read_json(tmp_path / "crops" / "CASE-1.json")["status"] == "excluded"
