"""The compiled header index: the header facts of plain, uncompressed single-frame DICOM images read
by GDCM's Scanner (C++), so that indexing and reading a CT series needs neither pydicom's import
(0.15-0.25 s) nor its pure-Python parse of every file (~2.5 ms a file).

:func:`scan_headers` reads the tags :mod:`hnct.dicomio`'s index and pixel read use from every file
at once and keeps a file only when these headers say exactly what pydicom would: a native transfer
syntax (explicit or implicit VR little endian), a classic single-frame image (no NumberOfFrames),
16 bits allocated, one sample, no Modality LUT, a rescale that :func:`hnct.dicomio._rescale_to_hu`
treats alike either way, text in ASCII under a character set that reads ASCII as ASCII, the
preamble's 'DICM', and the pixel data verified to be the file's last element (its element header
found right before the expected number of bytes at the end of the file), so that the stored
values are read straight from their offset. Every other file (compressed, multi-frame or with
NumberOfFrames at all, SEG, RTSTRUCT, non-DICOM, anything these checks cannot vouch for) is listed
with the reason and read by pydicom, as before. The values (text as GDCM gives the
element's bytes, stripped as :func:`hnct.dicomio._ascii` and pydicom's text conversion strip
them) are the ones pydicom's path gives: tests/test_fast_index.py compares both indexes field by
field.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

# DICOM keyword -> (group, element) of every tag read here (pydicom's data dictionary is not imported).
TAGS = {
    "TransferSyntaxUID": (0x0002, 0x0010),
    "SpecificCharacterSet": (0x0008, 0x0005),
    "ImageType": (0x0008, 0x0008),
    "SOPInstanceUID": (0x0008, 0x0018),
    "Modality": (0x0008, 0x0060),
    "Manufacturer": (0x0008, 0x0070),
    "SeriesDescription": (0x0008, 0x103E),
    "ManufacturerModelName": (0x0008, 0x1090),
    "PatientID": (0x0010, 0x0020),
    "GantryDetectorTilt": (0x0018, 0x1120),
    "ConvolutionKernel": (0x0018, 0x1210),
    "StudyInstanceUID": (0x0020, 0x000D),
    "SeriesInstanceUID": (0x0020, 0x000E),
    "SeriesNumber": (0x0020, 0x0011),
    "AcquisitionNumber": (0x0020, 0x0012),
    "InstanceNumber": (0x0020, 0x0013),
    "ImagePositionPatient": (0x0020, 0x0032),
    "ImageOrientationPatient": (0x0020, 0x0037),
    "FrameOfReferenceUID": (0x0020, 0x0052),
    "SamplesPerPixel": (0x0028, 0x0002),
    "NumberOfFrames": (0x0028, 0x0008),
    "Rows": (0x0028, 0x0010),
    "Columns": (0x0028, 0x0011),
    "PixelSpacing": (0x0028, 0x0030),
    "BitsAllocated": (0x0028, 0x0100),
    "BitsStored": (0x0028, 0x0101),
    "PixelRepresentation": (0x0028, 0x0103),
    "RescaleIntercept": (0x0028, 0x1052),
    "RescaleSlope": (0x0028, 0x1053),
    "ModalityLUTSequence": (0x0028, 0x3000),
}
# Single-valued US elements (GDCM gives them as decimal text).
UNSIGNED = ("SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")
# Present (even empty) means a file this module does not read: pydicom's path handles it. NumberOfFrames
# (even 1) is in the Multi-frame Module that every IOD with functional groups (enhanced CT, SEG)
# requires: without it a file is a classic single-frame image, and the scanner stops after group
# 0028 instead of reading on to the functional groups (5200,xxxx) (a third of its time).
ABSENT = ("ModalityLUTSequence", "NumberOfFrames")
NATIVE_SYNTAXES = {"1.2.840.10008.1.2.1": "Explicit VR Little Endian", "1.2.840.10008.1.2": "Implicit VR Little Endian"}
# Character sets under which pydicom decodes printable ASCII bytes to the same text (the default
# repertoire, the single-byte ISO 8859 / TIS / KOI sets and UTF-8); anything else goes to pydicom.
ASCII_CHARSETS = ("", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126",
                  "ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 203",
                  "ISO_IR 192")
PIXEL_DATA_HEADER = b"\xe0\x7f\x10\x00"  # tag (7FE0,0010), little endian
# python-gdcm and SimpleITK each carry their own build of GDCM. Once SimpleITK's is loaded after
# python-gdcm's, GDCM's Scanner crashes the process (segmentation fault; python-gdcm 3.2.6,
# SimpleITK 2.5.7); SimpleITK loaded first is safe, and SimpleITK works either way. The order is
# the order of the two extension modules in sys.modules (a dict: insertion order).
GDCM_EXTENSION, SIMPLEITK_EXTENSION = "_gdcm._gdcmswig", "SimpleITK._SimpleITK"


class ScannedHeader:
    """One file's header facts from GDCM, as hnct.dicomio's accessors (``_ascii``, ``_uint``,
    ``_series_text``; ``_number`` through ``_ascii``) read them from a pydicom dataset, and where its
    stored pixel values lie (``pixel_offset``, bytes from the start of the file)."""

    def __init__(self, path: str, values: dict[str, str | None], pixel_offset: int):
        self.filename = path
        self._values = values
        self.pixel_offset = pixel_offset

    def __contains__(self, keyword: str) -> bool:
        return self._values.get(keyword) is not None

    def ascii(self, keyword: str) -> str:
        """As :func:`hnct.dicomio._ascii`: the text, stripped of spaces and NULs at both ends."""
        value = self._values.get(keyword)
        return "" if value is None else value.strip(" \0")

    def text(self, keyword: str) -> str:
        """As pydicom's text conversion (then ``_text``) of a text element (LO, SH) that is ASCII
        under an ASCII-compatible character set: each value stripped of trailing NULs and spaces."""
        value = self._values.get(keyword)
        return "" if value is None else "\\".join(v.rstrip("\0 ") for v in value.split("\\"))

    def uint(self, keyword: str) -> int | None:
        text = self.ascii(keyword)
        return int(text) if text else None

    @property
    def transfer_syntax(self) -> str:
        return self.ascii("TransferSyntaxUID")


def scanner_usable() -> bool:
    """Whether GDCM's Scanner can run in this process: SimpleITK's extension not loaded, or loaded
    before python-gdcm's (see :data:`GDCM_EXTENSION`)."""
    if GDCM_EXTENSION not in sys.modules or SIMPLEITK_EXTENSION not in sys.modules:
        return True
    loaded = list(sys.modules)
    return loaded.index(SIMPLEITK_EXTENSION) < loaded.index(GDCM_EXTENSION)


def _refusal(values: dict[str, str | None]) -> str:
    """Why GDCM's values for a file cannot stand in for pydicom's ('' when they can, pixel data aside)."""
    syntax = (values["TransferSyntaxUID"] or "").strip(" \0")
    if syntax not in NATIVE_SYNTAXES:
        return f"transfer syntax {syntax or '(none)'} is not native"
    present = [k for k in ABSENT if values[k] is not None]
    if present:
        return f"has {', '.join(present)}"
    if any(v is not None and (not v.isascii() or "\x1b" in v) for v in values.values()):
        return "non-ASCII text"
    charset = (values["SpecificCharacterSet"] or "").strip(" \0")
    if charset not in ASCII_CHARSETS:
        return f"SpecificCharacterSet {charset}"
    unsigned = {k: (values[k] or "").strip(" \0") for k in UNSIGNED}
    if not all(v == "" or v.isdigit() for v in unsigned.values()):
        return "an unsigned element is not one number"
    if unsigned["BitsAllocated"] != "16" or unsigned["SamplesPerPixel"] not in ("", "1") \
            or unsigned["PixelRepresentation"] not in ("0", "1") or not 1 <= int(unsigned["BitsStored"] or 16) <= 16:
        return "not 16-bit single-sample pixel data"
    if not (int(unsigned["Rows"] or 0) and int(unsigned["Columns"] or 0)):
        return "no Rows / Columns"
    rescale = [(values[k] or "").strip(" \0") for k in ("RescaleSlope", "RescaleIntercept")]
    try:
        slope, intercept = (float(rescale[0]) if rescale[0] else 1.0) or 1.0, float(rescale[1] or 0.0) or 0.0
    except ValueError:
        return "RescaleSlope / RescaleIntercept not one number"
    # _rescale_to_hu adds an integer intercept itself; otherwise it calls pydicom's apply_rescale,
    # which rescales only when both elements are present.
    if not (slope == 1.0 and intercept.is_integer()) and not all(values[k] is not None for k in
                                                                 ("RescaleSlope", "RescaleIntercept")):
        return "rescale left to pydicom"
    return ""


def _pixel_offset(path: str, values: dict[str, str | None]) -> int | None:
    """Offset of the stored values when the pixel data element (its header just before them: tag,
    VR OW/OB and length for explicit VR, tag and length for implicit) ends the file, else None;
    None too for a file without the 128-byte preamble and 'DICM' (GDCM reads those, pydicom
    refuses them as not DICOM: pydicom's path decides)."""
    n_bytes = int(values["Rows"]) * int(values["Columns"]) * 2
    explicit = values["TransferSyntaxUID"].strip(" \0") == "1.2.840.10008.1.2.1"
    length = n_bytes.to_bytes(4, "little")
    head = 12 if explicit else 8
    try:
        offset = os.path.getsize(path) - n_bytes
        if offset < head:
            return None
        with open(path, "rb") as fh:
            if fh.read(132)[128:] != b"DICM":
                return None
            fh.seek(offset - head)
            found = fh.read(head)
    except OSError:
        return None
    if explicit:
        ok = found[:4] == PIXEL_DATA_HEADER and found[4:6] in (b"OW", b"OB") and found[6:] == b"\0\0" + length
    else:
        ok = found == PIXEL_DATA_HEADER + length
    return offset if ok else None


def scan_headers(paths: Iterable[str | os.PathLike]) -> tuple[dict[str, ScannedHeader], dict[str, str]]:
    """GDCM's header facts of the files it can vouch for, and the reason for every other file.

    Returns ({path: ScannedHeader}, {path: reason}); paths as ``str(path)``.
    """
    files = [str(p) for p in paths]
    if not files:
        return {}, {}
    if not scanner_usable():
        return {}, {file: "GDCM's scanner cannot run once SimpleITK is loaded after python-gdcm" for file in files}
    import gdcm

    scanner = gdcm.Scanner()
    tags = {keyword: gdcm.Tag(*tag) for keyword, tag in TAGS.items()}
    for tag in tags.values():
        scanner.AddTag(tag)
    names = gdcm.FilenamesType()
    for file in files:
        names.append(file)
    headers: dict[str, ScannedHeader] = {}
    refused: dict[str, str] = {}
    if not scanner.Scan(names):
        return {}, {file: "GDCM's scanner failed" for file in files}
    for file in files:
        if not scanner.IsKey(file):
            refused[file] = "not read by GDCM"
            continue
        values = {keyword: scanner.GetValue(file, tag) for keyword, tag in tags.items()}
        reason = _refusal(values)
        offset = None if reason else _pixel_offset(file, values)
        if offset is None:
            refused[file] = reason or "no DICM prefix, or pixel data is not the last element where expected"
            continue
        headers[file] = ScannedHeader(file, values, offset)
    return headers, refused
