"""Many structures (issue 13): name harmonisation, HaN-Seg / SegRap mask layouts, partial labels,
structures.nrrd, the unmatched-ROI table and the bad inputs, on files written here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from hnct import roi_table
from hnct.common import InputError, read_sidecar
from hnct.convert import convert_case
from hnct.structures import (MASK_PATTERNS, check_structures, find_masks, harmonise, read_annotation_table,
                             read_structures)
from test_dicomio import read, square, write_ct_series, write_rtstruct

REPO = Path(__file__).resolve().parents[1]
CORD_NAMES = {"SpinalCord": ["spinal[ _-]?cord", "cord"], "A_Carotid_L": ["(a[ _-]?)?carotid[ _-]?(l|lt|left)"]}


def convert(case, dicom_dir, out, **kw):
    folder = out / "volumes" / case
    sidecar = convert_case(case, dicom_dir, folder / "volume.nrrd", folder / "label.nrrd", out / "volumes" / f"{case}.json",
                           out_dir=folder, **kw)
    assert read_sidecar(out / "volumes" / f"{case}.json") == json.loads(json.dumps(sidecar, default=str))
    return sidecar, folder


def ct_case(tmp_path, n_slices=6):
    """A small CT (20 x 16 x 6, spacing 0.8 x 0.5 x 2 mm, origin 0) and its SimpleITK grid."""
    ct = write_ct_series(tmp_path / "dicom", n_slices, origin=(0.0, 0.0, 0.0))
    _, _, _, image, _ = read(tmp_path / "dicom")
    return ct, image


def write_mask(path: Path, reference: sitk.Image, box=None, values=None, **changes) -> None:
    """A uint8 mask on ``reference``'s grid with 1 in ``box`` ((x0, x1), (y0, y1), (z0, z1)) or
    ``values`` (a (z, y, x) array); ``changes`` set origin/spacing/direction off the grid."""
    array = np.zeros(tuple(reversed(reference.GetSize())), dtype=np.uint8) if values is None else values
    if box is not None:
        (x0, x1), (y0, y1), (z0, z1) = box
        array[z0:z1, y0:y1, x0:x1] = 1
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    for what, value in changes.items():
        getattr(image, f"Set{what.capitalize()}")(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def test_harmonise_maps_variant_names_ranks_the_best_and_lists_the_rest():
    names = ["Spinal_Cord", "spinal cord", "SPINALCORD", "Cord", "LCarotid", "Carotid Lt", "Body", "PTV_70"]
    got = harmonise(["SpinalCord", "A_Carotid_L", "Larynx"], names,
                    {**CORD_NAMES, "A_Carotid_L": ["(a[ _-]?)?carotid[ _-]?(l|lt|left)", "l(eft)?[ _-]?carotid"]})
    assert got["matched"]["SpinalCord"] == {"roi": "SPINALCORD", "how": "case-insensitive"}
    assert got["not_used"]["SpinalCord"] == ["Spinal_Cord", "spinal cord", "Cord"]  # normalised, then pattern
    assert got["matched"]["A_Carotid_L"] == {"roi": "Carotid Lt", "how": "pattern"}
    assert got["not_used"]["A_Carotid_L"] == ["LCarotid"]
    assert "Larynx" not in got["matched"] and got["unmatched"] == ["Body", "PTV_70"]
    assert got["ambiguous"] == {}
    # A pattern matches the whole name only, case-insensitively.
    assert harmonise(["SpinalCord"], ["Cord_PRV"], CORD_NAMES)["unmatched"] == ["Cord_PRV"]
    # A name two structures claim is ambiguous (the canonical name matches itself).
    clash = harmonise(["SpinalCord", "Cord"], ["cord"], CORD_NAMES)
    assert clash["ambiguous"] == {"cord": ["Cord", "SpinalCord"]}


def test_check_structures_refuses_duplicates_unknown_names_and_bad_patterns():
    check_structures(["SpinalCord", "Larynx"], {"SpinalCord": ["cord"]})  # no error
    with pytest.raises(ValueError, match="duplicates: 'Larynx'"):
        check_structures(["Larynx", "GTVp", "Larynx"])
    with pytest.raises(ValueError, match="duplicates: 'SpinalCord' and 'spinal_cord'"):
        check_structures(["SpinalCord", "spinal_cord"])
    with pytest.raises(ValueError, match=r"names \['Cord'\], which are not in the structure list"):
        check_structures(["SpinalCord"], {"Cord": ["x"]})
    with pytest.raises(ValueError, match="is not a regular expression"):
        check_structures(["SpinalCord"], {"SpinalCord": ["spinal(cord"]})


HANSEG = ["A_Carotid_L", "Bone_Mandible", "Glnd_Thyroid", "Larynx_SG", "Glottis", "SpinalCord"]


def test_hanseg_layout_with_oar_data_csv(tmp_path):
    """HaN-Seg's release layout: case_XX/case_XX_OAR_<name>.seg.nrrd and OAR_data.csv (';', 1/0).
    Glottis lies inside Larynx_SG (overlap kept in structures.nrrd; the later structure wins in the
    label map); Bone_Mandible has no file and Glnd_Thyroid a file the table marks 0: both not
    annotated, their channels zero; a mask file no structure matches is listed as unmatched."""
    _, image = ct_case(tmp_path)
    masks = tmp_path / "hanseg"
    case = "case_01"
    write_mask(masks / case / f"{case}_OAR_A_Carotid_L.seg.nrrd", image, box=((2, 5), (2, 5), (1, 5)))
    write_mask(masks / case / f"{case}_OAR_Larynx_SG.seg.nrrd", image, box=((8, 16), (4, 12), (0, 6)))
    write_mask(masks / case / f"{case}_OAR_Glottis.seg.nrrd", image, box=((10, 14), (6, 10), (2, 4)))
    write_mask(masks / case / f"{case}_OAR_Glnd_Thyroid.seg.nrrd", image, box=((0, 3), (12, 16), (0, 2)))
    write_mask(masks / case / f"{case}_OAR_SpinalCord.seg.nrrd", image, box=((17, 19), (13, 15), (0, 6)))
    write_mask(masks / case / f"{case}_OAR_Lens_L.seg.nrrd", image, box=((0, 1), (0, 1), (0, 1)))
    write_mask(masks / case / f"{case}_IMG_CT.nrrd", image, box=((0, 20), (0, 16), (0, 6)))  # not a mask file
    (masks / "OAR_data.csv").write_text("ID;A_Carotid_L;Bone_Mandible;Glnd_Thyroid;Larynx_SG;Glottis;SpinalCord\n"
                                        f"{case};1;0;0;1;1;1\ncase_02;1;1;1;1;1;1\n")
    sidecar, folder = convert(case, tmp_path / "dicom", tmp_path / "out", labels="nrrd", mask_dir=masks,
                              mask_pattern="hanseg", annotation_table=masks / "OAR_data.csv", structures=HANSEG)
    assert sidecar["status"] == "ok", sidecar.get("reason")
    entries = {e["name"]: e for e in sidecar["structures"]}
    assert [e["name"] for e in sidecar["structures"]] == HANSEG
    assert [e["channel"] for e in sidecar["structures"]] == list(range(6))
    assert [e["label"] for e in sidecar["structures"]] == list(range(1, 7))
    assert {s: e["annotated"] for s, e in entries.items()} == {
        "A_Carotid_L": True, "Bone_Mandible": False, "Glnd_Thyroid": False, "Larynx_SG": True, "Glottis": True,
        "SpinalCord": True}
    assert {s: e["voxels"] for s, e in entries.items()} == {
        "A_Carotid_L": 36, "Bone_Mandible": 0, "Glnd_Thyroid": 0, "Larynx_SG": 8 * 8 * 6, "Glottis": 32,
        "SpinalCord": 24}
    assert entries["Glottis"]["source"] == str(masks / case / f"{case}_OAR_Glottis.seg.nrrd")
    assert entries["Bone_Mandible"]["source"] is None
    assert sidecar["unmatched_rois"] == [f"{case}_OAR_Lens_L.seg.nrrd"]
    assert sidecar["label_matching"]["not_annotated_by_table"] == ["Glnd_Thyroid"]
    assert sidecar["structures_present"] == ["A_Carotid_L", "Larynx_SG", "Glottis", "SpinalCord"]
    assert sidecar["structures_file"] == str(folder / "structures.nrrd")

    # structures.nrrd: the interface's layout, volume.nrrd's geometry, lossless where structures overlap.
    channels, header = read_structures(folder / "structures.nrrd")
    _, volume_header = nrrd.read(str(folder / "volume.nrrd"))
    assert channels.dtype == np.uint8 and channels.shape == (6, 6, 16, 20) and set(np.unique(channels)) == {0, 1}
    assert nrrd.read(str(folder / "structures.nrrd"), index_order="C")[0].shape == (6, 6, 16, 20)  # (C, z, y, x)
    assert list(header["sizes"]) == [20, 16, 6, 6]  # NRRD's axis order: x, y, z, channel
    assert list(header["kinds"]) == ["domain", "domain", "domain", "list"] and header["encoding"] == "gzip"
    assert np.isnan(header["space directions"][3]).all()
    assert np.array_equal(header["space directions"][:3], volume_header["space directions"])
    assert np.array_equal(header["space origin"], volume_header["space origin"])
    assert header["space"] == volume_header["space"]
    assert channels[3, 2, 6, 10] == channels[4, 2, 6, 10] == 1  # Glottis inside Larynx_SG, both kept
    assert channels[[1, 2]].sum() == 0
    vector = sitk.ReadImage(str(folder / "structures.nrrd"))  # another reader: a 6-component image on the CT grid
    ct = sitk.ReadImage(str(folder / "volume.nrrd"))
    assert vector.GetNumberOfComponentsPerPixel() == 6 and vector.GetSize() == ct.GetSize()
    assert np.allclose(vector.GetOrigin(), ct.GetOrigin()) and np.allclose(vector.GetSpacing(), ct.GetSpacing())
    assert np.allclose(vector.GetDirection(), ct.GetDirection())
    assert np.array_equal(np.moveaxis(sitk.GetArrayFromImage(vector), -1, 0), channels)
    # label.nrrd: value = position + 1, painted in list order (Glottis over Larynx_SG).
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nrrd")))
    assert label[2, 6, 10] == 5 and label[0, 4, 8] == 4 and label[1, 2, 2] == 1
    assert sidecar["label_matching"]["voxels"]["Larynx_SG"] == 8 * 8 * 6 - 32


def test_segrap_and_default_patterns_find_their_files(tmp_path):
    (tmp_path / "segrap_0001").mkdir()
    for name in ("Brain.nii.gz", "OpticNerve_L.nii.gz", "image.nii.gz", "notes.txt"):
        (tmp_path / "segrap_0001" / name).write_bytes(b"")
    folder, found = find_masks("segrap_0001", tmp_path, "segrap")
    assert folder == tmp_path / "segrap_0001"
    assert sorted(found) == ["Brain", "OpticNerve_L", "image"]  # the image is a name no structure matches
    _, found = find_masks("segrap_0001", tmp_path, "default")
    assert sorted(found) == ["Brain", "OpticNerve_L", "image"]
    _, found = find_masks("segrap_0001", tmp_path, "{case}/Optic{structure}.nii.gz")
    assert list(found) == ["Nerve_L"]
    with pytest.raises(InputError, match="mask folder .*segrap_0002 does not exist"):
        find_masks("segrap_0002", tmp_path, "segrap")
    with pytest.raises(ValueError, match="needs {structure}"):
        find_masks("segrap_0001", tmp_path, "{case}/{case}.nii.gz")
    assert MASK_PATTERNS["hanseg"] == "{case}/{case}_OAR_{structure}.seg.nrrd"


def test_annotation_table_is_harmonised_and_checked(tmp_path):
    table = tmp_path / "OAR_data.csv"
    table.write_text("ID,Spinal_Cord,Lips\ncase_01,1,\ncase_02,0,1\n")
    assert read_annotation_table(table, ["SpinalCord"]) == {"case_01": {"SpinalCord": True},
                                                            "case_02": {"SpinalCord": False}}
    table.write_text("ID;Spinal_Cord\ncase_01;yes\n")
    with pytest.raises(ValueError, match=r"case case_01, column 'Spinal_Cord': 'yes' is not 0, 1 or empty"):
        read_annotation_table(table, ["SpinalCord"])


RT_STRUCTURES = ["Larynx", "SpinalCord", "A_Carotid_L", "GTVp"]


def test_rtstruct_variant_names_partial_labels_and_unmatched_rois(tmp_path):
    """ROI names written as a planning system might (Spinal_Cord, Carotid Lt) reach their structures;
    GTVp has no ROI: annotated false, zero channel (required_structures still excludes); unmatched
    ROI names are in the sidecar and in the names x cases table."""
    ct, _ = ct_case(tmp_path)
    write_rtstruct(tmp_path / "dicom" / "rt.dcm", ct, {
        "LARYNX": [square((8.0, 4.0), 2.0, 4.0)], "Spinal_Cord": [square((4.0, 4.0), 1.0, 2.0)],
        "cord": [square((4.0, 4.0), 1.0, 6.0)], "Carotid Lt": [square((12.0, 5.0), 1.0, 4.0)],
        "BODY": [square((8.0, 4.0), 6.0, 4.0)], "PTV_70": [square((8.0, 4.0), 3.0, 4.0)]})
    names = {"SpinalCord": ["spinal[ _-]?cord", "cord"], "A_Carotid_L": ["(a[ _-]?)?carotid[ _-]?(l|lt|left)"]}
    sidecar, folder = convert("C", tmp_path / "dicom", tmp_path / "out", structures=RT_STRUCTURES,
                              structure_names=names)
    assert sidecar["status"] == "ok", sidecar.get("reason")
    entries = {e["name"]: e for e in sidecar["structures"]}
    assert {s: e["source"] for s, e in entries.items()} == {"Larynx": "LARYNX", "SpinalCord": "Spinal_Cord",
                                                           "A_Carotid_L": "Carotid Lt", "GTVp": None}
    assert [e["annotated"] for e in sidecar["structures"]] == [True, True, True, False]
    assert sidecar["label_matching"]["not_used"] == {"SpinalCord": ["cord"]}
    assert sidecar["unmatched_rois"] == ["BODY", "PTV_70"]
    channels, _ = read_structures(folder / "structures.nrrd")
    assert channels[1, 1].sum() > 0 and channels[1, 3].sum() == 0  # Spinal_Cord's slice only, not cord's
    assert channels[3].sum() == 0 and entries["GTVp"]["voxels"] == 0
    excluded, _ = convert("C", tmp_path / "dicom", tmp_path / "out2", structures=RT_STRUCTURES,
                          structure_names=names, required_structures=["GTVp"])
    assert excluded["status"] == "excluded" and "required structure(s) ['GTVp'] missing" in excluded["reason"]

    other = tmp_path / "other"
    ct2 = write_ct_series(other / "dicom", 4, origin=(0.0, 0.0, 0.0))
    write_rtstruct(other / "dicom" / "rt.dcm", ct2, {"Larynx": [square((8.0, 4.0), 2.0, 2.0)],
                                                     "PTV_70": [square((8.0, 4.0), 3.0, 2.0)]})
    convert("D", other / "dicom", tmp_path / "out", structures=RT_STRUCTURES, structure_names=names)
    table = roi_table.unmatched_table([tmp_path / "out" / "volumes" / "C.json", tmp_path / "out" / "volumes" / "D.json",
                                       tmp_path / "out2" / "volumes" / "C.json"])  # the excluded one has no column
    assert table.to_dict("list") == {"roi_name": ["PTV_70", "BODY"], "n_cases": [2, 1], "C": [1, 1], "D": [1, 0]}
    roi_table.main(["--sidecars", str(tmp_path / "out2" / "volumes" / "C.json"), "--out", str(tmp_path / "t.tsv")])
    assert (tmp_path / "t.tsv").read_text() == "roi_name\tn_cases\n"


def test_mask_folder_beside_the_rtstruct_adds_its_structures(tmp_path):
    """A mask folder as a second source: its structures join the RTSTRUCT's; a case without a mask
    folder keeps the RTSTRUCT's; a structure in both sources is bad input."""
    ct, image = ct_case(tmp_path)
    write_rtstruct(tmp_path / "dicom" / "rt.dcm", ct, {"Larynx": [square((8.0, 4.0), 2.0, 4.0)]})
    write_mask(tmp_path / "masks" / "C" / "SpinalCord.nrrd", image, box=((1, 3), (1, 3), (0, 6)))
    options = dict(structures=["Larynx", "SpinalCord"], mask_dir=tmp_path / "masks")
    sidecar, _ = convert("C", tmp_path / "dicom", tmp_path / "out", **options)
    assert [(e["annotated"], e["voxels"]) for e in sidecar["structures"]] == [(True, sidecar["structures"][0]["voxels"]),
                                                                                (True, 24)]
    assert sidecar["structures"][0]["voxels"] > 0 and sidecar["mask_matching"]["annotated"] == ["SpinalCord"]
    sidecar, _ = convert("C", tmp_path / "dicom", tmp_path / "out", structures=["Larynx", "SpinalCord"],
                         mask_dir=tmp_path / "no-masks-here")
    assert sidecar["status"] == "ok" and [e["annotated"] for e in sidecar["structures"]] == [True, False]
    write_mask(tmp_path / "masks" / "C" / "Larynx.nii.gz", image, box=((1, 3), (1, 3), (0, 6)))
    sidecar, folder = convert("C", tmp_path / "dicom", tmp_path / "out", **options)
    assert sidecar["status"] == "excluded" and not list(folder.iterdir())
    assert "structure(s) ['Larynx'] are both in the RTSTRUCT" in sidecar["reason"]


def _bad_mask_off_grid(tmp_path, image):
    write_mask(tmp_path / "masks" / "C" / "Larynx.nrrd", image, box=((1, 3), (1, 3), (0, 6)), origin=(0.0, 0.5, 0.0))
    return dict(labels="nrrd", mask_dir=tmp_path / "masks"), r"Larynx.nrrd is not on the CT's grid: its origin is"


def _bad_mask_not_binary(tmp_path, image):
    values = np.zeros(tuple(reversed(image.GetSize())), dtype=np.uint8)
    values[0, :2, :2], values[1, :2, :2] = 1, 2  # a label map where a mask belongs
    write_mask(tmp_path / "masks" / "C" / "Larynx.nrrd", image, values=values)
    return dict(labels="nrrd", mask_dir=tmp_path / "masks"), r"Larynx.nrrd is not binary: values \[0, 1, 2\]"


def _bad_ambiguous_roi(tmp_path, image):
    return (dict(structures=["Larynx", "SpinalCord", "Cord"], structure_names={"SpinalCord": ["cord"]}),
            r"ROI 'CORD' in .*rt.dcm matches 2 structures \['Cord', 'SpinalCord'\]")


def _bad_duplicate_structures(tmp_path, image):
    return dict(structures=["Larynx", "SpinalCord", "Larynx"]), r"structure list has duplicates: 'Larynx'"


@pytest.mark.parametrize("make", [_bad_mask_off_grid, _bad_mask_not_binary, _bad_ambiguous_roi,
                                  _bad_duplicate_structures])
def test_bad_label_input_excludes_the_case_naming_file_and_reason(tmp_path, make):
    ct, image = ct_case(tmp_path)
    write_rtstruct(tmp_path / "dicom" / "rt.dcm", ct, {"Larynx": [square((8.0, 4.0), 2.0, 4.0)],
                                                        "CORD": [square((4.0, 4.0), 1.0, 2.0)]})
    options, reason = make(tmp_path, image)
    options.setdefault("structures", ["Larynx"])
    sidecar, folder = convert("C", tmp_path / "dicom", tmp_path / "out", **options)
    assert sidecar["status"] == "excluded" and sidecar["excluded_at"] == "convert"
    assert sidecar["case"] == "C" and sidecar["file"]
    assert re.search(reason, sidecar["reason"]), sidecar["reason"]
    assert not list(folder.iterdir())  # nothing half-written left as if complete


def test_demo_cases_bring_their_organs_at_risk_from_both_sources(tmp_path):
    """The demo config converts a mask-folder case and an RTSTRUCT case (varied ROI names) of the demo
    cohort with every organ at risk, the left-out one unannotated, and only the cord PRV unmatched."""
    yaml = pytest.importorskip("yaml")
    from hnct import demo, demo_oar

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cohort = demo.plan_cohort(**config["demo"])
    ct_rows = [row for _, row in cohort.iterrows() if row["demo_kind"] == "ct"]
    assert {demo_oar.oar_source(row) for row in ct_rows} == {"masks", "rtstruct"}
    assert 0 < sum(demo_oar.LEFT_OUT not in demo_oar.contoured(row) for row in ct_rows) < len(ct_rows) / 2
    keys = ("labels", "mask_dir", "mask_pattern", "annotation_table", "structures", "structure_names")
    options = {key: config["convert"][key] for key in keys}
    for source, partial in (("masks", True), ("rtstruct", False)):
        row = next(r for r in ct_rows if demo_oar.oar_source(r) == source
                   and (demo_oar.LEFT_OUT not in demo_oar.contoured(r)) == partial)
        manifest = demo.write_case(row, tmp_path / "dicom", tmp_path / f"{row['case']}.json")
        assert manifest["organs_at_risk"]["source"] == source
        sidecar, _ = convert(row["case"], tmp_path / "dicom" / row["dicom_dir"], tmp_path / "out", **options)
        assert sidecar["status"] == "ok", sidecar.get("reason")
        entries = {e["name"]: e for e in sidecar["structures"]}
        expected = set(demo_oar.contoured(row)) | {"Larynx", "GTVp"} | ({"GTVn"} if row["node_positive"] == "1" else set())
        assert {s for s, e in entries.items() if e["annotated"]} == expected
        assert all(entries[s]["voxels"] > 0 for s in expected)
        assert sidecar["unmatched_rois"] == manifest["organs_at_risk"]["unmatched_rois"] == (
            ["SpinalCord_PRV03"] if source == "rtstruct" else [])
        if source == "rtstruct":
            assert entries["SpinalCord"]["source"] == demo_oar.roi_name(row, "SpinalCord")
        else:
            assert entries["SpinalCord"]["source"].endswith(f"{row['case']}_OAR_SpinalCord.seg.nrrd")
        channels, _ = read_structures(sidecar["structures_file"])
        across_mm = {s: float(np.ptp(np.nonzero(channels[e["channel"]])[2]) + 1) * sidecar["spacing"][0]
                     for s, e in entries.items() if e["annotated"]}
        assert across_mm["A_Vertebral_L"] < 5.0 < 10.0 < across_mm["Trachea"]  # sizes very different
        mm3 = float(np.prod(sidecar["spacing"]))
        assert entries["Thyroid_L"]["voxels"] * mm3 < 1.3 * 4 / 3 * np.pi * np.prod(demo_oar.THYROID_SEMI)


@pytest.mark.parametrize("name,n_structures", [("hanseg", 30), ("segrap", 45), ("config", 12)])
def test_mask_cohort_configs_are_valid_and_name_distinct_structures(name, n_structures):
    """hanseg.yaml (HaN-Seg's 30 OARs, IDs = order), segrap.yaml (45) and the demo pass the schema
    (tasks aside: the oar task registers itself) and have no duplicate or ambiguous names."""
    yaml = pytest.importorskip("yaml")
    jsonschema = pytest.importorskip("jsonschema")
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    jsonschema.validate({k: v for k, v in config.items() if k != "tasks"}, schema)
    convert = config["convert"]
    assert len(convert["structures"]) == n_structures
    check_structures(convert["structures"], convert["structure_names"])
    names = convert["structures"]
    for structure in names:  # every name reaches itself and nothing else
        assert harmonise(names, [structure], convert["structure_names"])["matched"] == {
            structure: {"roi": structure, "how": "exact"}}
    if name == "hanseg":
        assert names[0] == "A_Carotid_L" and names[29] == "SpinalCord" and names == sorted(names, key=str.lower)
        got = harmonise(names, ["Eye_L", "Lens_R"], convert["structure_names"])["matched"]
        assert {s: m["roi"] for s, m in got.items()} == {"Eye_AL": "Eye_L", "Eye_PR": "Lens_R"}
