"""Loader benchmark: aligned patch pairs per second and MB/s from page-cached shards built by `ctld-shards`.

    python benchmarks/bench_loader.py --out bench_out/loader.json
    python benchmarks/bench_loader.py --workers 1,2,4 --batches 100 --shards_dir /data/shards   # existing set

Without --shards_dir it writes synthetic thin CT volumes (NIfTI, 1 mm slices) and builds shards from them with
`ctld-shards build` (thick partners simulated), then reads every shard once so the set is page-cached. The
loader runs as in training (`make_patch_loader`, resampled, configs/base.yaml data section: 8 -> 40 slices,
192x192, 4 patches per decoded volume, augmentation and foreground-biased crops on), for each DataLoader
worker count. The first batches (worker start-up, shuffle buffer fill) are not timed.

Reported per worker count:
  pairs_per_s             patch pairs delivered to the training process per second
  pairs_per_s_per_worker  the same divided by the workers (a worker is one CPU core when cores are free)
  pairs_per_cpu_s         pairs per CPU-second used by the loading process and its workers: the per-core
                          rate, which contention on a shared machine does not lower (much)
  batch_MB_per_s          float32 thick + thin tensors delivered per second (what the GPU receives)
  shard_MB_per_s          shard bytes decoded per second (volumes/s x mean sample size)
The machine's load average before and after is recorded: on a shared machine other work lowers the figures.
Goal (issue 4): >= 20 pairs/s per CPU core at 8 -> 40 slices, 192x192.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from emit import emit_json  # benchmarks/emit.py (this script's folder is on sys.path)

from ctld.config import load_config
from ctld.data import build_shards
from ctld.data.loader import make_patch_loader
from ctld.data.nifti import write_nifti
from ctld.data.shards import shard_urls
from ctld.data.volume import Volume

REPO_ROOT = Path(__file__).resolve().parents[1]


def synthetic_ct(depth: int, size: int, seed: int) -> np.ndarray:
    """(depth, size, size) int16 HU: air, an elliptic body whose radius changes along z, lungs, a spine, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:depth, :size, :size]
    centre = (size - 1) / 2
    radius = size * (0.36 + 0.06 * np.sin(2 * np.pi * z / depth + seed))
    body = ((y - centre) / (0.75 * radius)) ** 2 + ((x - centre) / radius) ** 2 <= 1
    lungs = ((y - centre) / (0.45 * radius)) ** 2 + ((np.abs(x - centre) - 0.45 * radius) / (0.3 * radius)) ** 2 <= 1
    spine = (y - centre - 0.55 * radius) ** 2 + (x - centre) ** 2 <= (0.1 * radius) ** 2
    hu = np.full((depth, size, size), -1000.0, dtype=np.float32)
    hu[np.broadcast_to(body, hu.shape)] = 40.0
    hu[np.broadcast_to(body & lungs, hu.shape)] = -850.0
    hu[np.broadcast_to(body & spine, hu.shape)] = 700.0
    hu += rng.normal(0, 12, size=hu.shape).astype(np.float32)
    return np.rint(hu).astype(np.int16)


def build_shard_set(work: Path, *, volumes: int, thin_depth: int, size: int) -> Path:
    """Synthetic NIfTI volumes -> `ctld-shards build` (train split only) -> shards folder."""
    sources = work / "nifti"
    for index in range(volumes):
        volume = Volume(synthetic_ct(thin_depth, size, index), (1.0, 0.8, 0.8), (0.0, 0.0, 0.0), np.eye(3))
        write_nifti(volume, sources / f"case{index:03d}.nii", overwrite=True)  # a reused --work_dir
    out = work / "shards"
    argv = [
        "build", str(sources), "--out", str(out), "--shards.salt=bench", "--shards.val_fraction=0",
        "--shards.test_fraction=0", "--shards.shard_max_samples=4", "--shards.num_workers=2", "--log_level=WARNING",
    ]  # fmt: skip
    if build_shards.main(argv) != 0:
        raise RuntimeError(f"ctld-shards build failed: {argv}")
    return out


def page_cache(urls: list[str]) -> int:
    """Read every shard once so the timed runs read from memory; returns the total bytes."""
    total = 0
    for url in urls:
        with open(url, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (the DataLoader workers)."""
    process = psutil.Process()
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def time_loader(urls, data_cfg, *, num_workers: int, batches: int, warmup: int) -> dict:
    loader = make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=0, num_workers=num_workers)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start, cpu_start, pairs, batch_bytes = time.perf_counter(), cpu_seconds(), 0, 0
    for _ in range(batches):
        batch = next(iterator)
        pairs += len(batch["key"])
        batch_bytes += batch["thick"].nbytes + batch["thin"].nbytes
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    del iterator  # stops the workers
    return {"pairs": pairs, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "batch_bytes": batch_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "base.yaml"), help="config for data.*")
    parser.add_argument("--shards_dir", help="an existing `ctld-shards build` folder (default: build one)")
    parser.add_argument("--work_dir", help="where to build the synthetic set (default: a temporary folder)")
    parser.add_argument("--volumes", type=int, default=12, help="synthetic thin volumes to build")
    parser.add_argument("--thin_depth", type=int, default=120, help="slices per synthetic thin volume (1 mm)")
    parser.add_argument("--size", type=int, default=256, help="rows and columns per synthetic slice")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time (0 = in-process)")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per worker count")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches first (worker start-up)")
    parser.add_argument("--out", help="also write the JSON here")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    data_cfg = cfg.data

    with tempfile.TemporaryDirectory(prefix="ctld-bench-loader-") as tmp:
        work = Path(args.work_dir or tmp)
        start = time.perf_counter()
        shards_dir = (
            Path(args.shards_dir)
            if args.shards_dir
            else build_shard_set(work, volumes=args.volumes, thin_depth=args.thin_depth, size=args.size)
        )
        build_seconds = time.perf_counter() - start
        data_cfg.shards_dir, data_cfg.train_urls = str(shards_dir), ""
        urls = shard_urls(data_cfg, "train")
        manifest = json.loads((shards_dir / "manifest.json").read_text())
        shard_bytes = page_cache(urls)
        sample_bytes = shard_bytes / manifest["splits"]["train"]["samples"]

        load_before = os.getloadavg()
        runs = {}
        for num_workers in (int(w) for w in args.workers.split(",")):
            run = time_loader(urls, data_cfg, num_workers=num_workers, batches=args.batches, warmup=args.warmup)
            pairs_per_s = run["pairs"] / run["seconds"]
            runs[f"workers_{num_workers}"] = {
                **run,
                "pairs_per_s": round(pairs_per_s, 2),
                "pairs_per_s_per_worker": round(pairs_per_s / max(num_workers, 1), 2),
                # Contention-proof per-core figure: pairs per CPU-second spent by the loader and its workers.
                "pairs_per_cpu_s": round(run["pairs"] / run["cpu_seconds"], 2),
                "batch_MB_per_s": round(run["batch_bytes"] / run["seconds"] / 1e6, 1),
                "shard_MB_per_s": round(pairs_per_s / data_cfg.patches_per_volume * sample_bytes / 1e6, 1),
            }
        load_after = os.getloadavg()

    report = {
        "benchmark": "loader",
        "shards": {
            "built_by": "given" if args.shards_dir else "ctld-shards build (synthetic NIfTI, simulated thick)",
            "build_seconds": None if args.shards_dir else round(build_seconds, 1),
            "count": len(urls),
            "samples": manifest["splits"]["train"]["samples"],
            "MB": round(shard_bytes / 1e6, 1),
            "thin_volume": None if args.shards_dir else [args.thin_depth, args.size, args.size],
        },
        "patch": {
            "thick": [data_cfg.depth_thick, data_cfg.patch_size, data_cfg.patch_size],
            "thin": [data_cfg.depth_thick * data_cfg.factor, data_cfg.patch_size, data_cfg.patch_size],
            "patches_per_volume": data_cfg.patches_per_volume,
            "batch_size": data_cfg.batch_size,
            "augment": data_cfg.augment,
            "min_foreground_fraction": data_cfg.min_foreground_fraction,
        },
        "runs": runs,
        "goal_pairs_per_s_per_core": 20,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_1min_before": round(load_before[0], 2),
            "loadavg_1min_after": round(load_after[0], 2),
            "python": platform.python_version(),
        },
    }
    emit_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
