"""Whole-series inference benchmark: seconds per series and peak memory of `ctld-infer`'s engine.

    python benchmarks/bench_infer.py --device cuda --steps 0,10,20 --out bench_infer_gpu.json
    python benchmarks/bench_infer.py --device cpu --presets configs/demo.yaml --slices 28 --steps 0   # CPU figure
    python benchmarks/bench_infer.py --device cpu --export demo_out/runs/diffusion/export --series thin_ct/ \
        --slices 28 --steps 0 --tiling_check                                    # a trained export on a real series

The series is the issue's reference case: 60 thick slices of 512x512 at 5 mm, factor 5 -> 300 thin slices of 1 mm
(`--slices 28`: the 28 -> 140 slices of a CPU workstation case; `--reduced`: 12 slices of 128x128). Each preset
(configs/base.yaml, configs/large.yaml when present) gets randomly initialised models (timing does not depend on
the weights, except that an untrained zero-initialised VAE is skipped exactly as in ctld-demo's exports) and runs
the real path: windows chosen by ctld.inferer.resolve_window (whole slices and up to 32 thick slices for a fully
convolutional model, else the training patch), VAE encode, the U-Net (one pass or DDIM sampling), VAE decode,
blending, with the `infer` section's overlaps and batch size (bf16 autocast on CUDA, fp32 on CPU). `--export`
times a trained export instead, and `--series` a real series (thin: thick simulated with a box profile) instead of
random HU; `--tiling_check` also runs the series with the window grid shifted by half a window and reports the
PSNR between the two thin series (`ctld-eval --tiling_check`).

Reported per model and step count: seconds per series (median of --repeats after one warm-up window batch),
windows per series and their size, peak memory (torch.cuda.max_memory_allocated on CUDA, peak process RSS on CPU),
the torch threads used and, with --tiling_check, the PSNR of the shifted grid in the wide and soft-tissue windows.
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
from ctld.evaluate import check_tiling  # noqa: E402
from ctld.export import Export  # noqa: E402
from ctld.inferer import interpolate_volume, plan_inference  # noqa: E402
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


def preset_export(preset: Path, overrides: list[str], device: torch.device) -> tuple[Export, dict]:
    """Randomly initialised models of a config preset, as an export would hold them."""
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    vae = AutoencoderKL3D(**{**asdict(cfg.vae), "gradient_checkpointing": False}).to(device).eval()
    vae.find_untrained_branches()  # as ctld.export.load_model does
    unet = UNet3D(latent_channels=cfg.vae.latent_channels, factor=cfg.data.factor,
                  **{**asdict(cfg.unet), "gradient_checkpointing": False}).to(device).eval()
    spec = ResidualSpec(prior="encode_cubic", factor=cfg.data.factor, residual_scale=5.0,
                        strength=cfg.diffusion.strength, num_train_timesteps=cfg.diffusion.num_train_timesteps)
    meta = {"factor": cfg.data.factor, "depth_thick": cfg.data.depth_thick, "patch_size": cfg.data.patch_size,
            "hu_min": cfg.data.hu_min, "hu_max": cfg.data.hu_max, "infer": asdict(cfg.infer), **spec.to_meta()}
    return Export(vae=vae, unet=unet, scheduler=build_train_scheduler(cfg.diffusion), meta=meta), asdict(cfg.infer)


def bench_export(name: str, export: Export, infer: dict, *, thick: np.ndarray, device: torch.device,
                 steps_list: list[int], repeats: int, batch_size: int | None, sampler: str, tiling_check: bool,
                 window_overrides: dict) -> list[dict]:
    meta = export.meta
    infer = {**infer, **window_overrides}
    self_ensemble = int(infer.get("self_ensemble", 1))  # mirrored copies per window, as ctld-infer runs the export
    window = dict(factor=int(meta["factor"]), depth_thick=int(meta["depth_thick"]),
                  patch_size=int(meta["patch_size"]), hu_range=(float(meta["hu_min"]), float(meta["hu_max"])),
                  depth_context=infer.get("depth_context", 2), depth_overlap=infer.get("depth_overlap", 1),
                  inplane_overlap=infer.get("inplane_overlap", 0.25),
                  batch_size=batch_size or infer.get("batch_size", 16), window_depth=infer.get("window_depth", 0),
                  tile_size=infer.get("tile_size", 0), device=device, progress=False)
    results = []
    for steps in steps_list:
        # steps 0 = regression (one pass); otherwise diffusion with that many sampler steps.
        mode = "regression" if steps == 0 else "diffusion"
        predictor = CtldPredictor(export, mode=mode, sampler=sampler, num_inference_steps=max(steps, 1), seed=0,
                                  self_ensemble=self_ensemble, device=device)
        keys = ("factor", "depth_thick", "patch_size", "depth_context", "depth_overlap", "inplane_overlap",
                "batch_size", "window_depth", "tile_size")
        plan, batch = plan_inference(predictor, thick.shape, **{key: window[key] for key in keys})
        depth, tile = plan.depth_thick, plan.patch_size
        # Warm-up: one window batch (cuDNN autotuning, allocator), not timed.
        interpolate_volume(thick[:depth, :tile, :tile], predictor, **{**window, "depth_context": 0,
                                                                      "depth_overlap": 0})
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        with PeakRSS() as rss:
            for _ in range(repeats):
                start = time.perf_counter()
                thin = interpolate_volume(thick, predictor, **window)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        result = {
            "model": name,
            "sampler": sampler,
            "steps": steps,
            "mode": mode,
            "self_ensemble": self_ensemble,
            "seconds_per_series": round(statistics.median(times), 3),
            "times_s": [round(t, 3) for t in times],
            "windows_per_series": plan.num_windows,
            "window": {"depth_thick": depth, "tile_size": tile, "batch_size": batch,
                       "depth_context": plan.depth_context, "depth_overlap": plan.depth_overlap,
                       "inplane_overlap": window["inplane_overlap"],
                       "fully_convolutional": predictor.fully_convolutional},
            "peak_rss_gb": round(rss.peak / 2**30, 3),
        }
        if device.type == "cuda":
            result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if tiling_check:  # at the input's own pixel spacing (no in-plane resampling)
            result["tiling_check"] = check_tiling(thick, predictor, thin, {
                **window, "pixel_spacing_mm": (1.0, 1.0), "model_pixel_spacing_mm": None})
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    return results


def read_thick(path: str, factor: int, slices: int | None, size: int | None) -> np.ndarray:
    """A real series as the thick input: a thin series (slice spacing <= 2 mm) gets its thick slices simulated
    (box profile); cropped to `slices` thick slices from the middle and `size` pixels in-plane when given."""
    from ctld.data.transforms import simulate_thick
    from ctld.series_io import read_series

    volume = read_series(path)[0]
    hu = volume.hu
    if volume.spacing_mm[0] <= 2.0:
        hu = simulate_thick(hu, factor, "box")
    if slices:
        start = max(0, (hu.shape[0] - slices) // 2)
        hu = hu[start : start + slices]
    if size:
        y0, x0 = max(0, (hu.shape[1] - size) // 2), max(0, (hu.shape[2] - size) // 2)
        hu = hu[:, y0 : y0 + size, x0 : x0 + size]
    return np.ascontiguousarray(hu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--steps", default="0,10", help="comma-separated sampler step counts; 0 = regression mode")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "dpm", "ddpm"), help="sampling scheduler")
    parser.add_argument("--presets", default="", help="comma-separated config files (default: base, large if present)")
    parser.add_argument("--export", default=None, help="time this trained export instead of random presets")
    parser.add_argument("--series", default=None,
                        help="a real series (DICOM folder/ZIP or NIfTI; thin ones get simulated thick slices) "
                             "instead of random HU")
    parser.add_argument("--reduced", action="store_true", help="12 thick slices of 128x128 instead of 60 of 512x512")
    parser.add_argument("--slices", type=int, default=None, help="thick slices (overrides the series size)")
    parser.add_argument("--size", type=int, default=None, help="in-plane size in pixels (overrides)")
    parser.add_argument("--batch_size", type=int, default=None, help="windows per forward (default: infer.batch_size)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median reported)")
    parser.add_argument("--depth_overlap", type=int, default=None, help="override infer.depth_overlap")
    parser.add_argument("--depth_context", type=int, default=None, help="override infer.depth_context")
    parser.add_argument("--window_depth", type=int, default=None, help="override infer.window_depth (0 = automatic)")
    parser.add_argument("--tile_size", type=int, default=None, help="override infer.tile_size (0 = automatic)")
    parser.add_argument("--tiling_check", action="store_true",
                        help="also run with the window grid shifted by half a window; report the PSNR between both")
    parser.add_argument("--out", default=None, help="write the JSON here as well as to stdout")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    window_overrides = {key: getattr(args, key) for key in ("depth_overlap", "depth_context", "window_depth",
                                                            "tile_size") if getattr(args, key) is not None}
    if args.export:
        from ctld.export import load_export

        export = load_export(args.export, device)
        models = [(Path(args.export).name, lambda: (export, export.meta.get("infer", {})))]
    else:
        presets = [Path(p) for p in args.presets.split(",") if p] or [
            p for p in (REPO_ROOT / "configs" / "base.yaml", REPO_ROOT / "configs" / "large.yaml") if p.is_file()
        ]
        models = [(p.name, lambda p=p: preset_export(p, [], device)) for p in presets]
    if args.series:
        thick = read_thick(args.series, 5, args.slices, args.size)
    else:
        slices, size = (12, 128) if args.reduced else (60, 512)
        shape = (args.slices or slices, args.size or size, args.size or size)
        thick = np.random.default_rng(0).integers(-1024, 1500, size=shape).astype(np.int16)
    steps_list = [int(s) for s in args.steps.split(",")]
    results: list[dict] = []
    doc = {
        "benchmark": "bench_infer",
        "series": {"thick_shape": list(thick.shape), "thin_slices": thick.shape[0] * 5, "factor": 5,  # as simulated
                   "source": args.series or "random HU", "thick_spacing_mm": 5.0},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "results": results,
    }
    for name, make in models:
        export, infer = make()
        results.extend(bench_export(name, export, infer, thick=thick, device=device, steps_list=steps_list,
                                    repeats=args.repeats, batch_size=args.batch_size, sampler=args.sampler,
                                    tiling_check=args.tiling_check, window_overrides=window_overrides))
        if args.out:  # after each model, so a run cut short still leaves its figures
            Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
