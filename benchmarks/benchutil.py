"""Shared helpers of the benchmark scripts: machine description, child processes with their own
peak memory, result tables and JSON.

Benchmarks measure ratios within one run on a shared machine: every result records the load
average (``os.getloadavg``) before and after, so a reader can judge how noisy the run was.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
PACKAGES = ("numpy", "pydicom", "SimpleITK", "pynrrd", "pandas", "pillow", "torch", "monai", "snakemake",
            "snakemake-executor-plugin-slurm")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return float("nan")


def machine_info() -> dict[str, Any]:
    """Where and when: CPU, cores, RAM, load average, Python and package versions."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": total_ram_gb(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "versions": versions,
    }


def finish_info(info: dict[str, Any]) -> dict[str, Any]:
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    return info


def worker_env() -> dict[str, str]:
    """Environment of a measured child: hnct importable, BLAS/ITK limited to one thread.

    One thread matches the per-case SLURM jobs (threads: 1) and keeps the shared machine usable.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO / "workflow"), env.get("PYTHONPATH", "")] if p)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[var] = "1"
    return env


def run_measured(cmd: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, poll_s: float = 0.05) -> dict[str, Any]:
    """Run ``cmd`` as a child; return its wall time, CPU time, peak memory and its stdout/stderr.

    Wall time ends when the child exits: this thread blocks in ``os.wait4`` (a polling loop would
    round every run up to its next poll, up to 50 ms on a 0.16 s dcm2niix run). Peak memory: the
    child's resident memory plus that of its descendants, polled every ``poll_s`` by a watcher
    thread with psutil (``peak_rss_mb``; can miss a spike shorter than the interval; after 5 s the
    watcher polls every 0.25 s, as polling costs CPU too), which also kills the child at the
    timeout. The child's ``ru_maxrss`` from ``os.wait4`` is NOT used as a peak: Linux carries the
    forking parent's high-water mark over ``exec`` into it. Workers that report their own
    ``VmHWM`` are exact.
    """
    import threading

    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or worker_env(), cwd=cwd)
    chunks: dict[str, list[str]] = {"out": [], "err": []}

    def drain(stream, key):
        for line in stream:
            chunks[key].append(line)

    exited = threading.Event()
    watch = {"peak": 0, "timed_out": False}

    def watcher():
        try:
            watched = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not exited.is_set():
            try:
                rss = watched.memory_info().rss
                for child in watched.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                watch["peak"] = max(watch["peak"], rss)
            except psutil.NoSuchProcess:
                return
            elapsed = time.perf_counter() - start
            if timeout is not None and elapsed > timeout:
                watch["timed_out"] = True
                proc.kill()
                return
            exited.wait(poll_s if elapsed < 5 else max(poll_s, 0.25))

    # Drain the pipes in threads so a chatty child cannot block on a full pipe.
    threads = [threading.Thread(target=drain, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, "err"), daemon=True),
               threading.Thread(target=watcher, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    exited.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join(timeout=5)
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": watch["peak"] / 1024.0**2,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "stdout": "".join(chunks["out"]),
        "stderr": "".join(chunks["err"]),
        "timed_out": watch["timed_out"],
    }


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def format_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table; ``columns`` = (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and value != value):
                line.append("-")
            else:
                line.append(format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_result(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write ``payload`` as JSON to ``out`` (default ``benchmarks/results/<name>.json``)."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def python_cmd() -> list[str]:
    return [sys.executable]
