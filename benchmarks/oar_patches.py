"""oar patches: the patch loader's throughput against the network's training step on the same patches.

Data: ``--cases`` preprocessed cases written here in hnct.preprocess's layout (``image.npy`` float32
HU, ``structures.npy`` uint8 (C, z, y, x), ``locations.npy``, ``foreground.npy`` and the sidecar), a
neck-sized body (``--shape`` z y x voxels at 1 mm) with ``--structures`` structures of very different
sizes. The loader is hnct.tasks.oar's own ``PatchDataset`` (memory-mapped arrays, every third patch
centred on a structure, clip + z-score), timed in one process: patches/s of one worker. The step is
``hnct.models.build_model("oar", model)`` sized from the same plan, trained (forward, the task's
masked Dice + BCE with deep supervision, backward, AdamW step) on batches of those patches, already
in memory. The ratio ``loader patches/s / step patches/s`` is how many steps one worker feeds: below
1, training waits for data (add workers). Separately, the DynUNet step at ``--big-patch`` (128^3,
nnU-Net's batch 2 unless ``--big-batch``): seconds per step and, on CUDA, peak memory.

Runs on CUDA when ``torch.cuda.is_available()``, otherwise on the CPU (the JSON's ``device`` says which).

    .venv/bin/python benchmarks/oar_patches.py                 # dynunet, patch 64x128x128, CPU here
    .venv/bin/python benchmarks/oar_patches.py --model segresnet --no-big
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

REPO = benchutil.REPO
sys.path.insert(0, str(REPO / "workflow"))


def write_cases(root: Path, n_cases: int, shape: list[int], n_structures: int, seed: int) -> list[Any]:
    """Preprocessed cases (hnct.preprocess's files and sidecar) with structures from ~60 mm to ~4 mm."""
    import numpy as np

    from hnct.common import ok_sidecar, write_json
    from hnct.preprocess import save_npy
    from hnct.tasks.oar import CaseVolume

    rng = np.random.default_rng(seed)
    volumes = []
    z, y, x = np.indices(shape, dtype=np.float32)
    for n in range(n_cases):
        case = f"OAR-{n + 1:03d}"
        folder = root / case
        body = ((y - shape[1] / 2) / (shape[1] / 2.3)) ** 2 + ((x - shape[2] / 2) / (shape[2] / 2.2)) ** 2 <= 1
        image = np.where(body, 30.0, -1000.0).astype(np.float32) + rng.normal(0, 15, shape).astype(np.float32)
        channels = np.zeros((n_structures, *shape), np.uint8)
        for c in range(n_structures):
            radius = max(shape[1] / 8 / (1.6 ** c), 2.0)  # each structure smaller than the last
            centre = [rng.uniform(0.3, 0.7) * s for s in shape]
            mask = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius ** 2
            channels[c] = mask
            image[mask] = 60.0 + 40 * c
        files = {name: str(folder / f"{name}.npy") for name in ("image", "structures", "foreground", "locations")}
        save_npy(image, Path(files["image"]))
        save_npy(channels, Path(files["structures"]))
        save_npy(image[channels.any(axis=0)][:10000], Path(files["foreground"]))
        rows = [np.column_stack([np.full(len(w), c), w]) for c, w in
                ((c, np.argwhere(channels[c])[:10000]) for c in range(n_structures))]
        save_npy(np.concatenate(rows).astype(np.int32), Path(files["locations"]))
        sidecar = root / f"{case}.json"
        grid = {"size": list(reversed(shape)), "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
                "direction": list(np.eye(3).ravel())}  # 1 mm, LPS-aligned (the loader's L/R axis: x)
        write_json(sidecar, ok_sidecar(case, "preprocess", files=files, shape_zyx=list(shape), grid=grid, structures=[
            {"name": f"S{c}", "channel": c, "annotated": True, "voxels": int(channels[c].sum())}
            for c in range(n_structures)]))
        volumes.append(CaseVolume(case, str(sidecar)))
    return volumes


def time_loader(volumes, patch: list[int], n_patches: int, intensity: dict[str, float], seed: int):
    from hnct.tasks.oar import PatchDataset

    dataset = PatchDataset(volumes, n_patches, patch, intensity, seed, epoch=1)
    dataset[0]  # map the arrays once (page cache warm, as in an epoch after the first)
    started = time.perf_counter()
    items = [dataset[i] for i in range(n_patches)]
    seconds = time.perf_counter() - started
    return items, {"patches": n_patches, "seconds": seconds, "patches_per_s": n_patches / seconds}


def time_steps(model_name: str, plan: dict[str, Any], items, batch: int, steps: int, warmup: int, device,
               filters: int):
    import torch

    from hnct.models import build_model
    from hnct.tasks.oar import deep_supervision_loss

    cfg = {"plan": plan, "dynunet_base_filters": filters, "dynunet_max_filters": 320,
           "segresnet_init_filters": max(filters // 2, 8)}
    model = build_model("oar", model_name, cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    batches = []
    for start in range(0, len(items) - batch + 1, batch):
        chunk = items[start:start + batch]
        batches.append({k: torch.stack([i[k] for i in chunk]).to(device) for k in ("image", "target", "annotated")})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for n in range(warmup + steps):
        data = batches[n % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=amp):
            outputs = model(data["image"])
        loss = deep_supervision_loss(outputs, data["target"], data["annotated"])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if n >= warmup:
            times.append(time.perf_counter() - started)
    step = statistics.median(times)
    result = {"model": model_name, "patch": plan["patch_size"], "batch": batch, "steps": steps,
              "median_step_s": step, "patches_per_s": batch / step,
              "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dynunet", choices=["dynunet", "segresnet"])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 224, 224], metavar=("Z", "Y", "X"))
    parser.add_argument("--structures", type=int, default=6)
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128], metavar=("Z", "Y", "X"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--filters", type=int, default=32, help="dynunet_base_filters (segresnet: half)")
    parser.add_argument("--patches", type=int, default=60, help="patches timed through the loader")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--big-patch", type=int, default=128, help="side of the cubic DynUNet step patch")
    parser.add_argument("--big-batch", type=int, default=2)
    parser.add_argument("--big-steps", type=int, default=2, help="timed DynUNet steps at --big-patch")
    parser.add_argument("--big-warmup", type=int, default=1)
    parser.add_argument("--no-big", action="store_true", help="skip the DynUNet step at --big-patch")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--tiny", action="store_true", help="smoke test size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/oar_patches.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.cases, args.shape, args.structures, args.patch = 2, [24, 40, 40], 3, [16, 16, 16]
        args.patches, args.steps, args.filters, args.big_patch, args.big_batch = 6, 1, 4, 16, 1
        args.big_steps = 1

    import torch

    torch.set_num_threads(args.threads)
    info = benchutil.machine_info()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workdir = Path(tempfile.mkdtemp(prefix="hnct-bench-oar-"))
    try:
        volumes = write_cases(workdir, args.cases, args.shape, args.structures, args.seed)
        intensity = {"clip_low": -160.0, "clip_high": 300.0, "mean": 60.0, "std": 60.0}
        from hnct.preprocess import foreground_fractions

        plan = {"structures": [f"S{c}" for c in range(args.structures)], "spacing_zyx": [1.0, 1.0, 1.0],
                "patch_size": list(args.patch), "foreground_fraction": foreground_fractions([v.sidecar for v in volumes])}
        items, loader = time_loader(volumes, args.patch, args.patches, intensity, args.seed)
        step = time_steps(args.model, plan, items, args.batch, args.steps, args.warmup, device, args.filters)
        result: dict[str, Any] = {
            "benchmark": "oar_patches", "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else benchutil.cpu_model(),
            "settings": vars(args), "loader_one_worker": loader, "step": step,
            "ratio_loader_over_step": loader["patches_per_s"] / step["patches_per_s"],
        }
        # written now too: the step at the big patch can take many minutes on a loaded CPU
        benchutil.write_result("oar_patches", {**result, "machine": benchutil.finish_info(dict(info))}, args.out)
        if not args.no_big:
            big = [args.big_patch] * 3
            big_items, _ = time_loader(volumes, big, args.big_batch * (args.big_steps + args.big_warmup),
                                       intensity, args.seed)
            result["dynunet_big_patch"] = time_steps("dynunet", {**plan, "patch_size": big}, big_items,
                                                     args.big_batch, args.big_steps, args.big_warmup, device,
                                                     args.filters)
        result["machine"] = benchutil.finish_info(info)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [{"what": f"loader (1 worker, patch {'x'.join(map(str, args.patch))})",
             "per_s": loader["patches_per_s"], "seconds": loader["seconds"] / loader["patches"]},
            {"what": f"{args.model} step (batch {args.batch})", "per_s": step["patches_per_s"],
             "seconds": step["median_step_s"]}]
    if "dynunet_big_patch" in result:
        big_step = result["dynunet_big_patch"]
        rows.append({"what": f"dynunet step at {args.big_patch}^3 (batch {args.big_batch})",
                     "per_s": big_step["patches_per_s"], "seconds": big_step["median_step_s"]})
    print(benchutil.format_table(rows, [("what", "measured", ""), ("per_s", "patches/s", ".2f"),
                                        ("seconds", "s per patch / step", ".3f")]))
    print(f"loader / step throughput: {result['ratio_loader_over_step']:.1f}x on {device.type}")
    print(benchutil.write_result("oar_patches", result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
