"""CT from volume files (hnct.volume_ct): HaN-Seg's NRRD and SegRap's NIfTI releases as released.

Files are written here in each release's layout (HaN-Seg: ``set_1/case_XX/case_XX_IMG_CT.nrrd``,
``case_XX_OAR_<name>.seg.nrrd``, ``set_1/OAR_data.csv``; SegRap2023: ``segrap_XXXX/image.nii.gz``,
``<Organ>.nii.gz``), converted through :func:`hnct.convert.convert_case` (what the rule runs), and
the CT NRRD, structures.nrrd and sidecar are checked against the arrays and the LPS geometry they
were written from. The workflow test runs convert alone with config/hanseg.yaml's keys and shows
that editing one mask reruns only that case's convert.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from hnct import volume_ct
from hnct.convert import convert_case
from hnct.fetch import main as fetch_main
from hnct.fetch import skipped_table_path
from hnct.structures import read_structures

REPO = Path(__file__).resolve().parents[1]
# An oblique LPS grid (rotated about z), so that a flipped or transposed axis cannot pass unseen.
ANGLE = np.deg2rad(10.0)
DIRECTION = (np.cos(ANGLE), -np.sin(ANGLE), 0.0, np.sin(ANGLE), np.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)
SPACING = (0.9765625, 0.9765625, 2.5)
ORIGIN = (-125.3, -140.25, 31.5)
SHAPE = (9, 12, 14)  # z, y, x
TOLERANCE_HU = 0.01  # config/schema.yaml's convert.ct_rounding_tolerance_hu
HANSEG_STRUCTURES = ["Brainstem", "Eye_AL", "Parotid_L", "SpinalCord"]
HANSEG_NAMES = {"Eye_AL": ["eye[ _-]?l"]}


def ct_array(seed: int) -> np.ndarray:
    """Air around a water-like body with a bone block: int16 HU, z, y, x."""
    rng = np.random.default_rng(seed)
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[:, 2:10, 3:11] = rng.integers(-50, 80, size=(SHAPE[0], 8, 8))
    hu[3:6, 4:7, 5:8] = 1200
    return hu


def on_grid(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def mask_arrays(seed: int) -> dict[str, np.ndarray]:
    masks = {}
    for k, name in enumerate(["Brainstem", "Eye_L", "SpinalCord"]):
        mask = np.zeros(SHAPE, dtype=np.uint8)
        mask[1 + k:5 + k, 3 + k:6 + k, 4 + seed:7 + seed] = 1
        masks[name] = mask
    return masks


def write_hanseg_case(set_1: Path, case: str, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    folder = set_1 / case
    folder.mkdir(parents=True)
    hu = ct_array(seed)
    sitk.WriteImage(on_grid(hu), str(folder / f"{case}_IMG_CT.nrrd"))
    sitk.WriteImage(on_grid(ct_array(seed + 10)), str(folder / f"{case}_IMG_MR_T1.nrrd"))  # not read
    masks = mask_arrays(seed)
    for name, mask in masks.items():
        sitk.WriteImage(on_grid(mask), str(folder / f"{case}_OAR_{name}.seg.nrrd"), useCompression=True)
    return hu, masks


@pytest.fixture
def hanseg(tmp_path):
    """A HaN-Seg set_1/ of two cases; OAR_data.csv says case_02's Brainstem was not contoured."""
    set_1 = tmp_path / "HaN-Seg" / "set_1"
    written = {case: write_hanseg_case(set_1, case, seed) for seed, case in enumerate(["case_01", "case_02"])}
    (set_1 / "OAR_data.csv").write_text("ID;Brainstem;Eye_L;Parotid_L;SpinalCord\n"
                                        "case_01;1;1;0;1\ncase_02;0;1;0;1\n")
    return set_1, written


def convert(tmp_path, case, ct_file, mask_dir, pattern, structures, names=None, table="", tolerance=TOLERANCE_HU):
    out = tmp_path / "results" / "volumes" / case
    sidecar = convert_case(case, "", out / "volume.nrrd", out / "label.nrrd", out.with_suffix(".json"),
                           labels="nrrd", mask_dir=mask_dir, structures=structures, structure_names=names or {},
                           mask_pattern=pattern, annotation_table=table, out_dir=out, ct_file=ct_file,
                           ct_rounding_tolerance_hu=tolerance)
    return out, sidecar


def same_grid(image: sitk.Image, source: sitk.Image) -> bool:
    """The grid of ``source`` as SimpleITK reads both: size and origin exactly; spacing and direction
    to 1e-12 (an NRRD stores their product, which ITK splits again: the last bit may differ)."""
    return (image.GetSize() == source.GetSize() and image.GetOrigin() == source.GetOrigin()
            and np.allclose(image.GetSpacing(), source.GetSpacing(), rtol=0, atol=1e-12)
            and np.allclose(image.GetDirection(), source.GetDirection(), rtol=0, atol=1e-12))


def assert_lps_grid(image: sitk.Image, atol: float = 1e-12):
    """The grid the test files were written on (see same_grid for the 1e-12)."""
    assert image.GetSize() == tuple(reversed(SHAPE))
    for got, want in ((image.GetSpacing(), SPACING), (image.GetOrigin(), ORIGIN),
                      (image.GetDirection(), DIRECTION)):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_hanseg_layout_converts_to_hnct_ct_and_structures(hanseg, tmp_path):
    set_1, written = hanseg
    hu, masks = written["case_01"]
    ct_file = set_1 / "case_01" / "case_01_IMG_CT.nrrd"
    out, sidecar = convert(tmp_path, "case_01", ct_file, set_1, "hanseg", HANSEG_STRUCTURES, HANSEG_NAMES,
                           set_1 / "OAR_data.csv")
    assert sidecar["status"] == "ok", sidecar
    volume = sitk.ReadImage(str(out / "volume.nrrd"))
    assert volume.GetPixelID() == sitk.sitkInt16
    assert same_grid(volume, sitk.ReadImage(str(ct_file)))
    assert_lps_grid(volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), hu)
    channels, header = read_structures(out / "structures.nrrd")
    assert channels.shape == (len(HANSEG_STRUCTURES), *SHAPE)
    np.testing.assert_array_equal(channels[0], masks["Brainstem"])
    np.testing.assert_array_equal(channels[1], masks["Eye_L"])  # OAR_data.csv's Eye_L is Eye_AL
    np.testing.assert_array_equal(channels[3], masks["SpinalCord"])
    assert not channels[2].any()
    np.testing.assert_array_equal(header["space origin"], ORIGIN)
    assert sidecar["ct_source"] == "file" and sidecar["ct_file"] == str(ct_file)
    assert sidecar["ct_sha256"] == hashlib.sha256(ct_file.read_bytes()).hexdigest()
    assert sidecar["ct_bytes"] == ct_file.stat().st_size and sidecar["ct_format"] == "NrrdImageIO"
    source = sitk.ReadImage(str(ct_file))
    assert sidecar["size"] == list(source.GetSize()) and sidecar["origin"] == list(source.GetOrigin())
    assert sidecar["spacing"] == list(source.GetSpacing()) and sidecar["direction"] == list(source.GetDirection())
    assert sidecar["hu_clipped_voxels"] == 0
    annotated = {e["name"]: e["annotated"] for e in sidecar["structures"]}
    assert annotated == {"Brainstem": True, "Eye_AL": True, "Parotid_L": False, "SpinalCord": True}
    assert "case_01_IMG_MR_T1.nrrd" not in json.dumps(sidecar["label_matching"])


def test_hanseg_annotation_table_marks_a_structure_not_annotated(hanseg, tmp_path):
    set_1, _ = hanseg
    _, sidecar = convert(tmp_path, "case_02", set_1 / "case_02" / "case_02_IMG_CT.nrrd", set_1, "hanseg",
                         HANSEG_STRUCTURES, HANSEG_NAMES, set_1 / "OAR_data.csv")
    assert sidecar["status"] == "ok"
    assert sidecar["label_matching"]["not_annotated_by_table"] == ["Brainstem"]
    assert [e["annotated"] for e in sidecar["structures"]] == [False, True, False, True]


def nifti_sform(path: Path) -> np.ndarray:
    """The 3x4 sform (srow_x, srow_y, srow_z) of a NIfTI-1 file's header: NIfTI's RAS world."""
    import gzip

    header = gzip.decompress(path.read_bytes())[:348]
    assert struct.unpack_from("<i", header, 0)[0] == 348  # little-endian NIfTI-1
    return np.array(struct.unpack_from("<12f", header, 280)).reshape(3, 4)


def test_segrap_nifti_is_read_from_ras_into_the_lps_grid_it_was_written_from(tmp_path):
    train = tmp_path / "SegRap2023_Training_Set_120cases"
    case = train / "segrap_0000"
    case.mkdir(parents=True)
    hu = ct_array(3)
    sitk.WriteImage(on_grid(hu), str(case / "image.nii.gz"))
    sitk.WriteImage(on_grid(ct_array(4)), str(case / "image_contrast.nii.gz"))
    masks = {name: mask for name, mask in zip(["BrainStem", "SpinalCord", "GTVp"], mask_arrays(1).values())}
    for name, mask in masks.items():
        sitk.WriteImage(on_grid(mask), str(case / f"{name}.nii.gz"))
    # On disk the grid is RAS: x and y of every axis and of the origin negated.
    affine = np.column_stack([np.reshape(DIRECTION, (3, 3)) * SPACING, ORIGIN]) * np.array([[-1], [-1], [1]])
    np.testing.assert_allclose(nifti_sform(case / "image.nii.gz"), affine, atol=1e-4)

    out, sidecar = convert(tmp_path, "segrap_0000", case / "image.nii.gz", train, "segrap",
                           ["BrainStem", "Eye_L", "SpinalCord"])
    assert sidecar["status"] == "ok", sidecar
    volume = sitk.ReadImage(str(out / "volume.nrrd"))
    assert same_grid(volume, sitk.ReadImage(str(case / "image.nii.gz")))
    assert_lps_grid(volume, atol=1e-4)  # NIfTI stores its affine as float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), hu)
    channels, _ = read_structures(out / "structures.nrrd")
    np.testing.assert_array_equal(channels[0], masks["BrainStem"])
    np.testing.assert_array_equal(channels[2], masks["SpinalCord"])
    assert not channels[1].any() and [e["annotated"] for e in sidecar["structures"]] == [True, False, True]
    # The other image and the tumour masks match no structure: listed, not used.
    assert {"GTVp.nii.gz", "image.nii.gz", "image_contrast.nii.gz"} <= set(sidecar["unmatched_rois"])


def test_an_nrrd_in_ras_space_is_read_into_lps(tmp_path):
    """An NRRD may say ``space: right-anterior-superior`` (pynrrd writes it as told): ITK turns it
    into LPS, x and y of the origin and axes negated."""
    import nrrd

    hu = ct_array(2)
    ras_axes = np.diag([-1.0, -1.0, 1.0]) @ np.reshape(DIRECTION, (3, 3)) * SPACING  # columns: LPS axes -> RAS
    ras_origin = np.array(ORIGIN) * [-1, -1, 1]
    nrrd.write(str(tmp_path / "ct.nrrd"), hu, {"space": "right-anterior-superior", "space directions": ras_axes.T,
                                               "space origin": ras_origin, "kinds": ["domain"] * 3},
               index_order="C")
    got, geometry, _ = volume_ct.read_ct_file("c1", tmp_path / "ct.nrrd", TOLERANCE_HU)
    np.testing.assert_array_equal(got, hu)
    np.testing.assert_allclose(geometry["origin"], ORIGIN, rtol=0, atol=1e-12)
    np.testing.assert_allclose(geometry["spacing"], SPACING, rtol=0, atol=1e-12)
    np.testing.assert_allclose(geometry["direction"], DIRECTION, rtol=0, atol=1e-12)


def test_float_ct_within_tolerance_is_rounded_to_int16(tmp_path):
    hu = ct_array(5)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(on_grid((hu.astype(np.float32) + 0.004).astype(np.float32)), str(path))
    got, geometry, provenance = volume_ct.read_ct_file("c1", path, TOLERANCE_HU)
    assert got.dtype == np.int16 and geometry["hu_clipped_voxels"] == 0
    np.testing.assert_array_equal(got, hu)
    assert provenance["ct_pixel_type"] == "32-bit float" and provenance["ct_format"] == "NiftiImageIO"


def test_integer_ct_beyond_int16_is_clipped_and_counted(tmp_path):
    hu = ct_array(6).astype(np.int32)
    hu[0, 0, :3] = 40000
    path = tmp_path / "ct.mha"
    sitk.WriteImage(on_grid(hu), str(path))
    got, geometry, _ = volume_ct.read_ct_file("c1", path, TOLERANCE_HU)
    assert geometry["hu_clipped_voxels"] == 3 and got[0, 0, :3].tolist() == [32767] * 3


def bad_ct(kind: str, path: Path) -> str:
    """Write a bad CT file of ``kind`` at ``path``; return what the reason must say."""
    hu = ct_array(7)
    if kind == "missing":
        return "does not exist"
    if kind == "unreadable":
        path.write_bytes(b"NRRD0004\nthis is not a header\n")
        return "cannot read CT file"
    if kind == "2-D":
        sitk.WriteImage(sitk.GetImageFromArray(hu[0]), str(path))
        return "2-D image"
    if kind == "vector":
        sitk.WriteImage(sitk.GetImageFromArray(np.stack([hu, hu], axis=-1), isVector=True), str(path))
        return "2 component(s)"
    if kind == "normalised":
        sitk.WriteImage(on_grid(((hu + 1000) / 2200.0).astype(np.float32)), str(path))
        return "not integer HU"
    if kind == "hu+1024":
        sitk.WriteImage(on_grid((hu + 1024).astype(np.uint16)), str(path))
        return "no voxel at air's HU"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "unreadable", "2-D", "vector", "normalised", "hu+1024"])
def test_bad_ct_file_excludes_the_case_naming_file_and_reason(tmp_path, kind):
    set_1 = tmp_path / "set_1"
    (set_1 / "case_09").mkdir(parents=True)
    ct_file = set_1 / "case_09" / "case_09_IMG_CT.nrrd"
    reason = bad_ct(kind, ct_file)
    out, sidecar = convert(tmp_path, "case_09", ct_file, set_1, "hanseg", HANSEG_STRUCTURES, HANSEG_NAMES)
    assert sidecar["status"] == "excluded" and sidecar["case"] == "case_09"
    assert sidecar["file"] == str(ct_file) and reason in sidecar["reason"], sidecar
    assert list(out.iterdir()) == []  # nothing half-written left as if complete


def test_mask_on_another_grid_than_the_ct_file_excludes_the_case(hanseg, tmp_path):
    set_1, _ = hanseg
    shifted = on_grid(mask_arrays(0)["SpinalCord"])
    shifted.SetOrigin((ORIGIN[0] + 1.0, *ORIGIN[1:]))
    bad = set_1 / "case_01" / "case_01_OAR_SpinalCord.seg.nrrd"
    sitk.WriteImage(shifted, str(bad))
    _, sidecar = convert(tmp_path, "case_01", set_1 / "case_01" / "case_01_IMG_CT.nrrd", set_1, "hanseg",
                         HANSEG_STRUCTURES, HANSEG_NAMES)
    assert sidecar["status"] == "excluded" and sidecar["file"] == str(bad) and "origin" in sidecar["reason"]


def test_ct_file_needs_mask_labels_or_none(tmp_path):
    with pytest.raises(ValueError, match="labels 'rtstruct' needs the DICOM"):
        convert_case("c1", "", tmp_path / "v.nrrd", tmp_path / "l.nrrd", tmp_path / "c1.json", labels="rtstruct",
                     ct_file=tmp_path / "ct.nrrd", ct_rounding_tolerance_hu=TOLERANCE_HU)


# ----------------------------------------------------------------------------- release index


def test_index_of_a_hanseg_release_gives_one_case_per_case_folder(hanseg, tmp_path, capsys):
    set_1, _ = hanseg
    (set_1 / "case_03").mkdir()  # a case folder without its CT: skipped, with the reason
    (set_1 / "case_03" / "case_03_IMG_MR_T1.nrrd").write_bytes(b"")
    patients = tmp_path / "patients.tsv"
    patients.write_text("case\tpatient\ncase_02\tP-7\n")
    out = tmp_path / "cohort.tsv"
    assert fetch_main(["index", "--root", str(set_1), "--layout", "hanseg", "--patients", str(patients),
                       "--out", str(out)]) == 0
    cohort = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    assert cohort[["case", "patient", "collection", "ct_file", "dicom_dir"]].values.tolist() == [
        ["case_01", "case_01", "HaN-Seg", "case_01/case_01_IMG_CT.nrrd", ""],
        ["case_02", "P-7", "HaN-Seg", "case_02/case_02_IMG_CT.nrrd", ""],
    ]
    skipped = pd.read_csv(skipped_table_path(out), sep="\t", dtype=str, keep_default_na=False)
    assert skipped.set_index("path")["what"].to_dict() == {"OAR_data.csv": "file", "case_03": "folder"}
    assert (skipped["reason"].str.contains("no CT file matching")).all()
    assert "2 cases (one per CT file of layout hanseg)" in capsys.readouterr().out


def test_index_of_a_segrap_folder_with_a_collection_of_ones_own(tmp_path):
    for case in ("segrap_0001", "segrap_0000"):
        (tmp_path / case).mkdir()
        sitk.WriteImage(on_grid(ct_array(0)), str(tmp_path / case / "image.nii.gz"))
    cohort, skipped = volume_ct.index_release(tmp_path, "segrap", collection="SegRap2023-train")
    assert list(cohort["case"]) == ["segrap_0000", "segrap_0001"] and skipped.empty
    assert set(cohort["collection"]) == {"SegRap2023-train"}
    assert list(cohort["ct_file"]) == ["segrap_0000/image.nii.gz", "segrap_0001/image.nii.gz"]
    flat, _ = volume_ct.index_release(tmp_path, "{case}/image.nii.gz")
    assert list(flat["collection"]) == [tmp_path.name] * 2  # a pattern of one's own: the folder's name


def test_index_refuses_a_mapping_of_cases_the_release_lacks(hanseg):
    set_1, _ = hanseg
    with pytest.raises(ValueError, match=r"case\(s\) \['case_77'\]"):
        volume_ct.index_release(set_1, "hanseg", patients={"case_77": "P"})


# ----------------------------------------------------------------------------- the workflow


def snakemake(workdir: Path, configs: list[Path], *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(workdir), "--cores", "1", *args,
                           "--configfile", *map(str, configs)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"snakemake {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def structure_names_given(text: str) -> dict:
    """The --structure-names of the convert commands printed (--printshellcmds), one for all."""
    given = {json.dumps(json.loads(m), sort_keys=True) for m in re.findall(r"--structure-names '([^']*)'", text)}
    assert len(given) == 1, given
    return json.loads(given.pop())


def planned_convert_cases(text: str) -> list[str]:
    return sorted(re.findall(r"rule convert_series:.*?wildcards: case=(\S+)", text, re.S))


@pytest.mark.workflow
@pytest.mark.slow
def test_workflow_converts_a_hanseg_release_and_an_edited_mask_reruns_its_case_only(hanseg, tmp_path):
    set_1, written = hanseg
    work = tmp_path / "work"
    work.mkdir()
    cohort = work / "cohort.tsv"
    assert fetch_main(["index", "--root", str(set_1), "--layout", "hanseg", "--out", str(cohort)]) == 0
    hanseg_yaml = yaml.safe_load((REPO / "config" / "hanseg.yaml").read_text())
    local = work / "local.yaml"
    local.write_text(yaml.safe_dump({
        "cohort": {**hanseg_yaml["cohort"], "table": str(cohort), "dicom_root": str(set_1)},
        "convert": {**hanseg_yaml["convert"], "mask_dir": str(set_1),
                    "annotation_table": str(set_1 / "OAR_data.csv")},
    }))
    configs = [REPO / "config" / "config.yaml", REPO / "config" / "hanseg.yaml", local]
    targets = ["results/volumes/case_01", "results/volumes/case_02"]
    printed = snakemake(work, configs, *targets, "--printshellcmds")
    # config.yaml's (the demo's) structure names do not leak into hanseg.yaml's (common.smk)
    assert structure_names_given(printed) == hanseg_yaml["convert"]["structure_names"]
    for case, (hu, masks) in written.items():
        sidecar = json.loads((work / "results" / "volumes" / f"{case}.json").read_text())
        assert sidecar["status"] == "ok", sidecar
        volume = sitk.ReadImage(str(work / "results" / "volumes" / case / "structures.nrrd"))
        assert_lps_grid(sitk.ReadImage(str(work / "results" / "volumes" / case / "volume.nrrd")))
        channels, _ = read_structures(work / "results" / "volumes" / case / "structures.nrrd")
        structures = hanseg_yaml["convert"]["structures"]
        assert volume.GetNumberOfComponentsPerPixel() == len(structures) == 30
        np.testing.assert_array_equal(channels[structures.index("SpinalCord")], masks["SpinalCord"])
    assert "Nothing to be done" in snakemake(work, configs, *targets, "--dry-run")

    # A later file that gives only names adds them to hanseg.yaml's (convert reruns for them).
    names = work / "names.yaml"
    names.write_text(yaml.safe_dump({"convert": {"structure_names": {"SpinalCord": ["cord"]}}}))
    printed = snakemake(work, [*configs, names], *targets, "--dry-run", "--printshellcmds")
    assert structure_names_given(printed) == {**hanseg_yaml["convert"]["structure_names"], "SpinalCord": ["cord"]}
    assert planned_convert_cases(printed) == ["case_01", "case_02"]
    # Edited files (Snakemake compares a small input's checksum, so a bare touch would not count):
    # a mask of case_02 reruns case_02's convert only; the MR beside case_01's CT is no input of
    # convert; case_01's CT reruns case_01's.
    edited = mask_arrays(0)["SpinalCord"]
    edited[0] = 1
    sitk.WriteImage(on_grid(edited), str(set_1 / "case_02" / "case_02_OAR_SpinalCord.seg.nrrd"), useCompression=True)
    sitk.WriteImage(on_grid(ct_array(43)), str(set_1 / "case_01" / "case_01_IMG_MR_T1.nrrd"))
    assert planned_convert_cases(snakemake(work, configs, *targets, "--dry-run")) == ["case_02"]
    sitk.WriteImage(on_grid(ct_array(42)), str(set_1 / "case_01" / "case_01_IMG_CT.nrrd"))
    assert planned_convert_cases(snakemake(work, configs, *targets, "--dry-run")) == ["case_01", "case_02"]


def dicom_volume(testdata_dir: Path, folder: str, out: Path) -> sitk.Image:
    """The volume.nrrd convert's DICOM path makes of a real test-data folder."""
    done = convert_case("C", testdata_dir / "rt-utils" / folder, out / "C" / "volume.nrrd", None, out / "C.json",
                        labels="none", out_dir=out / "C")
    assert done["status"] == "ok", done
    return sitk.ReadImage(str(out / "C" / "volume.nrrd"))


def convert_file(ct_file: Path, out: Path) -> dict:
    return convert_case("C", "", out / "C" / "volume.nrrd", None, out / "C.json", labels="none", out_dir=out / "C",
                        ct_file=ct_file, ct_rounding_tolerance_hu=TOLERANCE_HU)


@pytest.mark.parametrize("name", ["case_IMG_CT.nrrd", "image.nii.gz"])
def test_a_real_ct_as_a_volume_file_converts_as_its_dicom_does(testdata_dir, tmp_path, name):
    """rt-utils' mock_data (a real CT, two 512 x 512 slices) through convert's DICOM path, its
    volume.nrrd saved as a release would ship it, then through the volume-file path: the same HU
    and grid (NIfTI: to its float32 affine)."""
    from_dicom = dicom_volume(testdata_dir, "mock_data", tmp_path / "dicom")
    sitk.WriteImage(from_dicom, str(tmp_path / name))
    done = convert_file(tmp_path / name, tmp_path / "file")
    assert done["status"] == "ok", done
    from_file = sitk.ReadImage(str(tmp_path / "file" / "C" / "volume.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(from_file), sitk.GetArrayViewFromImage(from_dicom))
    atol = 1e-4 if name.endswith(".nii.gz") else 1e-12
    assert from_file.GetSize() == from_dicom.GetSize()
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(from_file, what)(), getattr(from_dicom, what)(), rtol=0, atol=atol)


def test_a_real_series_that_is_not_hu_is_excluded_as_a_volume_file(testdata_dir, tmp_path):
    """rt-utils' oriented_data is labelled CT, but its values (slope 0.001) span about +-10: saved as
    NIfTI it has no air, and the volume-file path says so (DICOM's rescale cannot be checked there)."""
    sitk.WriteImage(dicom_volume(testdata_dir, "oriented_data", tmp_path / "dicom"), str(tmp_path / "image.nii.gz"))
    done = convert_file(tmp_path / "image.nii.gz", tmp_path / "file")
    assert done["status"] == "excluded" and "no voxel at air's HU" in done["reason"]
