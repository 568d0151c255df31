"""Real-world DICOM variants convert to the same HU as their plain twin: compressed transfer
syntaxes, enhanced multi-frame CT, series without a SeriesInstanceUID; folders without a usable
series say what they hold. Series are written here with pydicom (and GDCM/Pillow for the JPEG
syntaxes pydicom cannot encode)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.encaps import encapsulate
from pydicom.uid import (JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
                         JPEGLSNearLossless, RLELossless, UID, generate_uid)

from hnct import dicomio
from hnct.common import read_sidecar
from hnct.convert import convert_case
from test_dicomio import COLS, ROWS, write_ct_series

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def convert(folder: Path, out: Path, **kw) -> tuple[dict, np.ndarray | None, sitk.Image | None]:
    sidecar = convert_case("C", folder, out / "C.nrrd", None, out / "C.json", labels="none", **kw)
    assert read_sidecar(out / "C.json")["status"] == sidecar["status"]
    if sidecar["status"] != "ok":
        return sidecar, None, None
    image = sitk.ReadImage(str(out / "C.nrrd"))
    return sidecar, sitk.GetArrayFromImage(image), image


def _gdcm_jpeg_lossless(ds: pydicom.Dataset) -> None:
    """Replace the pixel data by GDCM's JPEG Lossless (process 14, SV1) encoding (via SimpleITK)."""
    tmp = Path(ds.filename).with_suffix(".gdcm")
    image = sitk.GetImageFromArray(ds.pixel_array[None].astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(tmp))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(image)
    encoded = pydicom.dcmread(tmp)
    tmp.unlink()
    assert encoded.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    ds.PixelData = encoded.PixelData
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


def _grow(ds: pydicom.Dataset, size: int = 64) -> None:
    """Pad a slice to size x size (edge values): JPEG 2000's six wavelet levels need 32+ pixels."""
    stored = np.pad(ds.pixel_array, ((0, size - ds.Rows), (0, size - ds.Columns)), mode="edge")
    ds.Rows, ds.Columns = size, size
    ds.PixelData = stored.tobytes()


def _to_8bit(ds: pydicom.Dataset) -> None:
    """An 8-bit twin of a slice (stored values clipped to 0..255), for JPEG baseline."""
    stored = np.clip(ds.pixel_array.astype(np.int32), 0, 255).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = stored.tobytes()


def _pillow_jpeg_baseline(ds: pydicom.Dataset) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8)).save(buffer, "JPEG", quality=95)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


def rewrite(folder: Path, change) -> None:
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.filename = str(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


# (name, how to encode a slice, the codec's error bound: largest HU error, root mean square HU error)
CODECS = [
    ("RLE Lossless", lambda ds: ds.compress(RLELossless), 0, 0),
    ("JPEG-LS Lossless", lambda ds: ds.compress(JPEGLSLossless), 0, 0),
    ("JPEG-LS near-lossless (error 2)", lambda ds: ds.compress(JPEGLSNearLossless, jls_error=2), 2, 2),
    ("JPEG 2000 Lossless", lambda ds: ds.compress(JPEG2000Lossless), 0, 0),
    # PSNR 90 dB of the 16-bit range: RMS error 65535 / 10^(90/20) = 2.1 HU (no bound on one voxel).
    ("JPEG 2000 lossy (PSNR 90)", lambda ds: ds.compress(JPEG2000, j2k_psnr=[90]), None, 65535 / 10 ** 4.5),
    ("JPEG Lossless SV1", _gdcm_jpeg_lossless, 0, 0),
]


@pytest.mark.parametrize("name,encode,max_error,max_rms", CODECS, ids=[c[0] for c in CODECS])
def test_compressed_series_convert_to_the_hu_of_their_uncompressed_twin(tmp_path, name, encode, max_error, max_rms):
    for kind in ("plain", "packed"):
        write_ct_series(tmp_path / kind, 4)
        rewrite(tmp_path / kind, _grow)
    rewrite(tmp_path / "packed", encode)
    syntax = pydicom.dcmread(next((tmp_path / "packed").glob("*.dcm"))).file_meta.TransferSyntaxUID
    assert syntax.is_compressed, name
    _, plain, _ = convert(tmp_path / "plain", tmp_path / "out-plain")
    sidecar, packed, _ = convert(tmp_path / "packed", tmp_path / "out-packed")
    assert sidecar["status"] == "ok", sidecar.get("reason")
    error = packed.astype(float) - plain.astype(float)
    if max_error is not None:
        assert np.abs(error).max() <= max_error, f"{name}: largest HU error {np.abs(error).max()}"
    # +0.5: the HU are rounded to integers after decoding.
    assert np.sqrt(np.mean(error ** 2)) <= max_rms + 0.5, f"{name}: RMS HU error {np.sqrt(np.mean(error ** 2))}"


def test_jpeg_baseline_8bit_series_converts_within_the_codec_error(tmp_path):
    for kind in ("plain", "packed"):
        write_ct_series(tmp_path / kind, 4)
        rewrite(tmp_path / kind, _to_8bit)
    rewrite(tmp_path / "packed", _pillow_jpeg_baseline)
    _, plain, _ = convert(tmp_path / "plain", tmp_path / "out-plain")
    sidecar, packed, _ = convert(tmp_path / "packed", tmp_path / "out-packed")
    assert sidecar["status"] == "ok", sidecar.get("reason")
    assert np.abs(packed.astype(int) - plain.astype(int)).max() <= 8  # quality 95 on a 0..255 range


def test_undecodable_transfer_syntax_is_an_exclusion_naming_it(tmp_path):
    write_ct_series(tmp_path / "dicom", 3)

    def mpeg2(ds):
        ds.PixelData = encapsulate([b"\0\0\1\xb3" + b"\0" * 60])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 Main Profile

    rewrite(tmp_path / "dicom", mpeg2)
    sidecar, _, _ = convert(tmp_path / "dicom", tmp_path / "out")
    assert sidecar["status"] == "excluded"
    assert "cannot decode pixel data of transfer syntax MPEG2" in sidecar["reason"], sidecar["reason"]
    assert "1.2.840.10008.1.2.4.100" in sidecar["reason"] and sidecar["file"].endswith(".dcm")
    assert not (tmp_path / "out" / "C.nrrd").exists()


def write_enhanced_ct(single_frame_dir: Path, path: Path, frame_order) -> None:
    """One enhanced multi-frame CT file holding the slices of a single-frame series, in
    ``frame_order`` (positions and spacing in the functional groups, not in the top level)."""
    slices = sorted((pydicom.dcmread(p) for p in single_frame_dir.glob("*.dcm")),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    first = slices[0]
    ds = pydicom.dcmread(single_frame_dir / Path(first.filename).name)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleSlope", "RescaleIntercept", "InstanceNumber"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = len(slices)
    shared = pydicom.Dataset()
    measures, plane, value = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    plane.ImageOrientationPatient = first.ImageOrientationPatient
    value.RescaleSlope, value.RescaleIntercept, value.RescaleType = "1", "-1024", "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [plane]
    shared.PixelValueTransformationSequence = [value]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = []
    for k in frame_order:
        item, position = pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = slices[k].ImagePositionPatient
        item.PlanePositionSequence = [position]
        ds.PerFrameFunctionalGroupsSequence.append(item)
    ds.PixelData = b"".join(slices[k].PixelData for k in frame_order)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_multiframe_ct_converts_like_its_single_frame_twin(tmp_path):
    write_ct_series(tmp_path / "single", 5, slice_mm=2.5)
    write_enhanced_ct(tmp_path / "single", tmp_path / "multi" / "enhanced.dcm", frame_order=[3, 0, 4, 1, 2])
    _, plain, plain_image = convert(tmp_path / "single", tmp_path / "out-single")
    sidecar, multi, multi_image = convert(tmp_path / "multi", tmp_path / "out-multi")
    assert sidecar["status"] == "ok", sidecar.get("reason")
    assert sidecar["n_files"] == 1 and multi_image.GetSize() == plain_image.GetSize() == (COLS, ROWS, 5)
    assert np.array_equal(multi, plain)
    assert np.allclose(multi_image.GetOrigin(), plain_image.GetOrigin())
    assert np.allclose(multi_image.GetSpacing(), plain_image.GetSpacing())
    assert list(plain[:, 0, 0]) == [0, 10, 20, 30, 40]


def _drop_series_uid(ds: pydicom.Dataset) -> None:
    ds.SeriesInstanceUID = ""


def test_series_without_series_uid_converts_grouped_by_header_facts(tmp_path):
    study = generate_uid()
    write_ct_series(tmp_path / "dicom" / "a", 3, study_uid=study)
    big = write_ct_series(tmp_path / "dicom" / "b", 5, study_uid=study)
    rewrite(tmp_path / "dicom" / "a", lambda ds: (_drop_series_uid(ds), setattr(ds, "SeriesNumber", 2)))
    rewrite(tmp_path / "dicom" / "b", lambda ds: (_drop_series_uid(ds), setattr(ds, "SeriesNumber", 3)))
    index = dicomio.index_series(tmp_path / "dicom")
    assert sorted(index["n_slices"]) == [3, 5] and set(index["series_uid"]) == {""}
    sidecar, hu, _ = convert(tmp_path / "dicom", tmp_path / "out")
    assert sidecar["status"] == "ok", sidecar.get("reason")
    assert sidecar["series_uid"] == "" and hu.shape[0] == 5
    identity = sidecar["series_identity"]
    assert identity["by"] == "header facts (no SeriesInstanceUID)"
    assert identity["facts"]["SeriesNumber"] == "3" and identity["facts"]["StudyInstanceUID"] == study
    assert sidecar["n_files"] == len(big["files"])


def test_folder_without_a_usable_series_says_what_it_found(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "README").write_text("also not DICOM")
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory (a DICOMDIR)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dicomdir = pydicom.dataset.FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    dicomdir.PatientID = "P1"
    dicomdir.save_as(folder / "DICOMDIR", enforce_file_format=True)
    sidecar, _, _ = convert(folder, tmp_path / "out")
    assert sidecar["status"] == "excluded"
    assert sidecar["reason"] == (f"no DICOM image series under {folder}: found 2 non-DICOM files, "
                                 "1 DICOM file without a series UID or modality")
    assert "unreadable" not in sidecar["reason"]
    (tmp_path / "empty").mkdir()
    sidecar, _, _ = convert(tmp_path / "empty", tmp_path / "out")
    assert sidecar["reason"] == f"no DICOM image series under {tmp_path / 'empty'} (no files)"
