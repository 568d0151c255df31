"""The one place hnct reads DICOM: index a folder, choose the CT series, read it, build label maps.

Coordinates are DICOM patient coordinates, LPS millimetres, throughout; SimpleITK images carry
origin (LPS mm of voxel (0,0,0)), spacing (mm, x = column, y = row, z = slice) and a direction
matrix whose columns are the row direction, the column direction and the slice normal taken
from ImageOrientationPatient.

Indexing (:func:`index_series`) reads headers only and trusts no folder or file names: every
file under the folder is tried; files that are not DICOM are listed in ``df.attrs["unreadable"]``.
A series is its SeriesInstanceUID, or, where that is empty (anonymised exports), the header facts
its files share (study, series number, frame of reference, orientation, acquisition number).
An enhanced multi-frame CT file is one slice per frame (positions from its functional groups).
Headers of plain uncompressed single-frame images come from GDCM's compiled scanner
(:mod:`hnct.gdcm_index`, the same values), every other file's from pydicom, which is imported
only then: a plain CT conversion never imports pydicom.

Choosing the CT series (:func:`choose_ct_series`), the rule recorded as ``series_choice``:

1. A series UID given by the cohort table wins; it must exist under the folder and be CT.
2. Otherwise candidates are the series with Modality CT that are not localizers (scouts):
   ImageType contains LOCALIZER, or the series has fewer than 2 slices while another CT series
   has more.
3. Among them, prefer series with a consistent header geometry (one ImageOrientationPatient,
   one PixelSpacing, one Rows x Columns), then the most slices, then the smallest
   SeriesInstanceUID (a deterministic tie break).

Reading the CT (:func:`read_ct`) sorts slices by their position along the slice normal
(never by file name or InstanceNumber) and refuses, with an :class:`~hnct.common.InputError`,
series that are not one volume: fewer than 2 slices, slices sharing a position, mixed
orientations / pixel spacings / matrix sizes, a step beyond ``max_slice_gap_mm`` in an uneven
series, and (with ``gantry_tilt`` exclude) gantry tilt beyond ``max_tilt_deg``. Gantry tilt is
the angle between the slice normal and the direction the slices are stacked in, found from
ImagePositionPatient and ImageOrientationPatient (the GantryDetectorTilt tag's sign differs
between vendors; it is only recorded). A tilted series (``gantry_tilt`` correct) or one whose
steps spread beyond ``max_spacing_spread`` is resampled onto an orthogonal equidistant grid
(:func:`slice_geometry` plans it, :func:`resample_slices` fills it): the slice plane's axes
and pixel lattice kept, the third axis along the normal, grown so no slice's field of view is
cut off, as dcm2niix's tilt correction. An oblique series whose slices are stacked along their
own normal is a regular volume and is read with its oblique direction matrix. Pixels are
decoded by pydicom (which checks the pixel data length, unlike SimpleITK's series reader;
compressed transfer syntaxes through its GDCM, pyjpegls and pylibjpeg-openjpeg plugins), rescaled
to HU, rounded and clipped to int16; the image geometry is set from the validated headers.

Labels: one binary channel per structure, a (C, z, y, x) uint8 array in the order of
``structures`` (:func:`hnct.structures.paint_label_map` makes the uint8 label map of them, value =
index + 1, later structures painted over earlier). ROI names, segment labels and mask file names
are matched to structures by :func:`hnct.structures.harmonise` (exact, case-insensitive, ignoring
punctuation and spaces (``GTV-1`` = ``gtv_1`` = ``GTV 1``), then the ``structure_names`` patterns);
every report lists ``unmatched_rois`` and ``annotated`` (the structures the label object has: a
structure it lacks is unknown for the case, not background).

* :func:`rtstruct_label_map`: closed planar RTSTRUCT contours rasterised slice by slice
  (pixel centres inside the polygon, :func:`fill_polygon`; nested contours of one ROI on one slice combine by XOR,
  so holes stay empty). The RTSTRUCT must reference the chosen CT: every referenced SOP
  instance must be in the series (FrameOfReferenceUID is used only when an RTSTRUCT lists no
  instances).
* :func:`mask_folder_label_map`: per-structure mask files (``convert.mask_pattern``, e.g.
  ``<mask_dir>/<case>/<structure>.nrrd|.nii.gz``, HaN-Seg's or SegRap's layout), each on exactly
  the CT's grid (size, spacing, origin, direction within :data:`MASK_GRID_TOL`) and binary (0 and
  at most one other value); an annotation table (HaN-Seg's ``OAR_data.csv``) may say which exist.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np


# Codec packages that pydicom's pixel-data plugin registry (and its legacy handlers) import when
# pydicom is imported, to see which plugins are usable: GDCM ~0.06 s, Pillow ~0.03 s, pylibjpeg with
# its openjpeg / libjpeg / rle codecs and pyjpegls ~0.01-0.02 s each. A CT stored uncompressed
# (nearly every one) needs none of them, so hnct imports pydicom with them blocked and registers
# the plugins again the first time anything asks pydicom's registry about a compressed transfer
# syntax (:func:`register_pixel_plugins`).
DEFERRED_CODECS = ("gdcm", "pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls", "PIL")
# pydicom's plugin modules whose import probes the codecs above, and each plugin's function (the
# labels are the module names, under pydicom.pixels.decoders / .encoders).
_PLUGIN_FUNCTIONS = {
    "decoders": {"gdcm": "_decode_frame", "pylibjpeg": "_decode_frame", "pyjpegls": "_decode_frame",
                 "pillow": "_decode_frame"},
    "encoders": {"gdcm": "encode_pixel_data", "pylibjpeg": "_encode_frame", "pyjpegls": "_encode_frame"},
}
# The order of the plugins in every table of pydicom 3.0 that has them; pydicom's own (its RLE
# decoder, its native encoder) after them.
PLUGIN_ORDER = ("gdcm", "pylibjpeg", "pyjpegls", "pillow")
_LEGACY_HANDLERS = ("gdcm_handler", "pillow_handler", "pylibjpeg_handler", "jpeg_ls_handler")
# What the registry's CoderBase answers about plugins: wrapped until the deferred plugins are registered.
_REGISTRY_MEMBERS = ("_validate_plugins", "is_available", "available_plugins", "missing_dependencies")
_deferred_originals: dict[str, Any] = {}


def _import_pydicom():
    """Import pydicom without ``requests`` and without the codec packages (``DEFERRED_CODECS``),
    unless something imported pydicom (or them) already.

    pydicom's import loads ``pydicom.data.download``, which imports ``requests`` when it is
    installed (0.2-0.3 s) only to fetch pydicom's own test files; without it pydicom falls back to
    urllib. hnct never downloads through pydicom. Its plugin registry imports every installed
    codec up front; with them blocked the plugins are registered as unavailable, and the
    registry is wrapped so that its first question about a compressed transfer syntax registers
    them for real (:func:`register_pixel_plugins`). The blocks are lifted right after the import.
    """
    if "pydicom" in sys.modules:
        import pydicom

        return pydicom
    blocked = [name for name in ("requests", *DEFERRED_CODECS) if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        import pydicom
        from pydicom.pixels.common import CoderBase
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    if any(name in blocked for name in DEFERRED_CODECS):
        for member in _REGISTRY_MEMBERS:
            _deferred_originals[member] = original = CoderBase.__dict__[member]
            setattr(CoderBase, member, _registering(original))
    return pydicom


def _registering(original: Any) -> Any:
    """``original`` (a CoderBase method or property) registering the deferred plugins first when
    the coder is for a compressed (encapsulated) transfer syntax."""
    if isinstance(original, property):
        def get(coder):
            if coder.UID.is_encapsulated:
                register_pixel_plugins()
            return original.fget(coder)

        return property(get, doc=original.__doc__)

    def method(coder, *args, **kwargs):
        if coder.UID.is_encapsulated:
            register_pixel_plugins()
        return original(coder, *args, **kwargs)

    return method


def register_pixel_plugins() -> None:
    """Register the pixel-data plugins whose codecs were blocked while pydicom was imported, as
    pydicom itself registers them (same labels, same order); a no-op once done or when nothing
    was deferred. Called by pydicom's registry itself (wrapped) when a compressed transfer syntax
    is decoded or encoded. It works on the coders' plugin tables (``_available``,
    ``_unavailable``: private in the pinned pydicom 3.0.2), so a test compares the registry it
    leaves with a plain pydicom import's."""
    if not _deferred_originals:
        return
    import importlib

    from pydicom.pixels.common import CoderBase

    for member, original in _deferred_originals.items():
        setattr(CoderBase, member, original)
    _deferred_originals.clear()
    # The plugin modules and legacy handlers probed the codecs at import: probe again, in place.
    for module in ([f"pydicom.pixels.{kind}.{label}" for kind, labels in _PLUGIN_FUNCTIONS.items() for label in labels]
                   + [f"pydicom.pixel_data_handlers.{name}" for name in _LEGACY_HANDLERS]):
        if module in sys.modules:
            importlib.reload(sys.modules[module])
    for kind, functions in _PLUGIN_FUNCTIONS.items():
        registry = importlib.import_module(f"pydicom.pixels.{kind}.base")
        for coder in vars(registry).values():
            if not isinstance(coder, CoderBase):
                continue
            deferred = [label for label in coder._unavailable if label in functions]
            if not deferred:
                continue
            for label in deferred:
                del coder._unavailable[label]
                coder.add_plugin(label, (f"pydicom.pixels.{kind}.{label}", functions[label]))
            # The order is the order plugins are tried in: pydicom's tables' (PLUGIN_ORDER).
            ranked = sorted(coder._available, key=lambda label: PLUGIN_ORDER.index(label)
                            if label in PLUGIN_ORDER else len(PLUGIN_ORDER))
            coder._available = {label: coder._available[label] for label in ranked}


def pixel_array(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's ``pixel_array`` (the stored values of every frame), pydicom imported on first use."""
    _import_pydicom()
    from pydicom.pixels import pixel_array as decode

    return decode(ds)


def apply_rescale(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's ``apply_rescale`` (Modality LUT or rescale slope / intercept)."""
    _import_pydicom()
    from pydicom.pixels import apply_rescale as rescale

    return rescale(stored, ds)


def dcmread(path: str | os.PathLike, **kwargs: Any) -> pydicom.Dataset:
    """``pydicom.dcmread``, pydicom imported (:func:`_import_pydicom`) on first use."""
    return _import_pydicom().dcmread(path, **kwargs)


def _invalid_dicom() -> type[Exception]:
    """pydicom's InvalidDicomError, for an except clause (evaluated only once something was raised)."""
    return _import_pydicom().errors.InvalidDicomError


from hnct.common import InputError, progress  # noqa: E402
from hnct.gdcm_index import NATIVE_SYNTAXES, ScannedHeader, scan_headers  # noqa: E402
from hnct.structures import harmonise, normalise_name, raise_if_ambiguous  # noqa: E402,F401

# pydicom (0.15-0.25 s to import) is imported only for a file GDCM's header index cannot vouch for
# (hnct.gdcm_index: compressed, multi-frame, SEG, RTSTRUCT, ...) or to read labels; SimpleITK
# (0.2-0.4 s) only where labels, resampling of label masks or an image object are needed: the
# plain CT path (hnct.convert --labels none on an uncompressed series) loads neither.
# pandas is imported only to build index_series' DataFrame.
if TYPE_CHECKING:
    import pandas as pd
    import pydicom
    import SimpleITK as sitk

log = logging.getLogger("hnct.dicomio")

# Header fields the index reads (pixel data is never read while indexing).
INDEX_TAGS = [
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
    "Modality", "SeriesDescription", "SeriesNumber", "ImageType", "FrameOfReferenceUID",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
    "Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SliceThickness",
    "InstanceNumber", "NumberOfFrames", "GantryDetectorTilt", "AcquisitionNumber",
    # Enhanced multi-frame CT keeps positions, orientation and spacing per frame.
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
]
INDEX_COLUMNS = [
    "patient_id", "study_uid", "series_uid", "series_key", "series_identity", "modality", "series_description",
    "series_number", "image_type", "n_files", "n_slices", "files", "frame_of_reference_uid", "orientation",
    "pixel_spacing", "matrix", "consistent_geometry", "localizer", "manufacturer", "model", "kernel", "instances",
]
GANTRY_TILT = ("correct", "exclude")
# Elements larger than this are read only when used (the pixel data, while indexing for convert).
DEFER_BYTES = 16384
# What index_series skips, in the order a "no DICOM image series" reason lists them.
SKIP_KINDS = ("non-DICOM files", "unreadable files", "DICOM files without a series UID or modality")

INT16_MIN, INT16_MAX = -32768, 32767
PIXEL_DATA_TAG = 0x7FE00010
# Positions closer than this (mm along the normal) are "the same position".
SAME_POSITION_MM = 1e-3
# Header geometry tolerance: direction cosines and pixel spacing (mm).
COSINE_TOL = 1e-4
SPACING_TOL_MM = 1e-4


# ----------------------------------------------------------------------------- indexing


def _text(value: Any) -> str:
    if value is None:
        return ""
    from pydicom.multival import MultiValue  # _text reads values of pydicom datasets only

    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _floats(value: Any) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.split("\\")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


# The empty file Snakemake puts in each directory() output (the demo's case folders) to carry its mtime.
SNAKEMAKE_MARKER = ".snakemake_timestamp"


def _ascii(ds: pydicom.Dataset, keyword: str) -> str:
    """The value of an ASCII-only element (VR UI, CS, IS, DS) as text, multiple values joined by
    backslashes, straight from the raw bytes when pydicom has not converted it yet: converting
    DS/IS values to pydicom objects is half the cost of indexing a folder. A ScannedHeader (GDCM's
    values, :mod:`hnct.gdcm_index`) gives the same text."""
    if isinstance(ds, ScannedHeader):
        return ds.ascii(keyword)
    element = ds.get_item(keyword)
    if element is None:
        return ""
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        return value.decode("ascii", "replace").strip(" \0")
    return _text(value)


# Decoded text elements by (keyword, raw bytes, VR, SpecificCharacterSet): see _series_text.
_TEXT_CACHE: dict[tuple[str, bytes, str | None, str], str] = {}
TEXT_CACHE_SIZE = 4096


def _series_text(ds: pydicom.Dataset, keyword: str) -> str:
    """``_text(ds.get(keyword))`` for a character-set dependent text element (LO, SH, ...), decoded
    by pydicom once per distinct raw value and character set: every file of a series repeats its
    patient, description and scanner, and each decoding costs tens of microseconds."""
    if isinstance(ds, ScannedHeader):
        return ds.text(keyword)  # ASCII under a character set that reads it as ASCII (vouched)
    element = ds.get_item(keyword)
    value = getattr(element, "value", None)
    if not isinstance(value, (bytes, bytearray)):
        return _text(ds.get(keyword))
    key = (keyword, bytes(value), element.VR, _ascii(ds, "SpecificCharacterSet"))
    if key not in _TEXT_CACHE:
        if len(_TEXT_CACHE) >= TEXT_CACHE_SIZE:
            _TEXT_CACHE.clear()
        _TEXT_CACHE[key] = _text(ds.get(keyword))
    return _TEXT_CACHE[key]


def _uint(ds: pydicom.Dataset, keyword: str) -> int | None:
    """A single-valued US element (Rows, BitsAllocated, ...) as ``ds.get(keyword)`` gives it, read
    from its raw little-endian bytes when pydicom has not converted it yet: each conversion costs
    tens of microseconds, and convert reads a dozen such values of every slice."""
    if isinstance(ds, ScannedHeader):
        return ds.uint(keyword)
    element = ds.get_item(keyword)
    if element is None:
        return None
    value = element.value
    if (isinstance(value, bytes) and len(value) == 2 and getattr(element, "is_little_endian", False)
            and getattr(element, "VR", "US") in ("US", None)):  # VR None: implicit VR, US by the dictionary
        return int.from_bytes(value, "little")
    return ds.get(keyword)


def _number(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    """A single-valued DS/IS element as a float (``default`` when absent or empty), parsed from its
    raw text (see :func:`_ascii`); anything else (several values, bad text) through pydicom's own
    conversion and its error."""
    text = _ascii(ds, keyword)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        return float(ds.get(keyword))


def _iter_files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name != SNAKEMAKE_MARKER:
                yield Path(root) / name


def _frame_item(ds: pydicom.Dataset, frame: int | None, sequence: str) -> pydicom.Dataset | None:
    """The first item of functional group ``sequence`` for ``frame`` (per-frame, else shared)."""
    if isinstance(ds, ScannedHeader):
        return None  # GDCM's index vouches only for files without functional groups
    if frame is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and frame < len(per_frame) and per_frame[frame].get(sequence):
            return per_frame[frame].get(sequence)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(sequence):
        return shared[0].get(sequence)[0]
    return None


def _frame_geometry(ds: pydicom.Dataset, frame: int | None) -> dict[str, Any]:
    """Position, orientation and pixel spacing of one frame: classic tags, or the enhanced
    multi-frame functional groups (Plane Position / Plane Orientation / Pixel Measures)."""
    position = _frame_item(ds, frame, "PlanePositionSequence")
    orientation = _frame_item(ds, frame, "PlaneOrientationSequence")
    measures = _frame_item(ds, frame, "PixelMeasuresSequence")
    return {
        "position": _floats(_ascii(position or ds, "ImagePositionPatient")),
        "orientation": _floats(_ascii(orientation or ds, "ImageOrientationPatient")),
        "pixel_spacing": _floats(_ascii(measures or ds, "PixelSpacing")),
    }


def _series_key(ds: pydicom.Dataset, orientation: tuple[float, ...] | None) -> tuple[str, dict[str, str]]:
    """Series identity of a file: its SeriesInstanceUID, or (when that is empty or missing) the
    header facts one series shares: study, series number, frame of reference, orientation,
    acquisition number. Returns (key, how) with how = {} for a UID."""
    uid = _ascii(ds, "SeriesInstanceUID")
    if uid:
        return uid, {}
    facts = {
        "StudyInstanceUID": _ascii(ds, "StudyInstanceUID"),
        "SeriesNumber": _ascii(ds, "SeriesNumber"),
        "FrameOfReferenceUID": _ascii(ds, "FrameOfReferenceUID"),
        "ImageOrientationPatient": "\\".join(f"{c:.4f}" for c in orientation) if orientation else "",
        "AcquisitionNumber": _ascii(ds, "AcquisitionNumber"),
        "Modality": _ascii(ds, "Modality").upper(),
    }
    return "no-uid:" + "|".join(facts.values()), facts


def _skip_summary(skipped: Sequence[tuple[str, str, str]]) -> str:
    """'3 non-DICOM files, 1 DICOM file without a series UID or modality' from (path, kind, reason)."""
    counts = {kind: sum(1 for _, k, _ in skipped if k == kind) for kind in SKIP_KINDS}
    return ", ".join(f"{n} {kind if n != 1 else kind.replace('files', 'file')}" for kind, n in counts.items() if n)


class SeriesIndex(list):
    """The rows of :func:`index_series` as dicts (same keys as its columns), without pandas, plus
    ``unreadable`` and ``skipped_summary`` (its ``attrs``). What convert works on: importing pandas
    costs a third of a second of every convert job."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), unreadable: Iterable[tuple[str, str]] = (),
                 skipped_summary: str = "", read_by_pydicom: Mapping[str, str] | None = None):
        super().__init__(rows)
        self.unreadable = list(unreadable)
        self.skipped_summary = skipped_summary
        # Files whose headers pydicom read (GDCM's index could not vouch for them), with the reason.
        self.read_by_pydicom = dict(read_by_pydicom or {})


def as_series_index(index: "SeriesIndex | pd.DataFrame") -> SeriesIndex:
    """A SeriesIndex from either form of the index."""
    if isinstance(index, SeriesIndex):
        return index
    return SeriesIndex(index.to_dict("records"), index.attrs.get("unreadable", []),
                       index.attrs.get("skipped_summary", ""))


def index_series(folder: str | os.PathLike, keep_datasets: bool = False) -> "pd.DataFrame":
    """:func:`scan_series` as a DataFrame (one row per series), what is skipped in ``df.attrs``."""
    import pandas as pd

    index = scan_series(folder, keep_datasets)
    df = pd.DataFrame(list(index), columns=INDEX_COLUMNS)
    df.attrs["unreadable"] = index.unreadable
    df.attrs["skipped_summary"] = index.skipped_summary
    return df


def scan_series(folder: str | os.PathLike, keep_datasets: bool = False, compiled: bool = True) -> SeriesIndex:
    """One row per series found under ``folder`` (any layout), from headers only.

    A series is its SeriesInstanceUID; files whose SeriesInstanceUID is empty or missing are
    grouped by StudyInstanceUID, SeriesNumber, FrameOfReferenceUID, orientation and
    AcquisitionNumber instead (``series_uid`` is then '', ``series_identity`` lists the facts).
    An enhanced multi-frame file gives one instance per frame (its functional groups).

    Columns: ``patient_id, study_uid, series_uid, series_key (the UID or the header facts),
    series_identity, modality, series_description, series_number, image_type, n_files, files
    (sorted paths), frame_of_reference_uid, orientation (the distinct ImageOrientationPatient
    tuples), pixel_spacing (distinct [row, col] mm), matrix (distinct (rows, cols)),
    consistent_geometry, localizer, manufacturer, model, kernel, instances`` (per slice: file,
    frame (None for a single-frame file), sop_uid, position (LPS mm), orientation,
    pixel_spacing, rows, cols). Files skipped are listed in ``unreadable`` as ``(path, reason)``
    and summarised in ``skipped_summary`` ("2 non-DICOM files").

    Headers come from GDCM's compiled scanner (:mod:`hnct.gdcm_index`) for the plain uncompressed
    single-frame images it vouches for, the same values pydicom gives; every other file (listed
    in ``read_by_pydicom`` with the reason), or every file with ``compiled`` False, is read by
    pydicom. With ``keep_datasets`` (convert) the instance keeps its header as ``dataset``: GDCM's
    (with the verified offset of the stored values) or pydicom's whole parse, pixel data
    deferred, so that decoding reads only the pixel data and each header is parsed once.
    Otherwise (a folder index) pydicom reads only the header tags above.
    """
    folder = Path(folder)
    skipped: list[tuple[str, str, str]] = []
    by_series: dict[str, list[dict[str, Any]]] = {}
    identity: dict[str, dict[str, str]] = {}
    paths = list(_iter_files(folder)) if folder.is_dir() else []
    scanned, read_by_pydicom = scan_headers(paths) if compiled else ({}, {str(p): "compiled index off" for p in paths})
    if paths:
        log.info("indexing %s: %d file(s) through GDCM's scanner, %d through pydicom", folder, len(scanned),
                 len(read_by_pydicom))
    for path in progress(paths, every=200, what=f"indexing {folder}"):
        try:
            ds = scanned.get(str(path))
            if ds is None and keep_datasets:
                ds = dcmread(path, defer_size=DEFER_BYTES)
            elif ds is None:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=INDEX_TAGS)
        except OSError as err:
            skipped.append((str(path), "unreadable files", f"cannot read the file: {err}"))
            continue
        except (_invalid_dicom(), EOFError, ValueError, TypeError, AttributeError, KeyError) as err:
            skipped.append((str(path), "non-DICOM files", f"not readable as DICOM: {type(err).__name__}: {err}"))
            continue
        n_frames = int(_number(ds, "NumberOfFrames", 1) or 1)
        multi = n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
        frames = list(range(n_frames)) if multi else [None]
        first = _frame_geometry(ds, frames[0])
        if not _ascii(ds, "SeriesInstanceUID") and not _ascii(ds, "Modality"):
            skipped.append((str(path), "DICOM files without a series UID or modality",
                            "DICOM without SeriesInstanceUID or Modality (not an image of a series, e.g. DICOMDIR)"))
            continue
        key, how = _series_key(ds, first["orientation"])
        if how:
            identity[key] = how
        common = {
            "file": str(path),
            "sop_uid": _ascii(ds, "SOPInstanceUID"),
            "patient_id": _series_text(ds, "PatientID"),
            "study_uid": _ascii(ds, "StudyInstanceUID"),
            "series_uid": _ascii(ds, "SeriesInstanceUID"),
            "modality": _ascii(ds, "Modality").upper(),
            "series_description": _series_text(ds, "SeriesDescription"),
            "series_number": _ascii(ds, "SeriesNumber"),
            "image_type": _ascii(ds, "ImageType").upper(),
            "frame_of_reference_uid": _ascii(ds, "FrameOfReferenceUID"),
            "rows": int(_uint(ds, "Rows") or 0),
            "cols": int(_uint(ds, "Columns") or 0),
            "manufacturer": _series_text(ds, "Manufacturer"),
            "model": _series_text(ds, "ManufacturerModelName"),
            "kernel": _series_text(ds, "ConvolutionKernel"),
            "instance_number": _ascii(ds, "InstanceNumber"),
            "gantry_tilt": (_floats(_ascii(ds, "GantryDetectorTilt")) or [None])[0],
        }
        if keep_datasets:
            common["dataset"] = ds
        for frame in frames:
            by_series.setdefault(key, []).append(
                {**common, "frame": frame, **(first if frame == frames[0] else _frame_geometry(ds, frame))})
    rows = []
    for key, instances in sorted(by_series.items()):
        instances.sort(key=lambda inst: (inst["file"], inst["frame"] or 0))
        first = instances[0]
        orientations = sorted({tuple(round(c, 4) for c in i["orientation"]) for i in instances if i["orientation"]})
        spacings = sorted({tuple(round(c, 5) for c in i["pixel_spacing"]) for i in instances if i["pixel_spacing"]})
        matrices = sorted({(i["rows"], i["cols"]) for i in instances})
        image_types = sorted({i["image_type"] for i in instances if i["image_type"]})
        files = sorted({i["file"] for i in instances})
        rows.append({
            "patient_id": first["patient_id"],
            "study_uid": first["study_uid"],
            "series_uid": first["series_uid"],
            "series_key": key,
            "series_identity": {"by": "header facts (no SeriesInstanceUID)", "facts": identity[key]}
            if key in identity else {"by": "SeriesInstanceUID"},
            "modality": first["modality"],
            "series_description": first["series_description"],
            "series_number": first["series_number"],
            "image_type": " | ".join(image_types),
            "n_files": len(files),
            "n_slices": len(instances),
            "files": files,
            "frame_of_reference_uid": first["frame_of_reference_uid"],
            "orientation": orientations,
            "pixel_spacing": spacings,
            "matrix": matrices,
            "consistent_geometry": len(orientations) == 1 and len(spacings) == 1 and len(matrices) == 1
            and all(i["position"] is not None for i in instances),
            "localizer": any("LOCALIZER" in t or "SCOUT" in t or "TOPOGRAM" in t for t in image_types),
            "manufacturer": first["manufacturer"],
            "model": first["model"],
            "kernel": first["kernel"],
            "instances": instances,
        })
    return SeriesIndex(rows, [(path, reason) for path, _, reason in skipped], _skip_summary(skipped),
                       read_by_pydicom)


# ----------------------------------------------------------------------------- series choice


def choose_ct_series(case: str, folder: str | os.PathLike, index: "SeriesIndex | pd.DataFrame",
                     series_uid: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Choose the CT series by the rule in the module docstring; returns (row, series_choice)."""
    index = as_series_index(index)
    if not index:
        summary = index.skipped_summary
        found = f": found {summary}" if summary else " (no files)"
        raise InputError(case, folder, f"no DICOM image series under {folder}{found}")
    candidates = [
        {"series_uid": r["series_uid"], "series_key": r["series_key"], "modality": r["modality"],
         "n_files": int(r["n_files"]), "n_slices": int(r["n_slices"]), "series_description": r["series_description"],
         "localizer": bool(r["localizer"]), "consistent_geometry": bool(r["consistent_geometry"])}
        for r in index
    ]
    choice: dict[str, Any] = {"candidates": candidates, "requested_series_uid": series_uid or ""}
    if series_uid:
        hit = [r for r in index if r["series_uid"] == series_uid]
        if not hit:
            found = ", ".join(f"{c['series_uid'] or c['series_key']} ({c['modality']}, {c['n_files']} files)"
                              for c in candidates)
            raise InputError(case, folder, f"requested series {series_uid} not found under {folder}; found: {found}")
        row = hit[0]
        if row["modality"] != "CT":
            raise InputError(case, row["files"][0], f"requested series {series_uid} is {row['modality']}, not CT")
        choice["rule"] = "series_uid given by the cohort table"
        choice["series_uid"] = series_uid
        return row, choice
    ct = [r for r in index if r["modality"] == "CT"]
    if not ct:
        found = ", ".join(sorted(f"{m} ({n} series)" for m, n in Counter(r["modality"] for r in index).items()))
        raise InputError(case, folder, f"no CT series under {folder}; found modalities: {found}")
    not_localizer = [r for r in ct if not r["localizer"]]
    if not not_localizer:
        raise InputError(case, folder, f"only localizer/scout CT series under {folder} "
                         f"({', '.join(r['series_key'] for r in ct)})")
    volumes = [r for r in not_localizer if r["n_slices"] >= 2]
    pool = volumes or not_localizer
    ranked = sorted(pool, key=lambda r: (not r["consistent_geometry"], -int(r["n_slices"]), r["series_key"]))
    best = ranked[0]
    reasons = ["modality CT", "not a localizer (ImageType LOCALIZER/SCOUT or a lone slice)"]
    if len(ranked) > 1:
        reasons.append("consistent geometry, then most slices, then smallest SeriesInstanceUID")
    choice["rule"] = "; ".join(reasons)
    choice["series_uid"] = best["series_uid"]
    choice["series_identity"] = best["series_identity"]
    return best, choice


# ----------------------------------------------------------------------------- reading the CT


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D float array without NaNs, to the bit (the mean of the two middle
    values of an even count), without the ``numpy.ma`` import (~0.02 s) that np.median's NaN
    check makes."""
    ordered = np.sort(values)
    middle = len(ordered) // 2
    return float(ordered[middle] if len(ordered) % 2 else np.mean(ordered[middle - 1:middle + 1]))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _check_uniform_headers(case: str, uid: str, instances: list[dict[str, Any]]) -> None:
    """Raise InputError unless every slice has position, orientation and spacing, all alike.

    The slices are compared with the first all at once (np.isclose with np.allclose's rtol);
    the error names the first slice that differs, in the order orientation, spacing, matrix."""
    for inst in instances:
        if inst["position"] is None or inst["orientation"] is None or inst["pixel_spacing"] is None:
            raise InputError(case, inst["file"], f"slice of series {uid} lacks ImagePositionPatient, "
                             "ImageOrientationPatient or PixelSpacing")
    first = instances[0]
    checks = {}
    for field, tol in (("orientation", COSINE_TOL), ("pixel_spacing", SPACING_TOL_MM)):
        odd = next((inst for inst in instances if len(inst[field]) != len(first[field])), None)
        if odd is not None:
            raise InputError(case, odd["file"], f"{field} of a slice of series {uid} has {len(odd[field])} values, "
                             f"{len(first[field])} in {first['file']}")
        values = np.array([inst[field] for inst in instances], dtype=float)
        checks[field] = ~np.isclose(values, values[0], rtol=1e-05, atol=tol).all(axis=1)
    matrices = np.array([(inst["rows"], inst["cols"]) for inst in instances])
    checks["matrix"] = (matrices != matrices[0]).any(axis=1)
    differs = checks["orientation"] | checks["pixel_spacing"] | checks["matrix"]
    if not differs.any():
        return
    index = int(np.argmax(differs))
    inst = instances[index]
    if checks["orientation"][index]:
        raise InputError(case, inst["file"], f"mixed orientations in series {uid}: {inst['orientation']} "
                         f"vs {tuple(first['orientation'])} in {first['file']}")
    if checks["pixel_spacing"][index]:
        raise InputError(case, inst["file"], f"mixed pixel spacings in series {uid}: {inst['pixel_spacing']} "
                         f"vs {tuple(first['pixel_spacing'])} mm in {first['file']}")
    raise InputError(case, inst["file"], f"mixed matrix sizes in series {uid}: "
                     f"{inst['rows']}x{inst['cols']} vs {first['rows']}x{first['cols']}")


def _gap_error(case: str, uid: str, files: list[str], along: np.ndarray, steps: np.ndarray, spread: float,
               max_spacing_spread: float, max_slice_gap_mm: float) -> InputError:
    """The exclusion for slice steps too uneven to resample: names the first gap (or the widest step)."""
    gaps = [i for i, s in enumerate(steps) if s >= 1.5 * steps.min()]
    if gaps:
        i = gaps[0]
        return InputError(
            case, f"{files[i]}, {files[i + 1]}",
            f"missing slice(s) between z={along[i]:.2f} and z={along[i + 1]:.2f} mm in series {uid}: "
            f"step {steps[i]:.2f} mm where the smallest step is {steps.min():.2f} mm "
            f"({len(gaps)} gap(s); files {Path(files[i]).name} and {Path(files[i + 1]).name}; "
            f"largest step {steps.max():.2f} mm > max_slice_gap_mm {max_slice_gap_mm:g})")
    return InputError(case, files[int(np.argmax(steps))],
                      f"uneven slice spacing in series {uid}: steps {steps.min():.3f}..{steps.max():.3f} mm "
                      f"(spread {spread:.1%} > max_spacing_spread {max_spacing_spread:.1%} and largest step "
                      f"> max_slice_gap_mm {max_slice_gap_mm:g})")


def slice_geometry(case: str, series: dict[str, Any], *, gantry_tilt: str = "correct", max_tilt_deg: float = 0.5,
                   max_spacing_spread: float = 0.01, max_slice_gap_mm: float = 5.0,
                   slice_step_mm: float = 0.0) -> dict[str, Any]:
    """Sort the series' slices along the normal, check them and plan the output grid.

    Returns ``files`` and ``frames`` (sorted; frame index in a multi-frame file, else None),
    ``sop_uids``, ``origin`` (LPS mm of voxel (0, 0, 0)), ``spacing`` [x, y, z] mm,
    ``direction`` (9, row-major, columns = row dir, column dir, normal), ``size`` [x, y, z] of
    the output volume, ``slice_positions`` (the check summary for the sidecar) and ``resample``
    (None when the slices are the volume as they lie, else the plan :func:`resample_slices`
    follows). Slices are resampled onto an orthogonal equidistant grid when they are stacked
    at more than ``max_tilt_deg`` to their normal (gantry tilt, with ``gantry_tilt`` correct)
    or their steps spread more than ``max_spacing_spread``, as long as no step exceeds
    ``max_slice_gap_mm``. Raises InputError naming the file(s) for anything else.
    """
    if gantry_tilt not in GANTRY_TILT:
        raise ValueError(f"gantry_tilt must be one of {GANTRY_TILT}, not {gantry_tilt!r}")
    instances = list(series["instances"])
    uid = series["series_uid"] or series["series_key"]
    if len(instances) < 2:
        raise InputError(case, instances[0]["file"] if instances else "",
                         f"too few slices: series {uid} has {len(instances)} slice (need at least 2 for a volume)")
    _check_uniform_headers(case, uid, instances)
    iop0 = np.array(instances[0]["orientation"])
    ps0 = np.array(instances[0]["pixel_spacing"])
    row_dir, col_dir = _unit(iop0[:3]), _unit(iop0[3:])
    normal = _unit(np.cross(row_dir, col_dir))
    positions = np.array([inst["position"] for inst in instances])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    instances = [instances[i] for i in order]
    positions, along = positions[order], along[order]
    files = [inst["file"] for inst in instances]

    steps = np.diff(along)
    if np.any(steps < SAME_POSITION_MM):
        _, group_of, group_sizes = np.unique(np.round(along / SAME_POSITION_MM), return_inverse=True,
                                             return_counts=True)
        sharing = group_sizes[group_of] > 1
        raise InputError(case, files[int(np.argmax(sharing))], f"not a volume: {int(sharing.sum())} of "
                         f"{len(files)} slices of series {uid} share a position")
    # Gantry tilt: the slices are stacked along a direction that is not their plane normal. Its size
    # and direction come from the positions (the GantryDetectorTilt tag's sign varies by vendor).
    offsets = positions - positions[0]
    stack = offsets[-1]
    in_plane = stack - (stack @ normal) * normal
    tilt_deg = math.degrees(math.atan2(float(np.linalg.norm(in_plane)), float(stack @ normal)))
    off_axis = np.linalg.norm(np.cross(offsets, normal), axis=1)
    tilted = tilt_deg > max_tilt_deg
    if tilted and gantry_tilt == "exclude":
        raise InputError(case, files[0], f"gantry tilt: slices of series {uid} are stacked at {tilt_deg:.2f} deg to "
                         f"their plane normal (max_tilt_deg {max_tilt_deg}; convert.gantry_tilt is exclude)")
    spread = float((steps.max() - steps.min()) / steps.min())
    uneven = spread > max_spacing_spread
    if uneven and steps.max() > max_slice_gap_mm:
        raise _gap_error(case, uid, files, along, steps, spread, max_spacing_spread, max_slice_gap_mm)
    spacing_z = float(slice_step_mm or (steps.min() if uneven else _median(steps)))
    sx, sy = float(ps0[1]), float(ps0[0])  # PixelSpacing is [between rows (y), between columns (x)]
    cols, rows = int(instances[0]["cols"]), int(instances[0]["rows"])
    summary: dict[str, Any] = {
        "check": "ok",
        "n_slices": len(files),
        "first_mm": float(along[0]),
        "last_mm": float(along[-1]),
        "spacing_mm": spacing_z,
        "min_step_mm": float(steps.min()),
        "max_step_mm": float(steps.max()),
        "spacing_spread": spread,
        "tilt_deg": tilt_deg,
        "max_off_axis_mm": float(off_axis.max()),
        "sorted_by": "ImagePositionPatient along the slice normal",
    }
    geometry = {
        "files": files,
        "frames": [inst.get("frame") for inst in instances],
        "datasets": [inst.get("dataset") for inst in instances],
        "sop_uids": [inst["sop_uid"] for inst in instances],
        "origin": positions[0].tolist(),
        "spacing": [sx, sy, spacing_z],
        "direction": np.column_stack([row_dir, col_dir, normal]).flatten().tolist(),
        "size": [cols, rows, len(files)],
        "slice_positions": summary,
        "resample": None,
    }
    if not (tilted or uneven or slice_step_mm):
        return geometry
    # In-plane shift of each slice (voxels along row / column direction) and its place along the normal.
    shift_x = offsets @ row_dir / sx if tilted else np.zeros(len(files))
    shift_y = offsets @ col_dir / sy if tilted else np.zeros(len(files))
    # The output grid keeps the slice plane's axes and pixel lattice (of the first slice), grown so
    # every slice's footprint fits: nothing of the scanned anatomy is cut off.
    x_lo, x_hi = math.floor(shift_x.min() + 1e-6), math.ceil(shift_x.max() - 1e-6)
    y_lo, y_hi = math.floor(shift_y.min() + 1e-6), math.ceil(shift_y.max() - 1e-6)
    depth = along - along[0]
    n_out = int(math.floor(depth[-1] / spacing_z + 1e-3)) + 1
    geometry["origin"] = (positions[0] + x_lo * sx * row_dir + y_lo * sy * col_dir).tolist()
    geometry["size"] = [cols + x_hi - x_lo, rows + y_hi - y_lo, n_out]
    geometry["resample"] = {
        "depth_mm": depth, "shift_x": shift_x - x_lo, "shift_y": shift_y - y_lo,
        "out_depth_mm": np.arange(n_out) * spacing_z,
    }
    summary["original_positions_mm"] = [round(float(a), 4) for a in along]
    gantry_tag = sorted({inst.get("gantry_tilt") for inst in instances if inst.get("gantry_tilt") is not None})
    if tilted:
        summary["tilt"] = {
            "angle_deg": tilt_deg,
            # Unit vector (LPS) of the in-plane drift of the slices per mm along the normal.
            "direction_lps": _unit(in_plane).tolist(),
            "shear_mm_per_mm": {"row": float(stack @ row_dir / (stack @ normal)),
                                "column": float(stack @ col_dir / (stack @ normal))},
            "gantry_detector_tilt_tag_deg": gantry_tag,
        }
    summary["resampled"] = {
        "why": [w for w, on in (("gantry tilt", tilted), ("uneven slice spacing", uneven),
                                ("convert.slice_step_mm", bool(slice_step_mm))) if on],
        "method": "each output slice blends the two nearest input slices (linear along the normal), each "
                  "shifted in-plane by its own offset (bilinear): an orthogonal grid on the slice plane",
        "input_size": [cols, rows, len(files)],
        "output_size": geometry["size"],
        "padded_voxels_xy": [cols + x_hi - x_lo - cols, rows + y_hi - y_lo - rows],
        "fill": "the series' minimum HU outside every slice's field of view",
    }
    return geometry


def resample_slices(hu: np.ndarray, plan: dict[str, Any], size: Sequence[int]) -> np.ndarray:
    """The int16 (z, y, x) volume on the planned grid from the sorted input slices ``hu`` (z, y, x).

    Output slice m at depth d lies between input slices k and k+1 (depths along the normal);
    it is (1-t) * slice k + t * slice k+1, each placed at its own in-plane shift (voxels,
    scipy.ndimage.shift, linear) on the grown canvas filled with the volume's minimum.
    """
    from scipy import ndimage

    depth, shift_x, shift_y = plan["depth_mm"], plan["shift_x"], plan["shift_y"]
    out_shape = (int(size[1]), int(size[0]))
    fill = float(hu.min())
    out = np.empty((int(size[2]), *out_shape), dtype=np.int16)
    rows, cols = hu.shape[1:]

    def placed(k: int) -> np.ndarray:
        canvas = np.full(out_shape, fill, dtype=np.float32)
        y0, x0 = int(math.floor(shift_y[k] + 1e-6)), int(math.floor(shift_x[k] + 1e-6))
        canvas[y0:y0 + rows, x0:x0 + cols] = hu[k]
        fy, fx = shift_y[k] - y0, shift_x[k] - x0
        if abs(fy) > 1e-6 or abs(fx) > 1e-6:
            canvas = ndimage.shift(canvas, (fy, fx), order=1, mode="nearest")
        return canvas

    for m, d in enumerate(progress(plan["out_depth_mm"], every=100, what="resampling slices")):
        k = int(np.clip(np.searchsorted(depth, d, side="right") - 1, 0, len(depth) - 2))
        t = float(np.clip((d - depth[k]) / (depth[k + 1] - depth[k]), 0.0, 1.0))
        value = placed(k) * (1.0 - t) if t < 1.0 - 1e-6 else 0.0
        if t > 1e-6:
            value = value + placed(k + 1) * t
        out[m] = np.rint(value)
    return out


def _rescale_to_hu(stored: np.ndarray, ds: pydicom.Dataset,
                   frame: int | None) -> tuple[np.ndarray, int | None]:
    """Modality rescale of one frame: ``(stored, intercept)`` for the usual CT rescale (slope 1, an
    integer intercept, added by the caller straight into the int16 volume), else ``(HU, None)``
    through pydicom's apply_rescale; enhanced files take theirs from the Pixel Value
    Transformation functional group."""
    transform = _frame_item(ds, frame, "PixelValueTransformationSequence") if frame is not None else None
    source = transform or ds
    slope = _number(source, "RescaleSlope", 1.0) or 1.0
    intercept = _number(source, "RescaleIntercept", 0.0) or 0.0
    if slope == 1.0 and intercept.is_integer() and "ModalityLUTSequence" not in ds:
        return stored, int(intercept)
    if transform is not None:
        return np.rint(stored * slope + intercept), None
    if isinstance(ds, ScannedHeader):  # both elements present (vouched): apply_rescale's arithmetic
        slope_text, intercept_text = ds.ascii("RescaleSlope"), ds.ascii("RescaleIntercept")
        return np.rint(stored.astype(np.float64) * float(slope_text) + float(intercept_text)), None
    return np.rint(apply_rescale(stored, ds)), None


def _transfer_syntax(ds: pydicom.Dataset | ScannedHeader | None) -> tuple[str, str] | None:
    """(UID, name) of a file's transfer syntax, None when its header has none."""
    if isinstance(ds, ScannedHeader):
        return ds.transfer_syntax, NATIVE_SYNTAXES[ds.transfer_syntax]
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return (str(syntax), syntax.name) if syntax else None


def _decode_error(file: str, ds: pydicom.Dataset | ScannedHeader | None, err: Exception) -> str:
    syntax = _transfer_syntax(ds)
    named = f" of transfer syntax {syntax[1]} ({syntax[0]})" if syntax else ""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"cannot decode pixel data{named}: {type(err).__name__}: {first_line}"


def _stored_values(ds: pydicom.Dataset | ScannedHeader, out: np.ndarray | None = None) -> np.ndarray:
    """The stored pixel values of a file, as pydicom's ``pixel_array`` gives them.

    Uncompressed little-endian, 16 bits allocated, one sample, one frame (nearly every CT slice)
    is read with numpy, straight from the file at the pixel data's offset when the index deferred
    it (else from the bytes in memory): pydicom's decoder framework costs about 2 ms a slice on top
    (a quarter of a 134-slice conversion), its deferred read another parse of the element. Its length is checked as pydicom checks
    it, and unused high bits are corrected as pydicom does (masked for unsigned values, sign
    extended for signed ones). Anything else goes through pydicom. A ScannedHeader (GDCM's index,
    which checked all of this and the offset of the stored values) is read from that offset.
    ``out``: an int16 (rows, cols) slice of the volume being filled: values read from the file go
    straight into its memory (returned as its uint16 or int16 view), saving an array a slice.
    """
    rows, cols = int(_uint(ds, "Rows") or 0), int(_uint(ds, "Columns") or 0)
    syntax = _transfer_syntax(ds)
    native = (syntax is not None and syntax[0] in NATIVE_SYNTAXES
              and _uint(ds, "BitsAllocated") == 16 and int(_uint(ds, "SamplesPerPixel") or 1) == 1
              and int(_number(ds, "NumberOfFrames", 1) or 1) == 1 and _uint(ds, "PixelRepresentation") in (0, 1)
              and "PerFrameFunctionalGroupsSequence" not in ds)
    bits_stored = int(_uint(ds, "BitsStored") or 16)
    if not native or not 1 <= bits_stored <= 16:
        return pixel_array(ds)
    dtype, n_bytes = ("<i2" if _uint(ds, "PixelRepresentation") == 1 else "<u2"), rows * cols * 2
    offset = ds.pixel_offset if isinstance(ds, ScannedHeader) else _deferred_pixel_offset(ds, n_bytes)
    if offset is not None:
        # Deferred while indexing: read straight from the value's offset in the file, so the
        # bytes are read once (pydicom's deferred read re-opens the file and parses the element again).
        stored = _read_at(ds.filename, offset, rows, cols, dtype, out)
        if stored is None:  # a truncated file (changed since indexing): pydicom's own error
            return pixel_array(dcmread(ds.filename) if isinstance(ds, ScannedHeader) else ds)
    else:
        data = ds.get("PixelData")
        if data is None or len(data) != n_bytes:
            return pixel_array(ds)  # pydicom's own handling: its error naming the lengths, or its warning
        stored = np.frombuffer(data, dtype=dtype).reshape(rows, cols)
    if bits_stored < 16:
        shift = 16 - bits_stored  # arithmetic shift on int16 extends the sign, on uint16 it masks
        if out is not None and np.shares_memory(stored, out):
            np.left_shift(stored, shift, out=stored)
            np.right_shift(stored, shift, out=stored)
        else:
            stored = (stored << shift) >> shift
    return stored


def _read_at(path: str, offset: int, rows: int, cols: int, dtype: str, out: np.ndarray | None) -> np.ndarray | None:
    """``rows * cols`` little-endian 16-bit values at ``offset`` of ``path`` as a (rows, cols)
    array of ``dtype``: in ``out``'s memory when it fits (a C-contiguous int16 array of that shape,
    on a little-endian machine), else a new array; None when the file ends before."""
    if out is None or out.shape != (rows, cols) or out.dtype != np.int16 or not out.flags.c_contiguous \
            or sys.byteorder != "little":
        stored = np.fromfile(path, dtype=dtype, count=rows * cols, offset=offset)
        return stored.reshape(rows, cols) if stored.size == rows * cols else None
    buffer = memoryview(out).cast("B")
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        filled = 0
        while filled < len(buffer):
            n = fh.readinto(buffer[filled:])
            if not n:
                return None
            filled += n
    return out.view(dtype)


def _deferred_pixel_offset(ds: pydicom.Dataset, n_bytes: int) -> int | None:
    """Offset in its file of a pixel data value of ``n_bytes`` that pydicom deferred, else None."""
    from pydicom.dataelem import RawDataElement

    element = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if isinstance(element, RawDataElement) and element.value is None and element.length == n_bytes and ds.filename:
        return element.value_tell
    return None


def _read_pixels_hu(case: str, files: Sequence[str], frames: Sequence[int | None] | None = None,
                    datasets: Sequence[pydicom.Dataset | None] | None = None) -> tuple[np.ndarray, int]:
    """HU (modality rescale applied, rounded, clipped to int16) as int16 (z, y, x), slices in the
    given order (``frames[i]``: the frame of a multi-frame file, None for a single frame;
    ``datasets[i]``: the file already parsed with its pixel data deferred, or None), and the
    number of voxels that had to be clipped.

    pydicom decodes the pixel data (it checks its length against the header, unlike SimpleITK's
    series reader; compressed transfer syntaxes through the GDCM (JPEG baseline/lossless), pyjpegls
    (JPEG-LS) and pylibjpeg-openjpeg (JPEG 2000) plugins, RLE natively);
    a transfer syntax no installed plugin decodes is this file's InputError naming it. Each file
    is read once (a multi-frame file's frames are kept until the last is placed). The usual CT
    rescale is applied in integers straight into the preallocated int16 volume.
    """
    frames = list(frames) if frames is not None else [None] * len(files)
    datasets = list(datasets) if datasets is not None else [None] * len(files)
    remaining: dict[str, int] = {}
    for file in files:
        remaining[file] = remaining.get(file, 0) + 1
    decoded: dict[str, tuple[pydicom.Dataset, np.ndarray]] = {}
    volume: np.ndarray | None = None
    if datasets and all(isinstance(ds, ScannedHeader) for ds in datasets) and frames == [None] * len(files):
        # GDCM's index gave every slice's matrix: the stored values are read into the volume itself.
        volume = np.empty((len(files), int(_uint(datasets[0], "Rows")), int(_uint(datasets[0], "Columns"))),
                          dtype=np.int16)
    n_clipped = 0
    for index, (file, frame, ds) in enumerate(progress(list(zip(files, frames, datasets)), every=100,
                                                      what="decoding slices")):
        try:
            if file not in decoded:
                if ds is None or not isinstance(ds, ScannedHeader) and "PixelData" not in ds:
                    ds = dcmread(file)
                # Decoded without caching the array on the (index's) dataset; the pixel data bytes
                # it loaded are released below, once the file's frames are placed.
                slot = volume[index] if volume is not None else None
                decoded[file] = (ds, _stored_values(ds, out=slot))
            ds, stored = decoded[file]
            if frame is not None:
                if stored.ndim != 3 or frame >= stored.shape[0]:
                    raise InputError(case, file, f"frame {frame + 1} of {file} is missing from its pixel data "
                                     f"(shape {stored.shape})")
                stored = stored[frame]
            hu, intercept = _rescale_to_hu(stored, ds, frame)
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - any decoder failure is this file's bad input
            raise InputError(case, file, _decode_error(file, ds, err)) from None
        remaining[file] -= 1
        if not remaining[file]:
            if not isinstance(decoded[file][0], ScannedHeader):
                del decoded[file][0].PixelData
            del decoded[file]
        if hu.ndim != 2:
            raise InputError(case, file, f"expected one 2-D frame per slice, got pixel data of shape {hu.shape}")
        if volume is None:
            volume = np.empty((len(files), *hu.shape), dtype=np.int16)
        elif hu.shape != volume.shape[1:]:
            raise InputError(case, file, f"slices differ in pixel matrix size: {hu.shape} vs {volume.shape[1:]}")
        if intercept is not None:
            if INT16_MIN <= int(hu.min()) + intercept and int(hu.max()) + intercept <= INT16_MAX:
                if np.shares_memory(hu, volume[index]):
                    # Read into the slice itself: added in place modulo 2**16, which leaves the int16
                    # bits of HU (in range, as just checked) whether stored as uint16 or int16.
                    slot = volume[index].view(np.uint16)
                    np.add(slot, np.uint16(intercept % 65536), out=slot)
                else:
                    # The common case: added in int32, written into the int16 slice, no temporary volume.
                    np.add(hu, np.int32(intercept), out=volume[index], casting="unsafe")
                continue
            hu = hu.astype(np.int32) + intercept
        outside = (hu < INT16_MIN) | (hu > INT16_MAX)
        if outside.any():
            n_clipped += int(np.count_nonzero(outside))
            hu = np.clip(hu, INT16_MIN, INT16_MAX)
        volume[index] = hu
    if volume is None:
        raise InputError(case, "", "no slices to decode")
    return volume, n_clipped


def read_ct_array(case: str, series: dict[str, Any], **checks: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The CT series as an int16 HU array (z, y, x) + geometry info (``size``, ``spacing``,
    ``origin``, ``direction``: LPS mm, ITK conventions; ``hu_clipped_voxels``).

    ``checks`` are :func:`slice_geometry`'s keywords (gantry_tilt, max_tilt_deg,
    max_spacing_spread, max_slice_gap_mm, slice_step_mm). A tilted or unevenly spaced series is
    resampled onto the orthogonal equidistant grid that function plans.
    """
    geometry = slice_geometry(case, series, **checks)
    hu, n_clipped = _read_pixels_hu(case, geometry["files"], geometry["frames"], geometry["datasets"])
    rows_cols = (int(series["instances"][0]["rows"]), int(series["instances"][0]["cols"]))
    if hu.shape[1:] != rows_cols:
        raise InputError(case, geometry["files"][0], f"pixel data shape {hu.shape[1:]} does not match headers "
                         f"{rows_cols}")
    if geometry["resample"] is not None:
        hu = resample_slices(hu, geometry["resample"], geometry["size"])
    geometry["hu_clipped_voxels"] = n_clipped
    return hu, geometry


def image_on_grid(array: np.ndarray, geometry: dict[str, Any]) -> sitk.Image:
    """A SimpleITK image of a (z, y, x) array with ``geometry``'s origin, spacing and direction."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    # Geometry from our own validated header read, not from the reader's guess.
    image.SetOrigin(geometry["origin"])
    image.SetSpacing(geometry["spacing"])
    image.SetDirection(geometry["direction"])
    return image


def read_ct(case: str, series: dict[str, Any], **checks: Any) -> tuple[sitk.Image, dict[str, Any]]:
    """:func:`read_ct_array` as an int16 HU SimpleITK image (LPS geometry from the headers)."""
    hu, geometry = read_ct_array(case, series, **checks)
    return image_on_grid(hu, geometry), geometry


# ----------------------------------------------------------------------------- labels


def match_structures(structures: Sequence[str], roi_names: Sequence[str],
                     structure_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, str]]:
    """structure -> {"roi": ROI name, "how": exact|case-insensitive|normalised|pattern} for the ones
    found (:func:`hnct.structures.harmonise`)."""
    return harmonise(structures, roi_names, structure_names)["matched"]


def _rtstruct_references(ds: pydicom.Dataset) -> tuple[set[str], set[str], set[str]]:
    """(referenced SOP instance UIDs, referenced series UIDs, referenced frames of reference)."""
    sops: set[str] = set()
    series: set[str] = set()
    frames: set[str] = set()
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
        if fr.get("FrameOfReferenceUID"):
            frames.add(str(fr.FrameOfReferenceUID))
        for study in fr.get("RTReferencedStudySequence", []):
            for se in study.get("RTReferencedSeriesSequence", []):
                if se.get("SeriesInstanceUID"):
                    series.add(str(se.SeriesInstanceUID))
                sops.update(str(ci.ReferencedSOPInstanceUID) for ci in se.get("ContourImageSequence", []))
    for roi in ds.get("StructureSetROISequence", []):
        if roi.get("ReferencedFrameOfReferenceUID"):
            frames.add(str(roi.ReferencedFrameOfReferenceUID))
    for rc in ds.get("ROIContourSequence", []):
        for contour in rc.get("ContourSequence", []):
            sops.update(str(ci.ReferencedSOPInstanceUID) for ci in contour.get("ContourImageSequence", []))
    return sops, series, frames


def check_rtstruct_reference(case: str, file: str, ds: pydicom.Dataset, series: dict[str, Any],
                             sop_uids: Iterable[str]) -> dict[str, Any]:
    """Raise InputError unless the RTSTRUCT refers to the chosen CT series; returns how it matched."""
    sops, ref_series, frames = _rtstruct_references(ds)
    uid = series["series_uid"]
    if sops:
        missing = sops - set(sop_uids)
        if missing:
            raise InputError(case, file, f"RTSTRUCT {file} references SOP instances not in series {uid} "
                             f"({len(missing)} of {len(sops)} unresolved, e.g. {sorted(missing)[0]})")
        note = {"by": "referenced SOP instances", "n_referenced": len(sops)}
        ct_frame = series["frame_of_reference_uid"]
        if frames and ct_frame and ct_frame not in frames:
            note["warning"] = f"FrameOfReferenceUID {sorted(frames)} differs from the CT's {ct_frame}"
        return note
    if not frames and not ref_series:
        raise InputError(case, file, f"RTSTRUCT {file} has nothing to reference (no SOP instances, series or "
                         "frame of reference)")
    if uid in ref_series or (series["frame_of_reference_uid"] and series["frame_of_reference_uid"] in frames):
        return {"by": "series UID" if uid in ref_series else "FrameOfReferenceUID", "n_referenced": 0}
    raise InputError(case, file, f"RTSTRUCT {file} references series {sorted(ref_series)} / frames of reference "
                     f"{sorted(frames)}, not series {uid}")


def fill_polygon(col_x: np.ndarray, row_y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (rows, cols) mask of the pixel centres inside a closed polygon (even-odd rule).

    ``col_x``/``row_y`` are vertex positions in continuous pixel index units (pixel centres at
    integers). A vectorised scanline fill: every edge is cut with the pixel-centre rows it spans
    (half-open in y, so a vertex on a row is counted once), the crossings of a row are paired in x
    order and the columns between each pair are filled. Same rule as ``skimage.draw.polygon``,
    much faster for the large contours of lungs or bodies.
    """
    n_rows, n_cols = shape
    x0, y0 = np.asarray(col_x, dtype=float), np.asarray(row_y, dtype=float)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    first_row = np.clip(np.ceil(np.minimum(y0, y1)), 0, n_rows).astype(np.int64)
    stop_row = np.clip(np.ceil(np.maximum(y0, y1)), 0, n_rows).astype(np.int64)
    counts = np.maximum(stop_row - first_row, 0)
    mask = np.zeros(shape, dtype=bool)
    if counts.sum() == 0:
        return mask
    edge = np.repeat(np.arange(len(x0)), counts)
    row = first_row[edge] + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    x_cross = x0[edge] + (row - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    order = np.lexsort((x_cross, row))
    row, x_cross = row[order], x_cross[order]
    # Whole rows are kept or clipped, so every row has an even number of crossings.
    start = np.clip(np.ceil(x_cross[0::2]), 0, n_cols).astype(np.int64)
    stop = np.clip(np.floor(x_cross[1::2]) + 1, 0, n_cols).astype(np.int64)
    keep = stop > start
    steps = np.zeros((n_rows, n_cols + 1), dtype=np.int32)
    np.add.at(steps, (row[0::2][keep], start[keep]), 1)
    np.add.at(steps, (row[0::2][keep], stop[keep]), -1)
    return np.cumsum(steps[:, :-1], axis=1) > 0


def _contour_points(contour: pydicom.Dataset) -> np.ndarray:
    """ContourData as (N, 3) LPS mm; parsed from the raw bytes (pydicom's DS objects are slow)."""
    element = contour.get_item("ContourData")
    value = getattr(element, "value", None)
    if isinstance(value, (bytes, bytearray)):
        return np.array(value.decode("ascii").replace("\\", " ").split(), dtype=float).reshape(-1, 3)
    return np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)


def rasterise_rtstruct(case: str, file: str, ds: pydicom.Dataset, reference: sitk.Image,
                       structures: Sequence[str],
                       structure_names: Mapping[str, Sequence[str]] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The RTSTRUCT's contours of ``structures`` on the reference grid: (C, z, y, x) uint8 0/1 channels."""
    roi_names = {str(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    harmonised = harmonise(structures, list(roi_names.values()), structure_names)
    raise_if_ambiguous(case, file, harmonised)
    matched = harmonised["matched"]
    number_of = {name: number for number, name in roi_names.items()}
    contours_of = {str(rc.ReferencedROINumber): rc.get("ContourSequence", []) for rc in ds.get("ROIContourSequence", [])}
    size = reference.GetSize()
    origin = np.array(reference.GetOrigin())
    spacing = np.array(reference.GetSpacing())
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction * spacing)  # LPS mm offset -> continuous (i, j, k)
    channels = np.zeros((len(structures),) + tuple(reversed(size)), dtype=np.uint8)
    report: dict[str, Any] = {"matched": matched, "roi_names": sorted(roi_names.values()), "skipped_contours": {},
                              "unmatched_rois": harmonised["unmatched"], "not_used": harmonised["not_used"],
                              "annotated": [s for s in structures if s in matched]}
    for channel, structure in enumerate(structures):
        if structure not in matched:
            continue
        roi = matched[structure]["roi"]
        per_slice: dict[int, np.ndarray] = {}
        skipped = {"not_closed_planar": 0, "outside_scan": 0}
        for contour in contours_of.get(number_of[roi], []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                skipped["not_closed_planar"] += 1
                continue
            points = _contour_points(contour)
            ijk = (points - origin) @ to_index.T
            k = ijk[:, 2]
            k_slice = int(round(float(np.mean(k))))
            if np.max(np.abs(k - k_slice)) > 0.5:
                raise InputError(case, file, f"contour of {roi} does not lie on a slice plane of the CT "
                                 f"(slice index {k.min():.2f}..{k.max():.2f}, tolerance half a slice)")
            if not 0 <= k_slice < size[2]:
                skipped["outside_scan"] += 1
                continue
            plane = per_slice.setdefault(k_slice, np.zeros((size[1], size[0]), dtype=bool))
            plane ^= fill_polygon(ijk[:, 0], ijk[:, 1], (size[1], size[0]))  # XOR: a nested contour is a hole
        for k_slice, plane in per_slice.items():
            channels[channel, k_slice][plane] = 1
        if any(skipped.values()):
            report["skipped_contours"][structure] = skipped
    return channels, report


def choose_label_object(usable: list[tuple[int, str, Any, dict[str, Any]]],
                        rejected: list[InputError]) -> tuple[str, Any, dict[str, Any]]:
    """The label object (RTSTRUCT, SEG) to use among those that refer to the chosen CT.

    ``usable``: (structures matched, file, dataset, how it refers to the CT) each; the most
    structures matched wins, then the smallest file path. Returns (file, dataset, report fields:
    file, reference, the ``ignored`` ones with their reasons); raises the first of ``rejected``
    when none is usable.
    """
    if not usable:
        raise rejected[0]
    _, file, ds, reference_note = min(usable, key=lambda u: (-u[0], u[1]))
    return file, ds, {"file": file, "reference": reference_note,
                      "ignored": [{"file": e.file, "reason": e.reason} for e in rejected]}


def no_label_object(reference: "sitk.Image", modality: str, series: dict[str, Any],
                    structures: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """A case without any label object of ``modality`` (RTSTRUCT, SEG): all-zero channels on the
    reference grid, no structure annotated, and a report saying so; convert excludes the case if
    structures are required."""
    channels = np.zeros((len(structures),) + tuple(reversed(reference.GetSize())), dtype=np.uint8)
    return channels, {"file": None, "note": f"no {modality} beside CT series {series['series_uid']}",
                      "matched": {}, "roi_names": [], "unmatched_rois": [], "annotated": []}


def rtstruct_label_map(case: str, index: "SeriesIndex | pd.DataFrame", series: dict[str, Any],
                       geometry: dict[str, Any], reference: sitk.Image, structures: Sequence[str],
                       structure_names: Mapping[str, Sequence[str]] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The structures' channels (C, z, y, x) from the RTSTRUCT under the case folder that
    references the chosen CT, and the report.

    Several RTSTRUCTs: the ones whose references do not resolve are ignored (listed in the
    report) as long as one resolves; among those that resolve the one matching the most
    structures wins, then the smallest file path.
    """
    rt_rows = [r for r in as_series_index(index) if r["modality"] == "RTSTRUCT"]
    if not rt_rows:
        return no_label_object(reference, "RTSTRUCT", series, structures)
    usable, rejected = [], []
    for row in rt_rows:
        for file in row["files"]:
            try:
                ds = dcmread(file)
            except (_invalid_dicom(), OSError, ValueError) as err:
                rejected.append(InputError(case, file, f"RTSTRUCT {file} is unreadable: {err}"))
                continue
            try:
                reference_note = check_rtstruct_reference(case, file, ds, series, geometry["sop_uids"])
            except InputError as err:
                rejected.append(err)
                continue
            names = [str(r.ROIName) for r in ds.get("StructureSetROISequence", [])]
            usable.append((len(match_structures(structures, names, structure_names)), file, ds, reference_note))
    file, ds, chosen = choose_label_object(usable, rejected)
    channels, report = rasterise_rtstruct(case, file, ds, reference, structures, structure_names)
    report.update(chosen)
    return channels, report


# Mask geometry against the CT: size exactly; spacing, origin (mm) and direction cosines within these.
MASK_GRID_TOL = {"spacing_mm": 1e-3, "origin_mm": 1e-2, "direction": 1e-4}


def _numbers(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


def check_mask_grid(case: str, path: str | os.PathLike, mask: "sitk.Image", reference: "sitk.Image") -> None:
    """InputError naming what differs when ``mask`` is not on the CT's grid (:data:`MASK_GRID_TOL`)."""
    checks = [
        ("size", mask.GetSize(), reference.GetSize(), 0),
        ("spacing", mask.GetSpacing(), reference.GetSpacing(), MASK_GRID_TOL["spacing_mm"]),
        ("origin", mask.GetOrigin(), reference.GetOrigin(), MASK_GRID_TOL["origin_mm"]),
        ("direction", mask.GetDirection(), reference.GetDirection(), MASK_GRID_TOL["direction"]),
    ]
    for what, got, want, tol in checks:
        if len(got) != len(want) or not np.allclose(got, want, atol=tol, rtol=0):
            raise InputError(case, path, f"mask {path} is not on the CT's grid: its {what} is {_numbers(got)}, the "
                             f"CT's {_numbers(want)} (tolerance {tol:g})")


def read_mask(case: str, path: str | os.PathLike, reference: "sitk.Image") -> np.ndarray:
    """A binary mask file on the CT grid as a (z, y, x) uint8 0/1 array; InputError when it cannot
    be read, is not 3-D, is not on the CT's grid or is not binary (0 and at most one other value)."""
    import SimpleITK as sitk

    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(case, path, f"cannot read mask {path}: {str(err).strip().splitlines()[-1]}") from None
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(case, path, f"mask {path} is {mask.GetDimension()}-D with "
                         f"{mask.GetNumberOfComponentsPerPixel()} component(s), expected one 3-D binary mask")
    check_mask_grid(case, path, mask, reference)
    array = sitk.GetArrayViewFromImage(mask)
    inside = array != 0
    values = array[inside]
    if values.size and values.min() != values.max():  # np.unique would sort every voxel (0.8 s a mask)
        shown = np.unique(values)
        raise InputError(case, path, f"mask {path} is not binary: values {[0] + shown[:7].tolist()}"
                         f"{' ...' if len(shown) > 7 else ''} (expected 0 and one other value)")
    return inside.view(np.uint8)


def mask_folder_label_map(case: str, mask_dir: str | os.PathLike, reference: sitk.Image, structures: Sequence[str],
                          pattern: str = "default", structure_names: Mapping[str, Sequence[str]] | None = None,
                          annotation_table: str | os.PathLike = "",
                          required: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """The structures' channels (C, z, y, x) from per-structure mask files (``pattern``, see
    :func:`hnct.structures.find_masks`) and the report.

    A structure is annotated when its mask file exists, unless ``annotation_table`` (HaN-Seg's
    ``OAR_data.csv``) lists the case with a 0 for it (then its file, if any, is not used and listed
    under ``not_annotated_by_table``). A missing case folder is bad input when ``required``
    (``convert.labels: nrrd``), else no structure is annotated (a second label source).
    """
    from hnct.structures import find_masks, read_annotation_table

    try:
        folder, by_name = find_masks(case, mask_dir, pattern)
    except InputError:
        if required:
            raise
        channels = np.zeros((len(structures),) + tuple(reversed(reference.GetSize())), dtype=np.uint8)
        return channels, {"folder": None, "matched": {}, "unmatched_rois": [], "annotated": []}
    harmonised = harmonise(structures, list(by_name), structure_names)
    raise_if_ambiguous(case, folder, harmonised)
    table: dict[str, bool] = {}
    if annotation_table:
        try:
            table = read_annotation_table(annotation_table, structures, structure_names).get(case, {})
        except (OSError, ValueError) as err:
            raise InputError(case, annotation_table, f"annotation table {annotation_table}: {err}") from None
    channels = np.zeros((len(structures),) + tuple(reversed(reference.GetSize())), dtype=np.uint8)
    report: dict[str, Any] = {"folder": str(folder), "matched": {}, "annotated": [],
                              "unmatched_rois": [by_name[n].name for n in harmonised["unmatched"]],
                              "not_used": {s: [by_name[n].name for n in names]
                                           for s, names in harmonised["not_used"].items()},
                              "annotation_table": str(annotation_table) if annotation_table else None,
                              "not_annotated_by_table": [], "table_says_contoured_but_no_file": []}
    for channel, structure in enumerate(structures):
        hit = harmonised["matched"].get(structure)
        if table.get(structure) is False:
            if hit:
                report["not_annotated_by_table"].append(structure)
            continue
        if hit is None:
            if table.get(structure):
                report["table_says_contoured_but_no_file"].append(structure)
            continue
        path = by_name[hit["roi"]]
        channels[channel] = read_mask(case, path, reference)
        report["matched"][structure] = {"file": str(path), "roi": path.name, "how": hit["how"]}
        report["annotated"].append(structure)
    return channels, report
