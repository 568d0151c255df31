"""``hnct <stage> ...``: every stage's command line under one name (same as ``python -m hnct.<stage>``)."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "demo": "generate the synthetic demo cohort (DICOM CT + RTSTRUCT)",
    "fetch": "download a case's series from TCIA, or index a local DICOM folder",
    "laryngealct": "LaryngealCT annotations: download (checksummed), build the cohort table",
    "convert": "DICOM series -> NRRD volume + per-structure channels + label map",
    "roi_table": "ROI names no structure matched, names x cases (unmatched_rois.tsv)",
    "crop": "1 mm isotropic laryngeal crop",
    "slices": "windowed axial slices (.npz, .jpg) and their index",
    "folds": "patient-level stratified folds",
    "train": "train one task x model x fold",
    "evaluate": "metrics of one fold",
    "exclusions": "gather every excluded case into exclusions.tsv",
    "report": "tables and figures",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in STAGES:
        width = max(map(len, STAGES))
        print("usage: hnct <stage> [args...]\n\nstages:")
        for name, what in STAGES.items():
            print(f"  {name:<{width}}  {what}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(f"hnct.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
