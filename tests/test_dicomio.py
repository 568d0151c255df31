"""hnct.dicomio on small DICOM series written here with pydicom (real files, no mocks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from hnct import dicomio
from hnct.common import InputError
from hnct.structures import paint_label_map

ROWS, COLS = 16, 20
PIXEL_MM = (0.5, 0.8)  # PixelSpacing [row spacing (y), column spacing (x)]


def _base(sop_class: str, modality: str, patient: str, study_uid: str, series_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    return ds


def write_ct_series(folder: Path, n_slices: int = 6, *, slice_mm: float = 2.0, origin=(-10.0, -20.0, 30.0),
                    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), image_type="ORIGINAL\\PRIMARY\\AXIAL",
                    skip=(), names=None, series_uid=None, study_uid=None, frame_uid=None,
                    patient="P1") -> dict:
    """A CT series; pixel (0, 0) of slice k (position order) holds HU 10*k, the rest HU = row - 1000.

    Slices are stacked along the IOP normal from ``origin``; indices in ``skip`` are left out
    (a missing slice). ``names(k)`` gives the file name of slice k (default: shuffled names).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    files, sops, positions = {}, {}, {}
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(n_slices)
    for k in range(n_slices):
        if k in skip:
            continue
        ds = _base(CTImageStorage, "CT", patient, study_uid, series_uid)
        ds.FrameOfReferenceUID = frame_uid
        ds.ImageType = image_type.split("\\")
        position = np.array(origin) + k * slice_mm * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [str(PIXEL_MM[0]), str(PIXEL_MM[1])]
        ds.SliceThickness = str(slice_mm)
        ds.InstanceNumber = int(n_slices - k)  # deliberately the reverse of position order
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.Manufacturer = "hnct-test"
        ds.ConvolutionKernel = "B30f"
        hu = np.tile(np.arange(ROWS, dtype=np.int16)[:, None] - 1000, (1, COLS))
        hu[0, 0] = 10 * k
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        name = names(k) if names else f"{shuffled[k]:03d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        files[k], sops[k], positions[k] = path, ds.SOPInstanceUID, position
    return {"series_uid": series_uid, "study_uid": study_uid, "frame_uid": frame_uid, "files": files,
            "sops": sops, "positions": positions, "normal": normal}


def write_rtstruct(path: Path, ct: dict, rois: dict[str, list[np.ndarray]], sop_refs=None) -> None:
    """RTSTRUCT with closed planar contours (arrays of LPS mm points) referencing ``ct``'s slices."""
    ds = _base(RTStructureSetStorage, "RTSTRUCT", "P1", ct["study_uid"], generate_uid())
    refs = list(ct["sops"].values()) if sop_refs is None else sop_refs
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = ct["frame_uid"]
    study = pydicom.Dataset()
    series = pydicom.Dataset()
    series.SeriesInstanceUID = ct["series_uid"]
    series.ContourImageSequence = [pydicom.Dataset() for _ in refs]
    for item, uid in zip(series.ContourImageSequence, refs):
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid
    study.RTReferencedSeriesSequence = [series]
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = pydicom.Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, ct["frame_uid"]
        ds.StructureSetROISequence.append(roi)
        rc = pydicom.Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = []
        for points in contours:
            c = pydicom.Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(points)
            c.ContourData = [f"{v:.4f}" for v in np.asarray(points).ravel()]
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def square(center_xy, half_mm, z):
    cx, cy = center_xy
    return np.array([[cx - half_mm, cy - half_mm, z], [cx + half_mm, cy - half_mm, z],
                     [cx + half_mm, cy + half_mm, z], [cx - half_mm, cy + half_mm, z]])


def read(folder, series_uid="", **kw):
    index = dicomio.index_series(folder)
    row, choice = dicomio.choose_ct_series("C", folder, index, series_uid)
    image, geometry = dicomio.read_ct("C", row, **kw)
    return index, row, choice, image, geometry


@pytest.mark.parametrize("signed,bits_stored,syntax", [(0, 16, "explicit"), (1, 16, "implicit"), (0, 12, "explicit"),
                                                     (1, 12, "explicit"), (1, 10, "implicit")])
@pytest.mark.parametrize("shape", [(7, 5), (160, 96)], ids=["in-memory", "deferred"])
def test_native_pixel_read_equals_pydicoms_pixel_array(tmp_path, monkeypatch, signed, bits_stored, syntax, shape):
    """The numpy read of uncompressed 16-bit slices gives pydicom's values, unused high bits included,
    whether the pixel data is in memory or was deferred by the index (then read at its file offset)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.pixels import pixel_array
    from pydicom.uid import ImplicitVRLittleEndian

    ds = _base(CTImageStorage, "CT", "P1", generate_uid(), generate_uid())
    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *shape, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, signed
    # Every 16-bit pattern, so the unused high bits hold garbage that both reads must discard alike.
    raw = np.random.default_rng(bits_stored + signed).integers(0, 2 ** 16, size=shape, dtype=np.uint16)
    ds.PixelData = raw.astype("<u2").tobytes()
    path = tmp_path / "slice.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = pydicom.dcmread(path, defer_size=dicomio.DEFER_BYTES)
    expected = pixel_array(pydicom.dcmread(path))

    def not_the_fast_path(ds):
        raise AssertionError("fell back to pydicom's pixel_array")

    element = read.get_item(dicomio.PIXEL_DATA_TAG, keep_deferred=True)
    deferred = isinstance(element, RawDataElement) and element.value is None
    assert deferred == (shape[0] * shape[1] * 2 > dicomio.DEFER_BYTES)
    monkeypatch.setattr(dicomio, "pixel_array", not_the_fast_path)
    fast = dicomio._stored_values(read)
    assert fast.dtype == expected.dtype and np.array_equal(fast, expected)


def test_codec_plugins_load_only_for_a_compressed_syntax_and_register_as_pydicom_does(tmp_path):
    """hnct.dicomio importing pydicom (before anything else did) imports no codec package; asking
    pydicom's registry about a compressed syntax registers the plugins exactly as a plain pydicom
    import does (same available plugins in the same order, same unavailable ones, for every decoder
    and encoder)."""
    from pydicom.pixels import pixel_array
    from pydicom.uid import JPEG2000Lossless

    ds = _base(CTImageStorage, "CT", "P1", generate_uid(), generate_uid())
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 40, 36, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    stored = np.random.default_rng(7).integers(-1024, 3000, size=(40, 36)).astype(np.int16)
    ds.PixelData = stored.tobytes()
    ds.compress(JPEG2000Lossless)
    compressed = tmp_path / "j2k.dcm"
    ds.save_as(compressed, enforce_file_format=True)
    assert np.array_equal(pixel_array(pydicom.dcmread(compressed)), stored)
    script = (
        "import json, sys\n"
        "if sys.argv[1] == 'hnct':\n"
        "    from hnct import dicomio\n"
        "    dicomio._import_pydicom()  # as any file GDCM's index leaves to pydicom imports it\n"
        "    print(json.dumps(sorted(set(dicomio.DEFERRED_CODECS) & set(sys.modules))))\n"
        "    import pydicom  # the first compressed file met registers the plugins\n"
        "    print(dicomio._stored_values(pydicom.dcmread(sys.argv[2])).tolist())\n"
        "else:\n"
        "    print('[]')\n"
        "    print('[]')\n"
        "from pydicom.pixels.common import CoderBase\n"
        "from pydicom.pixels.decoders import base as decoders\n"
        "from pydicom.pixels.encoders import base as encoders\n"
        "print(json.dumps({f'{m.__name__}.{n}': [list(c._available), sorted(c._unavailable),\n"
        "                   [f.__module__ + '.' + f.__name__ for f in c._available.values()]]\n"
        "                  for m in (decoders, encoders) for n, c in vars(m).items() if isinstance(c, CoderBase)}))\n"
    )
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "workflow"), "PATH": "/usr/bin:/bin"}
    answers = {}
    for how in ("hnct", "plain"):
        proc = subprocess.run([sys.executable, "-c", script, how, str(compressed)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        imported, decoded, registry = proc.stdout.strip().splitlines()[-3:]
        assert json.loads(imported) == [], f"hnct.dicomio imported codec packages {imported}"
        answers[how] = json.loads(registry)
        if how == "hnct":
            assert np.array_equal(np.array(json.loads(decoded)), stored)
    assert answers["hnct"] == answers["plain"]
    assert "gdcm" in answers["plain"]["pydicom.pixels.decoders.base.JPEGLosslessSV1Decoder"][0]


def test_index_decodes_series_text_in_each_files_character_set(tmp_path):
    """The same raw bytes are different text in different character sets: the index's text
    (decoded once per distinct value) follows each file's SpecificCharacterSet."""
    descriptions = {"ISO_IR 100": "Kopf é", "ISO_IR 144": "Kopf щ"}  # both b"Kopf \xe9" in the file
    written = {}
    for charset, description in descriptions.items():
        series = write_ct_series(tmp_path / charset.replace(" ", "_"), 2, names=lambda k: f"{k}.dcm")
        for path in sorted((tmp_path / charset.replace(" ", "_")).iterdir()):
            ds = pydicom.dcmread(path)
            ds.SpecificCharacterSet, ds.SeriesDescription, ds.Manufacturer = charset, description, description
            ds.save_as(path)
            assert path.read_bytes().count(b"Kopf \xe9") == 2
        written[series["series_uid"]] = description
    index = dicomio.scan_series(tmp_path)
    assert {row["series_uid"]: row["series_description"] for row in index} == written
    assert {row["series_uid"]: row["manufacturer"] for row in index} == written


def test_index_groups_by_series_uid_not_folder_and_notes_non_dicom(tmp_path):
    a = write_ct_series(tmp_path / "mixed", 3, names=lambda k: f"a{k}.dcm")
    b = write_ct_series(tmp_path / "mixed", 4, names=lambda k: f"b{k}.dcm", patient="P1")
    (tmp_path / "mixed" / "notes.txt").write_text("not DICOM")
    index = dicomio.index_series(tmp_path)
    assert sorted(index["series_uid"]) == sorted([a["series_uid"], b["series_uid"]])
    assert dict(zip(index["series_uid"], index["n_files"])) == {a["series_uid"]: 3, b["series_uid"]: 4}
    assert [Path(f).name for f, _ in index.attrs["unreadable"]] == ["notes.txt"]


def test_shuffled_files_are_sorted_by_position_not_name_or_instance_number(tmp_path):
    ct = write_ct_series(tmp_path, 6)
    _, _, _, image, geometry = read(tmp_path)
    hu = sitk.GetArrayFromImage(image)
    assert image.GetPixelID() == sitk.sitkInt16
    assert list(hu[:, 0, 0]) == [10 * k for k in range(6)]
    assert hu[0, 5, 1] == 5 - 1000  # rescale intercept applied
    assert np.allclose(image.GetOrigin(), ct["positions"][0])
    assert np.allclose(image.GetSpacing(), [PIXEL_MM[1], PIXEL_MM[0], 2.0])
    assert [Path(f) for f in geometry["files"]] == [ct["files"][k] for k in range(6)]


def test_oblique_series_keeps_its_direction_and_every_slice_position(tmp_path):
    angle = math.radians(30)
    orientation = (math.cos(angle), math.sin(angle), 0.0, 0.0, math.cos(0.2), math.sin(0.2))
    ct = write_ct_series(tmp_path, 5, orientation=orientation, slice_mm=2.5)
    _, _, _, image, geometry = read(tmp_path)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction[:, 0], orientation[:3], atol=1e-5)
    assert np.allclose(direction[:, 1], orientation[3:], atol=1e-5)
    assert not np.allclose(direction, np.eye(3))
    for k in range(5):
        assert np.allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), ct["positions"][k], atol=1e-4)
    # Pixel (col 3, row 2) of slice 4 lies 3 columns along the row direction, 2 rows along the column one.
    expected = ct["positions"][4] + 3 * PIXEL_MM[1] * np.array(orientation[:3]) + 2 * PIXEL_MM[0] * np.array(orientation[3:])
    assert np.allclose(image.TransformIndexToPhysicalPoint((3, 2, 4)), expected, atol=1e-4)
    assert geometry["slice_positions"]["tilt_deg"] < 1e-3


def test_missing_slice_is_interpolated_onto_the_even_grid_within_the_gap_bound(tmp_path):
    ct = write_ct_series(tmp_path, 6, skip=(3,))  # 2 mm steps, one 4 mm gap
    _, _, _, image, geometry = read(tmp_path)
    hu = sitk.GetArrayFromImage(image)
    assert image.GetSize() == (COLS, ROWS, 6) and image.GetSpacing()[2] == pytest.approx(2.0)
    assert np.allclose(image.GetOrigin(), ct["positions"][0])
    # Pixel (0, 0) holds 10 * k: the missing slice 3 is the linear blend of slices 2 and 4.
    assert list(hu[:, 0, 0]) == [0, 10, 20, 30, 40, 50]
    assert np.array_equal(hu[:, 5, 1], np.full(6, 5 - 1000))
    positions = geometry["slice_positions"]
    assert positions["original_positions_mm"] == pytest.approx([30.0, 32.0, 34.0, 38.0, 40.0])
    assert positions["resampled"]["why"] == ["uneven slice spacing"]


def test_missing_slice_beyond_the_gap_bound_is_an_input_error_naming_both_files(tmp_path):
    ct = write_ct_series(tmp_path, 6, skip=(3,))
    pattern = r"missing slice\(s\) between z=34.00 and z=38.00 .* max_slice_gap_mm 3"
    with pytest.raises(InputError, match=pattern) as err:
        read(tmp_path, max_slice_gap_mm=3.0)
    assert ct["files"][2].name in err.value.file and ct["files"][4].name in err.value.file


def write_tilted_series(folder: Path, tilt_deg: float, n_slices: int = 4, step_mm: float = 3.0) -> np.ndarray:
    """Slices stacked along z while their planes are tilted by ``tilt_deg`` about x (a gantry
    tilt); returns the orientation."""
    tilt = math.radians(tilt_deg)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt))
    for k in range(n_slices):
        write_ct_series(folder, 1, orientation=orientation, origin=(0.0, 0.0, step_mm * k), series_uid="1.2.3.4",
                        study_uid="1.2.3", frame_uid="1.2.3.5", names=lambda _k, k=k: f"{k}.dcm")
    return np.array(orientation)


def test_tilted_stack_is_resampled_onto_an_orthogonal_grid(tmp_path):
    orientation = write_tilted_series(tmp_path, 10)
    _, _, _, image, geometry = read(tmp_path)
    tilt = geometry["slice_positions"]["tilt"]
    assert tilt["angle_deg"] == pytest.approx(10, abs=1e-3)
    normal = np.cross(orientation[:3], orientation[3:])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction, np.column_stack([orientation[:3], orientation[3:], normal]), atol=1e-6)
    # The slices drift along the column direction by -3 sin(10 deg) mm per slice, so the grid
    # grows by ceil(3 * 3 sin(10 deg) / 0.5 mm) = 4 rows; slices 3 cos(10 deg) mm apart.
    assert image.GetSize() == (COLS, ROWS + 4, 4)
    assert image.GetSpacing()[2] == pytest.approx(3 * math.cos(math.radians(10)))
    assert geometry["slice_positions"]["resampled"]["padded_voxels_xy"] == [0, 4]
    assert np.allclose(tilt["direction_lps"], -np.array(orientation[3:]), atol=1e-6)
    # Voxel (i, j, k) lies at that slice's own row (HU = row - 1000, linear, so interpolation is exact).
    hu = sitk.GetArrayFromImage(image)
    for k in range(4):
        for j in (2, 9, 14):
            point = np.array(image.TransformIndexToPhysicalPoint((3, j, k)))
            source_row = (point - np.array([0.0, 0.0, 3.0 * k])) @ orientation[3:] / PIXEL_MM[0]
            if 0 <= source_row <= ROWS - 1 and source_row > 0.5:  # inside, clear of the marked pixel row 0
                assert hu[k, j, 3] == round(source_row) - 1000, (k, j, source_row)
    # Outside a slice's field of view: the series' minimum.
    assert (hu[0, :4, 3] == -1000).all() and (hu[3, -2:, 3] == -1000).all()


def test_tilted_stack_is_excluded_under_the_exclude_switch(tmp_path):
    write_tilted_series(tmp_path, 10)
    with pytest.raises(InputError, match=r"gantry tilt: .* stacked at 10.00 deg .*gantry_tilt is exclude"):
        read(tmp_path, gantry_tilt="exclude")
    # With a limit above the measured tilt the stack is read as it lies (the user accepts the shear).
    _, _, _, image, geometry = read(tmp_path, gantry_tilt="exclude", max_tilt_deg=15)
    assert geometry["slice_positions"]["tilt_deg"] == pytest.approx(10, abs=1e-3)
    assert geometry["resample"] is None and image.GetSize() == (COLS, ROWS, 4)


def test_localizer_beside_the_ct_is_not_chosen(tmp_path):
    ct = write_ct_series(tmp_path / "ct", 4)
    scout = write_ct_series(tmp_path / "scout", 6, image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
                            orientation=(0, 1, 0, 0, 0, -1))
    _, row, choice, _, _ = read(tmp_path)
    assert row["series_uid"] == ct["series_uid"]
    assert {c["series_uid"] for c in choice["candidates"]} == {ct["series_uid"], scout["series_uid"]}
    assert "localizer" in choice["rule"].lower()


def test_two_ct_series_most_slices_wins_and_the_cohort_choice_overrides(tmp_path):
    small = write_ct_series(tmp_path / "a", 3)
    big = write_ct_series(tmp_path / "b", 5)
    assert read(tmp_path)[1]["series_uid"] == big["series_uid"]
    _, row, choice, image, _ = read(tmp_path, series_uid=small["series_uid"])
    assert row["series_uid"] == small["series_uid"] and image.GetSize()[2] == 3
    assert choice["rule"].startswith("series_uid given")
    with pytest.raises(InputError, match="requested series 9.9.9 not found"):
        read(tmp_path, series_uid="9.9.9")


def test_only_rtstruct_means_no_ct_series(tmp_path):
    ct = write_ct_series(tmp_path / "elsewhere", 2)
    write_rtstruct(tmp_path / "rt" / "rt.dcm", ct, {"Larynx": []})
    index = dicomio.index_series(tmp_path / "rt")
    with pytest.raises(InputError, match="no CT series .* found modalities: RTSTRUCT"):
        dicomio.choose_ct_series("C", tmp_path / "rt", index)


def test_rtstruct_nested_contours_make_a_hole_and_names_match_loosely(tmp_path):
    ct = write_ct_series(tmp_path, 4, slice_mm=2.0, origin=(0.0, 0.0, 0.0))
    z = 2.0 * 2  # slice 2
    outer, hole = square((8.0, 4.0), 3.0, z), square((8.0, 4.0), 1.0, z)
    write_rtstruct(tmp_path / "rt.dcm", ct, {"larynx": [square((4.0, 4.0), 2.0, 2.0)], "GTV_p": [outer, hole]})
    index, row, _, image, geometry = read(tmp_path)
    channels, report = dicomio.rtstruct_label_map("C", index, row, geometry, image, ["Larynx", "GTVp"])
    array = paint_label_map(channels)
    assert report["matched"]["Larynx"]["how"] == "case-insensitive"
    assert report["matched"]["GTVp"]["how"] == "normalised"
    gtv = array[2] == 2
    assert array[[0, 3]].max() == 0 and (array[1] == 1).any()
    # Outer 6x6 mm minus inner 2x2 mm hole, in pixels of 0.8 (x) x 0.5 (y) mm.
    assert gtv.sum() * 0.4 == pytest.approx(36 - 4, rel=0.25)
    centre = image.TransformPhysicalPointToIndex((8.0, 4.0, z))
    assert array[centre[2], centre[1], centre[0]] == 0  # the hole is empty


def test_rtstruct_reference_must_resolve_in_the_chosen_series(tmp_path):
    ct = write_ct_series(tmp_path, 3)
    write_rtstruct(tmp_path / "rt.dcm", ct, {"Larynx": []}, sop_refs=[generate_uid()])
    index, row, _, image, geometry = read(tmp_path)
    with pytest.raises(InputError, match="references SOP instances not in series"):
        dicomio.rtstruct_label_map("C", index, row, geometry, image, ["Larynx"])


def test_match_structures_prefers_exact_then_case_then_normalised():
    matched = dicomio.match_structures(["GTV-1", "Lung-Left", "Cord"], ["gtv 1", "GTV-1", "LUNG_LEFT"])
    assert matched["GTV-1"] == {"roi": "GTV-1", "how": "exact"}
    assert matched["Lung-Left"] == {"roi": "LUNG_LEFT", "how": "normalised"}
    assert "Cord" not in matched


def test_mask_folder_mask_off_the_ct_grid_is_bad_input(tmp_path):
    """A mask on another grid (twice the CT spacing, or shifted) is not resampled: the case is
    excluded naming the file and what differs (issue 13's bad input)."""
    write_ct_series(tmp_path / "ct", 6, origin=(0.0, 0.0, 0.0))
    _, _, _, image, _ = read(tmp_path / "ct")
    mask = sitk.Image([COLS // 2, ROWS // 2, 3], sitk.sitkUInt8)
    mask.SetSpacing([2 * PIXEL_MM[1], 2 * PIXEL_MM[0], 4.0])
    mask.SetOrigin(image.GetOrigin())
    mask[2:5, 1:4, 1:3] = 1
    (tmp_path / "masks" / "C").mkdir(parents=True)
    path = tmp_path / "masks" / "C" / "larynx.nii.gz"
    sitk.WriteImage(mask, str(path))
    with pytest.raises(InputError, match=r"is not on the CT's grid: its size is \[10, 8, 3\]") as err:
        dicomio.mask_folder_label_map("C", tmp_path / "masks", image, ["Larynx", "GTVp"])
    assert err.value.case == "C" and Path(err.value.file) == path
    on_grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    on_grid.CopyInformation(image)
    on_grid[2:5, 1:4, 1:3] = 1
    sitk.WriteImage(on_grid, str(path))
    channels, report = dicomio.mask_folder_label_map("C", tmp_path / "masks", image, ["Larynx", "GTVp"])
    assert channels.shape == (2,) + tuple(reversed(image.GetSize())) and channels[0].sum() == 3 * 3 * 2
    assert report["annotated"] == ["Larynx"] and channels[1].sum() == 0
    for what, change in (("origin", lambda m: m.SetOrigin((0.0, 0.0, 0.05))),
                         ("spacing", lambda m: m.SetSpacing((PIXEL_MM[1], PIXEL_MM[0], 2.01))),
                         ("direction", lambda m: m.SetDirection((1, 0, 0, 0, 0, 1, 0, 1, 0)))):
        shifted = sitk.Image(on_grid)
        change(shifted)
        sitk.WriteImage(shifted, str(path))
        with pytest.raises(InputError, match=f"its {what} is"):
            dicomio.mask_folder_label_map("C", tmp_path / "masks", image, ["Larynx"])


def test_fill_polygon_agrees_with_skimage_on_random_polygons():
    from skimage.draw import polygon as skimage_polygon

    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(3, 40))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(3, 25, n)
        cx, cy = rng.uniform(-5, 45, 2)  # some polygons run past the image edge
        x, y = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
        ours = dicomio.fill_polygon(x, y, (40, 50))
        reference = np.zeros((40, 50), dtype=bool)
        rr, cc = skimage_polygon(y, x, shape=(40, 50))
        reference[rr, cc] = True
        # Pixel centres lying exactly on an edge may go either way; random vertices make that rare.
        assert (ours != reference).sum() <= 2, (ours != reference).sum()
    assert dicomio.fill_polygon(np.array([1.0, 5.0, 5.0]), np.array([2.0, 2.0, 2.0]), (8, 8)).sum() == 0


@pytest.mark.parametrize("keyword,value,reason", [
    ("ImageOrientationPatient", ["1", "0", "0", "0", "0.99", "0.141067"], "mixed orientations"),
    ("PixelSpacing", ["0.5", "0.81"], "mixed pixel spacings"),
    ("Rows", 8, "mixed matrix sizes"),
    ("ImageOrientationPatient", ["1", "0", "0", "0", "1"], "orientation of a slice .* has 5 values"),
])
def test_mixed_slice_headers_name_the_first_slice_that_differs(tmp_path, keyword, value, reason):
    ct = write_ct_series(tmp_path, 5, names=lambda k: f"{k}.dcm")
    for k in (2, 4):
        ds = pydicom.dcmread(ct["files"][k])
        setattr(ds, keyword, value)
        ds.save_as(ct["files"][k])
    index = dicomio.index_series(tmp_path)
    row, _ = dicomio.choose_ct_series("C", tmp_path, index)
    with pytest.raises(InputError, match=reason) as err:
        dicomio.slice_geometry("C", row)
    assert err.value.file == str(ct["files"][2])
