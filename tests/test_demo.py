"""hnct.demo: the synthetic cohort plan, the DICOM it writes, the RTSTRUCT, the cohort tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import UID
from skimage.draw import polygon as fill_polygon

from hnct import demo, demo_oar
from hnct.cohort import check_cohort

SEED = 11
N_PATIENTS = 4


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return demo.plan_cohort(n_patients=N_PATIENTS, seed=SEED, t4_fraction=0.35, broken_cases=True,
                            two_scan_patients=1)


@pytest.fixture(scope="module")
def written(cohort, tmp_path_factory) -> Path:
    """The small cohort written once: <tmp>/dicom (DICOM root), <tmp>/cases, metadata, clinical."""
    out = tmp_path_factory.mktemp("demo")
    for case in cohort.index:
        demo.write_case(cohort.loc[case], out / "dicom", out / "cases" / f"{case}.json")
    demo.write_cohort_tables(cohort, out / "dicom", out / "dicom" / "metadata.csv", out / "clinical.tsv")
    return out


def small(row: pd.Series, rows: int = 140, n_slices: int = 30) -> pd.Series:
    """A plan row shrunk to a small grid (1 mm pixels, 3 mm slices) around the same anatomy."""
    row = row.copy()
    row["rows"] = row["cols"] = str(rows)
    row["pixel_spacing"], row["slice_thickness"], row["n_slices"] = "1.0", "3.0", str(n_slices)
    row["origin_x"] = str(round(float(row["neck_x"]) - rows / 2, 3))
    row["origin_y"] = str(round(float(row["neck_y"]) - rows / 2, 3))
    row["origin_z"] = str(round(float(row["larynx_z"]) - 3.0 * n_slices / 2, 3))
    return row


def ct_series(manifest: dict) -> dict:
    return next(s for s in manifest["series"] if s["key"] == "ct")


def read_ct(written: Path, manifest: dict) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    folder = written / "dicom" / ct_series(manifest)["folder"]
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), ct_series(manifest)["uid"]))
    return reader.Execute()


def manifests(written: Path, cohort: pd.DataFrame, kind: str = "ct") -> list[dict]:
    return [json.loads((written / "cases" / f"{c}.json").read_text())
            for c in cohort.index if cohort.loc[c, "demo_kind"] == kind]


# ------------------------------------------------------------------------------------ plan

def test_plan_is_deterministic_cheap_and_a_valid_cohort_table(cohort):
    again = demo.plan_cohort(n_patients=N_PATIENTS, seed=SEED)
    pd.testing.assert_frame_equal(cohort, again)
    other = demo.plan_cohort(n_patients=N_PATIENTS, seed=SEED + 1)
    assert set(other["study_uid"]).isdisjoint(cohort["study_uid"])
    check_cohort(cohort.reset_index(drop=True))
    assert list(cohort.index) == list(cohort["case"])
    assert cohort["collection"].nunique() >= 3
    # 4 usable patients, one scanned twice, plus the two broken ones.
    assert len(cohort) == N_PATIENTS + 1 + 2
    assert cohort["patient"].nunique() == N_PATIENTS + 2
    assert sorted(cohort["demo_kind"].unique()) == ["ct", "gap", "no_ct"]
    usable = cohort[cohort["demo_kind"] == "ct"].drop_duplicates("patient")
    assert (usable["label_t4"] == "1").sum() == round(0.35 * N_PATIENTS)
    assert set(cohort["label_t4"]) == {"0", "1"}
    for column in ["study_uid", "frame_uid", "ct_series_uid"]:
        assert all(UID(u).is_valid for u in cohort[column])
    assert cohort["ct_series_uid"].is_unique
    spacing = cohort.loc[cohort["demo_kind"] != "no_ct", "pixel_spacing"].astype(float)
    thickness = cohort.loc[cohort["demo_kind"] != "no_ct", "slice_thickness"].astype(float)
    assert spacing.between(0.4, 1.0).all() and thickness.between(1.0, 3.0).all()


def test_default_cohort_plan(tmp_path):
    cohort = demo.plan_cohort()  # the config default: 24 patients
    assert cohort["patient"].nunique() == 24 + 2
    assert len(cohort) == 24 + 1 + 2
    assert cohort["collection"].nunique() == 3
    assert (cohort["node_positive"] == "0").sum() >= 2
    assert (cohort["localizer_series_uid"] != "").sum() == 2
    n_voxels = (cohort["rows"].astype(int) * cohort["cols"].astype(int) * cohort["n_slices"].astype(int)).sum()
    assert n_voxels * 2 < 160e6  # pixel bytes of the whole cohort stay modest
    # Every planted tumour and node lies inside the Larynx box + 8 mm (the default crop), and
    # that box lies inside the scan along z.
    for case in cohort.index:
        row = cohort.loc[case]
        anat = demo.anatomy(row)
        cx, cy, cz = anat["larynx_centre"]
        radius, (z_lo, z_hi) = demo.LARYNX_RADIUS, demo.LARYNX_Z
        lo = np.array([cx - radius, cy - radius, cz + z_lo]) - 8.0
        hi = np.array([cx + radius, cy + radius, cz + z_hi]) + 8.0
        for centre, semi in [(anat["tumour"]["centre"], demo.tumour_half_extent(anat["tumour"]))] + [
                (n["centre"], n["semi_axes"]) for n in anat["nodes"]]:
            assert (np.subtract(centre, semi) > lo).all() and (np.add(centre, semi) < hi).all(), case
        z_first = float(row["origin_z"])
        z_last = z_first + (int(row["n_slices"]) - 1) * float(row["slice_thickness"])
        assert z_first < lo[2] and hi[2] < z_last, case


def _share_beyond(anat: dict, radius_mm: float, step: float = 0.25) -> float:
    """Share of the tumour's volume farther than ``radius_mm`` from the airway axis (sampled on a grid)."""
    tumour = anat["tumour"]
    axes = [np.arange(c - s, c + s + step, step) for c, s in zip(tumour["centre"], demo.tumour_half_extent(tumour))]
    X, Y, Z = np.meshgrid(*axes, indexing="ij")
    inside = demo._in_tumour(tumour, X, Y, Z)
    cx, cy, _ = anat["larynx_centre"]
    return float((inside & (np.hypot(X - cx, Y - cy) > radius_mm)).sum() / inside.sum())


def test_collections_hold_the_same_t4_share_and_stages_share_tumour_and_cartilage_draws():
    """Collection does not predict the label (T4 share per collection and per scan, up to rounding),
    and every stage draws its tumour size and cartilage from the same ranges (the phantom's shortcut
    guarantees; the image statistics themselves are tests/test_shortcut.py)."""
    cohort = demo.plan_cohort()
    usable = cohort[cohort["demo_kind"] == "ct"]
    t4 = usable["label_t4"].astype(int)
    shares = t4.groupby(usable["collection"]).mean()
    sizes = usable.groupby("collection").size()
    assert shares.max() - shares.min() <= 1 / sizes.min() + 1e-9, shares  # one patient of rounding
    twice = usable[usable["patient"].duplicated(keep=False)]
    assert (twice["label_t4"] == "0").all()  # a T4 pair would double its collection's T4 scans
    assert set(usable.loc[t4 == 0, "t_stage"]) == {"T2", "T3"} and (usable.loc[t4 == 1, "t_stage"] == "T4").all()
    # every stage has its tumours on both sides alike (patients; a two-scan patient counts once)
    sides = usable.drop_duplicates("patient").groupby("t_stage")["tumour_side"].value_counts().unstack(fill_value=0)
    assert ((sides["left"] - sides["right"]).abs() <= 1).all(), sides
    for _, row in usable.iterrows():
        anat = demo.anatomy(row)
        tumour, cartilage = anat["tumour"], anat["cartilage"]
        assert demo.TUMOUR_VOLUME_MM3[0] <= tumour["volume_mm3"] <= demo.TUMOUR_VOLUME_MM3[1]
        assert 4 / 3 * math.pi * np.prod(tumour["semi_axes"]) == pytest.approx(tumour["volume_mm3"])
        if row["t_stage"] != "T4":  # T2 and T3 grow from the airway wall (into the lumen)
            assert tumour["inner_extent_mm"] < cartilage["airway_radius_mm"]
        shield = cartilage["shield_outer_mm"] - cartilage["shield_inner_mm"]
        assert demo.SHIELD_THICKNESS_RANGE[0] <= shield <= demo.SHIELD_THICKNESS_RANGE[1]
        # the replaced shield volume is given back to the cricoid: intact volume = nominal volume
        height = demo.CRICOID_Z[1] - demo.CRICOID_Z[0]
        cricoid = math.pi * height * (cartilage["cricoid_outer_mm"] ** 2 - cartilage["cricoid_inner_mm"] ** 2)
        nominal = math.pi * height * ((cartilage["cricoid_inner_mm"] + cartilage["cricoid_thickness_mm"]) ** 2
                                      - cartilage["cricoid_inner_mm"] ** 2)
        assert cricoid - cartilage["shield_replaced_mm3"] == pytest.approx(nominal, rel=1e-9)
        if row["t_stage"] == "T4":  # centred on the shield's outer surface, through its whole thickness
            middle = (tumour["inner_extent_mm"] + tumour["outer_extent_mm"]) / 2
            assert abs(middle - cartilage["shield_outer_mm"]) <= 0.5
            assert tumour["outer_extent_mm"] > cartilage["shield_outer_mm"] + 2.5
            assert tumour["inner_extent_mm"] < cartilage["shield_inner_mm"]
            assert cartilage["shield_replaced_mm3"] > 100
            # a large, visible share of the tumour lies outside the cartilage, in the neck
            assert 0.35 <= _share_beyond(anat, cartilage["shield_outer_mm"]) <= 0.65, row.name
        else:  # short of the outer cortex
            assert tumour["outer_extent_mm"] < cartilage["shield_outer_mm"] - 0.9
        if row["t_stage"] == "T2":
            assert cartilage["shield_replaced_mm3"] == 0


def test_two_scan_patient_cases_see_only_their_own_study(cohort):
    twice = cohort[cohort["patient"].duplicated(keep=False)]
    assert len(twice) == 2 and twice["patient"].nunique() == 1
    dirs = list(twice["dicom_dir"])
    assert dirs[0] != dirs[1] and all(d.count("/") == 2 for d in dirs)
    for case, d in zip(twice.index, dirs):
        assert all(f.startswith(d + "/") for f in demo.case_files(twice.loc[case]))
    single = cohort[~cohort["patient"].duplicated(keep=False)]
    assert all(d == f"{c}/{p}" for d, c, p in zip(single["dicom_dir"], single["collection"], single["patient"]))


def test_case_files_follow_the_data_retriever_layout(cohort):
    row = cohort[cohort["demo_kind"] == "ct"].iloc[0]
    files = demo.case_files(row)
    ct = [f for f in files if f"-{row['ct_series_uid'][-5:]}/" in f]
    assert len(ct) == int(row["n_slices"])
    width = len(str(len(ct)))
    assert ct[0].endswith(f"/1-{1:0{width}d}.dcm") and ct[-1].endswith(f"/1-{len(ct)}.dcm")
    collection, patient, study, series, _ = ct[0].split("/")
    assert (collection, patient) == (row["collection"], row["patient"])
    y, m, d = row["study_date"][:4], row["study_date"][4:6], row["study_date"][6:]
    assert study == f"{m}-{d}-{y}-NA-{row['study_desc']}-{row['study_uid'][-5:]}"
    assert series.startswith("2.000000-") and series.endswith(row["ct_series_uid"][-5:])
    assert [f for f in files if "RTSTRUCT" in f][0].endswith("/1-1.dcm")


# ------------------------------------------------------------------------------ determinism

def test_same_seed_writes_identical_bytes_and_another_seed_does_not(cohort, tmp_path):
    case = cohort[cohort["demo_kind"] == "ct"].index[0]
    row = small(cohort.loc[case])
    demo.write_case(row, tmp_path / "a", tmp_path / "a.json")
    demo.write_case(row, tmp_path / "b", tmp_path / "b.json")
    files = demo.case_files(row)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()

    other = small(demo.plan_cohort(n_patients=N_PATIENTS, seed=SEED + 1).loc[case])
    demo.write_case(other, tmp_path / "c", tmp_path / "c.json")
    other_files = demo.case_files(other)
    assert set(other_files).isdisjoint(files)  # new UIDs, new folders
    pixels_a = pydicom.dcmread(tmp_path / "a" / files[len(files) // 2]).pixel_array
    pixels_c = pydicom.dcmread(tmp_path / "c" / other_files[len(other_files) // 2]).pixel_array
    assert not np.array_equal(pixels_a, pixels_c)


# ----------------------------------------------------------------------------- files on disk

def test_case_files_equal_what_is_written(cohort, written):
    on_disk = {str(p.relative_to(written / "dicom")) for p in (written / "dicom").rglob("*") if p.is_file()}
    planned = {f for case in cohort.index for f in demo.case_files(cohort.loc[case])}
    masks = {f for case in cohort.index for f in demo_oar.mask_files(cohort.loc[case])}  # issue 13
    assert on_disk - {"metadata.csv"} == planned | masks and planned.isdisjoint(masks)
    for case in cohort.index:
        manifest = json.loads((written / "cases" / f"{case}.json").read_text())
        assert manifest["files"] == demo.case_files(cohort.loc[case])


def test_pydicom_reads_every_file(cohort, written):
    for case in cohort.index:
        for name in demo.case_files(cohort.loc[case]):
            ds = pydicom.dcmread(written / "dicom" / name)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.PatientID == cohort.loc[case, "patient"]
            assert ds.StudyInstanceUID == cohort.loc[case, "study_uid"]
            if ds.Modality == "CT":
                assert ds.SOPClassUID == pydicom.uid.CTImageStorage
                assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
                assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
                assert ds.pixel_array.dtype == np.int16
                assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_simpleitk_reads_the_ct_with_the_planned_geometry(cohort, written):
    for manifest in manifests(written, cohort):
        row = cohort.loc[manifest["case"]]
        image = read_ct(written, manifest)
        assert image.GetSize() == (int(row["cols"]), int(row["rows"]), int(row["n_slices"]))
        expected_spacing = (float(row["pixel_spacing"]),) * 2 + (float(row["slice_thickness"]),)
        np.testing.assert_allclose(image.GetSpacing(), expected_spacing, atol=1e-3)
        origin = [float(row["origin_x"]), float(row["origin_y"]), float(row["origin_z"])]
        np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
        assert manifest["geometry"]["size"] == list(image.GetSize())


# ------------------------------------------------------------------------------- planted HU

def hu_at(image: sitk.Image, point) -> float:
    """Mean HU of the 3 x 3 in-plane voxels around an LPS point (noise sigma 10 HU)."""
    i, j, k = image.TransformPhysicalPointToIndex([float(v) for v in point])
    array = sitk.GetArrayViewFromImage(image)
    return float(array[k, j - 1:j + 2, i - 1:i + 2].mean())


def test_planted_hu_values_are_realistic(cohort, written):
    for manifest in manifests(written, cohort):
        image = read_ct(written, manifest)
        truth = manifest["truth"]
        cx, cy, cz = truth["larynx_centre_lps"]
        array = sitk.GetArrayViewFromImage(image)
        assert array[:, :3, :3].max() < -900  # air in the corners
        assert hu_at(image, [cx, cy, cz - 12]) < -900  # airway lumen at the cricoid
        # Thyroid cartilage on the side away from the tumour, cricoid ring anterior.
        side = -math.copysign(1, truth["tumour"]["angle_deg_from_anterior"])
        r = (truth["thyroid_shield"]["inner_radius_mm"] + truth["thyroid_shield"]["outer_radius_mm"]) / 2
        angle = math.radians(60) * side
        shield_point = [cx + r * math.sin(angle), cy - r * math.cos(angle), cz + 12]
        i, j, k = image.TransformPhysicalPointToIndex(shield_point)
        assert array[k, j, i] > 200, manifest["case"]
        assert hu_at(image, [cx, cy - 12.5, truth["cricoid"]["z_min"] + 3]) > 200
        assert 80 < hu_at(image, truth["tumour"]["centre_lps"]) < 140, manifest["case"]
        for node in truth["nodes"]:
            assert 10 < hu_at(image, node["centre_lps"]) < 50
        nx, ny = demo.anatomy(cohort.loc[manifest["case"]])["neck_centre"]
        assert 25 < hu_at(image, [nx + 38, ny, cz]) < 55  # lateral neck soft tissue
        assert -130 < hu_at(image, [nx, ny - demo.NECK_SEMI[1] + 2.5, cz]) < -70  # subcutaneous fat
        assert hu_at(image, [nx, ny + 18, cz]) > 200  # vertebral body
        assert truth["node_positive"] == int(bool(truth["nodes"]))


def test_t4_tumour_breaks_through_the_cartilage_and_others_stay_inside(cohort, written):
    seen = set()
    for manifest in manifests(written, cohort):
        truth = manifest["truth"]
        image = read_ct(written, manifest)
        array = sitk.GetArrayFromImage(image)
        k, j, i = np.indices(array.shape)
        x = image.GetOrigin()[0] + i * image.GetSpacing()[0]
        y = image.GetOrigin()[1] + j * image.GetSpacing()[1]
        z = image.GetOrigin()[2] + k * image.GetSpacing()[2]
        cx, cy, _ = truth["larynx_centre_lps"]
        r = np.hypot(x - cx, y - cy)
        shield = truth["thyroid_shield"]
        anterior = np.abs(np.degrees(np.arctan2(x - cx, -(y - cy)))) <= shield["half_angle_deg"]
        outside = (r > shield["outer_radius_mm"] + 1.0) & (r < 32) & anterior
        outside &= (z >= shield["z_min"]) & (z <= shield["z_max"])
        enhancing = (array > 80) & (array < 200)  # tumour HU, neither soft tissue nor cartilage
        outside_mm3 = enhancing[outside].sum() * np.prod(image.GetSpacing())
        if truth["label_t4"]:
            # T4 tumours are no larger than the others (matched sizes): the part more than 1 mm
            # beyond the shield's outer surface is >= 100 mm3 and >= 10 % of the tumour
            assert outside_mm3 > max(100, 0.1 * truth["tumour"]["volume_mm3"]), (manifest["case"], outside_mm3)
            # The gap: where the tumour crosses the shield there is no cartilage.
            angle = math.radians(truth["tumour"]["angle_deg_from_anterior"])
            rm = (shield["inner_radius_mm"] + shield["outer_radius_mm"]) / 2
            centre = truth["tumour"]["centre_lps"]
            assert hu_at(image, [cx + rm * math.sin(angle), cy - rm * math.cos(angle), centre[2]]) < 200
        else:
            assert outside_mm3 < 20, (manifest["case"], outside_mm3)
        seen.add(truth["label_t4"])
    assert seen == {0, 1}


# ------------------------------------------------------------------------------------ RTSTRUCT

def test_rtstruct_references_resolve_and_contours_give_the_planted_structures(cohort, written):
    for manifest in manifests(written, cohort):
        row = cohort.loc[manifest["case"]]
        files = demo.case_files(row)
        rt = pydicom.dcmread(written / "dicom" / next(f for f in files if "RTSTRUCT" in f))
        assert rt.SOPClassUID == pydicom.uid.RTStructureSetStorage and rt.Modality == "RTSTRUCT"
        ct = {}
        for name in files:
            ds = pydicom.dcmread(written / "dicom" / name, stop_before_pixels=True)
            if ds.Modality == "CT" and "LOCALIZER" not in ds.ImageType:
                ct[ds.SOPInstanceUID] = float(ds.ImagePositionPatient[2])
        frame = rt.ReferencedFrameOfReferenceSequence[0]
        assert frame.FrameOfReferenceUID == row["frame_uid"]
        study = frame.RTReferencedStudySequence[0]
        assert study.ReferencedSOPInstanceUID == row["study_uid"]
        series = study.RTReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == row["ct_series_uid"]
        assert {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence} == set(ct)
        names = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
        expected = {"GTVp", "Larynx"} | ({"GTVn"} if row["node_positive"] == "1" else set())
        oars = manifest["organs_at_risk"]  # issue 13 (hnct.demo_oar)
        expected |= set(oars["roi_names"].values()) | set(oars["unmatched_rois"])
        assert set(names.values()) == expected
        assert {o.ReferencedROINumber for o in rt.RTROIObservationsSequence} == set(names)
        geo = manifest["geometry"]
        spacing, origin = geo["pixel_spacing"], geo["origin"]
        for roi in rt.ROIContourSequence:
            volume_mm3, points = 0.0, []
            for contour in roi.ContourSequence:
                assert contour.ContourGeometricType == "CLOSED_PLANAR"
                xyz = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
                assert len(xyz) == contour.NumberOfContourPoints
                uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
                assert abs(ct[uid] - xyz[0, 2]) < 1e-3 and np.ptp(xyz[:, 2]) == 0
                cols = (xyz[:, 0] - origin[0]) / spacing
                rows = (xyz[:, 1] - origin[1]) / spacing
                rr, cc = fill_polygon(rows, cols)
                volume_mm3 += len(rr) * spacing**2 * geo["slice_thickness"]
                points.append(xyz)
            points = np.concatenate(points)
            truth = manifest["truth"]
            if names[roi.ReferencedROINumber] == "GTVp":
                centre = truth["tumour"]["centre_lps"]
                assert np.linalg.norm(points.mean(0)[:2] - np.array(centre[:2])) < 6.0
                assert volume_mm3 > 50
                if truth["label_t4"]:  # contour points well outside the shield (T4: centred on its
                    # outer surface, radial semi-axis >= 3.4 mm)
                    r = np.hypot(points[:, 0] - truth["larynx_centre_lps"][0],
                                 points[:, 1] - truth["larynx_centre_lps"][1])
                    assert r.max() > truth["thyroid_shield"]["outer_radius_mm"] + 2.5
            if names[roi.ReferencedROINumber] == "Larynx":
                cx, cy, _ = truth["larynx_centre_lps"]
                radius = truth["larynx_roi"]["radius_mm"]
                expected_mm3 = math.pi * radius**2 * (truth["larynx_roi"]["z_max"] - truth["larynx_roi"]["z_min"])
                assert 0.75 * expected_mm3 < volume_mm3 < 1.25 * expected_mm3
                np.testing.assert_allclose(points.min(0)[:2], [cx - radius, cy - radius], atol=1.5 * spacing)
                np.testing.assert_allclose(points.max(0)[:2], [cx + radius, cy + radius], atol=1.5 * spacing)
                assert truth["larynx_roi"]["z_min"] - geo["slice_thickness"] <= points[:, 2].min()
                assert points[:, 2].max() <= truth["larynx_roi"]["z_max"] + geo["slice_thickness"]


# ------------------------------------------------------------------------------ cohort tables

def test_metadata_csv_and_clinical_table(cohort, written):
    raw = (written / "dicom" / "metadata.csv").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") > 1  # CRLF only
    table = pd.read_csv(written / "dicom" / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == demo.METADATA_COLUMNS
    n_series = sum(len({f.rsplit("/", 1)[0] for f in demo.case_files(cohort.loc[c])}) for c in cohort.index)
    assert len(table) == n_series
    for _, series in table.iterrows():
        folder = written / "dicom" / series["File Location"]
        files = sorted(folder.iterdir())
        assert int(series["Number of Images"]) == len(files)
        assert int(series["File Size"]) == sum(f.stat().st_size for f in files)
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert (ds.SeriesInstanceUID, ds.Modality, ds.SOPClassUID) == (
            series["Series UID"], series["Modality"], series["SOP Class UID"])
    clinical = pd.read_csv(written / "clinical.tsv", sep="\t", dtype=str)
    assert list(clinical.columns) == demo.CLINICAL_COLUMNS
    assert list(clinical["Case_ID"]) == list(cohort.index)
    assert list(clinical["T_stage"]) == list(cohort["t_stage"])
    # The crop parameters (voxels of the scan grid) contain the planted larynx centre.
    for _, entry in clinical.iterrows():
        row = cohort.loc[entry["Case_ID"]]
        centre = demo.anatomy(row)["larynx_centre"]
        i = (centre[0] - float(row["origin_x"])) / float(row["pixel_spacing"])
        k = (centre[2] - float(row["origin_z"])) / float(row["slice_thickness"])
        assert int(entry["x"]) < i < int(entry["x"]) + int(entry["size_x"])
        assert int(entry["z"]) < k < int(entry["z"]) + int(entry["size_z"])


# ------------------------------------------------------------------------------- broken cases

def test_broken_cases_are_broken_as_advertised(cohort, written):
    gap = cohort[cohort["demo_kind"] == "gap"].iloc[0]
    gap_ct = [f for f in demo.case_files(gap) if f"-{gap['ct_series_uid'][-5:]}/" in f]
    assert len(gap_ct) == int(gap["n_slices"]) - 1
    z = sorted(float(pydicom.dcmread(written / "dicom" / f).ImagePositionPatient[2]) for f in gap_ct)
    steps = np.round(np.diff(z), 3)
    thickness = float(gap["slice_thickness"])
    assert sorted(set(steps)) == [thickness, 2 * thickness] and list(steps).count(2 * thickness) == 1

    no_ct = cohort[cohort["demo_kind"] == "no_ct"].iloc[0]
    modalities = {pydicom.dcmread(written / "dicom" / f).Modality for f in demo.case_files(no_ct)}
    assert modalities == {"MR"}

    with_scout = cohort[cohort["localizer_series_uid"] != ""]
    assert len(with_scout) >= 1
    for case in with_scout.index:
        kinds = {}
        for f in demo.case_files(cohort.loc[case]):
            ds = pydicom.dcmread(written / "dicom" / f, stop_before_pixels=True)
            kinds.setdefault((ds.Modality, tuple(ds.get("ImageType", []))), 0)
            kinds[(ds.Modality, tuple(ds.get("ImageType", [])))] += 1
        assert kinds[("CT", ("ORIGINAL", "PRIMARY", "LOCALIZER"))] == 2
        assert kinds[("CT", ("ORIGINAL", "PRIMARY", "AXIAL"))] == int(cohort.loc[case, "n_slices"])


def test_cli_writes_a_case_from_its_plan_json(cohort, tmp_path):
    row = small(cohort[cohort["demo_kind"] == "ct"].iloc[1], n_slices=20)
    manifest = tmp_path / "cases" / f"{row['case']}.json"
    plan = json.dumps(row.to_dict())
    assert demo.main(["case", "--case", row["case"], "--out-root", str(tmp_path / "dicom"),
                      "--manifest", str(manifest), "--plan-json", plan]) == 0
    assert json.loads(manifest.read_text())["files"] == demo.case_files(row)
    assert all((tmp_path / "dicom" / f).is_file() for f in demo.case_files(row))
    with pytest.raises(SystemExit):
        demo.main(["case", "--case", "NOT-THIS", "--manifest", str(manifest), "--plan-json", plan])


def _distance_to_chain(points: np.ndarray, chain: np.ndarray) -> np.ndarray:
    """Each point's distance to the nearest segment of a polyline (brute force, for the test)."""
    best = np.full(len(points), np.inf)
    for a, b in zip(chain[:-1], chain[1:]):
        d = b - a
        t = np.clip(((points - a) @ d) / max(float(d @ d), 1e-12), 0.0, 1.0)
        best = np.minimum(best, np.hypot(*(points - (a + t[:, None] * d)).T))
    return best


def test_simplified_contours_keep_douglas_peucker_guarantees_as_skimage_does():
    """demo's own Douglas-Peucker (skimage's approximate_polygon costs a scipy.signal import per demo
    job): on the closed contours of random blobs it keeps the end points and a subset of the points in
    order, every dropped point lies within the tolerance of the kept chain, and it keeps as many points
    as skimage's approximate_polygon, give or take one."""
    from skimage.measure import approximate_polygon, find_contours

    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(40):
        mask = np.zeros((48, 48), np.float32)
        for _ in range(rng.integers(1, 4)):
            centre, radii = rng.uniform(12, 36, 2), rng.uniform(3, 12, 2)
            angle = np.linspace(0, 2 * np.pi, 9, endpoint=False)
            wobble = rng.uniform(0.7, 1.3, angle.size)
            rows, cols = fill_polygon(centre[0] + radii[0] * wobble * np.sin(angle),
                                      centre[1] + radii[1] * wobble * np.cos(angle), mask.shape)
            mask[rows, cols] = 1
        for contour in find_contours(np.pad(mask, 1), 0.5):
            for tolerance in (0.2, 1.0):
                kept = demo.simplify_polygon(contour, tolerance)
                np.testing.assert_array_equal(kept[[0, -1]], contour[[0, -1]])
                # a subsequence of the contour (each kept point found after the previous one)
                at = -1
                for point in kept:
                    later = np.flatnonzero((contour[at + 1:] == point).all(axis=1))
                    assert later.size, (point, at)
                    at += 1 + int(later[0])
                assert _distance_to_chain(contour, kept).max() <= tolerance + 1e-9
                assert abs(len(kept) - len(approximate_polygon(contour, tolerance))) <= 1
                checked += 1
    assert checked > 80
