"""DICOM SEG -> label map (hnct.seg through convert): highdicom's own SEG objects over pydicom's small
CT, and SEGs written with highdicom from a demo case's label map, checked voxel by voxel."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from hnct.convert import convert_case, main as convert_main

# highdicom warns that the demo's PatientName has a single component; the demo writes it so.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")

REPO = Path(__file__).resolve().parents[1]
# pydicom's 4-slice CT that highdicom's test SEGs were written over. Its first slice (17106) lies
# 202 mm below the other three, so the series is not one volume (convert excludes it for the gap):
# the CT here is the three regular slices, and SEG frames on 17106 lie outside it.
CT2_DIR = Path(get_testdata_file("dicomdirtests/77654033/CT2/17136")).parent
CT2_VOLUME = ("17136", "17166", "17196")


def convert(folder: Path, out: Path, labels: str = "seg", structures=("first segment", "second segment"),
            **kwargs) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return convert_case("C", folder, out / "v.nrrd", out / "l.nrrd", out / "s.json", labels=labels,
                        structures=list(structures), **kwargs)


def label_array(out: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "l.nrrd")))


def ct2_case(tmp_path: Path, seg_file: Path | None) -> Path:
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in CT2_VOLUME:
        shutil.copy(CT2_DIR / name, folder / name)
    if seg_file is not None:
        shutil.copy(seg_file, folder / "seg.dcm")
    return folder


def expected_from_frames(seg_file: Path, ct_files: list[Path], structures: list[str]) -> np.ndarray:
    """The label map read independently of hnct.seg: pydicom's decoded frames, each put on the CT
    slice its DerivationImageSequence names, fractional values thresholded at half the maximum."""
    ds = pydicom.dcmread(seg_file)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    cts = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in ct_files),
                 key=lambda c: float(c.ImagePositionPatient[2]))
    slice_of = {str(c.SOPInstanceUID): k for k, c in enumerate(cts)}
    if ds.SegmentationType == "FRACTIONAL":
        frames = frames >= 0.5 * float(ds.MaximumFractionalValue)
    label_of = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    expected = np.zeros((len(cts), cts[0].Rows, cts[0].Columns), dtype=np.uint8)
    for value, structure in enumerate(structures, start=1):
        for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            source = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            if label_of[number].lower() == structure.lower() and source in slice_of:
                expected[slice_of[source]][frame.astype(bool)] = value
    return expected


@pytest.mark.parametrize("name", ["seg_image_ct_binary", "seg_image_ct_binary_fractional",
                                  "seg_image_ct_true_fractional", "seg_image_ct_binary_overlap"])
def test_highdicom_segs_convert_onto_their_ct(testdata_dir, tmp_path, name):
    seg_file = testdata_dir / "highdicom-seg" / f"{name}.dcm"
    folder = ct2_case(tmp_path, seg_file)
    sidecar = convert(folder, tmp_path / "out")
    assert sidecar["status"] == "ok", sidecar.get("reason")
    structures = ["first segment", "second segment"]
    expected = expected_from_frames(seg_file, [folder / n for n in CT2_VOLUME], structures)
    got = label_array(tmp_path / "out")
    assert got.shape == (3, 16, 16)
    assert np.array_equal(got, expected)
    assert got.any()
    matching = sidecar["label_matching"]
    assert matching["reference"]["by"] == "ReferencedSeriesSequence" and matching["resampled"] == []
    assert sidecar["label_source"] == "seg"
    if name == "seg_image_ct_binary_overlap":
        # Two overlapping segments: the second painted over the first; the frames on slice 17106
        # (not part of this volume) are counted, not silently lost.
        assert set(np.unique(got)) == {0, 1, 2}
        raw = pydicom.dcmread(seg_file)
        below = [f for f, item in zip(raw.pixel_array, raw.PerFrameFunctionalGroupsSequence)
                 if float(item.PlanePositionSequence[0].ImagePositionPatient[2]) < 0]
        outside = sum(p["voxels_outside_ct"] for p in matching["segments"].values())
        assert outside == int(sum(f.sum() for f in below)) > 0
    if name == "seg_image_ct_true_fractional":
        values = pydicom.dcmread(seg_file).pixel_array
        assert ((values > 0) & (values < 255)).any()  # truly fractional: the threshold decides


def test_seg_of_another_series_excludes_the_case(testdata_dir, tmp_path):
    seg_file = testdata_dir / "highdicom-seg" / "seg_image_ct_binary_single_frame.dcm"  # over CT_small.dcm
    folder = ct2_case(tmp_path, seg_file)
    sidecar = convert(folder, tmp_path / "out")
    assert sidecar["status"] == "excluded"
    assert sidecar["file"] == str(folder / "seg.dcm")
    assert "not to CT series 1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.2" in sidecar["reason"]
    assert not list((tmp_path / "out").glob("*.nrrd"))


def test_unreadable_seg_excludes_the_case_with_the_reason(testdata_dir, tmp_path):
    ds = pydicom.dcmread(testdata_dir / "highdicom-seg" / "seg_image_ct_binary.dcm")
    del ds.SegmentSequence
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    folder = ct2_case(tmp_path, broken)
    sidecar = convert(folder, tmp_path / "out")
    assert sidecar["status"] == "excluded" and sidecar["file"] == str(folder / "seg.dcm")
    assert "is not a readable DICOM SEG" in sidecar["reason"]
    # Beside a good SEG, the broken one is ignored and listed.
    shutil.copy(testdata_dir / "highdicom-seg" / "seg_image_ct_binary.dcm", folder / "seg_good.dcm")
    sidecar = convert(folder, tmp_path / "out2")
    assert sidecar["status"] == "ok"
    assert sidecar["label_matching"]["file"] == str(folder / "seg_good.dcm")
    assert [i["file"] for i in sidecar["label_matching"]["ignored"]] == [str(folder / "seg.dcm")]


@pytest.mark.parametrize("shift_x_mm, z_last, reason", [
    (0.0, 106.0, r"frames of segment\(s\) \[1\] do not form a regular volume"),
    (1000.3, None, r"segment\(s\) \[1\] do not overlap the CT volume"),
])
def test_seg_whose_frames_cannot_go_on_the_ct_excludes_the_case(testdata_dir, tmp_path, shift_x_mm, z_last, reason):
    ds = pydicom.dcmread(testdata_dir / "highdicom-seg" / "seg_image_ct_binary.dcm")
    for item in ds.PerFrameFunctionalGroupsSequence:
        x, y, z = (float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        item.PlanePositionSequence[0].ImagePositionPatient = [round(x + shift_x_mm, 4), y, z]
    if z_last is not None:  # frames at 103.02, 104.27, 106.0 mm: uneven
        last = ds.PerFrameFunctionalGroupsSequence[-1].PlanePositionSequence[0]
        last.ImagePositionPatient = [*last.ImagePositionPatient[:2], z_last]
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved)
    folder = ct2_case(tmp_path, moved)
    sidecar = convert(folder, tmp_path / "out")
    assert sidecar["status"] == "excluded" and sidecar["file"] == str(folder / "seg.dcm")
    assert re.search(reason, sidecar["reason"]), sidecar["reason"]
    assert not list((tmp_path / "out").glob("*.nrrd"))


# ------------------------------------------------------------------------- demo round trips

STRUCTURES = ["Larynx", "GTVp", "GTVn"]


@pytest.fixture(scope="module")
def demo_case(tmp_path_factory):
    """One demo case converted with its RTSTRUCT: the CT files, the CT image and the label map."""
    yaml = pytest.importorskip("yaml")
    import hnct.demo

    root = tmp_path_factory.mktemp("demo")
    cohort = hnct.demo.plan_cohort(**yaml.safe_load((REPO / "config" / "config.yaml").read_text())["demo"])
    row = cohort[(cohort["demo_kind"] == "ct") & (cohort["localizer_series_uid"] == "")].iloc[0]
    hnct.demo.write_case(row, root / "dicom", root / "manifest.json")
    folder = root / "dicom" / row["dicom_dir"]
    sidecar = convert(folder, root / "rt", labels="rtstruct", structures=STRUCTURES)
    assert sidecar["status"] == "ok", sidecar.get("reason")
    labels = label_array(root / "rt")
    assert set(np.unique(labels)) >= {0, 1, 2}
    ct_files = [Path(f) for f in (folder.rglob("*")) if f.is_file()
                and pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == sidecar["series_uid"]]
    return {"folder": folder, "ct_files": ct_files, "labels": labels,
            "reference": sitk.ReadImage(str(root / "rt" / "v.nrrd")), "rtstruct_sidecar": sidecar}


def write_seg(demo_case, path: Path, fractional: np.ndarray | None = None, names=STRUCTURES) -> None:
    """A SEG written with highdicom from the demo label map (one segment per structure);
    ``fractional`` (z, y, x, segment) in 0..1 writes a FRACTIONAL SEG instead of a BINARY one."""
    reference = demo_case["reference"]
    sources = [pydicom.dcmread(f) for f in demo_case["ct_files"]]
    k_of = [reference.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]
            for ds in sources]
    labels = demo_case["labels"]
    if fractional is None:
        pixels = np.stack([labels[k_of] == v for v in range(1, len(names) + 1)], axis=-1).astype(np.uint8)
    else:
        pixels = fractional[k_of].astype(np.float32)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=name, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, name in enumerate(names, start=1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels,
        segmentation_type="FRACTIONAL" if fractional is not None else "BINARY",
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=300,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="hnct tests",
        manufacturer_model_name="test_seg", software_versions="1", device_serial_number="1")
    seg.save_as(path)


def shuffle_frames(path: Path, seed: int) -> list[int]:
    """Put a SEG's frames (pixel data and per-frame headers together) in a random order; returns it.

    highdicom writes frames sorted by position, as most writers do; DICOM does not require it."""
    ds = pydicom.dcmread(path)
    n_frames = int(ds.NumberOfFrames)
    frame_bits = ds.Rows * ds.Columns * ds.BitsAllocated
    assert frame_bits % 8 == 0, "frames must start on a byte to be cut apart"
    frame_bytes = frame_bits // 8
    order = [int(i) for i in np.random.default_rng(seed).permutation(n_frames)]
    data = bytes(ds.PixelData)
    shuffled = b"".join(data[i * frame_bytes:(i + 1) * frame_bytes] for i in order)
    ds.PixelData = shuffled + b"\0" * (len(shuffled) % 2)
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in order]
    if "DimensionOrganizationType" in ds:
        del ds.DimensionOrganizationType
    ds.save_as(path)
    return order


def seg_case(demo_case, tmp_path: Path, keep_rtstruct: bool = False, **seg_kwargs) -> Path:
    """The demo case's CT (and its RTSTRUCT, if kept) with a SEG written from its label map."""
    folder = tmp_path / "case"
    folder.mkdir(parents=True)
    for f in demo_case["ct_files"]:
        shutil.copy(f, folder / f.name)
    if keep_rtstruct:
        shutil.copy(demo_case["rtstruct_sidecar"]["label_matching"]["file"], folder / "rtstruct.dcm")
    write_seg(demo_case, folder / "seg.dcm", **seg_kwargs)
    return folder


def test_demo_seg_round_trips_voxel_by_voxel(demo_case, tmp_path):
    folder = seg_case(demo_case, tmp_path)
    sidecar = convert(folder, tmp_path / "out", structures=STRUCTURES)
    assert sidecar["status"] == "ok", sidecar.get("reason")
    assert np.array_equal(label_array(tmp_path / "out"), demo_case["labels"])
    assert sidecar["label_matching"]["segmentation_type"] == "BINARY"
    assert sidecar["label_matching"]["resampled"] == []  # on the CT grid: placed, not interpolated
    assert sidecar["label_matching"]["voxels"] == demo_case["rtstruct_sidecar"]["label_matching"]["voxels"]


def test_demo_seg_with_frames_shuffled_round_trips(demo_case, tmp_path):
    folder = seg_case(demo_case, tmp_path)
    shuffle_frames(folder / "seg.dcm", seed=15)
    written = pydicom.dcmread(folder / "seg.dcm", stop_before_pixels=True)
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in written.PerFrameFunctionalGroupsSequence]
    first_segment = [zz for zz, f in zip(z, written.PerFrameFunctionalGroupsSequence)
                     if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1]
    assert first_segment != sorted(first_segment) and first_segment != sorted(first_segment, reverse=True)
    sidecar = convert(folder, tmp_path / "out", structures=STRUCTURES)
    assert sidecar["status"] == "ok", sidecar.get("reason")
    assert np.array_equal(label_array(tmp_path / "out"), demo_case["labels"])


def test_fractional_demo_seg_thresholds_at_half_the_maximum(demo_case, tmp_path):
    labels = demo_case["labels"]
    rng = np.random.default_rng(6)
    inside = np.stack([labels == v for v in range(1, 4)], axis=-1)
    # Inside at 0.55 .. 1.0 of the maximum, outside at 0 .. 0.45 (stored as n/255).
    fractional = np.where(inside, rng.uniform(0.55, 1.0, inside.shape), rng.uniform(0.0, 0.45, inside.shape))
    folder = seg_case(demo_case, tmp_path, fractional=fractional)
    sidecar = convert(folder, tmp_path / "out", structures=STRUCTURES)
    assert sidecar["status"] == "ok", sidecar.get("reason")
    assert sidecar["label_matching"]["segmentation_type"] == "FRACTIONAL"
    assert np.array_equal(label_array(tmp_path / "out"), labels)


def test_auto_picks_rtstruct_else_seg(demo_case, tmp_path):
    with_both = seg_case(demo_case, tmp_path / "both", keep_rtstruct=True, names=["Larynx", "GTVp", "nothing"])
    sidecar = convert(with_both, tmp_path / "out-both", labels="auto", structures=STRUCTURES)
    assert sidecar["label_source"] == "rtstruct" and sidecar["label_matching"]["file"].endswith("rtstruct.dcm")
    seg_only = seg_case(demo_case, tmp_path / "seg")
    assert convert_main(["--case", "C", "--dicom-dir", str(seg_only), "--volume", str(tmp_path / "v.nrrd"),
                         "--label", str(tmp_path / "l.nrrd"), "--sidecar", str(tmp_path / "s.json"),
                         "--labels", "auto", "--structures", *STRUCTURES]) == 0
    sidecar = json.loads((tmp_path / "s.json").read_text())
    assert sidecar["label_source"] == "seg" and sidecar["label_matching"]["file"] == str(seg_only / "seg.dcm")
    assert np.array_equal(label_array(tmp_path), demo_case["labels"])


def test_seg_off_the_ct_grid_is_resampled(demo_case, tmp_path):
    """A SEG on the CT grid shifted by 0.6 of a column: resampled (linear) onto the CT and thresholded
    at 0.5, so CT column i takes SEG column i-1 (weight 0.6) over column i (weight 0.4)."""
    folder = seg_case(demo_case, tmp_path)
    ds = pydicom.dcmread(folder / "seg.dcm")
    column_mm = float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1])
    for item in ds.PerFrameFunctionalGroupsSequence:  # an axial CT: columns run along +x
        position = item.PlanePositionSequence[0]
        position.ImagePositionPatient = [round(float(position.ImagePositionPatient[0]) + 0.6 * column_mm, 4),
                                         *position.ImagePositionPatient[1:]]
    ds.save_as(folder / "seg.dcm")
    sidecar = convert(folder, tmp_path / "out", structures=["Larynx"])
    assert sidecar["status"] == "ok", sidecar.get("reason")
    assert sidecar["label_matching"]["resampled"] == ["Larynx"]
    larynx = demo_case["labels"] == 1
    assert not larynx[:, :, :2].any() and not larynx[:, :, -2:].any()  # away from the edges
    expected = np.zeros_like(larynx)
    expected[:, :, 1:] = larynx[:, :, :-1]
    assert np.array_equal(label_array(tmp_path / "out") == 1, expected)


def test_seg_segment_labels_are_harmonised_like_roi_names(demo_case, tmp_path):
    """Segment labels reach their structures through convert.structure_names (issue 13): 'LARYNX_ROI'
    and 'gtv primary' by pattern, 'GTV-n' ignoring punctuation; a label no structure matches is listed
    in unmatched_rois; a label two structures claim excludes the case."""
    names = {"Larynx": ["larynx[ _-]?roi"], "GTVp": ["gtv[ _-]?primary"]}
    folder = seg_case(demo_case, tmp_path, names=["LARYNX_ROI", "gtv primary", "GTV-n"])
    sidecar = convert(folder, tmp_path / "out", structures=STRUCTURES, structure_names=names)
    assert sidecar["status"] == "ok", sidecar.get("reason")
    assert np.array_equal(label_array(tmp_path / "out"), demo_case["labels"])
    assert {s: m["how"] for s, m in sidecar["label_matching"]["matched"].items()} == {
        "Larynx": "pattern", "GTVp": "pattern", "GTVn": "normalised"}
    assert [e["source"] for e in sidecar["structures"]] == ["LARYNX_ROI", "gtv primary", "GTV-n"]
    sidecar = convert(folder, tmp_path / "out2", structures=["Larynx", "GTVp"], structure_names=names)
    assert sidecar["unmatched_rois"] == ["GTV-n"] and [e["annotated"] for e in sidecar["structures"]] == [True, True]
    sidecar = convert(folder, tmp_path / "out3", structures=STRUCTURES, structure_names={**names, "GTVn": ["gtv.*"]})
    assert sidecar["status"] == "excluded"
    assert "ROI 'gtv primary' in " in sidecar["reason"] and "matches 2 structures ['GTVn', 'GTVp']" in sidecar["reason"]
