"""Structures of a cohort: ROI-name harmonisation, mask-folder layouts, annotation tables, channels.

Harmonisation (:func:`harmonise`): ``structure_names`` maps a canonical structure (one of
``convert.structures``) to regular expressions, e.g. ``{"SpinalCord": ["spinal[ _-]?cord", "cord"]}``.
An ROI name (RTSTRUCT ROIName, SEG SegmentLabel, a mask file's structure part, a column of an
annotation table) matches a structure when it equals the structure's name exactly, case-
insensitively, or after :func:`hnct.dicomio.normalise_name` (lower case, punctuation and spaces
removed: a canonical name always matches itself), or when one of its patterns matches the whole
name, case-insensitively, either as written or normalised. Several ROIs matching one structure:
the best match wins (exact, case-insensitive, normalised, pattern; then the smallest name), the
others are listed as ``not_used``. An ROI matching two structures is ambiguous: the case is
excluded naming the ROI and both structures. ROIs matching none are ``unmatched``.

Mask folders (:func:`find_masks`): ``convert.mask_pattern`` is a path below ``convert.mask_dir``
with ``{case}``, ``{structure}`` (in the file name) and optionally ``{ext}`` (any of
``.nrrd``/``.nii.gz``/``.nii``/``.nhdr``/``.mha``), or one of the presets :data:`MASK_PATTERNS`.

Annotation tables (:func:`read_annotation_table`): HaN-Seg's ``OAR_data.csv`` kind, one row per
case (first column the case), one column per structure (harmonised as ROI names), 1 where the
structure was contoured, 0 or empty where it was not.

Channels (:func:`write_structures`): ``structures.nrrd``, uint8 0/1, one channel per structure in
the order of ``convert.structures``, gzip: a (C, z, y, x) array as ``nrrd.read(path,
index_order="C")`` returns it (:func:`read_structures`). In NRRD's own axis order (fastest first)
that is (x, y, z, channel), so the header lists ``kinds: domain domain domain list`` and ``space
directions: (x) (y) (z) none``, volume.nrrd's directions and origin; SimpleITK reads it as a
C-component vector image on the CT grid.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hnct.common import InputError, atomic_path

# convert.mask_pattern presets: HaN-Seg's release layout, SegRap2023's, hnct's own default.
MASK_PATTERNS = {
    "hanseg": "{case}/{case}_OAR_{structure}.seg.nrrd",
    "segrap": "{case}/{structure}.nii.gz",
    "default": "{case}/{structure}.{ext}",
}
MASK_EXTENSIONS = ("nrrd", "nii.gz", "nii", "nhdr", "mha")
# How a name matched, best first (see the module docstring).
MATCH_RANKS = ("exact", "case-insensitive", "normalised", "pattern")


def normalise_name(name: str) -> str:
    """ROI name for tolerant matching: lower case, punctuation and spaces removed."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def check_structures(structures: Sequence[str], structure_names: Mapping[str, Sequence[str]] | None = None) -> None:
    """Raise ValueError for a structure list with duplicates (also after normalising: ``Spinal_Cord``
    and ``spinal cord`` are one structure), or a name map naming structures not in the list, or a
    pattern that is not a regular expression."""
    seen: dict[str, str] = {}
    duplicates = []
    for structure in structures:
        key = normalise_name(structure)
        if key in seen:
            duplicates.append(f"{seen[key]!r} and {structure!r}" if seen[key] != structure else repr(structure))
        seen.setdefault(key, structure)
    if duplicates:
        raise ValueError(f"structure list has duplicates: {', '.join(duplicates)}")
    unknown = sorted(set(structure_names or {}) - set(structures))
    if unknown:
        raise ValueError(f"structure_names names {unknown}, which are not in the structure list {list(structures)}")
    for structure, patterns in (structure_names or {}).items():
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"structure_names[{structure!r}]: {pattern!r} is not a regular expression: "
                                 f"{err}") from None


def _how(structure: str, name: str, patterns: Sequence[str]) -> str | None:
    """How ``name`` matches ``structure`` (one of MATCH_RANKS), or None."""
    if name == structure:
        return "exact"
    if name.lower() == structure.lower():
        return "case-insensitive"
    if normalise_name(name) == normalise_name(structure):
        return "normalised"
    if any(re.fullmatch(p, name, re.IGNORECASE) or re.fullmatch(p, normalise_name(name), re.IGNORECASE)
           for p in patterns):
        return "pattern"
    return None


def harmonise(structures: Sequence[str], names: Iterable[str],
              structure_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Match ``names`` (ROI names, segment labels, mask file names) to ``structures``.

    Returns ``matched`` (structure -> {"roi", "how"}), ``not_used`` (structure -> the other names
    that matched it), ``unmatched`` (names matching no structure, sorted) and ``ambiguous``
    (name -> the structures it matched, when more than one).
    """
    structure_names = structure_names or {}
    hits: dict[str, list[tuple[int, str]]] = {}
    unmatched, ambiguous = [], {}
    for name in sorted(set(names)):
        found = {s: how for s in structures if (how := _how(s, name, structure_names.get(s, ()))) is not None}
        if not found:
            unmatched.append(name)
        elif len(found) > 1:
            ambiguous[name] = sorted(found)
        for structure, how in found.items():
            hits.setdefault(structure, []).append((MATCH_RANKS.index(how), name))
    matched, not_used = {}, {}
    for structure in structures:
        if structure in hits:
            (rank, best), *others = sorted(hits[structure])
            matched[structure] = {"roi": best, "how": MATCH_RANKS[rank]}
            if others:
                not_used[structure] = [name for _, name in others]
    return {"matched": matched, "not_used": not_used, "unmatched": unmatched, "ambiguous": ambiguous}


def raise_if_ambiguous(case: str, file: str | os.PathLike, harmonised: dict[str, Any]) -> None:
    """InputError naming the first ROI that matched two structures (the case is excluded)."""
    for name, structures in harmonised["ambiguous"].items():
        raise InputError(case, file, f"ROI {name!r} in {file} matches {len(structures)} structures {structures}: "
                         "make convert.structure_names patterns distinct")


# ----------------------------------------------------------------------------- mask folders


def mask_pattern(pattern: str) -> str:
    """A preset's pattern, or ``pattern`` itself (checked: ``{structure}`` in the file name)."""
    pattern = MASK_PATTERNS.get(pattern, pattern)
    if "{structure}" not in Path(pattern).name:
        raise ValueError(f"mask_pattern {pattern!r} needs {{structure}} in its file name (or a preset: "
                         f"{sorted(MASK_PATTERNS)})")
    unknown = set(re.findall(r"{([^}]*)}", pattern)) - {"case", "structure", "ext"}
    if unknown:
        raise ValueError(f"mask_pattern {pattern!r}: unknown placeholder(s) {sorted(unknown)} "
                         "(known: case, structure, ext)")
    return pattern


def find_masks(case: str, mask_dir: str | os.PathLike, pattern: str) -> tuple[Path, dict[str, Path]]:
    """(the case's mask folder, structure part of the file name -> file) for ``pattern``'s files."""
    pattern = mask_pattern(pattern)
    folder = Path(mask_dir) / Path(pattern).parent.as_posix().replace("{case}", case)
    if not folder.is_dir():
        raise InputError(case, folder, f"mask folder {folder} does not exist (convert.mask_pattern {pattern})")
    parts = {"{case}": re.escape(case), "{structure}": "(?P<structure>.+?)",
             "{ext}": "(?:" + "|".join(re.escape(e) for e in MASK_EXTENSIONS) + ")"}
    pieces = re.split(r"({case}|{structure}|{ext})", Path(pattern).name)
    if pieces.count("{structure}") != 1:
        raise ValueError(f"mask_pattern {pattern!r} needs {{structure}} exactly once in its file name")
    regex = "".join(parts.get(piece, re.escape(piece)) for piece in pieces)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        hit = re.fullmatch(regex, path.name, re.IGNORECASE)
        if hit and path.is_file():
            found.setdefault(hit.group("structure"), path)
    return folder, found


def read_annotation_table(table: str | os.PathLike, structures: Sequence[str],
                          structure_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, bool]]:
    """case -> {structure: contoured?} from an ``OAR_data.csv``-style table (``,`` ``;`` or tab).

    Columns are harmonised like ROI names; a structure without a column is not in the result
    (the mask files decide for it). A value other than 0, 1 or empty is a ValueError naming the cell.
    """
    path = Path(table)
    text = path.read_text(encoding="utf-8-sig")
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",;\t")
    except (csv.Error, IndexError):
        raise ValueError(f"annotation table {path}: cannot tell its delimiter (, ; or tab)") from None
    rows = [row for row in csv.reader(text.splitlines(), dialect) if any(cell.strip() for cell in row)]
    header = [cell.strip() for cell in rows[0]]
    harmonised = harmonise(structures, header[1:], structure_names)
    if harmonised["ambiguous"]:
        name, hits = next(iter(harmonised["ambiguous"].items()))
        raise ValueError(f"annotation table {path}: column {name!r} matches structures {hits}")
    column_of = {s: header.index(m["roi"]) for s, m in harmonised["matched"].items()}
    result: dict[str, dict[str, bool]] = {}
    for row in rows[1:]:
        case = row[0].strip()
        flags = {}
        for structure, column in column_of.items():
            cell = row[column].strip() if column < len(row) else ""
            try:
                value = float(cell) if cell else 0.0
            except ValueError:
                value = -1.0
            if value not in (0.0, 1.0):
                raise ValueError(f"annotation table {path}: case {case}, column {header[column]!r}: {cell!r} is "
                                 "not 0, 1 or empty")
            flags[structure] = value == 1.0
        result[case] = flags
    return result


# ----------------------------------------------------------------------------- channels


def paint_label_map(channels: np.ndarray) -> np.ndarray:
    """The uint8 label map of (C, z, y, x) binary channels: value c+1 where channel c is set, the
    later channel winning where channels overlap (the documented priority order)."""
    if len(channels) > 255:
        raise ValueError(f"{len(channels)} structures do not fit a uint8 label map (at most 255)")
    label = np.zeros(channels.shape[1:], dtype=np.uint8)
    for channel, mask in enumerate(channels):
        label[mask.astype(bool)] = channel + 1
    return label


def write_structures(channels: np.ndarray, geometry: dict[str, Any], path: str | os.PathLike) -> None:
    """Write (C, z, y, x) 0/1 channels as ``structures.nrrd`` (module docstring) on ``geometry``'s
    LPS grid (``origin``, ``spacing``, ``direction`` as ITK gives them), gzip, atomically."""
    import nrrd

    from hnct.nrrdio import blank_write_time_in_file

    axes = np.reshape(np.asarray(geometry["direction"], dtype=float), (3, 3)) * np.asarray(geometry["spacing"])
    header = {
        "space": "left-posterior-superior",
        # One row per file axis (x, y, z, channel); nan is pynrrd's "none" for the channel axis.
        "space directions": np.vstack([axes.T, np.full(3, np.nan)]),
        "space origin": np.asarray(geometry["origin"], dtype=float),
        "kinds": ["domain", "domain", "domain", "list"],
        "encoding": "gzip",
    }
    with atomic_path(path, suffix=".nrrd") as tmp:
        # zlib level 1: the sparse 0/1 channels compress almost as well as at pynrrd's default 9, 5x faster.
        nrrd.write(str(tmp), np.ascontiguousarray(channels, dtype=np.uint8), header, index_order="C",
                   compression_level=1)
        blank_write_time_in_file(tmp)


def read_structures(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``structures.nrrd`` as a (C, z, y, x) uint8 array and its header."""
    import nrrd

    return nrrd.read(str(path), index_order="C")
