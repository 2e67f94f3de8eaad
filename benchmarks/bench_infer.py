"""Whole-series inference benchmark: seconds per series and peak memory of `ctld-infer`'s engine.

    python benchmarks/bench_infer.py --device cuda --steps 0,10,20 --out bench_infer_gpu.json
    python benchmarks/bench_infer.py --device cpu --reduced --steps 0,2 --out bench_infer_cpu.json

The series is the issue's reference case: 60 thick slices of 512x512 at 5 mm, factor 5 -> 300 thin slices of 1 mm
(`--reduced`: 12 slices of 128x128, for CPUs). Each preset (configs/base.yaml, configs/large.yaml when present)
gets randomly initialised models (timing does not depend on the weights) and runs the real path: sliding windows
of the preset's depth_thick x patch_size, VAE encode, DDIM sampling, VAE decode, Gaussian blending, with the
`infer` section's overlaps and batch size (bf16 autocast on CUDA, fp32 on CPU).

Reported per preset and step count: seconds per series (median of --repeats after one warm-up window batch),
windows per series, and peak memory: torch.cuda.max_memory_allocated on CUDA, peak process RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ctld.config import load_config  # noqa: E402
from ctld.diffusion import ResidualSpec, build_train_scheduler  # noqa: E402
from ctld.export import Export  # noqa: E402
from ctld.inferer import fit_depth_windows, interpolate_volume, plan_windows  # noqa: E402
from ctld.models.unet import UNet3D  # noqa: E402
from ctld.models.vae import AutoencoderKL3D  # noqa: E402
from ctld.predictors import CtldPredictor  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process, sampled every 5 ms in a thread."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bench_preset(preset: Path, *, device: torch.device, steps_list: list[int], shape, repeats: int,
                 batch_size: int | None, sampler: str, overrides: list[str]) -> list[dict]:
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    vae = AutoencoderKL3D(**{**asdict(cfg.vae), "gradient_checkpointing": False}).to(device).eval()
    unet = UNet3D(latent_channels=cfg.vae.latent_channels, factor=cfg.data.factor,
                  **{**asdict(cfg.unet), "gradient_checkpointing": False}).to(device).eval()
    spec = ResidualSpec(prior="encode_cubic", factor=cfg.data.factor, residual_scale=5.0,
                        strength=cfg.diffusion.strength, num_train_timesteps=cfg.diffusion.num_train_timesteps)
    export = Export(vae=vae, unet=unet, scheduler=build_train_scheduler(cfg.diffusion),
                    meta={"factor": cfg.data.factor, **spec.to_meta()})
    thick = np.random.default_rng(0).integers(-1024, 1500, size=shape).astype(np.int16)
    context, overlap = fit_depth_windows(cfg.data.depth_thick, cfg.infer.depth_context, cfg.infer.depth_overlap)
    window = dict(factor=cfg.data.factor, depth_thick=cfg.data.depth_thick, patch_size=cfg.data.patch_size,
                  hu_range=(cfg.data.hu_min, cfg.data.hu_max), depth_context=context, depth_overlap=overlap,
                  inplane_overlap=cfg.infer.inplane_overlap, batch_size=batch_size or cfg.infer.batch_size,
                  device=device, progress=False)
    plan = plan_windows(shape, factor=cfg.data.factor, depth_thick=cfg.data.depth_thick,
                        patch_size=cfg.data.patch_size, depth_context=context, depth_overlap=overlap,
                        inplane_overlap=cfg.infer.inplane_overlap)
    results = []
    for steps in steps_list:
        # steps 0 = regression (one pass); otherwise diffusion with that many sampler steps.
        mode = "regression" if steps == 0 else "diffusion"
        predictor = CtldPredictor(export, mode=mode, sampler=sampler, num_inference_steps=max(steps, 1), seed=0,
                                  device=device)
        # Warm-up: one window batch (cuDNN autotuning, allocator), not timed.
        interpolate_volume(thick[: cfg.data.depth_thick], predictor, **{**window, "depth_context": 0,
                                                                         "depth_overlap": 0})
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        with PeakRSS() as rss:
            for _ in range(repeats):
                start = time.perf_counter()
                interpolate_volume(thick, predictor, **window)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        result = {
            "preset": preset.name,
            "sampler": sampler,
            "steps": steps,
            "seconds_per_series": round(statistics.median(times), 3),
            "times_s": [round(t, 3) for t in times],
            "windows_per_series": plan.num_windows,
            "window": {"depth_thick": cfg.data.depth_thick, "patch_size": cfg.data.patch_size,
                       "depth_context": context, "depth_overlap": overlap,
                       "inplane_overlap": cfg.infer.inplane_overlap, "batch_size": window["batch_size"]},
            "peak_rss_gb": round(rss.peak / 2**30, 3),
        }
        if device.type == "cuda":
            result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--steps", default="0,10", help="comma-separated sampler step counts; 0 = regression mode")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "dpm", "ddpm"), help="sampling scheduler")
    parser.add_argument("--presets", default="", help="comma-separated config files (default: base, large if present)")
    parser.add_argument("--reduced", action="store_true", help="12 thick slices of 128x128 instead of 60 of 512x512")
    parser.add_argument("--slices", type=int, default=None, help="thick slices (overrides the series size)")
    parser.add_argument("--size", type=int, default=None, help="in-plane size in pixels (overrides)")
    parser.add_argument("--batch_size", type=int, default=None, help="windows per forward (default: infer.batch_size)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median reported)")
    parser.add_argument("--depth_overlap", type=int, default=None, help="override infer.depth_overlap")
    parser.add_argument("--depth_context", type=int, default=None, help="override infer.depth_context")
    parser.add_argument("--out", default=None, help="write the JSON here as well as to stdout")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    slices, size = (12, 128) if args.reduced else (60, 512)
    shape = (args.slices or slices, args.size or size, args.size or size)
    presets = [Path(p) for p in args.presets.split(",") if p] or [
        p for p in (REPO_ROOT / "configs" / "base.yaml", REPO_ROOT / "configs" / "large.yaml") if p.is_file()
    ]
    steps_list = [int(s) for s in args.steps.split(",")]
    overrides = [f"--infer.{key}={getattr(args, key)}" for key in ("depth_overlap", "depth_context")
                 if getattr(args, key) is not None]
    results: list[dict] = []
    doc = {
        "benchmark": "bench_infer",
        "series": {"thick_shape": list(shape), "thick_spacing_mm": 5.0, "factor": "from preset (5)",
                   "reduced": shape != (60, 512, 512)},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "results": results,
    }
    for preset in presets:
        results.extend(bench_preset(preset, device=device, steps_list=steps_list, shape=shape,
                                    repeats=args.repeats, batch_size=args.batch_size, sampler=args.sampler,
                                    overrides=overrides))
        if args.out:  # after each preset, so a run cut short still leaves its figures
            Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
