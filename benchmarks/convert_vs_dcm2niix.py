"""Whole-process convert against dcm2niix on the same series, side by side in one run.

Reference: dcm2niix (its PyPI package, the converter imaging researchers compare with), its
binary run as ``dcm2niix -z n -b n -o OUT -f %s FOLDER`` (uncompressed NIfTI, no BIDS sidecar; the
closest to hnct's uncompressed NRRD) — the binary itself, not the package's Python console-script
wrapper, which would add an interpreter start to every dcm2niix run. hnct: ``python -m
hnct.convert --labels none`` as the convert rule runs it (interpreter start, imports, header index,
decode, NRRD and sidecar writes all counted), its modules byte-compiled first as in any installed
package (with PYTHONDONTWRITEBYTECODE set, each run would otherwise compile hnct's sources again).

Series: the real LUNG1-001 CT (512 x 512 x 134, NSCLC-Radiomics, from the verified test data cache
of :mod:`hnct.testdata`, ``make testdata``) and
a generated 512 x 512 x 300 series (benchmarks/preprocess.py's phantom, 1 mm slices). Each pair
runs alternately (hnct, dcm2niix, hnct, ...) ``--repeat`` times after one warm-up of each (page
cache filled for both); each run writes into a folder cleared of its previous output (outside the
timing: hnct would otherwise pay for deleting its last volume, while dcm2niix adds a suffix
to the name and deletes nothing); the medians give the ratio hnct / dcm2niix per series (the target's),
and the medians of CPU time (user + system) a second ratio, less inflated by a loaded machine. A
third command in the same alternation, ``python -c "import numpy, gdcm"``, is the floor of a
Python convert on numpy and GDCM's scanner (interpreter start and imports only), as a ratio to
dcm2niix too: where it is near the target, no work inside convert can meet it. Wall
times come from benchutil.run_measured (child processes, peak RSS polled). The load average before and after
is recorded: on a shared machine, read the ratios, not the seconds.

    .venv/bin/python benchmarks/convert_vs_dcm2niix.py               # both series, 7 pairs each
    .venv/bin/python benchmarks/convert_vs_dcm2niix.py --small       # a 64 x 64 x 20 series only (smoke)
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

sys.path.insert(0, str(benchutil.REPO / "workflow"))  # this checkout's hnct (its test data cache root)

LUNG1 = Path("testdata") / "real" / "nsclc-radiomics-LUNG1-001" / "LUNG1-001" / "image"  # under the cache root
TARGET_RATIO = 1.5


def dcm2niix_exe() -> str:
    """The dcm2niix binary of the PyPI package (its Python wrapper would add an interpreter start)."""
    try:
        import dcm2niix
    except ImportError:
        raise SystemExit("dcm2niix not found: pip install the test extra (dcm2niix==1.0.20260724)") from None
    return dcm2niix.bin


def compile_package(checkout: Path) -> None:
    """Byte-compile a checkout's hnct package, as an installed package is."""
    if not compileall.compile_dir(str(checkout / "workflow" / "hnct"), quiet=1):
        raise SystemExit(f"cannot byte-compile {checkout / 'workflow' / 'hnct'}")


def generated_series(workdir: Path, n_slices: int, rows: int) -> Path:
    import preprocess

    preprocess.ROWS = preprocess.COLS = rows
    spec = {"case": f"BENCH-{rows}x{n_slices}", "n_slices": n_slices, "pixel_mm": 0.5, "slice_mm": 1.0}
    case = preprocess.write_case(workdir, spec, seed=20260101)
    return workdir / case["ct_dir"]


def hnct_cmd(name: str, folder: Path, out: Path) -> list[str]:
    return benchutil.python_cmd() + [
        "-m", "hnct.convert", "--case", name, "--dicom-dir", str(folder), "--volume", str(out / f"{name}.nrrd"),
        "--sidecar", str(out / f"{name}.json"), "--labels", "none"]


def measure_pair(name: str, folder: Path, workdir: Path, repeat: int, timeout: float,
                 reference_checkout: Path | None = None) -> dict[str, Any]:
    out = workdir / f"out-{name}"
    out.mkdir(parents=True, exist_ok=True)
    # tool: (command, environment, the files its previous run left, removed before each run untimed:
    # every run writes into a folder without its earlier output, as a Snakemake job does)
    commands = {
        "hnct": (hnct_cmd(name, folder, out), None, f"{name}.*"),
        "dcm2niix": ([dcm2niix_exe(), "-z", "n", "-b", "n", "-o", str(out), "-f", f"{name}_dcm2niix", str(folder)],
                     None, f"{name}_dcm2niix*"),
        # The floor of any convert written in Python on numpy with GDCM's header scanner: the
        # interpreter's start and those two imports, nothing read or written.
        "imports": (benchutil.python_cmd() + ["-c", "import numpy, gdcm"], None, f"{name}.__none__"),
    }
    if reference_checkout:
        # The same command on another checkout (e.g. before a change), to see the gain in this run.
        env = benchutil.worker_env()
        env["PYTHONPATH"] = str(reference_checkout / "workflow")
        (out / "reference").mkdir(exist_ok=True)
        commands["hnct_reference"] = (hnct_cmd(name, folder, out / "reference"), env, f"reference/{name}.*")
    runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in commands}
    for attempt in range(repeat + 1):  # the first round warms the page cache and is not kept
        for tool, (cmd, env, previous) in commands.items():
            for path in out.glob(previous):
                path.unlink()
            measured = benchutil.run_measured(cmd, timeout=timeout, env=env)
            if measured["returncode"] != 0:
                raise SystemExit(f"{tool} failed on {folder}:\n"
                                 f"{measured['stdout'][-2000:]}{measured['stderr'][-2000:]}")
            if attempt:
                runs[tool].append({"wall_s": round(measured["wall_s"], 4),
                                   "cpu_s": round(measured["user_s"] + measured["sys_s"], 4),
                                   "peak_rss_mb": round(measured["peak_rss_mb"], 1)})
    medians = {tool: statistics.median(r["wall_s"] for r in rs) for tool, rs in runs.items()}
    cpu = {tool: statistics.median(r["cpu_s"] for r in rs) for tool, rs in runs.items()}
    return {
        "series": name,
        "folder": str(folder),
        "n_files": sum(1 for p in folder.iterdir() if p.is_file()),
        "runs": runs,
        "median_wall_s": {tool: round(v, 4) for tool, v in medians.items()},
        "median_peak_rss_mb": {tool: statistics.median(r["peak_rss_mb"] for r in rs) for tool, rs in runs.items()},
        "ratio_hnct_over_dcm2niix": round(medians["hnct"] / medians["dcm2niix"], 3),
        # CPU time (user + system) is what a loaded machine inflates least: a second view, not the target's.
        "median_cpu_s": {tool: round(v, 4) for tool, v in cpu.items()},
        "cpu_ratio_hnct_over_dcm2niix": round(cpu["hnct"] / cpu["dcm2niix"], 3),
        "ratio_imports_over_dcm2niix": round(medians["imports"] / medians["dcm2niix"], 3),
        "ratio_reference_over_dcm2niix": round(medians["hnct_reference"] / medians["dcm2niix"], 3)
        if "hnct_reference" in medians else None,
        "within_target": medians["hnct"] / medians["dcm2niix"] <= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="alternating pairs per series (default 7)")
    parser.add_argument("--lung1", default="", help="the LUNG1-001 CT folder (default: in the test data cache, "
                        "$HNCT_TESTDATA or ~/.cache/hnct/testdata; skipped if absent)")
    parser.add_argument("--small", action="store_true", help="one 64 x 64 x 20 generated series (smoke test)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per child, seconds")
    parser.add_argument("--reference-checkout", default=None,
                        help="another hnct checkout to time alongside (its workflow/ on PYTHONPATH)")
    parser.add_argument("--workdir", default=None, help="where generated series and outputs go (default: temp)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/convert_vs_dcm2niix.json)")
    args = parser.parse_args(argv)
    info = benchutil.machine_info()
    info["versions"]["dcm2niix"] = benchutil.metadata.version("dcm2niix")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hnct-vs-dcm2niix-"))
    try:
        series: list[tuple[str, Path]] = []
        if args.small:
            series.append(("generated-64x64x20", generated_series(workdir / "gen", 20, 64)))
        else:
            from hnct.testdata import HOW_TO_GET, default_root

            lung1 = Path(args.lung1) if args.lung1 else default_root() / LUNG1
            if lung1.is_dir():
                series.append(("LUNG1-001", lung1))
            else:
                print(f"LUNG1-001 not found at {lung1}: skipped ({HOW_TO_GET})", file=sys.stderr)
            series.append(("generated-512x512x300", generated_series(workdir / "gen", 300, 512)))
        reference = Path(args.reference_checkout).resolve() if args.reference_checkout else None
        for checkout in [benchutil.REPO] + ([reference] if reference else []):
            compile_package(checkout)
        pairs = [measure_pair(name, folder, workdir, args.repeat, args.timeout, reference) for name, folder in series]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "benchmark": "convert_vs_dcm2niix",
        "reference": "dcm2niix -z n -b n (the PyPI dcm2niix package's binary), same series, alternating runs",
        "reference_checkout": str(reference) if reference else None,
        "target": f"hnct / dcm2niix <= {TARGET_RATIO} (median whole-process wall time)",
        "machine": benchutil.finish_info(info),
        "pairs": pairs,
    }
    path = benchutil.write_result("convert_vs_dcm2niix", result, args.out)
    print(benchutil.format_table(
        [{"series": p["series"], "hnct": p["median_wall_s"]["hnct"], "dcm2niix": p["median_wall_s"]["dcm2niix"],
          "ratio": p["ratio_hnct_over_dcm2niix"], "ok": "yes" if p["within_target"] else "no",
          "before": p["ratio_reference_over_dcm2niix"], "floor": p["ratio_imports_over_dcm2niix"],
          "cpu_ratio": p["cpu_ratio_hnct_over_dcm2niix"],
          "hnct_mb": p["median_peak_rss_mb"]["hnct"], "d2n_mb": p["median_peak_rss_mb"]["dcm2niix"]}
         for p in pairs],
        [("series", "series", ""), ("hnct", "hnct s", ".3f"), ("dcm2niix", "dcm2niix s", ".3f"),
         ("ratio", "hnct/dcm2niix", ".2f"), ("ok", f"<= {TARGET_RATIO}", ""), ("cpu_ratio", "CPU ratio", ".2f"),
         ("floor", "imports/dcm2niix", ".2f"), ("before", "reference/dcm2niix", ".2f"), ("hnct_mb", "hnct MB", ".0f"),
         ("d2n_mb", "dcm2niix MB", ".0f")]))
    print(f"load average {info['loadavg_start']} -> {info['loadavg_end']}; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
