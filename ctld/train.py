"""Train ctld: the 3D VAE (`train.stage=vae`), then the latent diffusion U-Net (`train.stage=diffusion`).

    accelerate launch ctld/train.py CONFIG [--section.key=value ...]

One GPU (or CPU):
    accelerate launch ctld/train.py configs/base.yaml --train.stage=vae --train.run_name=vae1
    accelerate launch ctld/train.py configs/base.yaml --train.stage=diffusion --train.run_name=diff1 \
        --train.vae_export=runs/vae1/export
8 GPUs on one node with DeepSpeed ZeRO-2 (launch/ holds DDP, ZeRO-2 and ZeRO-3 configs):
    accelerate launch --config_file launch/zero2.yaml --num_processes 8 ctld/train.py configs/base.yaml ...
Preemptible clusters: add --train.resume=latest. The first launch starts fresh, every restart continues from
the newest complete checkpoint. SIGTERM on any rank: every rank stops at the same step, saves a checkpoint and
exits 143 (preempted). Multi-process `accelerate launch` (torchrun) forwards SIGTERM and SIGKILLs the workers
TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default 30) seconds later; a single-process `accelerate launch` does not forward
it, so run one process as `python ctld/train.py CONFIG ...`.
2-process CPU run (what the tests do):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        ctld/train.py configs/tiny.yaml --data.shards_dir=/path/to/shards

Writes run_dir = train.output_dir/train.run_name:
    config.yaml (resolved config + `_run`: world size, git commit, package versions), tb/ (TensorBoard),
    checkpoints/checkpoint-<step>/ (ctld.checkpointing), export/ (ctld.export: what inference needs).

Data position on resume: the training stream is reopened, keyed by the step, at every checkpoint (and when a
pass ends), so a run resumed from checkpoint-N sees exactly the batches an uninterrupted run sees after step N.
A SIGTERM checkpoint at step M resumes with a fresh stream keyed by M (no sample is replayed on purpose).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger
from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ctld.baselines import SlabFilter, fit_slab_filter
from ctld.checkpointing import StopRequest, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from ctld.config import Config, flatten_config, load_config, save_config
from ctld.data.loader import iter_covered_pairs, make_patch_loader, shard_urls
from ctld.diffusion import ResidualSpec, build_sampler, build_train_scheduler, encode_latents, residual_loss
from ctld.export import load_export, save_export
from ctld.metrics import WINDOWS
from ctld.models.unet import UNet3D
from ctld.models.vae import AutoencoderKL3D
from ctld.tracking import make_panel
from ctld.validation import validate_diffusion, validate_vae

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
VAL_SEED = 1_000_003  # validation patches and sampling noise: fixed, so validations differ only by the weights
PACKAGES = ("torch", "accelerate", "deepspeed", "diffusers", "webdataset", "pydicom", "numpy", "ctld")


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    _check_config(cfg)
    train(cfg)


def train(cfg: Config) -> None:
    # First, so a SIGTERM that arrives during start-up still ends in a clean checkpoint after the first step.
    stop = StopRequest()
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=_resolve_mixed_precision(cfg.train.mixed_precision),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        kwargs_handlers=_process_group_kwargs(),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(cfg.train.seed, device_specific=True)  # device_specific: each rank draws different noise
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick the fastest conv kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _configure_deepspeed(accelerator, cfg)
    device = accelerator.device
    stage = cfg.train.stage

    # ---- models: the one being trained goes through `prepare`; the frozen VAE (diffusion stage) does not ----
    frozen_vae = noise_scheduler = sampler = spec = None
    if stage == "vae":
        model = AutoencoderKL3D(**asdict(cfg.vae))
    else:
        frozen_vae = _load_frozen_vae(cfg, device, accelerator.mixed_precision)
        model = UNet3D(latent_channels=frozen_vae.latent_channels, factor=cfg.data.factor, **asdict(cfg.unet))
        noise_scheduler = build_train_scheduler(cfg.diffusion)
        sampler = build_sampler(cfg.diffusion.sampler, noise_scheduler.config)
        # A closed-form fit on the first training volumes: every rank and every launch gets the same filter.
        slab_filter = _fit_slab_filter(cfg)
        # residual_scale is set after resume: a resumed run keeps the checkpoint's value (below).
        spec = ResidualSpec(prior=cfg.diffusion.prior, factor=cfg.data.factor, residual_scale=1.0,
                            strength=cfg.diffusion.strength, num_train_timesteps=cfg.diffusion.num_train_timesteps,
                            slab_filter=slab_filter)
    # EMA of the U-Net in fp32 (bf16 cannot hold updates of 1e-4 relative size), created before `prepare`
    # casts the model. Saved and restored with each checkpoint (ctld.checkpointing).
    # foreach: one fused update (and under ZeRO-3 one gather of all parameters instead of one per tensor).
    ema = (EMAModel(model.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=cfg.train.ema_warmup,
                    power=2 / 3, foreach=True) if stage == "diffusion" else None)
    if ema is not None:
        ema.to(device=device, dtype=torch.float32)

    optimizer, lr_scheduler = _optimizer_and_lr_scheduler(accelerator, model, cfg)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    model_dtype = next(model.parameters()).dtype  # bf16 under DeepSpeed bf16: inputs are cast to it
    if ema is not None and _zero_stage(accelerator) == 3:
        # diffusers.training_utils imports deepspeed only when ZeRO-3 is already on at ITS import time, which is
        # before our Accelerator exists; EMAModel.step then fails with "name 'deepspeed' is not defined".
        import deepspeed
        import diffusers.training_utils

        diffusers.training_utils.deepspeed = deepspeed

    # ---- resume: model, optimizer, LR scheduler, RNG (accelerate), EMA and counters (ctld.checkpointing) ----
    step, skipped_steps = 0, 0
    resume_from = resolve_resume(run_dir, cfg.train.resume)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, ema=ema)
        step, skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        logger.info(f"resumed from {resume_from} at step {step}")
        newer = [path.name for saved_step, path in list_checkpoints(run_dir) if saved_step > step]
        if newer:
            logger.warning(f"{run_dir / 'checkpoints'} holds checkpoints beyond step {step} ({newer}) from an "
                           "abandoned continuation; --train.resume=latest would pick them: delete them")
    last_step = cfg.train.max_steps
    if cfg.train.steps_per_launch > 0:
        last_step = min(last_step, step + cfg.train.steps_per_launch)

    if spec is not None:
        # The residual's scale: saved with every checkpoint, so a resumed run trains against the same target even
        # when it runs on another number of processes (a new measurement would differ slightly).
        if resume_from is not None and "residual_scale" in state:
            residual_scale = float(state["residual_scale"])
        else:
            residual_scale = cfg.diffusion.residual_scale or _estimate_residual_scale(accelerator, frozen_vae, spec,
                                                                                     cfg)
        spec = dataclasses.replace(spec, residual_scale=residual_scale)

    run_info = _run_info(cfg, accelerator, frozen_vae, resume_from, step, last_step)
    if spec is not None:
        run_info["residual_scale"] = spec.residual_scale
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml", extra=run_info)
    accelerator.init_trackers("tb", config=flatten_config(cfg))
    _log_start(cfg, run_info)

    # ---- data: never through `prepare` (STACK.md); each rank reads its own shards ----
    train_stream = _TrainStream(shard_urls(cfg.data, "train"), cfg, accelerator)
    train_stream.open(step)
    try:
        val_urls = shard_urls(cfg.data, "val")
    except ValueError as err:  # an empty val split: train anyway, say so
        logger.warning(f"validation is off: {err}")
        val_urls = []

    nonfinite_in_row = 0
    window = _Window(device)
    progress = tqdm(total=last_step, initial=step, desc=f"{stage} steps", disable=not accelerator.is_local_main_process)
    model.train()
    window_bad = False  # a non-finite loss in this accumulation window: drop the whole optimizer step
    micro_step = step * accelerator.gradient_accumulation_steps
    stopped_by = ""
    while step < last_step:
        data_start = time.perf_counter()
        batch = train_stream.next(step)
        window.data_seconds += time.perf_counter() - data_start

        with accelerator.accumulate(model):
            if stage == "vae":
                loss = _vae_loss(model, batch, cfg, micro_step, accelerator.process_index, model_dtype, device)
            else:
                loss = _unet_loss(model, frozen_vae, noise_scheduler, spec, batch, cfg, device)
            # One collective per micro-step: [any rank non-finite, any rank asked to stop], so all ranks agree.
            flags = accelerator.reduce(
                torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0, 1.0 if stop.requested else 0.0],
                             device=device),
                reduction="sum",
            )
            finite = bool(flags[0].item() == 0)  # note: a CPU-GPU sync point
            if finite:
                accelerator.backward(loss)
                window.add_loss(loss.detach())
            else:
                window_bad = True
            grad_norm = None
            if accelerator.sync_gradients and not window_bad:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro_step += 1
        window.micro_batches += 1
        if not accelerator.sync_gradients:
            continue

        # ---- one optimizer step done (or skipped) ----
        stop_now = bool(flags[1].item() > 0)
        stepped = not window_bad
        if window_bad:
            window_bad = False
            skipped_steps += 1
            nonfinite_in_row += 1
            logger.warning(f"non-finite loss at step {step}: optimizer step skipped ({nonfinite_in_row} in a row)")
            if nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                raise RuntimeError(
                    f"{nonfinite_in_row} optimizer steps in a row had a non-finite loss (NaN/Inf) at step {step} "
                    f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); lower train.lr, check the shards "
                    f"with `ctld-shards verify`, or resume from an earlier checkpoint in {run_dir / 'checkpoints'}"
                )
        else:
            nonfinite_in_row = 0
            step += 1
            progress.update(1)
            if ema is not None:
                ema.step(accelerator.unwrap_model(model).parameters())
            if grad_norm is not None:
                window.add_grad_norm(grad_norm)

        if stepped and step % cfg.train.log_every == 0:
            scalars = window.summary(accelerator, cfg.data.batch_size)
            scalars.update({"lr": lr_scheduler.get_last_lr()[0], "train/skipped_steps": skipped_steps})
            accelerator.log(scalars, step=step)
            progress.set_postfix(loss=f"{scalars['train/loss']:.4g}")
            logger.info(f"step {step}/{cfg.train.max_steps} loss {scalars['train/loss']:.4g} lr {scalars['lr']:.3g} "
                        f"{scalars['train/samples_per_s']:.2f} samples/s, data wait "
                        f"{scalars['train/data_wait_fraction']:.0%}")
            window = _Window(device)

        val_due = stepped and step % cfg.train.val_every == 0
        images_due = stepped and step % cfg.train.image_every == 0
        if (val_due or images_due) and val_urls:
            _validate(accelerator, cfg, model=model, frozen_vae=frozen_vae, sampler=sampler, spec=spec, ema=ema,
                      val_urls=val_urls, step=step, model_dtype=model_dtype, log_metrics=val_due,
                      log_images=images_due)
            model.train()

        if stop_now:
            stopped_by = stop.signal_name or "a signal on another rank"
        if (stepped and (step % cfg.train.checkpoint_every == 0 or step >= last_step)) or stop_now:
            counters = {"step": step, "skipped_steps": skipped_steps}
            if spec is not None:
                counters["residual_scale"] = spec.residual_scale
            save_checkpoint(accelerator, run_dir, step, counters,
                            ema=ema, keep_last=cfg.train.checkpoints_total_limit)
            if not stop_now:
                train_stream.open(step)  # the data position policy (module docstring)
        if stop_now:
            break
    progress.close()

    if stopped_by:
        logger.info(f"stopping at step {step} on {stopped_by}; resume with --train.resume=latest")
    elif step >= cfg.train.max_steps:
        _export(accelerator, cfg, run_dir, model=model, frozen_vae=frozen_vae, noise_scheduler=noise_scheduler,
                spec=spec, ema=ema, train_stream=train_stream, step=step)
    else:
        logger.info(f"stopped at step {step} of {cfg.train.max_steps} (train.steps_per_launch); resume with "
                    "--train.resume=latest")
    accelerator.end_training()
    stop.restore()
    if stopped_by:  # preempted, not finished: a retryable exit code for the PyTorchJob (k8s/README.md)
        from ctld.checkpointing import exit_preempted

        exit_preempted()


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def _vae_loss(vae, batch, cfg: Config, micro_step: int, rank: int, dtype, device) -> torch.Tensor:
    """L1 reconstruction + KL on a thick or a thin patch batch (chosen per micro-batch, `train.thick_fraction`)."""
    # Thick and thin patches differ in depth, so a micro-batch is one or the other; the choice is a pure
    # function of (seed, rank, micro_step) so a resumed run makes the same choices.
    use_thick = np.random.default_rng([cfg.train.seed, rank, micro_step]).random() < cfg.train.thick_fraction
    x = batch["thick" if use_thick else "thin"].to(device, non_blocking=True).to(dtype)
    reconstruction, posterior = vae(x)
    reconstruction_loss = F.l1_loss(reconstruction.float(), x.float())
    # KL summed over the latent and divided by the image voxels, i.e. LDM's weighting (sum of the per-pixel
    # reconstruction loss + kl_weight * summed KL) with both terms divided by the number of voxels.
    kl = posterior.kl().mean() / x[0].numel()
    return reconstruction_loss + cfg.train.kl_weight * kl


def _unet_loss(unet, vae, noise_scheduler, spec: ResidualSpec, batch, cfg: Config, device) -> torch.Tensor:
    """The residual objective (ctld.diffusion.residual_loss) on the posterior-mode thin latents around the prior
    latents; the VAE is frozen and outside autograd."""
    vae_dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        target = encode_latents(vae, batch["thin"].to(device, non_blocking=True).to(vae_dtype))
        prior = spec.prior_latents(vae, batch["thick"].to(device, non_blocking=True).to(vae_dtype))
    # The U-Net casts its input to its own weight dtype (DeepSpeed bf16 casts the model).
    return residual_loss(unet, noise_scheduler, target.float(), prior.float(), residual_scale=spec.residual_scale,
                         strength=spec.strength, regression_fraction=cfg.diffusion.regression_fraction,
                         min_snr_gamma=cfg.diffusion.min_snr_gamma)


def _fit_slab_filter(cfg: Config) -> SlabFilter:
    """The slab-aware linear baseline (ctld.baselines.SlabFilter), fitted in closed form on the first
    `diffusion.slab_fit_volumes` training volumes; every rank fits the same filter from the same shards."""
    urls = shard_urls(cfg.data, "train")
    start = time.perf_counter()
    limit = cfg.diffusion.slab_fit_volumes
    pairs = ((thick, thin) for _, thick, thin in iter_covered_pairs(urls, cfg.data.factor, limit))
    slab_filter = fit_slab_filter(pairs, cfg.data.factor, taps=cfg.diffusion.slab_taps)
    logger.info(f"slab filter fitted on up to {cfg.diffusion.slab_fit_volumes} training volumes in "
                f"{time.perf_counter() - start:.1f} s; taps per phase: {slab_filter.weights.round(3).tolist()}")
    return slab_filter


@torch.no_grad()
def _estimate_residual_scale(accelerator: Accelerator, vae, spec: ResidualSpec, cfg: Config) -> float:
    """1 / std of z_thin - z_prior over `train.scale_batches` batches per rank of a fixed-seed training stream,
    so the diffusion sees a unit-variance residual (as the VAE's scaling_factor does for latents)."""
    loader = make_patch_loader(shard_urls(cfg.data, "train"), cfg.data, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, seed=VAL_SEED + cfg.train.seed, resampled=True,
                               num_workers=0, epoch=0)
    dtype = next(vae.parameters()).dtype
    device = accelerator.device
    batches = itertools.islice(loader, max(1, cfg.train.scale_batches))
    residuals = (encode_latents(vae, b["thin"].to(device).to(dtype))
                 - spec.prior_latents(vae, b["thick"].to(device).to(dtype)) for b in batches)
    std, _ = _std_over_ranks(accelerator, residuals)
    logger.info(f"residual latent std {std:.4g} around the {spec.prior} prior: residual_scale = {1 / std:.4g}")
    return 1.0 / std


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


class _TrainStream:
    """The training batches, reopened (keyed by the step) at checkpoints and when a pass ends."""

    def __init__(self, urls: list[str], cfg: Config, accelerator: Accelerator):
        if not urls:
            raise ValueError(
                f"no training shards found (data.shards_dir={cfg.data.shards_dir!r}, data.train_urls="
                f"{cfg.data.train_urls!r}); build them with `ctld-shards build`"
            )
        self.urls, self.cfg, self.accelerator = urls, cfg, accelerator
        self._iterator = None
        self._opened_at = -1

    def open(self, step: int) -> None:
        if step == self._opened_at:
            return
        loader = make_patch_loader(
            self.urls,
            self.cfg.data,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            seed=self.cfg.data.seed,
            resampled=True,
            epoch=step,
        )
        self._iterator, self._opened_at = iter(loader), step

    def next(self, step: int) -> dict:
        try:
            return next(self._iterator)
        except StopIteration:
            self._opened_at = -1
            self.open(step)
            try:
                return next(self._iterator)
            except StopIteration:
                raise RuntimeError(
                    f"the training loader yields no batches (shards {self.urls[:3]}...): check data.batch_size and "
                    "data.samples_per_epoch, and that the shards hold volumes of at least one patch"
                ) from None


def _val_batches(urls: list[str], cfg: Config, accelerator: Accelerator) -> list[dict]:
    """`train.val_batches` batches per rank, the same ones at every validation (fixed seed, resampled so
    every rank gets the same number even with fewer val shards than ranks)."""
    loader = make_patch_loader(urls, cfg.data, rank=accelerator.process_index, world_size=accelerator.num_processes,
                               seed=VAL_SEED + cfg.data.seed, resampled=True, num_workers=0, epoch=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == cfg.train.val_batches:
            break
    return batches


# ---------------------------------------------------------------------------------------------------------------
# Validation, images, export
# ---------------------------------------------------------------------------------------------------------------


def _validate(accelerator: Accelerator, cfg: Config, *, model, frozen_vae, sampler, spec, ema, val_urls: list[str],
              step: int, model_dtype: torch.dtype, log_metrics: bool, log_images: bool) -> None:
    """Metrics (`val/...`) and/or image panels (`panels/...`) on the fixed validation patches; every rank runs
    its share (a collective under ZeRO-3), rank 0 writes the images."""
    model.eval()
    # Fork the RNG so validation (and its loader) leaves the training stream's random state untouched.
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        batches = _val_batches(val_urls, cfg, accelerator)
        if cfg.train.stage == "vae":
            metrics, columns = validate_vae(model, batches, hu_min=cfg.data.hu_min, hu_max=cfg.data.hu_max,
                                            factor=cfg.data.factor, device=accelerator.device, dtype=model_dtype)
            depth_repeats = [cfg.data.factor, cfg.data.factor, 1, 1]
            caption = "thick | reconstruction | thin | reconstruction"
        else:
            with _ema_weights(accelerator, model, ema):
                metrics, columns = validate_diffusion(
                    model, frozen_vae, sampler, spec, batches, hu_min=cfg.data.hu_min, hu_max=cfg.data.hu_max,
                    num_inference_steps=cfg.diffusion.num_inference_steps,
                    seed=VAL_SEED + accelerator.process_index, device=accelerator.device)
            depth_repeats = [cfg.data.factor, 1, 1, 1, 1]
            caption = "thick input | regression (EMA) | diffusion sample (EMA) | cubic | target"
    names = sorted(metrics)
    values = accelerator.reduce(torch.tensor([metrics[n] for n in names], device=accelerator.device), "mean")
    if log_metrics:
        accelerator.log({f"val/{n}": float(v) for n, v in zip(names, values.tolist())}, step=step)
    if log_images and accelerator.is_main_process:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for window_name in ("soft_tissue", "wide"):
            panel = make_panel(columns, depth_repeats=depth_repeats, window=WINDOWS[window_name])
            # Axial mid-slices on top, coronal mid-planes below; columns as in `caption`.
            writer.add_image(f"panels/{window_name}", panel, global_step=step, dataformats="HW")
        writer.add_text("panels/columns", caption, global_step=step)


@contextlib.contextmanager
def _ema_weights(accelerator: Accelerator, model, ema: EMAModel):
    """Swap the EMA weights into the prepared U-Net for validation, then put the trained weights back."""
    params = list(accelerator.unwrap_model(model).parameters())
    zero3 = _zero_stage(accelerator) == 3
    if zero3:  # partitioned parameters: gather, let rank 0 write, re-partition on exit
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    else:
        gather = contextlib.nullcontext()
    with gather:
        ema.store(params)
        ema.copy_to(params)
    try:
        yield
    finally:
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if zero3 else contextlib.nullcontext()
        with gather:
            ema.restore(params)


def _export(accelerator: Accelerator, cfg: Config, run_dir: Path, *, model, frozen_vae, noise_scheduler, spec, ema,
            train_stream: _TrainStream, step: int) -> None:
    """run_dir/export: what inference needs (VAE; for the diffusion stage also the EMA U-Net and scheduler)."""
    state_dict, scaling_factor = None, None
    if cfg.train.stage == "vae":  # (the diffusion stage exports the EMA weights, which every rank holds whole)
        state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every rank calls it
    if cfg.train.stage == "vae" and cfg.train.scale_batches > 0:
        scaling_factor = _estimate_scaling_factor(accelerator, model, train_stream, cfg, step)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    meta = {
        "factor": cfg.data.factor, "hu_min": cfg.data.hu_min, "hu_max": cfg.data.hu_max,
        "depth_thick": cfg.data.depth_thick, "patch_size": cfg.data.patch_size,
        "stage": cfg.train.stage, "step": step, "run_name": cfg.train.run_name, "git_commit": _git_commit(),
    }
    thin_spacing_mm = _thin_spacing_mm(cfg)
    if thin_spacing_mm is not None:  # ctld-infer checks a thick input's spacing against factor x this
        meta["thin_spacing_mm"] = thin_spacing_mm
    if cfg.train.stage == "vae":
        vae = AutoencoderKL3D(**{**asdict(cfg.vae), **({"scaling_factor": scaling_factor} if scaling_factor else {})})
        vae.load_state_dict({k: v.float() for k, v in state_dict.items()})
        save_export(run_dir / "export", vae=vae, meta=meta)
    else:
        unet = UNet3D(latent_channels=frozen_vae.latent_channels, factor=cfg.data.factor, **asdict(cfg.unet))
        ema.copy_to(unet.parameters())  # the exported U-Net holds the EMA weights
        vae = AutoencoderKL3D(**frozen_vae.config)
        vae.load_state_dict({k: v.float() for k, v in frozen_vae.state_dict().items()})
        meta.update(spec.to_meta())
        meta["thick_profile"] = cfg.data.thick_profile
        save_export(run_dir / "export", vae=vae, unet=unet, scheduler=noise_scheduler, meta=meta)
    logger.info(f"exported {run_dir / 'export'}")
    accelerator.wait_for_everyone()


@torch.no_grad()
def _estimate_scaling_factor(accelerator, vae, train_stream, cfg: Config, step: int) -> float:
    """1 / std of the thin-patch latents over `train.scale_batches` batches per rank (unit-variance latents,
    as Stable Diffusion's 0.18215 was chosen)."""
    vae.eval()
    base = accelerator.unwrap_model(vae)
    dtype = next(base.parameters()).dtype
    latents = (base.encode(train_stream.next(step)["thin"].to(accelerator.device).to(dtype)).sample()
               for _ in range(cfg.train.scale_batches))
    std, count = _std_over_ranks(accelerator, latents)
    logger.info(f"latent std {std:.4g} over {count} values: VAE scaling_factor = {1.0 / std:.4g}")
    return 1.0 / std


def _std_over_ranks(accelerator: Accelerator, tensors) -> tuple[float, int]:
    """Standard deviation of all values of `tensors` on every rank (one all-reduce of count, sum, sum of squares)."""
    moments = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for t in tensors:
        t = t.double()
        moments += torch.stack([torch.tensor(t.numel(), device=t.device, dtype=torch.float64), t.sum(), t.pow(2).sum()])
    count, total, squares = accelerator.reduce(moments, reduction="sum").tolist()
    return math.sqrt(max(squares / count - (total / count) ** 2, 1e-12)), int(count)


# ---------------------------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the ctld VAE or diffusion U-Net (run it with `accelerate launch`).",
        epilog="Overrides: any --section.key=value, e.g. --train.stage=diffusion --train.lr=2e-4",
    )
    parser.add_argument("config", help="YAML config, e.g. configs/base.yaml")
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    return args


def _check_config(cfg: Config) -> None:
    t = cfg.train
    if t.stage == "diffusion" and not t.vae_export:
        raise ValueError("train.stage=diffusion needs train.vae_export=<the VAE run's export/ folder>")
    if t.max_steps < 0 or (t.max_steps == 0 and t.stage != "vae"):
        raise ValueError(f"train.max_steps must be >= 1 (0 only for the VAE stage: export the VAE as initialised, "
                         f"e.g. a zero_init_residual VAE that is already lossless), got {t.max_steps}")
    for name in ("log_every", "val_every", "image_every", "checkpoint_every", "checkpoints_total_limit",
                 "gradient_accumulation_steps", "max_nonfinite_steps", "val_batches"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if not 0.0 <= t.thick_fraction <= 1.0:
        raise ValueError(f"train.thick_fraction must be in [0, 1], got {t.thick_fraction}")
    d = cfg.diffusion
    if not 0.0 < d.strength <= 1.0:
        raise ValueError(f"diffusion.strength must be in (0, 1], got {d.strength}")
    if not 0.0 <= d.regression_fraction <= 1.0:
        raise ValueError(f"diffusion.regression_fraction must be in [0, 1], got {d.regression_fraction}")
    if d.residual_scale < 0 or d.slab_taps < 1 or d.slab_taps % 2 == 0 or d.slab_fit_volumes < 1:
        raise ValueError(f"need diffusion.residual_scale >= 0 (0 = measure), an odd slab_taps >= 1 and "
                         f"slab_fit_volumes >= 1; got {d.residual_scale}, {d.slab_taps}, {d.slab_fit_volumes}")
    inplane = 2 ** (len(cfg.vae.channels) - 1)
    if cfg.data.patch_size % inplane:
        raise ValueError(f"data.patch_size={cfg.data.patch_size} must be a multiple of the VAE's in-plane factor "
                         f"{inplane} (2 ** (len(vae.channels) - 1))")


def _optimizer_and_lr_scheduler(accelerator: Accelerator, model: torch.nn.Module, cfg: Config):
    """AdamW + `train.lr_scheduler` (warmup, then e.g. cosine) from diffusers.optimization.get_scheduler."""
    ds_config = {}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if "scheduler" in ds_config:
        raise ValueError(
            "the DeepSpeed JSON has a 'scheduler' block; remove it: ctld's LR schedule comes from train.lr_scheduler, "
            "train.lr_warmup_steps and train.max_steps"
        )

    def build_lr_scheduler(optimizer, steps_per_update: int):
        return get_scheduler(
            cfg.train.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.train.lr_warmup_steps * steps_per_update,
            num_training_steps=cfg.train.max_steps * steps_per_update,
        )

    if "optimizer" in ds_config:
        # DeepSpeed builds the optimizer from its JSON ("lr": "auto" is filled from train.lr) and steps the
        # LR scheduler itself, once per optimizer step.
        optimizer = DummyOptim(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        return optimizer, DummyScheduler(optimizer, lr_scheduler_callable=lambda opt: build_lr_scheduler(opt, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    # accelerate's AcceleratedScheduler steps the scheduler once per process per optimizer step, hence the
    # factor num_processes (as in diffusers' training examples).
    return optimizer, build_lr_scheduler(optimizer, accelerator.num_processes)


def _process_group_kwargs() -> list:
    # gloo on CPU: without it DeepSpeed on CPU sees every rank as rank 0 of 1 (STACK.md). Only for multi-process
    # launches (torchrun underneath `accelerate launch`): a single process has no process group to configure.
    if torch.cuda.is_available() or not torch.distributed.is_torchelastic_launched():
        return []
    return [InitProcessGroupKwargs(backend="gloo")]


def _resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    # bf16 Conv3d on CPU is 35-200x slower than fp32 (STACK.md): fp32 there.
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _zero_stage(accelerator: Accelerator) -> int:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def _configure_deepspeed(accelerator: Accelerator, cfg: Config) -> None:
    """Fill the DeepSpeed JSON's "auto" batch size and clipping from the ctld config (no dataloader is
    prepared, so accelerate cannot infer them)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = cfg.train.max_grad_norm
    if _zero_stage(accelerator) == 3:
        # The VAE export gathers the partitioned weights (accelerator.get_state_dict), which needs this.
        ds_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    ds_accumulation = ds_config.get("gradient_accumulation_steps", "auto")
    if ds_accumulation != "auto" and int(ds_accumulation) != cfg.train.gradient_accumulation_steps:
        raise ValueError(
            f"DeepSpeed gradient_accumulation_steps={ds_accumulation} differs from train.gradient_accumulation_steps="
            f"{cfg.train.gradient_accumulation_steps}; make them equal (accelerate launch "
            "--gradient_accumulation_steps) or set it to \"auto\" in the DeepSpeed JSON"
        )


def _load_frozen_vae(cfg: Config, device: torch.device, mixed_precision: str) -> AutoencoderKL3D:
    # Loaded on the CPU, then moved: safetensors rejects device strings like "cpu:0" (accelerate's MULTI_CPU).
    export = load_export(cfg.train.vae_export, "cpu")
    meta = export.meta
    for key in ("hu_min", "hu_max"):
        if float(meta[key]) != float(getattr(cfg.data, key)):
            raise ValueError(
                f"the VAE in {cfg.train.vae_export} was trained with {key}={meta[key]} but data.{key}="
                f"{getattr(cfg.data, key)}; use the VAE run's intensity window (--data.{key}={meta[key]})"
            )
    vae = export.vae
    if cfg.data.patch_size % vae.inplane_factor:
        raise ValueError(f"data.patch_size={cfg.data.patch_size} must be a multiple of the VAE's in-plane factor "
                         f"{vae.inplane_factor}")
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    vae.requires_grad_(False)
    return vae.to(device=device, dtype=weight_dtype).eval()


def _thin_spacing_mm(cfg: Config) -> float | None:
    """Median thin slice spacing the model was trained on: from the shard manifest, else from the VAE export."""
    manifest = Path(cfg.data.shards_dir) / "manifest.json"
    if not cfg.data.train_urls and manifest.is_file():
        median = json.loads(manifest.read_text()).get("geometry", {}).get("thin_spacing_z_mm", {}).get("median")
        if median is not None:
            return float(median)
    vae_meta = Path(cfg.train.vae_export) / "ctld.json" if cfg.train.vae_export else None
    if vae_meta is not None and vae_meta.is_file():
        return json.loads(vae_meta.read_text()).get("thin_spacing_mm")
    return None


def _git_commit() -> str:
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


def _package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _run_info(cfg: Config, accelerator: Accelerator, frozen_vae, resume_from, step: int, last_step: int) -> dict:
    """The derived numbers, logged at start and written to config.yaml's `_run` block."""
    latent_channels = frozen_vae.latent_channels if frozen_vae is not None else cfg.vae.latent_channels
    inplane = 2 ** (len(cfg.vae.channels) - 1)
    latent_hw = cfg.data.patch_size // inplane
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stage": cfg.train.stage,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "zero_stage": _zero_stage(accelerator),
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "effective_batch": cfg.data.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes,
        "thin_latent_shape": [latent_channels, cfg.data.depth_thick * cfg.data.factor, latent_hw, latent_hw],
        "thick_latent_shape": [latent_channels, cfg.data.depth_thick, latent_hw, latent_hw],
        "total_steps": cfg.train.max_steps,
        "start_step": step,
        "last_step_this_launch": last_step,
        "resumed_from": str(resume_from) if resume_from else "",
        "git_commit": _git_commit(),
        "packages": _package_versions(),
    }


def _log_start(cfg: Config, info: dict) -> None:
    logger.info("***** Running training *****")
    for key in ("stage", "world_size", "distributed_type", "zero_stage", "mixed_precision", "effective_batch",
                "thin_latent_shape", "thick_latent_shape", "total_steps", "start_step", "last_step_this_launch",
                "resumed_from", "git_commit", "packages"):
        logger.info(f"  {key} = {info[key]}")
    logger.info(f"  config = {flatten_config(cfg)}")


class _Window:
    """Scalars accumulated between two log steps (on device; `.item()` only when logging)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count = 0
        self.grad_norm_sum = torch.zeros((), device=device)
        self.grad_norm_count = 0
        self.micro_batches = 0
        self.data_seconds = 0.0
        self.start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

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
        if torch.cuda.is_available():
            scalars["sys/gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return scalars


if __name__ == "__main__":
    main()
