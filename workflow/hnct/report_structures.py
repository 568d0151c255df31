"""The per-structure report of a task of report_kind ``structures`` (oar): tables and figures.

From every model x fold's ``per_case.csv`` (hnct.tasks.oar.evaluate: one row per case and
structure) and ``val_predictions.csv`` into ``results/report/structures/{task}/``:

``table.csv`` / ``table.md``  per model and structure: Dice, HD95 (mm) and NSD mean, median, IQR
                              (q1, q3) and n over the cases that define them, and the counts of
                              the cases that do not (missed: HD95 missing; false positives;
                              both empty; not annotated)
``boxplots.png``              per-structure box plots of Dice and HD95, one box per model
``dice_heatmap.png``          case x structure Dice per model (grey: not annotated; hatched
                              rows/cols: not scored)
``overlays.png``              QA: per structure group (a left/right pair together), the axial
                              slice through its reference's centre in one validation case that
                              has it, cropped around it: CT, reference (green) and prediction
                              (red) outlines
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hnct.common import atomic_path, setup_logging

log = logging.getLogger("hnct.report")

METRICS = ("dice", "hd95_mm", "nsd")
COUNTS = ("scored", "missed", "false_positive", "both_empty", "not_annotated")


def read_per_case(files: Sequence[str | Path]) -> pd.DataFrame:
    frames = [pd.read_csv(f, dtype={"case": str}) for f in files]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def structure_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """One row per model and structure (structures in their first-seen order)."""
    rows = []
    order = list(dict.fromkeys(per_case["structure"]))
    for (model, structure), part in per_case.groupby(["model", "structure"], sort=False):
        row = {"model": model, "structure": structure}
        for metric in METRICS:
            values = part[metric].to_numpy(float)
            values = values[np.isfinite(values)]
            q1, median, q3 = np.percentile(values, [25, 50, 75]) if values.size else (np.nan,) * 3
            row.update({f"{metric}_mean": values.mean() if values.size else np.nan, f"{metric}_median": median,
                        f"{metric}_q1": q1, f"{metric}_q3": q3, f"{metric}_n": int(values.size)})
        for status in COUNTS:
            row[f"n_{status}"] = int((part["status"] == status).sum())
        row["n_hd95_missing"] = row["n_missed"]
        rows.append(row)
    table = pd.DataFrame(rows)
    table["order"] = table["structure"].map(order.index)
    return table.sort_values(["model", "order"]).drop(columns="order").reset_index(drop=True)


def markdown_table(table: pd.DataFrame) -> str:
    def cell(row, metric):
        if row[f"{metric}_n"] == 0:
            return "–"
        return (f"{row[f'{metric}_mean']:.3f} / {row[f'{metric}_median']:.3f} "
                f"[{row[f'{metric}_q1']:.3f}, {row[f'{metric}_q3']:.3f}] (n={row[f'{metric}_n']})")

    lines = ["| model | structure | Dice mean / median [IQR] (n) | HD95 mm | NSD | missed (HD95 missing) "
             "| false positive | both empty | not annotated |", "|" + "---|" * 9]
    for _, row in table.iterrows():
        lines.append(f"| {row['model']} | {row['structure']} | {cell(row, 'dice')} | {cell(row, 'hd95_mm')} | "
                     f"{cell(row, 'nsd')} | {row['n_missed']} | {row['n_false_positive']} | {row['n_both_empty']} | "
                     f"{row['n_not_annotated']} |")
    return "\n".join(lines) + "\n"


def _pyplot(dpi: int, font_size: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": dpi, "font.size": font_size})
    return plt


def _save(fig, png: str | Path) -> None:
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def plot_boxplots(per_case: pd.DataFrame, png: str | Path, dpi: int = 110, font_size: float = 10) -> None:
    plt = _pyplot(dpi, font_size)
    structures = list(dict.fromkeys(per_case["structure"]))
    models = sorted(per_case["model"].unique())
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(structures) * len(models)), 7), squeeze=False)
    for ax, metric, label in zip(axes[:, 0], ("dice", "hd95_mm"), ("Dice", "HD95 (mm)")):
        data, positions, ticks = [], [], []
        for i, structure in enumerate(structures):
            for j, model in enumerate(models):
                values = per_case.loc[(per_case["structure"] == structure) & (per_case["model"] == model), metric]
                data.append(values.dropna().to_numpy(float))
                positions.append(i * (len(models) + 1) + j)
            ticks.append(i * (len(models) + 1) + (len(models) - 1) / 2)
        ax.boxplot([d if d.size else [np.nan] for d in data], positions=positions, widths=0.8)
        ax.set_xticks(ticks, structures, rotation=30, ha="right")
        ax.set_ylabel(label)
    axes[0, 0].set_title("per structure; boxes left to right: " + ", ".join(models))
    _save(fig, png)
    plt.close(fig)


def plot_heatmap(per_case: pd.DataFrame, png: str | Path, dpi: int = 110, font_size: float = 10) -> None:
    """Case x structure Dice per model; not-annotated cells grey, other unscored cells white."""
    plt = _pyplot(dpi, font_size)
    structures = list(dict.fromkeys(per_case["structure"]))
    models = sorted(per_case["model"].unique())
    cases = sorted(per_case["case"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(2 + 0.6 * len(structures) * len(models),
                                                      1.5 + 0.25 * len(cases)), squeeze=False)
    for ax, model in zip(axes[0], models):
        part = per_case[per_case["model"] == model]
        dice = part.pivot_table(index="case", columns="structure", values="dice", aggfunc="first")
        dice = dice.reindex(index=cases, columns=structures)
        status = part.pivot_table(index="case", columns="structure", values="status", aggfunc="first")
        status = status.reindex(index=cases, columns=structures)
        unknown = (status == "not_annotated").to_numpy()
        ax.imshow(np.where(unknown, 1.0, np.nan), cmap="Greys", vmin=0, vmax=4, aspect="auto")
        image = ax.imshow(dice.to_numpy(float), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(structures)), structures, rotation=45, ha="right")
        ax.set_yticks(range(len(cases)), cases)
        ax.set_title(model)
    fig.colorbar(image, ax=list(axes[0]), label="Dice (grey: not annotated)")
    _save(fig, png)
    plt.close(fig)


def structure_groups(names: Sequence[str]) -> dict[str, list[int]]:
    """Channels grouped for the QA overlay: each ``<stem>_L`` / ``<stem>_R`` pair under its stem
    (both sides on one slice), every other structure alone; in first-seen order."""
    groups: dict[str, list[int]] = {}
    for channel, name in enumerate(names):
        stem, _, side = str(name).rpartition("_")
        paired = side in ("L", "R") and {f"{stem}_L", f"{stem}_R"} <= set(map(str, names))
        groups.setdefault(stem if paired else str(name), []).append(channel)
    return groups


OVERLAY_MARGIN_MM = 15.0  # context around a group's reference on its overlay panel


def plot_overlays(prediction_files: Sequence[str | Path], png: str | Path, dpi: int = 110,
                  font_size: float = 10) -> None:
    """Per structure group (:func:`structure_groups`), the axial slice through the centre of its
    reference in the first validation case (of the first prediction file) where one of the group is
    annotated and present, cropped to the group with :data:`OVERLAY_MARGIN_MM` around it."""
    import nrrd

    from hnct.common import read_sidecar
    from hnct.preprocess import read_prediction, read_reference

    plt = _pyplot(dpi, font_size)
    predictions = pd.concat([pd.read_csv(f, dtype={"case": str}) for f in prediction_files], ignore_index=True) \
        if prediction_files else pd.DataFrame()
    panels = {}
    for record in predictions.itertuples(index=False):
        ref, names, annotated, spacing = read_reference(record.volume_sidecar)
        groups = {group: [c for c in channels if annotated[c] and ref[c].any()]
                  for group, channels in structure_groups(names).items() if group not in panels}
        groups = {group: channels for group, channels in groups.items() if channels}
        if not groups:
            continue
        ct = nrrd.read(read_sidecar(record.volume_sidecar)["volume"], index_order="C")[0]
        pred = read_prediction(record.masks_dir, names, ref.shape[1:])
        for group, channels in groups.items():
            where = np.argwhere(ref[channels].any(axis=0))
            z = int(round(where[:, 0].mean()))
            margin = [int(np.ceil(OVERLAY_MARGIN_MM / s)) for s in spacing[1:]]
            (y0, x0), (y1, x1) = where[:, 1:].min(axis=0) - margin, where[:, 1:].max(axis=0) + margin + 1
            box = (z, slice(max(y0, 0), y1), slice(max(x0, 0), x1))
            panels[group] = (record.case, ct[box], ref[channels][(slice(None), *box)],
                             pred[channels][(slice(None), *box)], spacing[1] / spacing[2])
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    for ax, (group, (case, ct, refs, preds, aspect)) in zip(axes[0], panels.items()):
        ax.imshow(np.clip(ct, -160, 240), cmap="gray", aspect=aspect)
        for ref, pred in zip(refs, preds):
            if ref.any():
                ax.contour(ref, levels=[0.5], colors="lime", linewidths=0.8)
            if pred.any():
                ax.contour(pred, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{group}\n{case}", fontsize=font_size * 0.8)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no annotated structure in the validation cases", ha="center")
    else:
        fig.suptitle("reference (green), prediction (red)", fontsize=font_size * 0.8)
    _save(fig, png)
    plt.close(fig)


def write_report(per_case_files, prediction_files, out_dir: str | Path, dpi: int = 110,
                 font_size: float = 10) -> pd.DataFrame:
    out_dir = Path(out_dir)
    per_case = read_per_case(per_case_files)
    if per_case.empty:
        raise ValueError(f"no per-case rows in {len(per_case_files)} per_case.csv file(s)")
    table = structure_table(per_case)
    with atomic_path(out_dir / "table.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_dir / "table.md") as tmp:
        tmp.write_text(markdown_table(table))
    plot_boxplots(per_case, out_dir / "boxplots.png", dpi, font_size)
    plot_heatmap(per_case, out_dir / "dice_heatmap.png", dpi, font_size)
    plot_overlays(prediction_files, out_dir / "overlays.png", dpi, font_size)
    log.info("structures report: %d models x %d structures -> %s", table["model"].nunique(),
             table["structure"].nunique(), out_dir)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct report_structures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-case", nargs="+", required=True, help="results/evaluate/{task}/*/fold*/per_case.csv")
    parser.add_argument("--predictions", nargs="*", default=[], help="results/train/{task}/*/fold*/val_predictions.csv")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--dpi", type=int, required=True)
    parser.add_argument("--font-size", type=float, required=True)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    write_report(args.per_case, args.predictions, args.out_dir, args.dpi, args.font_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
