"""Training throughput of the real trainer (ctld/train.py), both stages, at the configured patch size.

    python benchmarks/bench_train.py --out bench_train_gpu.json                     # configs/base.yaml, 8 -> 40 x 192^2
    python benchmarks/bench_train.py --config configs/tiny.yaml --steps 8 --warmup 3 --out bench_train_cpu.json
    python benchmarks/bench_train.py --override --data.batch_size=4 --override --unet.gradient_checkpointing=true

Self-contained: it builds a synthetic shard set with `ctld-shards build` (benchmarks/bench_loader.py's synthetic
CT, sized to hold a patch), trains the VAE stage, then the diffusion stage on that VAE's export, each as one
`python ctld/train.py` process (train.mixed_precision=auto: bf16 on a bf16 GPU, fp32 on CPU) for
--warmup + --steps optimizer steps, logging every step; validation and periodic checkpoints are off. Figures
come from the run's own TensorBoard scalars over the steps after the warm-up:
  samples_per_s        patch pairs per second (effective batch / mean step time)
  step_time_s          mean wall time of one optimizer step, data loading included
  data_wait_fraction   mean fraction of a step spent waiting for the next batch
  peak_memory_gb       CUDA: the trainer's sys/gpu_memory_gb (max_memory_allocated); CPU: peak RSS of the process
On CUDA also flops_per_step (torch.utils.flop_counter: one forward+backward of the trained model at the batch
shape, plus the frozen VAE's encoder in the diffusion stage) and MFU = flops_per_step x steps/s / --peak_tflops.
Goal (issue 6) on one H100: diffusion stage >= 10 samples/s at 8 -> 40 x 192x192 and >= 35% MFU.
"""

from __future__ import annotations

import argparse
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
from emit import emit_json  # noqa: E402  (benchmarks/emit.py)

from ctld.config import Config, load_config  # noqa: E402
from ctld.models.unet import UNet3D  # noqa: E402
from ctld.models.vae import AutoencoderKL3D  # noqa: E402

STAGES = ("vae", "diffusion")


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


def flops_per_step(cfg: Config, stage: str, device: torch.device) -> float:
    """FLOPs of one optimizer step: forward + backward of the trained model on each micro-batch (and the frozen
    VAE encoder's forward for the diffusion stage), counted by torch.utils.flop_counter."""
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
        with torch.no_grad():  # the thin target and the prior's thin-grid image (cubic of the thick patch)
            encode = count(lambda: (vae.encode(thin), vae.encode(thin)))
        per_micro = encode + count(lambda: unet(noisy, timesteps, prior).float().pow(2).mean().backward())
    return per_micro * cfg.train.gradient_accumulation_steps


def run_stage(stage: str, config: str, overrides: list[str], work: Path, *, steps: int, warmup: int) -> dict:
    run_name = f"bench_{stage}"
    total = warmup + steps
    argv = [
        sys.executable, str(REPO_ROOT / "ctld" / "train.py"), config, *overrides,
        f"--train.stage={stage}", f"--train.output_dir={work / 'runs'}", f"--train.run_name={run_name}",
        f"--train.max_steps={total}", "--train.log_every=1", f"--train.val_every={total + 1}",
        f"--train.image_every={total + 1}", f"--train.checkpoint_every={total + 1}", "--train.scale_batches=2",
    ]  # fmt: skip
    if stage == "diffusion":
        argv.append(f"--train.vae_export={work / 'runs' / 'bench_vae' / 'export'}")
    log = work / f"{stage}.log"
    with open(log, "w") as out:
        child = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        rss = ChildPeakRSS(child.pid)
        code = child.wait()
        peak_rss_gb = rss.stop()
    if code != 0:
        raise RuntimeError(f"{stage} training failed (exit {code}); log tail:\n{log.read_text()[-4000:]}")

    events = EventAccumulator(str(work / "runs" / run_name / "tb"), size_guidance={"scalars": 0})
    events.Reload()

    def after_warmup(tag: str) -> list[float]:
        return [e.value for e in events.Scalars(tag) if e.step > warmup]

    samples_per_s = after_warmup("train/samples_per_s")
    effective_batch = load_config(config, overrides).data.batch_size * load_config(
        config, overrides).train.gradient_accumulation_steps
    step_times = [effective_batch / s for s in samples_per_s]
    step_time = sum(step_times) / len(step_times)
    result = {
        "timed_steps": len(step_times),
        "effective_batch": effective_batch,
        "samples_per_s": round(effective_batch / step_time, 3),
        "step_time_s": round(step_time, 4),
        "data_wait_fraction": round(sum(after_warmup("train/data_wait_fraction")) / len(step_times), 4),
        "final_loss": round(events.Scalars("train/loss")[-1].value, 5),
    }
    if "sys/gpu_memory_gb" in events.Tags()["scalars"]:
        result["peak_memory_gb"] = round(max(after_warmup("sys/gpu_memory_gb")), 3)
        result["peak_memory_kind"] = "cuda max_memory_allocated"
    else:
        result["peak_memory_gb"] = round(peak_rss_gb, 3)
        result["peak_memory_kind"] = "process peak RSS"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark ctld/train.py (both stages) on synthetic shards.")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "base.yaml"), help="YAML config")
    parser.add_argument("--override", action="append", default=[],
                        help="a --section.key=value override for the trainer (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per stage")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first (cuDNN autotune, workers)")
    parser.add_argument("--volumes", type=int, default=8, help="synthetic volumes in the shard set")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: vae,diffusion")
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOPS of the GPU for MFU (989 = H100/H200 SXM, 312 = A100)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if "diffusion" in stages and "vae" not in stages:
        parser.error("the diffusion stage trains on the VAE stage's export: include vae in --stages")

    cfg = load_config(args.config, args.override)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = cfg.data
    with tempfile.TemporaryDirectory(prefix="ctld_bench_train_") as tmp:
        work = Path(tmp)
        thin_depth = (data.depth_thick + 2) * data.factor
        shards = build_shard_set(work, volumes=args.volumes, thin_depth=thin_depth, size=data.patch_size + 16)
        train_urls = sorted(str(p) for p in shards.glob("train-*.tar"))
        overrides = [*args.override, f"--data.train_urls={'::'.join(train_urls)}",
                     f"--data.val_urls={train_urls[0]}"]  # validation is off; the trainer still resolves val URLs
        load_before = os.getloadavg()
        results = {}
        for stage in stages:
            results[stage] = run_stage(stage, args.config, overrides, work, steps=args.steps, warmup=args.warmup)
            if device.type == "cuda":
                flops = flops_per_step(cfg, stage, device)
                steps_per_s = results[stage]["samples_per_s"] / results[stage]["effective_batch"]
                results[stage]["flops_per_step"] = flops
                results[stage]["achieved_tflops"] = round(flops * steps_per_s / 1e12, 2)
                results[stage]["mfu"] = round(flops * steps_per_s / 1e12 / args.peak_tflops, 4)
        load_after = os.getloadavg()

    report = {
        "benchmark": "bench_train",
        "config": args.config,
        "overrides": args.override,
        "patch": {"thick": [data.depth_thick, data.patch_size, data.patch_size],
                  "thin": [data.depth_thick * data.factor, data.patch_size, data.patch_size],
                  "batch_size_per_device": data.batch_size, "num_workers": data.num_workers},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "processes": 1,
        "mixed_precision": "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no",
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
        "stages": results,
        "load_avg_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    emit_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
