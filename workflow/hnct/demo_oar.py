"""demo: organs at risk of the synthetic phantoms (issue 13), nine structures of very different sizes.

Placed from :func:`hnct.demo.anatomy` (LPS mm; cx, cy, cz = the larynx centre on the airway axis,
nx, ny = the neck centre, the vertebral body at (nx, ny + 18)), drawn into the CT with realistic HU
(a contrast-enhanced neck CT) and written as labels:

========================  =======================================================  =========
structure                 shape                                                     HU
========================  =======================================================  =========
SpinalCord                cylinder r 4 mm in the canal (r 6 mm, CSF 10 HU) behind   38
                          the vertebral body
Trachea                   the airway lumen below the cricoid's lower edge           (air)
Esophagus                 elliptic tube 16 x 9 mm behind the trachea below the      45, lumen
                          cricoid, fat rim 1.5 mm, a collapsed air lumen             air
Thyroid_L / Thyroid_R     ellipsoids 9 x 12 x 18 mm either side of the trachea,     100
                          below the cricoid
A_Carotid_L / _R          cylinders r 3.5 mm antero-lateral of the vertebra         250
A_Vertebral_L / _R        cylinders r 1.8 mm (3.6 mm across, the small one) in a    250, wall
                          bony transverse foramen either side of the vertebral body  650
========================  =======================================================  =========

Label sources (:func:`oar_source`, from the case name): about a third of the cases get their
organs at risk as a HaN-Seg-style folder beside their DICOM (``<dicom_dir>/OAR/<case>/
<case>_OAR_<name>.seg.nrrd``, gzip NRRD on the CT grid, and ``<dicom_dir>/OAR/OAR_data.csv``:
``ID;<name>;...`` with 1/0 per structure), the others in their RTSTRUCT under varied ROI names
(``SpinalCord``, ``Spinal_Cord``, ``spinal cord``, ``Cord`` ...; :data:`ROI_NAMES`), which
``convert.structure_names`` harmonises, and a cord PRV (:data:`PRV_ROI`) that nothing matches. A quarter of the cases leave :data:`LEFT_OUT` out
(partial labels: drawn in the CT, not contoured; its OAR_data.csv entry is 0).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from hnct.common import atomic_path

OARS = ("SpinalCord", "Trachea", "Esophagus", "Thyroid_L", "Thyroid_R", "A_Carotid_L", "A_Carotid_R",
        "A_Vertebral_L", "A_Vertebral_R")
# ROI names the RTSTRUCT cases use, one drawn per case and structure.
ROI_NAMES = {
    "SpinalCord": ["SpinalCord", "Spinal_Cord", "spinal cord", "Cord", "SPINAL-CORD"],
    "Trachea": ["Trachea", "Airway_Trachea", "TRACHEA"],
    "Esophagus": ["Esophagus", "Oesophagus", "Esophagus_S"],
    "Thyroid_L": ["Thyroid_L", "Glnd_Thyroid_L", "Thyroid Lt", "Left_Thyroid"],
    "Thyroid_R": ["Thyroid_R", "Glnd_Thyroid_R", "Thyroid Rt", "Right_Thyroid"],
    "A_Carotid_L": ["A_Carotid_L", "Carotid_L", "LCarotid", "Carotid Left"],
    "A_Carotid_R": ["A_Carotid_R", "Carotid_R", "RCarotid", "Carotid Right"],
    "A_Vertebral_L": ["A_Vertebral_L", "VertebralA_L", "Vertebral Lt"],
    "A_Vertebral_R": ["A_Vertebral_R", "VertebralA_R", "Vertebral Rt"],
}
# Mask file names (HaN-Seg style) of the mask-folder cases.
MASK_NAMES = {"SpinalCord": "SpinalCord", "Trachea": "Trachea", "Esophagus": "Esophagus_S",
              "Thyroid_L": "Thyroid_L", "Thyroid_R": "Thyroid_R", "A_Carotid_L": "A_Carotid_L",
              "A_Carotid_R": "A_Carotid_R", "A_Vertebral_L": "A_Vertebral_L", "A_Vertebral_R": "A_Vertebral_R"}
LEFT_OUT = "Thyroid_R"
# A planning structure the RTSTRUCT cases also hold (the cord plus a 3 mm margin): it matches no
# structure (patterns match whole names), so it shows up in the unmatched-ROI table, unused.
PRV_ROI, PRV_MARGIN = "SpinalCord_PRV03", 3.0
OAR_FOLDER = "OAR"
ANNOTATION_TABLE = "OAR_data.csv"

HU = {"cord": 38.0, "csf": 10.0, "oesophagus": 45.0, "fat": -100.0, "air": -1000.0, "thyroid": 100.0,
      "artery": 250.0, "bone": 650.0}
CORD_RADIUS, CANAL_RADIUS, CANAL_BEHIND_NECK = 4.0, 6.0, 35.0
OESOPHAGUS_SEMI, OESOPHAGUS_LUMEN, OESOPHAGUS_GAP = (8.0, 4.5), (3.0, 0.8), 2.0
THYROID_SEMI, THYROID_GAP, THYROID_ANTERIOR = (4.5, 6.0, 9.0), 3.0, 6.0
THYROID_BELOW_CRICOID = 10.0  # lobe centre below the cricoid's lower edge, mm
CAROTID_RADIUS, CAROTID_OFFSET = 3.5, (24.0, 22.0)  # (lateral, posterior) of the larynx centre
VERTEBRAL_RADIUS, FORAMEN_WALL, VERTEBRAL_LATERAL = 1.8, 1.2, 15.5


def _pick(*parts: Any) -> int:
    return int(hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:12], 16)


def oar_source(row) -> str:
    """``masks`` (a HaN-Seg-style folder) or ``rtstruct`` for this case (``none`` without a CT)."""
    if row["demo_kind"] == "no_ct":
        return "none"
    return "masks" if _pick(row["case"], "oar-source") % 3 == 0 else "rtstruct"


def contoured(row) -> list[str]:
    """The organs at risk this case's labels have (all but :data:`LEFT_OUT` in a quarter of the cases)."""
    left_out = _pick(row["case"], "oar-left-out") % 4 == 1
    return [s for s in OARS if not (left_out and s == LEFT_OUT)]


def roi_name(row, structure: str) -> str:
    names = ROI_NAMES[structure]
    return names[_pick(row["case"], structure, "roi-name") % len(names)]


class Phantom:
    """One case's organs at risk on its axial pixel grid (``X``, ``Y``: LPS mm of the pixel centres,
    rows = y, cols = x): the shapes that do not change along z are made once, the slices from them."""

    def __init__(self, anat: dict[str, Any], X: np.ndarray, Y: np.ndarray):
        from hnct import demo

        self.tissue_codes = (demo.SOFT, demo.FAT, demo.FAT_PAD)
        self.noise_hu = demo.NOISE_HU
        cx, cy, cz = anat["larynx_centre"]
        nx, ny = anat["neck_centre"]
        airway = anat.get("cartilage", {}).get("airway_radius_mm", demo.AIRWAY_RADIUS)
        self.below_cricoid = cz + demo.CRICOID_Z[0]
        self.thyroid_z = self.below_cricoid - THYROID_BELOW_CRICOID
        vx, vy = nx, ny + 18.0  # the vertebral body's centre (hnct.demo._region_slice)
        oy = cy + airway + OESOPHAGUS_GAP + OESOPHAGUS_SEMI[1]

        def ellipse(x0, y0, a, b):
            return ((X - x0) / a) ** 2 + ((Y - y0) / b) ** 2

        def disc(x0, y0, radius):
            return np.hypot(X - x0, Y - y0) <= radius

        self.fixed = {"SpinalCord": disc(nx, ny + CANAL_BEHIND_NECK + 1.0, CORD_RADIUS)}
        self.prv = disc(nx, ny + CANAL_BEHIND_NECK + 1.0, CORD_RADIUS + PRV_MARGIN)
        self.below = {"Trachea": disc(cx, cy, airway), "Esophagus": ellipse(cx, oy, *OESOPHAGUS_SEMI) <= 1}
        self.thyroid = {}
        walls = np.zeros(X.shape, dtype=bool)
        for side, suffix in ((1.0, "L"), (-1.0, "R")):  # + x = patient left
            tx = cx + side * (airway + THYROID_GAP + THYROID_SEMI[0])
            self.thyroid[f"Thyroid_{suffix}"] = ellipse(tx, cy - THYROID_ANTERIOR, *THYROID_SEMI[:2])
            self.fixed[f"A_Carotid_{suffix}"] = disc(cx + side * CAROTID_OFFSET[0], cy + CAROTID_OFFSET[1],
                                                     CAROTID_RADIUS)
            self.fixed[f"A_Vertebral_{suffix}"] = disc(vx + side * VERTEBRAL_LATERAL, vy, VERTEBRAL_RADIUS)
            walls |= disc(vx + side * VERTEBRAL_LATERAL, vy, VERTEBRAL_RADIUS + FORAMEN_WALL)
        self.canal = disc(nx, ny + CANAL_BEHIND_NECK, CANAL_RADIUS)
        self.rim = ellipse(cx, oy, OESOPHAGUS_SEMI[0] + 1.5, OESOPHAGUS_SEMI[1] + 1.5) <= 1
        self.lumen = ellipse(cx, oy, *OESOPHAGUS_LUMEN) <= 1
        self.walls = walls
        self.empty = np.zeros(X.shape, dtype=bool)

    def slice_masks(self, z: float) -> dict[str, np.ndarray]:
        """Boolean (rows, cols) mask of every organ at risk on the axial plane at ``z`` (LPS mm)."""
        below = z < self.below_cricoid
        masks = dict(self.fixed)
        masks.update({s: m if below else self.empty for s, m in self.below.items()})
        t = 1 - ((z - self.thyroid_z) / THYROID_SEMI[2]) ** 2
        masks.update({s: e <= t if t > 0 else self.empty for s, e in self.thyroid.items()})
        return {s: masks[s] for s in OARS}

    def paint_hu(self, hu: np.ndarray, region: np.ndarray, z: float, rng: np.random.Generator) -> None:
        """Draw the organs at risk into one CT slice ``hu`` (noise already added) in place: only over
        soft tissue and fat of the phantom, never over airway, bone, cartilage, tumour or nodes."""
        masks = self.slice_masks(z)
        below = z < self.below_cricoid
        layers = [(self.canal, "csf"), (masks["SpinalCord"], "cord"), (self.rim & below, "fat"),
                  (masks["Esophagus"], "oesophagus"), (self.lumen & masks["Esophagus"], "air"),
                  (masks["Thyroid_L"] | masks["Thyroid_R"], "thyroid"),
                  (masks["A_Carotid_L"] | masks["A_Carotid_R"], "artery"), (self.walls, "bone"),
                  (masks["A_Vertebral_L"] | masks["A_Vertebral_R"], "artery")]
        tissue = np.isin(region, self.tissue_codes)
        for mask, tissue_name in layers:  # later layers over earlier ones
            where = mask & tissue
            hu[where] = HU[tissue_name] + rng.normal(0, self.noise_hu, int(where.sum())).astype(np.float32)


def mask_files(row) -> list[str]:
    """The mask-folder files a case gets, relative to the DICOM root (none for RTSTRUCT cases)."""
    if oar_source(row) != "masks":
        return []
    folder = f"{row['dicom_dir']}/{OAR_FOLDER}"
    names = sorted(f"{folder}/{row['case']}/{row['case']}_OAR_{MASK_NAMES[s]}.seg.nrrd" for s in contoured(row))
    return names + [f"{folder}/{ANNOTATION_TABLE}"]


def add_oars(row, phantom: Phantom, geo: dict[str, Any], dicom_root: Path, contours: dict[str, list]) -> list[str]:
    """Label the case's organs at risk: contours added to ``contours`` (ROI name -> [(slice, polygon)])
    for an RTSTRUCT case, or the mask folder written for a mask case (returns its files,
    :func:`mask_files`)."""
    source = oar_source(row)
    if source == "none":
        return []
    structures = contoured(row)
    volumes = {s: np.zeros((geo["n_slices"], geo["rows"], geo["cols"]), dtype=np.uint8) for s in structures}
    for k, z in enumerate(geo["zs"]):
        masks = phantom.slice_masks(z)
        for structure in structures:
            if source == "rtstruct":
                contours.setdefault(roi_name(row, structure), []).extend((k, c) for c in _polygons(masks[structure], geo, z))
            else:
                volumes[structure][k] = masks[structure]
        if source == "rtstruct":
            contours.setdefault(PRV_ROI, []).extend((k, c) for c in _polygons(phantom.prv, geo, z))
    if source == "rtstruct":
        return []
    return _write_mask_folder(row, geo, volumes, dicom_root)


def _polygons(mask: np.ndarray, geo: dict[str, Any], z: float) -> list[np.ndarray]:
    """Closed polygons (N x 3, LPS mm) of a slice mask's boundaries at the 0.5 level (marching squares
    on the mask's bounding box; every boundary point kept: these shapes are small and smooth)."""
    from skimage import measure

    rows, cols = np.nonzero(mask)
    if not len(rows):
        return []
    r0, c0 = int(rows.min()) - 1, int(cols.min()) - 1  # the box with a one-pixel empty margin
    box = np.pad(mask, 1)[r0 + 1:int(rows.max()) + 3, c0 + 1:int(cols.max()) + 3].astype(np.float32)
    polygons = []
    for contour in measure.find_contours(box, 0.5):
        points = contour[:-1]  # find_contours closes the loop by repeating the first point
        if len(points) >= 3:
            x = geo["origin"][0] + (points[:, 1] + c0) * geo["pixel_spacing"]
            y = geo["origin"][1] + (points[:, 0] + r0) * geo["pixel_spacing"]
            polygons.append(np.column_stack([x, y, np.full(len(x), z)]))
    return polygons


def _write_mask_folder(row, geo: dict[str, Any], volumes: dict[str, np.ndarray], dicom_root: Path) -> list[str]:
    import SimpleITK as sitk

    files = mask_files(row)
    for structure, volume in volumes.items():
        image = sitk.GetImageFromArray(volume)
        image.SetOrigin(geo["origin"])
        image.SetSpacing(geo["spacing"])
        image.SetDirection([float(v) for v in geo["direction"]])
        path = dicom_root / f"{row['dicom_dir']}/{OAR_FOLDER}/{row['case']}/{row['case']}_OAR_{MASK_NAMES[structure]}.seg.nrrd"
        with atomic_path(path, suffix=".seg.nrrd") as tmp:
            sitk.WriteImage(image, str(tmp), True)
    header = ";".join(["ID"] + [MASK_NAMES[s] for s in OARS])
    flags = ";".join(["1" if s in volumes else "0" for s in OARS])
    with atomic_path(dicom_root / files[-1]) as tmp:
        tmp.write_text(f"{header}\n{row['case']};{flags}\n")
    return files


def truth(row) -> dict[str, Any]:
    """What the manifest records of the case's organs at risk."""
    source = oar_source(row)
    return {"source": source, "contoured": contoured(row) if source != "none" else [], "files": mask_files(row),
            "roi_names": {s: roi_name(row, s) for s in contoured(row)} if source == "rtstruct" else {},
            "unmatched_rois": [PRV_ROI] if source == "rtstruct" else [],
            "hu": HU}
