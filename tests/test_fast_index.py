"""GDCM's compiled header index (hnct.gdcm_index) gives the index pydicom's path gives, field by
field, and the same HU; files it cannot vouch for are read by pydicom, each with its reason.

The comparisons run in a child process that imports hnct.dicomio alone: GDCM's scanner refuses to
run once SimpleITK (which the test modules import) is loaded after python-gdcm, so in the pytest
process the compiled index may be off (tests/conftest.py imports SimpleITK first so that it is not;
the guard is tested here too).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIXEL_OFFSET_REFUSAL = "no DICM prefix, or pixel data is not the last element where expected"


def _instances(row: dict) -> list[dict]:
    return [{k: v for k, v in inst.items() if k != "dataset"} for inst in row["instances"]]


def compare_indexes(folders: list[str]) -> dict:
    """For each folder: the fields where the compiled index differs from pydicom's (both with and
    without ``keep_datasets``), and for every CT series whether HU and geometry agree. Run in the
    child process (see the module docstring)."""
    import numpy as np

    from hnct import dicomio
    from hnct.common import InputError

    report: dict = {"mismatches": [], "read_by_pydicom": {}, "through_gdcm": {}, "volumes": 0}
    for folder in folders:
        for keep in (True, False):
            fast = dicomio.scan_series(folder, keep_datasets=keep)
            slow = dicomio.scan_series(folder, keep_datasets=keep, compiled=False)
            for what in ("unreadable", "skipped_summary"):
                if getattr(fast, what) != getattr(slow, what):
                    report["mismatches"].append([folder, what, repr(getattr(fast, what)), repr(getattr(slow, what))])
            if len(fast) != len(slow):
                report["mismatches"].append([folder, "series", len(fast), len(slow)])
            for row_fast, row_slow in zip(fast, slow):
                for field in dicomio.INDEX_COLUMNS:
                    got, want = row_fast[field], row_slow[field]
                    if field == "instances":
                        got, want = _instances(row_fast), _instances(row_slow)
                    if got != want or repr(got) != repr(want):  # repr: 1.0 vs 1, float bits
                        report["mismatches"].append([folder, row_slow["series_key"], field, repr(got), repr(want)])
            if keep:
                report["read_by_pydicom"][folder] = fast.read_by_pydicom
                report["through_gdcm"][folder] = sum(len(r["instances"]) for r in fast) - sum(
                    1 for r in fast for i in r["instances"] if i["file"] in fast.read_by_pydicom)
                for row_fast, row_slow in zip(fast, slow):
                    if row_slow["modality"] != "CT":
                        continue
                    results = []
                    for row in (row_fast, row_slow):
                        try:
                            hu, geometry = dicomio.read_ct_array("C", row)
                            geometry = {k: v for k, v in geometry.items() if k not in ("datasets", "resample")}
                            results.append((hu, json.dumps(geometry, sort_keys=True, default=str)))
                        except InputError as err:
                            results.append((None, str(err)))
                    (hu_fast, about_fast), (hu_slow, about_slow) = results
                    same_hu = (hu_fast is None and hu_slow is None) or (
                        hu_fast is not None and hu_slow is not None and hu_fast.dtype == hu_slow.dtype
                        and np.array_equal(hu_fast, hu_slow))
                    if not same_hu or about_fast != about_slow:
                        report["mismatches"].append([folder, row_slow["series_key"], "read_ct_array", about_fast,
                                                     about_slow])
                    report["volumes"] += hu_slow is not None
    report["pydicom_imported"] = "pydicom" in sys.modules
    return report


def run_child(code: str, *args: str) -> str:
    env = {"PYTHONPATH": f"{REPO / 'workflow'}:{REPO / 'tests'}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def compare_in_child(folders: list[Path]) -> dict:
    code = ("import json, sys\nfrom test_fast_index import compare_indexes\n"
            "print(json.dumps(compare_indexes(sys.argv[1:])))")
    return json.loads(run_child(code, *map(str, folders)))


def test_compiled_index_equals_pydicoms_on_every_series_of_the_test_data(testdata_dir):
    folders = sorted({p.parent for p in testdata_dir.rglob("*") if p.is_file() and p.name not in
                      ("LICENSE", "README.upstream.md")})
    lung1 = testdata_dir / "nsclc-radiomics-LUNG1-001" / "LUNG1-001" / "image"
    assert lung1 in folders and len(folders) >= 5
    report = compare_in_child(folders)
    assert report["mismatches"] == []
    assert report["volumes"] >= 3
    # The real CT goes through GDCM, file by file; SEG (multi-frame) and RTSTRUCT (no pixel data) through pydicom.
    assert report["through_gdcm"][str(lung1)] == 134 and report["read_by_pydicom"][str(lung1)] == {}
    refused = {Path(f).name: why for folder, files in report["read_by_pydicom"].items() for f, why in files.items()}
    assert refused["seg_image_ct_binary.dcm"] == "has NumberOfFrames"
    assert refused["rt.dcm"] == refused["1-1.dcm"] == "not 16-bit single-sample pixel data"
    assert refused["LICENSE"] == "not read by GDCM"


def test_compiled_index_equals_pydicoms_on_generated_series(tmp_path):
    """Tilted (three orientations), uneven, UID-less, implicit VR / 12-bit / fractional rescale,
    and files GDCM's index must leave to pydicom: text in a non-ASCII character set, a Modality
    LUT, an element after the pixel data (the offset check fails), no preamble, a compressed slice, NumberOfFrames
    (an enhanced multi-frame CT; a classic slice saying 1). The all-GDCM series are read into the
    volume's own memory: 10- and 12-bit values with garbage high bits, and HU clipped to int16."""
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian, RLELossless

    from test_dicom_formats import _drop_series_uid, rewrite, write_enhanced_ct
    from test_dicomio import write_ct_series, write_tilted_series

    folders = {}
    for tilt in (10, 18, -25):
        folders[f"tilt{tilt}"] = tmp_path / f"tilt{tilt}"
        write_tilted_series(folders[f"tilt{tilt}"], tilt, n_slices=5)
    folders["oblique-tilt"] = tmp_path / "oblique-tilt"
    about_y = (0.96592583, 0.0, -0.25881905, 0.0, 1.0, 0.0)  # tilted 15 degrees about y
    for k in range(4):
        write_ct_series(folders["oblique-tilt"], 1, orientation=about_y, series_uid="1.2.9", study_uid="1.2.8",
                        frame_uid="1.2.7", origin=(0.0, 0.0, 2.5 * k), names=lambda _k, k=k: f"{k}.dcm")
    folders["uneven"] = tmp_path / "uneven"
    write_ct_series(folders["uneven"], 7, skip=(3,))
    folders["no-uid"] = tmp_path / "no-uid"
    write_ct_series(folders["no-uid"] / "a", 3, study_uid="1.2.3")
    write_ct_series(folders["no-uid"] / "b", 4, study_uid="1.2.3")
    rewrite(folders["no-uid"] / "a", lambda ds: (_drop_series_uid(ds), setattr(ds, "SeriesNumber", 2)))
    rewrite(folders["no-uid"] / "b", lambda ds: (_drop_series_uid(ds), setattr(ds, "SeriesNumber", 3)))

    # Read into the volume itself: high bits beyond BitsStored (signed: sign-extended; unsigned:
    # masked) and unsigned values whose HU leaves int16 (clipped).
    import numpy as np

    def stored_bits(bits_stored: int, signed: int, fill: int):
        def change(ds):
            raw = np.frombuffer(ds.PixelData, dtype="<u2") | np.uint16(fill)
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, signed
            ds.PixelData = raw.astype("<u2").tobytes()
        return change

    for name, change in (("12bit-signed", stored_bits(12, 1, 0xA000)), ("10bit-unsigned", stored_bits(10, 0, 0xF000)),
                         ("clipped", stored_bits(16, 0, 0xC000))):
        folders[name] = tmp_path / name
        write_ct_series(folders[name], 3)
        rewrite(folders[name], change)

    folders["enhanced"] = tmp_path / "enhanced"
    write_ct_series(tmp_path / "single", 4)
    write_enhanced_ct(tmp_path / "single", folders["enhanced"] / "enhanced.dcm", frame_order=[2, 0, 3, 1])

    folders["mixed"] = mixed = tmp_path / "mixed"
    ct = write_ct_series(mixed, 8, names=lambda k: f"{k}.dcm")
    files = ct["files"]

    def implicit_12bit_fractional(ds):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.BitsStored, ds.HighBit, ds.RescaleSlope, ds.RescaleIntercept = 12, 11, "0.5", "-1024.25"

    def latin1(ds):
        ds.SpecificCharacterSet, ds.SeriesDescription = "ISO_IR 100", "Kopf é"

    def modality_lut(ds):
        lut = pydicom.Dataset()
        lut.LUTDescriptor, lut.ModalityLUTType, lut.LUTData = [2, 0, 16], "HU", b"\x01\x00\x02\x00"
        ds.ModalityLUTSequence = [lut]

    def trailing_padding(ds):
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)  # Data Set Trailing Padding, after the pixel data

    changes = {1: implicit_12bit_fractional, 2: latin1, 3: modality_lut, 4: trailing_padding,
               5: lambda ds: ds.compress(RLELossless), 6: lambda ds: setattr(ds, "NumberOfFrames", 1)}
    for k, change in changes.items():
        ds = pydicom.dcmread(files[k])
        change(ds)
        ds.save_as(files[k], enforce_file_format=True)
    # No preamble and 'DICM': GDCM reads the rest, pydicom (without force) says it is not DICOM.
    files[7].write_bytes(files[7].read_bytes()[132:])
    report = compare_in_child(list(folders.values()))
    assert report["mismatches"] == []
    assert report["volumes"] == len(folders) + 1  # two UID-less series
    assert report["read_by_pydicom"][str(mixed)] == {
        str(files[2]): "non-ASCII text", str(files[3]): "has ModalityLUTSequence",
        str(files[4]): PIXEL_OFFSET_REFUSAL,
        str(files[5]): "transfer syntax 1.2.840.10008.1.2.5 is not native", str(files[6]): "has NumberOfFrames",
        str(files[7]): PIXEL_OFFSET_REFUSAL}
    assert report["through_gdcm"][str(mixed)] == 2  # the implicit VR, 12-bit, fractional rescale slice among them
    assert report["read_by_pydicom"][str(folders["enhanced"])] == {
        str(folders["enhanced"] / "enhanced.dcm"): "has NumberOfFrames"}
    assert all(report["read_by_pydicom"][str(f)] == {} for name, f in folders.items()
               if name not in ("mixed", "enhanced"))
    assert report["pydicom_imported"]  # the refused files


def test_plain_conversion_never_imports_pydicom(tmp_path):
    """A plain CT series converts with GDCM's index and numpy alone: pydicom is never imported."""
    from test_dicomio import write_ct_series

    write_ct_series(tmp_path / "dicom", 5)
    code = ("import sys\nfrom hnct.convert import main\n"
            "main(['--case', 'C', '--dicom-dir', sys.argv[1], '--volume', sys.argv[2] + '/v.nrrd', '--sidecar',"
            " sys.argv[2] + '/v.json', '--labels', 'none'])\n"
            "print(sorted(m for m in ('pydicom', 'SimpleITK', 'gdcm') if m in sys.modules))")
    assert run_child(code, str(tmp_path / "dicom"), str(tmp_path / "out")) == "['gdcm']"
    assert json.loads((tmp_path / "out" / "v.json").read_text())["status"] == "ok"


def test_scanner_is_refused_once_simpleitk_is_loaded_after_gdcm(tmp_path):
    """That order crashes GDCM's scanner: every file then goes through pydicom, with the reason,
    and the index is the same."""
    from test_dicomio import write_ct_series

    write_ct_series(tmp_path / "dicom", 3)
    code = ("import json, sys\nimport gdcm, SimpleITK\nfrom hnct import dicomio, gdcm_index\n"
            "index = dicomio.scan_series(sys.argv[1])\n"
            "print(json.dumps([gdcm_index.scanner_usable(), sorted(set(index.read_by_pydicom.values())),"
            " index[0]['n_slices']]))")
    usable, reasons, n_slices = json.loads(run_child(code, str(tmp_path / "dicom")))
    assert not usable and n_slices == 3
    assert reasons == ["GDCM's scanner cannot run once SimpleITK is loaded after python-gdcm"]


@pytest.mark.parametrize("first", ["SimpleITK", "gdcm"])
def test_scanner_order_check_reads_sys_modules(first):
    code = (f"import {first}\nimport {'gdcm' if first == 'SimpleITK' else 'SimpleITK'}\n"
            "from hnct import gdcm_index\nprint(gdcm_index.scanner_usable())")
    assert run_child(code) == str(first == "SimpleITK")
