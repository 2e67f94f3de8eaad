"""Training throughput of the real trainer (ctld/train.py): where a step's time goes, per stage and variant.

    python benchmarks/bench_train.py --out bench_train_gpu.json            # configs/base.yaml, 8 -> 40 x 192^2, CUDA
    python benchmarks/bench_train.py --preset cpu --out bench_train_cpu.json   # small fp32 shapes on CPU
    python benchmarks/bench_train.py --variants pixel,latent,latent_compile --launch launch/zero2.yaml

Self-contained: it builds a synthetic shard set with `ctld-shards build` (benchmarks/bench_loader.py's synthetic
CT, sized to hold a patch), trains the VAE stage, encodes the shards with `ctld-shards encode` (timed), then runs
the diffusion stage once per variant on that VAE's export, each as its own process (train.mixed_precision=auto:
bf16 on a bf16 GPU, fp32 on CPU) for --warmup + --steps optimizer steps, logging every step; validation and
periodic checkpoints are off. A variant of the diffusion stage is its shards plus optional tags:
  pixel           pixel shards: the frozen VAE encodes every patch at every step
  latent          latent shards (data.latent_shards_dir): no encode in the step
  ..._compile     train.compile=true (inductor)
  ..._nophases    without train.time_phases (no device syncs at phase boundaries: the throughput figure)
Variants run as one plain process (`python ctld/train.py`); --launch CONFIG also runs the --launch_variants under
`accelerate launch --config_file CONFIG --num_processes 1` (e.g. launch/zero2.yaml: DeepSpeed ZeRO-2's overhead on
one GPU against the plain process), reported as "<variant>@<config name>".
Figures come from the run's own TensorBoard scalars over the steps after the warm-up:
  samples_per_s        patch pairs per second (effective batch / mean step time)
  step_time_s          mean wall time of one optimizer step, data loading included
  phases_ms            mean time per micro-batch of data wait, vae_encode, forward, backward, optimizer, ema
                       (train.time_phases: the device is synchronised at each phase boundary, which costs a little;
                       a _nophases variant gives the throughput without those syncs)
  peak_memory_gb       CUDA: the trainer's sys/gpu_memory_gb (max_memory_allocated); CPU: peak RSS of the process
On CUDA also flops_per_step (torch.utils.flop_counter: one forward+backward of the trained model at the batch
shape, plus the frozen VAE's encodes for pixel variants) and MFU = flops_per_step x steps/s / --peak_tflops.
`latent_vs_pixel` puts the two side by side: the speed-up, and the share of the pixel step the VAE encode took.
Goal (issue 16) on one H100-class GPU: diffusion stage >= 10 samples/s at 8 -> 40 x 192x192 and >= 35% MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from bench_loader import build_shard_set  # noqa: E402
from emit import emit_json, write_json  # noqa: E402  (benchmarks/emit.py)

from ctld.config import Config, load_config  # noqa: E402
from ctld.models.unet import UNet3D  # noqa: E402
from ctld.models.vae import AutoencoderKL3D  # noqa: E402

SHARDS = ("pixel", "latent")
TAGS = ("compile", "nophases")
PHASES = ("data", "vae_encode", "forward", "backward", "optimizer", "ema")
# gpu: the seed's training patch and models (configs/base.yaml); cpu: the demo's fp32 models and 4 -> 20 x 48^2
# patches (configs/demo.yaml), what a CPU-only machine trains.
PRESETS = {
    "gpu": {"config": str(REPO_ROOT / "configs" / "base.yaml"), "overrides": []},
    "cpu": {"config": str(REPO_ROOT / "configs" / "demo.yaml"), "overrides": []},
}


class ChildPeakRSS:
    """Peak resident memory of a child process and its children, sampled every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in processes))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


def flops_per_step(cfg: Config, stage: str, device: torch.device, *, with_encode: bool = True) -> float:
    """FLOPs of one optimizer step: forward + backward of the trained model on each micro-batch (and, for the
    diffusion stage on pixel shards, the frozen VAE's two encodes), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    b, dt, f, p = cfg.data.batch_size, cfg.data.depth_thick, cfg.data.factor, cfg.data.patch_size
    vae = AutoencoderKL3D(**asdict(cfg.vae)).to(device)
    thick = torch.randn(b, 1, dt, p, p, device=device)
    thin = torch.randn(b, 1, dt * f, p, p, device=device)

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    if stage == "vae":
        def step(x):
            reconstruction, posterior = vae(x)
            ((reconstruction - x).abs().mean() + posterior.kl().mean()).backward()

        per_micro = (cfg.train.thick_fraction * count(lambda: step(thick))
                     + (1 - cfg.train.thick_fraction) * count(lambda: step(thin)))
    else:
        h = p // vae.inplane_factor
        c = vae.latent_channels
        unet = UNet3D(latent_channels=c, factor=f, **asdict(cfg.unet)).to(device)
        noisy = torch.randn(b, c, dt * f, h, h, device=device)
        prior = torch.randn(b, c, dt * f, h, h, device=device)
        timesteps = torch.randint(0, 1000, (b,), device=device)
        encode = 0.0
        if with_encode:
            with torch.no_grad():  # the thin target and the prior's thin-grid image (cubic of the thick patch)
                encode = count(lambda: (vae.encode(thin), vae.encode(thin)))
        per_micro = encode + count(lambda: unet(noisy, timesteps, prior).float().pow(2).mean().backward())
    return per_micro * cfg.train.gradient_accumulation_steps


def _command(launch: str) -> list[str]:
    if not launch:
        return [sys.executable, str(REPO_ROOT / "ctld" / "train.py")]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch, "--num_processes", "1",
            "--num_machines", "1", str(REPO_ROOT / "ctld" / "train.py")]


def run_training(run_name: str, stage: str, config: str, overrides: list[str], work: Path, *, steps: int,
                 warmup: int, launch: str = "") -> dict:
    total = warmup + steps
    argv = [
        *_command(launch), config, *overrides,
        f"--train.stage={stage}", f"--train.output_dir={work / 'runs'}", f"--train.run_name={run_name}",
        f"--train.max_steps={total}", "--train.log_every=1", f"--train.val_every={total + 1}",
        f"--train.image_every={total + 1}", f"--train.checkpoint_every={total + 1}", "--train.scale_batches=2",
    ]  # fmt: skip
    log = work / f"{run_name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        rss = ChildPeakRSS(child.pid)
        code = child.wait()
        peak_rss_gb = rss.stop()
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{run_name} training failed (exit {code}); log tail:\n{log.read_text()[-4000:]}")

    events = EventAccumulator(str(work / "runs" / run_name / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def after_warmup(tag: str) -> list[float]:
        return [e.value for e in events.Scalars(tag) if e.step > warmup]

    cfg = load_config(config, overrides)
    effective_batch = cfg.data.batch_size * cfg.train.gradient_accumulation_steps
    step_times = [effective_batch / s for s in after_warmup("train/samples_per_s")]
    step_time = sum(step_times) / len(step_times)
    result = {
        "timed_steps": len(step_times),
        "effective_batch": effective_batch,
        "micro_batches_per_step": cfg.train.gradient_accumulation_steps,
        "samples_per_s": round(effective_batch / step_time, 3),
        "step_time_s": round(step_time, 4),
        "data_wait_fraction": round(sum(after_warmup("train/data_wait_fraction")) / len(step_times), 4),
        "final_loss": round(events.Scalars("train/loss")[-1].value, 5),
        "process_wall_s": round(wall, 1),
    }
    phases = {name: round(sum(after_warmup(f"time/{name}_ms")) / len(step_times), 3)
              for name in PHASES if f"time/{name}_ms" in tags}
    if phases:
        result["phases_ms"] = phases
    if "sys/gpu_memory_gb" in tags:
        result["peak_memory_gb"] = round(max(after_warmup("sys/gpu_memory_gb")), 3)
        result["peak_memory_kind"] = "cuda max_memory_allocated"
    else:
        result["peak_memory_gb"] = round(peak_rss_gb, 3)
        result["peak_memory_kind"] = "process peak RSS"
    return result


def encode_latent_shards(config: str, overrides: list[str], shards: Path, vae_export: Path, out: Path,
                         patches_per_volume: int) -> dict:
    """`ctld-shards encode`, timed, in this process's environment (GPU when there is one)."""
    from ctld.data import build_shards

    argv = ["encode", str(shards), "--vae", str(vae_export), "--out", str(out), "--config", config,
            f"--patches_per_volume={patches_per_volume}", "--log_level=WARNING", *overrides]
    started = time.perf_counter()
    if build_shards.main(argv) != 0:
        raise RuntimeError(f"ctld-shards encode failed: {argv}")
    seconds = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    return {"seconds": round(seconds, 2), "volumes": totals["samples"], "patches": totals["patches"],
            "patches_per_s": round(totals["patches"] / seconds, 2), "bytes": totals["bytes"],
            "precision": manifest["settings"]["precision"]}


def add_mfu(result: dict, cfg: Config, stage: str, device: torch.device, peak_tflops: float, *, with_encode: bool
            ) -> None:
    flops = flops_per_step(cfg, stage, device, with_encode=with_encode)
    steps_per_s = result["samples_per_s"] / result["effective_batch"]
    result["flops_per_step"] = flops
    result["achieved_tflops"] = round(flops * steps_per_s / 1e12, 2)
    result["mfu"] = round(flops * steps_per_s / 1e12 / peak_tflops, 4)


def latent_vs_pixel(diffusion: dict) -> dict:
    """Pixel and latent figures side by side (each pair that ran: with phase timing, and without), their mean
    speed-up, and the speed-up that removing the encode alone predicts: 1 / (1 - the share of the timed pixel run's
    micro-batch that the VAE encode took)."""
    pairs = [(p, q) for p, q in (("pixel", "latent"), ("pixel_nophases", "latent_nophases"))
             if "error" not in diffusion.get(p, {"error": 1}) and "error" not in diffusion.get(q, {"error": 1})]
    doc: dict = {"pairs": [{"compared": [p, q], "pixel_samples_per_s": diffusion[p]["samples_per_s"],
                            "latent_samples_per_s": diffusion[q]["samples_per_s"],
                            "speedup": round(diffusion[q]["samples_per_s"] / diffusion[p]["samples_per_s"], 3)}
                           for p, q in pairs]}
    doc["mean_speedup"] = round(sum(pair["speedup"] for pair in doc["pairs"]) / len(doc["pairs"]), 3)
    timed = diffusion.get("pixel", {})
    encode_ms = timed.get("phases_ms", {}).get("vae_encode")
    if encode_ms is not None:
        micro_ms = 1e3 * timed["step_time_s"] / timed["micro_batches_per_step"]
        share = encode_ms / micro_ms
        doc["vae_encode_share_of_pixel_step"] = round(share, 4)
        doc["speedup_predicted_by_encode_share"] = round(1.0 / max(1e-9, 1.0 - share), 3)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark ctld/train.py (both stages) on synthetic shards.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu",
                        help="gpu: configs/base.yaml shapes (8 -> 40 x 192^2); cpu: small fp32 shapes")
    parser.add_argument("--config", default="", help="YAML config instead of the preset's")
    parser.add_argument("--override", action="append", default=[],
                        help="a --section.key=value override for the trainer (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first (cuDNN autotune, workers)")
    parser.add_argument("--volumes", type=int, default=8, help="synthetic volumes in the shard set")
    parser.add_argument("--stages", default="vae,diffusion", help="comma-separated: vae,diffusion")
    parser.add_argument("--variants", default="pixel,latent",
                        help="diffusion-stage variants, comma-separated: pixel|latent, optionally tagged _compile "
                             "and/or _nophases (e.g. latent_compile, pixel_nophases)")
    parser.add_argument("--launch", action="append", default=[],
                        help="also run the --launch_variants under this accelerate config with 1 process (repeatable)")
    parser.add_argument("--launch_variants", default="pixel_nophases,latent_nophases",
                        help="the variants run under each --launch config")
    parser.add_argument("--patches_per_volume", type=int, default=8, help="latent shards: patches encoded per volume")
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOPS of the GPU for MFU (989 = H100/H200 SXM, 312 = A100)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    launch_variants = [v for v in args.launch_variants.split(",") if v]
    for variant in {*variants, *launch_variants}:
        shards_kind, *tags = variant.split("_")
        if shards_kind not in SHARDS or not set(tags) <= set(TAGS):
            parser.error(f"bad variant {variant!r}: pixel or latent, then optional tags _{' _'.join(TAGS)}")
    if "diffusion" in stages and "vae" not in stages:
        parser.error("the diffusion stage trains on the VAE stage's export: include vae in --stages")

    config = args.config or PRESETS[args.preset]["config"]
    base_overrides = [*PRESETS[args.preset]["overrides"], *args.override]
    cfg = load_config(config, base_overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = cfg.data
    load_before = os.getloadavg()
    results: dict = {}

    def report(complete: bool) -> dict:
        return {
            "benchmark": "bench_train",
            "complete": complete,  # false: written after each run, so a killed benchmark keeps what it measured
            "preset": args.preset,
            "config": config,
            "overrides": base_overrides,
            "patch": {"thick": [data.depth_thick, data.patch_size, data.patch_size],
                      "thin": [data.depth_thick * data.factor, data.patch_size, data.patch_size],
                      "batch_size_per_device": data.batch_size, "num_workers": data.num_workers},
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "processes": 1,
            "mixed_precision": "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no",
            "steps": args.steps,
            "warmup": args.warmup,
            "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
            "results": results,
            "load_avg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
        }

    def checkpoint() -> None:
        if args.out:
            write_json(report(complete=False), args.out)

    with tempfile.TemporaryDirectory(prefix="ctld_bench_train_") as tmp:
        work = Path(tmp)
        # Deep enough for a patch and for the slab filter's taps (fitted on whole volumes at the diffusion start).
        thin_depth = (max(data.depth_thick, cfg.diffusion.slab_taps) + 2) * data.factor
        shards = build_shard_set(work, volumes=args.volumes, thin_depth=thin_depth, size=data.patch_size + 16)
        train_urls = sorted(str(p) for p in shards.glob("train-*.tar"))
        overrides = [*base_overrides, f"--data.train_urls={'::'.join(train_urls)}",
                     f"--data.val_urls={train_urls[0]}"]  # validation is off; the trainer still resolves val URLs
        if "vae" in stages:
            results["vae"] = run_training("bench_vae", "vae", config, [*overrides, "--train.time_phases=true"], work,
                                          steps=args.steps, warmup=args.warmup)
            if device.type == "cuda":
                add_mfu(results["vae"], cfg, "vae", device, args.peak_tflops, with_encode=False)
            checkpoint()
        if "diffusion" in stages:
            vae_export = work / "runs" / "bench_vae" / "export"
            diffusion: dict = {}
            results["diffusion"] = diffusion
            latent_dir = work / "latent_shards"
            if any(v.startswith("latent") for v in [*variants, *launch_variants]):
                results["encode"] = encode_latent_shards(config, base_overrides, shards, vae_export, latent_dir,
                                                         args.patches_per_volume)
            runs = [("", v) for v in variants] + [(launch, v) for launch in args.launch for v in launch_variants]
            for launch, variant in runs:
                tags = variant.split("_")[1:]
                extra = [f"--train.vae_export={vae_export}", f"--train.time_phases={'nophases' not in tags}"]
                if variant.startswith("latent"):
                    extra.append(f"--data.latent_shards_dir={latent_dir}")
                if "compile" in tags:
                    extra.append("--train.compile=true")
                name = f"{variant}@{Path(launch).stem}" if launch else variant
                try:
                    result = run_training(f"bench_diffusion_{name.replace('@', '_')}", "diffusion", config,
                                          [*overrides, *extra], work, steps=args.steps, warmup=args.warmup,
                                          launch=launch)
                except RuntimeError as error:  # one failing variant must not lose the others' figures
                    diffusion[name] = {"error": str(error)[-2000:]}
                    checkpoint()
                    continue
                if device.type == "cuda":
                    add_mfu(result, cfg, "diffusion", device, args.peak_tflops,
                            with_encode=variant.startswith("pixel"))
                diffusion[name] = result
                checkpoint()
            done = {name for name, result in diffusion.items() if "error" not in result}
            if {"pixel", "latent"} <= done or {"pixel_nophases", "latent_nophases"} <= done:
                results["latent_vs_pixel"] = latent_vs_pixel(diffusion)
    emit_json(report(complete=True), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
