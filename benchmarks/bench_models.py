"""Model benchmark: parameter counts, step times, peak memory, DDIM-20 per patch; TFLOPS and MFU on CUDA.

    python benchmarks/bench_models.py --preset base --device cpu --out bench_cpu.json
    python benchmarks/bench_models.py --preset base --device cuda --out bench_gpu.json   # bf16 autocast

Shapes:
  seed   8 -> 48 thin slices (factor 6) x 64x64, batch 1: the seed's benchmark shape, for a like-for-like
         comparison with its 213 s per diffusion training step and 343 s per DDIM-20 patch (CPU).
  train  depth_thick -> depth_thick * factor x patch_size^2 from the preset (8 -> 40 x 192x192 for base),
         batch data.batch_size (training) and infer.batch_size (sampling).
CPU runs `seed` by default, CUDA runs `seed,train`. CPU runs fp32; CUDA runs bf16 autocast. Both use
channels_last_3d unless --no_channels_last. On a shared CPU, `--threads 1` avoids OpenMP threads spinning
while other processes hold the cores (on an oversubscribed 2-core machine it made the U-Net 4x faster).

Measured per shape:
  vae_step     VAE forward + backward + AdamW step on a thin patch (recon MSE + KL)
  unet_step    U-Net forward + backward + AdamW step on latents (residual_loss)
  train_step   the diffusion training step: frozen VAE encode of thick+thin under no_grad, U-Net
               forward/backward, AdamW step
  ddim20       encode the thick patch, 20 DDIM steps, decode the thin latent
Times are medians (and minima) over --repeats runs after one warm-up run (which also counts FLOPs with
torch.utils.flop_counter.FlopCounterMode). Peak memory, from before the warm-up: growth of
torch.cuda.max_memory_allocated on CUDA, of the process RSS (sampled every 5 ms) on CPU, over what the models
and inputs already held (on CPU freed memory stays in the process, so a later measurement can show less
growth; peak_total_mib is the whole process RSS / all CUDA tensors).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # benchmarks/emit.py, also when imported by path
from emit import emit_json  # noqa: E402  (benchmarks/emit.py)

from ctld.config import load_config  # noqa: E402
from ctld.diffusion import (  # noqa: E402
    ResidualSpec,
    build_sampler,
    build_train_scheduler,
    decode_latents,
    encode_latents,
    residual_loss,
    sample,
)
from ctld.models.unet import UNet3D  # noqa: E402
from ctld.models.vae import AutoencoderKL3D  # noqa: E402

SEED_REFERENCE_CPU_S = {"train_step": 213.0, "ddim20": 343.0}  # the seed's figures on this CPU (issue 5)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS growth on CPU (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = 0.0  # growth over what was held at __enter__
        self.peak_total_mib = 0.0  # CUDA: all allocated tensors; CPU: process RSS

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_total_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.peak_mib = self.peak_total_mib - self._base / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_total_mib = self._peak / 2**20
            self.peak_mib = (self._peak - self._base) / 2**20
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, *, device: torch.device, repeats: int, peak_tflops: float | None) -> dict:
    """Run fn once under FlopCounterMode (warm-up), once more on CUDA (autotuning), then time `repeats` runs."""
    counter = FlopCounterMode(display=False)
    times, cpu_times = [], []
    # Memory is measured from before the warm-up: allocators keep what they took, so a later baseline shows ~0.
    with PeakMemory(device) as mem:
        with counter:
            fn()
        _sync(device)
        if device.type == "cuda":
            fn()
        for _ in range(repeats):
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    seconds = statistics.median(times)
    flops = counter.get_total_flops()
    result = {
        "seconds": round(seconds, 4),
        "seconds_all": [round(t, 4) for t in times],
        "seconds_min": round(min(times), 4),
        # CPU time of all threads of this process: on a shared, oversubscribed CPU, wall time also counts
        # the time other processes held the cores.
        "process_cpu_seconds": round(statistics.median(cpu_times), 4),
        "peak_mem_mib": round(mem.peak_mib, 1),
        "peak_total_mib": round(mem.peak_total_mib, 1),
        "gflop": round(flops / 1e9, 2),
        "achieved_tflops": round(flops / seconds / 1e12, 3),
    }
    if peak_tflops:
        result["mfu"] = round(flops / seconds / 1e12 / peak_tflops, 4)
    return result


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_shape(cfg, *, vae, unet_kwargs, device, depth_thick, factor, size, train_batch, infer_batch, repeats,
                peak_tflops, channels_last, steps, only) -> dict:
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    inplane = vae.inplane_factor
    if size % inplane:
        raise ValueError(f"patch size {size} is not divisible by the VAE in-plane factor {inplane}")
    d_thin = depth_thick * factor
    torch.manual_seed(0)
    unet = UNet3D(latent_channels=vae.latent_channels, factor=factor, **unet_kwargs).to(device, memory_format=fmt)
    scheduler = build_train_scheduler(cfg.diffusion)
    gen = torch.Generator(device).manual_seed(0)

    def image(b, d):
        return (torch.rand(b, 1, d, size, size, device=device) * 2 - 1).to(memory_format=fmt)

    def latent(b, d):
        return torch.randn(b, vae.latent_channels, d, size // inplane, size // inplane, device=device).to(
            memory_format=fmt)

    out = {
        "depth_thick": depth_thick, "depth_thin": d_thin, "factor": factor, "patch_size": size,
        "latent_shape_thin": [vae.latent_channels, d_thin, size // inplane, size // inplane],
        "train_batch": train_batch, "infer_batch": infer_batch,
    }

    # VAE forward + backward + optimizer step on a thin patch.
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=1e-5)
    x_thin = image(train_batch, d_thin)

    def vae_step():
        vae.train()
        with amp:
            recon, posterior = vae(x_thin, generator=gen)
            loss = F.mse_loss(recon.float(), x_thin) + 1e-6 * posterior.kl().mean()
        loss.backward()
        vae_opt.step()
        vae_opt.zero_grad(set_to_none=True)

    # U-Net forward + backward + optimizer step on latents.
    unet_opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    z_thin, z_prior = latent(train_batch, d_thin), latent(train_batch, d_thin)
    spec = ResidualSpec(prior="encode_cubic", factor=factor, residual_scale=5.0,
                        strength=cfg.diffusion.strength, num_train_timesteps=cfg.diffusion.num_train_timesteps)
    residual_kwargs = dict(residual_scale=spec.residual_scale, strength=spec.strength,
                           regression_fraction=cfg.diffusion.regression_fraction,
                           min_snr_gamma=cfg.diffusion.min_snr_gamma, generator=gen)

    def unet_step():
        unet.train()
        with amp:
            loss = residual_loss(unet, scheduler, z_thin, z_prior, **residual_kwargs)
        loss.backward()
        unet_opt.step()
        unet_opt.zero_grad(set_to_none=True)

    # The full diffusion training step, as the trainer runs it: the frozen VAE encodes the thin target and the
    # prior's thin-grid image under no_grad.
    x_thick = image(train_batch, depth_thick)

    def train_step():
        vae.eval()
        unet.train()
        with amp:
            latents = encode_latents(vae, x_thin)
            prior = spec.prior_latents(vae, x_thick)
            loss = residual_loss(unet, scheduler, latents, prior, **residual_kwargs)
        loss.backward()
        unet_opt.step()
        unet_opt.zero_grad(set_to_none=True)

    # DDIM sampling of one (or infer_batch) patches, with the encode and decode around it.
    sampler = build_sampler("ddim", scheduler.config)
    x_thick_infer = image(infer_batch, depth_thick)

    def ddim():
        vae.eval()
        unet.eval()
        with torch.no_grad(), amp:
            prior = spec.prior_latents(vae, x_thick_infer)
            latents = sample(unet, sampler, prior, residual_scale=spec.residual_scale, strength=spec.strength,
                             num_inference_steps=steps, generator=gen)
            decode_latents(vae, latents.to(memory_format=fmt))

    for name, fn in (("vae_step", vae_step), ("unet_step", unet_step), ("train_step", train_step),
                     (f"ddim{steps}", ddim)):
        if only and name not in only:
            continue
        try:
            out[name] = measure(fn, device=device, repeats=repeats, peak_tflops=peak_tflops)
        except torch.OutOfMemoryError as err:
            out[name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        except Exception as err:  # a benchmark reports every failure and goes on with the next measurement
            out[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=3)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if f"ddim{steps}" in out and "seconds" in out[f"ddim{steps}"]:
        out[f"ddim{steps}"]["seconds_per_patch"] = round(out[f"ddim{steps}"]["seconds"] / infer_batch, 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "base", "large"], default="base",
                        help="configs/<preset>.yaml supplies the vae, unet, diffusion and data sections")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--out", default="", help="also write the JSON to this file")
    parser.add_argument("--shapes", default="", help="comma list of seed,train (default: seed on CPU, both on CUDA)")
    parser.add_argument("--only", default="", help="comma list of vae_step,unet_step,train_step,ddim20 (default all)")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per measurement (default 2 CPU, 5 CUDA)")
    parser.add_argument("--ddim_steps", type=int, default=20, help="DDIM steps for the sampling measurement")
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOPS for MFU (989 = H100/H200 SXM); 0 = no MFU")
    parser.add_argument("--no_channels_last", action="store_true",
                        help="keep the default memory format (channels_last_3d is used on CPU and CUDA otherwise)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (torch.set_num_threads); 0 = default")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s for s in (args.shapes or ("seed,train" if device.type == "cuda" else "seed")).split(",") if s]
    only = {s for s in args.only.split(",") if s}
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    channels_last = not args.no_channels_last
    peak_tflops = args.peak_tflops if device.type == "cuda" and args.peak_tflops > 0 else None

    cfg = load_config(REPO_ROOT / "configs" / f"{args.preset}.yaml")
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    vae = AutoencoderKL3D(**asdict(cfg.vae)).to(device, memory_format=fmt)
    unet_kwargs = asdict(cfg.unet)
    params_unet = _count(UNet3D(latent_channels=vae.latent_channels, factor=cfg.data.factor, **unet_kwargs))
    result: dict = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "channels_last_3d": channels_last,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "repeats": repeats,
        "params": {"vae": _count(vae), "unet": params_unet, "vae_inplane_factor": vae.inplane_factor},
        "config": {"vae": asdict(cfg.vae), "unet": unet_kwargs,
                   "diffusion": asdict(cfg.diffusion)},
        "peak_tflops": peak_tflops,
        "shapes": {},
    }
    for shape in shapes:
        if shape == "seed":
            spec = dict(depth_thick=8, factor=6, size=64, train_batch=1, infer_batch=1)
        elif shape == "train":
            spec = dict(depth_thick=cfg.data.depth_thick, factor=cfg.data.factor, size=cfg.data.patch_size,
                        train_batch=cfg.data.batch_size, infer_batch=cfg.infer.batch_size)
        else:
            raise SystemExit(f"unknown shape {shape!r}; use seed and/or train")
        result["shapes"][shape] = bench_shape(
            cfg, vae=vae, unet_kwargs=unet_kwargs, device=device, repeats=repeats, peak_tflops=peak_tflops,
            channels_last=channels_last, steps=args.ddim_steps, only=only, **spec)
    seed = result["shapes"].get("seed", {})
    if device.type == "cpu" and seed:
        result["speedup_vs_seed_cpu"] = {
            key: round(SEED_REFERENCE_CPU_S[key] / seed[name]["seconds"], 1)
            for key, name in (("train_step", "train_step"), ("ddim20", "ddim20"))
            if "seconds" in seed.get(name, {}) and args.ddim_steps == 20
        }
        result["seed_reference_cpu_s"] = SEED_REFERENCE_CPU_S
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
