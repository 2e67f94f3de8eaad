"""What a training run records about itself: the derived numbers, git commit and package versions (written to
the run folder's config.yaml), a few status lines at start, and the meter of the scalars logged every few steps.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ctld.config import Config
from ctld.distributed import zero_stage

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "accelerate", "deepspeed", "diffusers", "webdataset", "pydicom", "numpy", "ctld")


def git_commit() -> str:
    # The container image has no .git; its build passes the commit in (Dockerfile: --build-arg GIT_COMMIT).
    fallback = os.environ.get("CTLD_GIT_COMMIT", "unknown") or "unknown"
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return fallback
    if out.returncode != 0:
        return fallback
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_info(cfg: Config, accelerator: Accelerator, frozen_vae, resume_from, step: int, last_step: int) -> dict:
    """The derived numbers, logged at start and written to config.yaml's `_run` block."""
    latent_channels = frozen_vae.latent_channels if frozen_vae is not None else cfg.vae.latent_channels
    inplane = 2 ** (len(cfg.vae.channels) - 1)
    latent_hw = cfg.data.patch_size // inplane
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "stage": cfg.train.stage,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "zero_stage": zero_stage(accelerator),
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "effective_batch": cfg.data.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes,
        "thin_latent_shape": [latent_channels, cfg.data.depth_thick * cfg.data.factor, latent_hw, latent_hw],
        "thick_latent_shape": [latent_channels, cfg.data.depth_thick, latent_hw, latent_hw],
        "total_steps": cfg.train.max_steps,
        "start_step": step,
        "last_step_this_launch": last_step,
        "resumed_from": str(resume_from) if resume_from else "",
        "git_commit": git_commit(),
        "packages": package_versions(),
    }


def log_run_start(info: dict) -> None:
    """A few short status lines (main process); the full config and package versions are in config.yaml."""
    logger.info(
        f"training {info['stage']}: steps {info['start_step']} -> {info['last_step_this_launch']} of "
        f"{info['total_steps']}, {info['world_size']} process(es) ({info['distributed_type']}, ZeRO "
        f"{info['zero_stage']}), precision {info['mixed_precision']}, effective batch {info['effective_batch']}"
        + (f", resumed from {info['resumed_from']}" if info["resumed_from"] else "")
    )
    logger.info(f"latents thin {info['thin_latent_shape']}, thick {info['thick_latent_shape']}; commit "
                f"{info['git_commit']}")


class LogMeter:
    """Scalars accumulated between two log steps (on device; `.item()` only when logging).

    With `time_phases` (train.time_phases) it also splits the step's wall time into phases (`with meter.phase(
    "backward"): ...`), logged as time/<phase>_ms per micro-batch. The device is synchronised at each boundary so
    queued GPU work is charged to the phase that queued it: a benchmark setting, it costs throughput."""

    def __init__(self, device: torch.device, time_phases: bool = False):
        self.device = device
        self.time_phases = time_phases
        self.phase_seconds: dict[str, float] = {}
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count = 0
        self.grad_norm_sum = torch.zeros((), device=device)
        self.grad_norm_count = 0
        self.micro_batches = 0
        self.data_seconds = 0.0
        self.start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.time_phases:
            yield
            return
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.float()
        self.loss_count += 1

    def add_grad_norm(self, grad_norm) -> None:
        self.grad_norm_sum += torch.as_tensor(grad_norm, device=self.device, dtype=torch.float32)
        self.grad_norm_count += 1

    def summary(self, accelerator: Accelerator, batch_size: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        local = torch.stack([
            self.loss_sum / max(self.loss_count, 1),
            self.grad_norm_sum / max(self.grad_norm_count, 1),
            torch.tensor(self.data_seconds / max(elapsed, 1e-9), device=self.device),
        ])
        loss, grad_norm, data_wait = accelerator.reduce(local, reduction="mean").tolist()
        scalars = {
            "train/loss": loss,
            "train/samples_per_s": self.micro_batches * batch_size * accelerator.num_processes / max(elapsed, 1e-9),
            "train/data_wait_fraction": data_wait,
        }
        if self.grad_norm_count:
            scalars["train/grad_norm"] = grad_norm
        if self.time_phases:
            scalars["time/data_ms"] = 1e3 * self.data_seconds / max(self.micro_batches, 1)
            for name, seconds in self.phase_seconds.items():
                scalars[f"time/{name}_ms"] = 1e3 * seconds / max(self.micro_batches, 1)
        if torch.cuda.is_available():
            scalars["sys/gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return scalars
