"""hnct.slices: windowed axial slices round-trip exactly (NPZ), within a grey level (JPG), with a true index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from hnct import slices
from hnct.common import excluded_sidecar, ok_sidecar, read_json, write_json

LABELS = {"1": "Larynx", "2": "GTVp", "3": "GTVn"}


def make_crop(tmp_path: Path, case="CASE-1", with_label=True, direction=None, spacing=(1.0, 1.0, 1.0)):
    """A crop-stage output: CT-like HU (air, fat, soft tissue, bone, noise) + label map, and its sidecar."""
    rng = np.random.default_rng(3)
    shape = (12, 48, 40)  # z, y, x
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    r = np.hypot(y - 24, x - 20)
    hu = np.where(r < 18, 40.0, -1000.0)
    hu = np.where((r > 12) & (r < 14), 700.0, hu)  # cartilage/bone ring, above the window
    hu = np.where((r < 5), -100.0, hu)  # fat
    hu = hu + rng.normal(0, 15, shape)
    hu = np.rint(hu).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[2:10, 10:38, 6:34] = 1  # larynx
    label[4:7, 20:28, 15:22] = 2  # GTVp
    label[6:9, 30:34, 25:30] = 3  # GTVn on slices 6, 7, 8 (overlaps nothing else there but larynx)
    ct = sitk.GetImageFromArray(hu)
    ct.SetSpacing(spacing)
    ct.SetOrigin((-12.5, 30.25, -401.0))
    if direction is not None:
        ct.SetDirection(direction)
    lab = sitk.GetImageFromArray(label)
    lab.CopyInformation(ct)
    out = tmp_path / "crops"
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(ct, str(out / f"{case}.nrrd"), useCompression=False)
    label_path = None
    if with_label:
        sitk.WriteImage(lab, str(out / f"{case}_label.nrrd"), useCompression=False)
        label_path = str(out / f"{case}_label.nrrd")
    sidecar = out / f"{case}.json"
    write_json(sidecar, ok_sidecar(case, "crop", volume=str(out / f"{case}.nrrd"), label=label_path,
                                   labels=LABELS, spacing=[1.0, 1.0, 1.0]))
    return sidecar, hu, label, ct


def run(tmp_path: Path, source: Path, case="CASE-1", **kwargs):
    return slices.export_slices(
        case, source, tmp_path / "slices" / f"{case}.json", tmp_path / "slices" / f"{case}.tsv",
        tmp_path / "slices" / case, **kwargs,
    )


def test_window_functions_match_the_contract():
    hu = np.array([-1024, -161, -160, -159, 0, 40, 239, 240, 241, 3000], dtype=np.int16)
    assert slices.window_hu(hu, 40, 400).tolist() == [-160, -160, -160, -159, 0, 40, 239, 240, 240, 240]
    expected = np.rint((np.clip(hu.astype(float), -160, 240) + 160) / 400 * 255).astype(np.uint8)
    assert slices.window_uint8(hu, 40, 400).tolist() == expected.tolist()
    assert slices.window_uint8(hu, 40, 400)[[0, -1]].tolist() == [0, 255]
    with pytest.raises(ValueError):
        slices.window_bounds(40, 0)


@pytest.mark.parametrize("geometry", [
    {},  # a crop: 1 mm, identity direction
    # a whole volume (slices.source: volume): anisotropic, rotated in-plane, feet first
    {"spacing": (0.7, 0.8, 2.5), "direction": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)},
])
def test_slices_round_trip_and_index(tmp_path, geometry):
    source, hu, label, ct = make_crop(tmp_path, **geometry)
    sidecar = run(tmp_path, source, window_level=40, window_width=400, structure="GTVn")
    assert sidecar["status"] == "ok", sidecar
    index = pd.read_csv(tmp_path / "slices" / "CASE-1.tsv", sep="\t", keep_default_na=False)
    assert len(index) == hu.shape[0] == sidecar["n_slices"]
    assert list(index.columns) == ["case", "slice", "z_mm", "npz", "jpg", "overlay",
                                   "n_Larynx", "n_GTVp", "n_GTVn", "positive"]
    expected_positive = (label == 3).any(axis=(1, 2)).astype(int)
    assert index["positive"].tolist() == expected_positive.tolist() == [0] * 6 + [1] * 3 + [0] * 3
    assert sidecar["n_positive"] == 3
    for value, name in LABELS.items():
        assert index[f"n_{name}"].tolist() == (label == int(value)).sum(axis=(1, 2)).tolist()

    low, high = -160, 240
    worst_jpg = 0
    for k, row in index.iterrows():
        with np.load(row["npz"]) as npz:
            assert npz["image"].dtype == np.int16 and npz["mask"].dtype == np.uint8
            # Exactly the windowed HU of the source volume, and the label map's values.
            assert np.array_equal(npz["image"], np.clip(hu[k], low, high))
            assert np.array_equal(npz["mask"], label[k])
            assert npz["spacing"].tolist() == list(ct.GetSpacing()[:2])
            assert npz["origin"].tolist() == pytest.approx(list(ct.TransformIndexToPhysicalPoint((0, 0, k))))
            z_step = ct.GetSpacing()[2] * ct.GetDirection()[8]
            assert float(npz["z_mm"]) == pytest.approx(-401.0 + k * z_step) == pytest.approx(row["z_mm"])
            assert int(npz["slice_index"]) == k and npz["window"].tolist() == [40.0, 400.0]
            assert npz["direction"].tolist() == list(ct.GetDirection())
        rescale = np.rint((np.clip(hu[k].astype(float), low, high) - low) / 400 * 255)
        jpg = np.asarray(Image.open(row["jpg"]))
        assert jpg.dtype == np.uint8 and jpg.shape == hu[k].shape
        worst_jpg = max(worst_jpg, int(np.abs(jpg.astype(int) - rescale).max()))
        # Overlays exist for the labelled slices only, RGB, with the outline drawn.
        if label[k].any():
            overlay = np.asarray(Image.open(row["overlay"]))
            assert overlay.shape == hu[k].shape + (3,)
            assert np.abs(overlay[..., 0].astype(int) - overlay[..., 1]).max() > 100
        else:
            assert row["overlay"] == ""
    assert worst_jpg <= 1


def test_rerun_replaces_old_slices_and_flags(tmp_path):
    source, hu, label, ct = make_crop(tmp_path)
    stale = tmp_path / "slices" / "CASE-1" / "CASE-1_0099.npz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    sidecar = run(tmp_path, source, structure="Larynx", jpg=False, overlay=False)
    assert sidecar["n_positive"] == 8 and not stale.exists()
    files = sorted(p.name for p in (tmp_path / "slices" / "CASE-1").iterdir())
    assert files == [f"CASE-1_{k:04d}.npz" for k in range(hu.shape[0])]


def test_no_label_map_gives_no_positive_slices(tmp_path):
    source, hu, label, ct = make_crop(tmp_path, with_label=False)
    sidecar = run(tmp_path, source, overlay=True)
    assert sidecar["status"] == "ok" and sidecar["n_positive"] == 0
    with np.load(tmp_path / "slices" / "CASE-1" / "CASE-1_0003.npz") as npz:
        assert not npz["mask"].any()


def test_excluded_upstream_gives_excluded_sidecar_and_no_files(tmp_path):
    source = tmp_path / "crops" / "CASE-1.json"
    write_json(source, excluded_sidecar("CASE-1", "crop", "boxes.tsv", "crop box wholly outside the scan",
                                        excluded_at="crop"))
    stale = tmp_path / "slices" / "CASE-1" / "CASE-1_0000.npz"  # from a run before the case broke
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    sidecar = run(tmp_path, source)
    assert sidecar["status"] == "excluded" and sidecar["excluded_at"] == "crop"
    assert read_json(tmp_path / "slices" / "CASE-1.json")["status"] == "excluded"
    assert not (tmp_path / "slices" / "CASE-1.tsv").exists()
    # The case's declared folder is there (the job has all its outputs) and empty.
    assert (tmp_path / "slices" / "CASE-1").is_dir()
    assert list((tmp_path / "slices" / "CASE-1").iterdir()) == []


def test_missing_volume_is_excluded(tmp_path):
    source, *_ = make_crop(tmp_path)
    (tmp_path / "crops" / "CASE-1.nrrd").unlink()
    sidecar = run(tmp_path, source)
    assert sidecar["status"] == "excluded" and "volume file is missing" in sidecar["reason"]


def test_cli(tmp_path):
    source, hu, *_ = make_crop(tmp_path)
    out = tmp_path / "slices"
    rc = slices.main(["--case", "CASE-1", "--source-sidecar", str(source), "--source", "crop",
                      "--sidecar", str(out / "CASE-1.json"), "--index", str(out / "CASE-1.tsv"),
                      "--out-dir", str(out / "CASE-1"), "--window-level", "50", "--window-width", "350",
                      "--structure", "GTVn", "--no-overlay"])
    assert rc == 0
    sidecar = read_json(out / "CASE-1.json")
    assert sidecar["window_level"] == 50 and sidecar["window_width"] == 350 and sidecar["overlay"] is False
    with np.load(out / "CASE-1" / "CASE-1_0000.npz") as npz:
        assert np.array_equal(npz["image"], np.clip(hu[0], -125, 225))


def test_jpg_within_a_grey_level_on_real_ct(testdata_dir, tmp_path):
    """LUNG1-001 (real CT, 512 x 512): JPG vs 8-bit rescale, measured, not assumed.

    Baseline JPEG at quality 100 still rounds in its integer DCT: ~1 pixel per million is 2 off.
    """
    reader = sitk.ImageSeriesReader()
    series = testdata_dir / "nsclc-radiomics-LUNG1-001" / "LUNG1-001" / "image"
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    hu = sitk.GetArrayFromImage(reader.Execute())[::9].astype(np.int16)
    grey = slices.window_uint8(hu, 40, 400)
    assert np.array_equal(grey, np.rint((np.clip(hu.astype(float), -160, 240) + 160) / 400 * 255))
    off_by_more = 0
    for k in range(hu.shape[0]):
        path = tmp_path / f"{k}.jpg"
        slices.write_jpg(path, grey[k])
        error = np.abs(np.asarray(Image.open(path)).astype(int) - grey[k])
        assert error.max() <= 2
        off_by_more += int((error > 1).sum())
    assert off_by_more <= 1e-5 * grey.size
