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
    checkpoints/checkpoint-<step>/ (ctld.checkpointing), export/ (ctld.export: what inference needs, the
    inference settings to use and a model card: ctld/run_export.py).

Data position on resume: the training stream is reopened, keyed by the step, at every checkpoint (and when a
pass ends), so a run resumed from checkpoint-N sees exactly the batches an uninterrupted run sees after step N.
A SIGTERM checkpoint at step M resumes with a fresh stream keyed by M (no sample is replayed on purpose).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ctld import faults
from ctld.baselines import SlabFilter
from ctld.calibration import estimate_residual_scale, fit_slab_filter_on_shards
from ctld.checkpointing import (
    ResumeError,
    StopRequest,
    check_checkpoint,
    check_resumed_architecture,
    exit_preempted,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from ctld.config import Config, ConfigError, flatten_config, load_config, save_config
from ctld.config_checks import check
from ctld.data.latent_shards import check_latent_manifest, latent_shard_urls, read_latent_manifest
from ctld.data.shard_writer import sha256_of
from ctld.data.shards import extra_train_urls, shard_urls
from ctld.data.train_stream import TrainStream
from ctld.diffusion import ResidualSpec, build_sampler, build_train_scheduler, encode_pair, spec_residual_loss
from ctld.distributed import (
    configure_deepspeed,
    optimizer_and_lr_scheduler,
    process_group_kwargs,
    resolve_mixed_precision,
    zero_stage,
)
from ctld.export import vae_hash
from ctld.frozen_vae import load_frozen_vae
from ctld.models.unet import UNet3D
from ctld.models.vae import AutoencoderKL3D
from ctld.run_export import export_run
from ctld.run_info import LogMeter, log_run_start, run_info
from ctld.validation import validate

logger = get_logger(__name__)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check(cfg)
        if cfg.data.latent_shards_dir:
            check_latent_shards(cfg)  # refuse latent shards of another VAE or config before any process starts work
        # Damaged inputs fail here in one line, not in a stack trace per rank: the VAE export is loaded once more
        # (a few seconds; every file and shape checked), the checkpoint to resume has its files' headers read.
        if cfg.train.stage == "diffusion":
            load_frozen_vae(cfg.train.vae_export, cfg.data, "cpu")
        resume_from = resolve_resume(Path(cfg.train.output_dir) / cfg.train.run_name, cfg.train.resume)
        if resume_from is not None:
            check_checkpoint(resume_from)
            model_cfg = cfg.vae if cfg.train.stage == "vae" else cfg.unet
            check_resumed_architecture(Path(resume_from).parent.parent, cfg.train.stage, model_cfg.norm_type)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        # One line from the first rank, not a traceback from every rank; exit 2 on all of them.
        if os.environ.get("RANK", "0") == "0":
            print(f"ctld train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        train(cfg)
    except ResumeError as error:  # found only once the models exist (e.g. another config's tensor shapes)
        if os.environ.get("RANK", "0") == "0":
            print(f"ctld train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def train(cfg: Config) -> None:
    # First, so a SIGTERM that arrives during start-up still ends in a clean checkpoint after the first step.
    stop = StopRequest()
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        kwargs_handlers=process_group_kwargs(),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(cfg.train.seed, device_specific=True)  # device_specific: each rank draws different noise
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick the fastest conv kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    configure_deepspeed(accelerator, cfg)
    device = accelerator.device
    stage = cfg.train.stage

    # The model being trained goes through `prepare`; the frozen VAE (diffusion stage) does not.
    model, frozen_vae, noise_scheduler, sampler, spec, ema = _build_models(cfg, accelerator)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # convs then run NDHWC kernels on the GPU
    if cfg.train.compile:
        # In place (nn.Module.compile): the module keeps its own parameter names, so state dicts, checkpoints, the
        # export, EMA and DDP's no_sync see the plain module (a torch.compile wrapper would prefix `_orig_mod.`).
        # dynamic=False: one graph per patch shape (the VAE stage alternates thick and thin patches); symbolic depths
        # fail in the posterior's randn.
        model.compile(dynamic=False)
    optimizer, lr_scheduler = optimizer_and_lr_scheduler(accelerator, model, cfg)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    model_dtype = next(model.parameters()).dtype  # bf16 under DeepSpeed bf16: inputs are cast to it
    if ema is not None and zero_stage(accelerator) == 3:
        # diffusers.training_utils imports deepspeed only when ZeRO-3 is already on at ITS import time, which is
        # before our Accelerator exists; EMAModel.step then fails with "name 'deepspeed' is not defined".
        import deepspeed
        import diffusers.training_utils

        diffusers.training_utils.deepspeed = deepspeed

    # Resume: model, optimizer, LR scheduler, RNG (accelerate), EMA and counters (ctld.checkpointing).
    resume_from = resolve_resume(run_dir, cfg.train.resume)
    state = load_checkpoint(accelerator, resume_from, ema=ema) if resume_from is not None else {}
    step, skipped_steps = int(state.get("step", 0)), int(state.get("skipped_steps", 0))
    if resume_from is not None:
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
        if "residual_scale" in state:
            residual_scale = float(state["residual_scale"])
        else:
            residual_scale = cfg.diffusion.residual_scale or estimate_residual_scale(accelerator, frozen_vae, spec, cfg)
        spec = dataclasses.replace(spec, residual_scale=residual_scale)

    info = run_info(cfg, accelerator, frozen_vae, resume_from, step, last_step)
    if spec is not None:
        info["residual_scale"] = spec.residual_scale
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml", extra=info)
    accelerator.init_trackers("tb", config=flatten_config(cfg))
    log_run_start(info)

    # Data: never through `prepare` (it would split the rank's stream again); each rank reads its own shards.
    latent = bool(cfg.data.latent_shards_dir)
    # (latent shards were checked against the VAE export and config in main, before the processes started work)
    urls = latent_shard_urls(cfg.data.latent_shards_dir) if latent else shard_urls(cfg.data, "train")
    urls += extra_train_urls(cfg.data)
    train_stream = TrainStream(urls, cfg, accelerator, latent=latent)
    train_stream.open(step)
    try:
        val_urls = shard_urls(cfg.data, "val")
    except ValueError as err:  # an empty val split: train anyway, say so
        logger.warning(f"validation is off: {err}")
        val_urls = []

    nonfinite_in_row = 0
    validated: tuple[int, dict] | None = None
    meter = LogMeter(device, cfg.train.time_phases)
    # disable=None: a bar only on a terminal; a redirected log gets the log_every lines, not carriage-return updates.
    progress = tqdm(total=last_step, initial=step, desc=f"{stage} steps",
                    disable=None if accelerator.is_local_main_process else True)
    model.train()
    accumulation_bad = False  # a non-finite loss in this accumulation window: drop the whole optimizer step
    deepspeed_accumulates = accelerator.distributed_type == DistributedType.DEEPSPEED and (
        accelerator.gradient_accumulation_steps > 1)
    micro_step = step * accelerator.gradient_accumulation_steps
    stopped_by = ""
    while step < last_step:
        data_start = time.perf_counter()
        batch = train_stream.next(step)
        meter.data_seconds += time.perf_counter() - data_start

        with accelerator.accumulate(model):
            if stage == "vae":
                with meter.phase("forward"):
                    loss = _vae_loss(model, batch, cfg, micro_step, accelerator.process_index, model_dtype, device)
            else:
                loss = _unet_loss(model, frozen_vae, noise_scheduler, spec, batch, cfg, device, meter)
            if faults.nonfinite_planted(micro_step, accelerator.process_index):
                loss = loss * float("nan")
            faults.kill_if_planted("step", step + 1, accelerator.process_index)
            # One collective per micro-step: [any rank non-finite, any rank asked to stop], so all ranks agree.
            flags = accelerator.reduce(
                torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0, 1.0 if stop.requested else 0.0],
                             device=device),
                reduction="sum",
            )
            finite = bool(flags[0].item() == 0)  # note: a CPU-GPU sync point
            if finite:
                with meter.phase("backward"):
                    accelerator.backward(loss)
                meter.add_loss(loss.detach())
            elif deepspeed_accumulates:
                # DeepSpeed steps inside `backward` at the window's last micro-batch: skipping one backward either
                # still updates the weights or leaves this window's gradients for the next, so stop instead.
                raise RuntimeError(
                    f"non-finite loss (NaN/Inf) at step {step}, micro-batch {micro_step}, under DeepSpeed with "
                    f"train.gradient_accumulation_steps={cfg.train.gradient_accumulation_steps}: DeepSpeed cannot skip "
                    f"an accumulation window exactly, so training stops here. Resume from the last checkpoint in "
                    f"{run_dir / 'checkpoints'} (--train.resume=latest) with a lower train.lr, or use DDP or "
                    f"gradient_accumulation_steps=1, where non-finite steps are skipped"
                )
            else:
                accumulation_bad = True
                if accelerator.distributed_type != DistributedType.DEEPSPEED:  # (DeepSpeed would step on it)
                    # A zero-gradient backward in its place keeps DDP's all-reduce schedule the one of a finite
                    # window (a skipped boundary backward makes DDP reduce the next micro-batch early: the same sum
                    # in another order). The window's gradients are dropped below.
                    accelerator.backward(sum(p.sum() for p in model.parameters()) * 0.0)
            grad_norm = None
            with meter.phase("optimizer"):
                if accelerator.sync_gradients and not accumulation_bad:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        micro_step += 1
        meter.micro_batches += 1
        if not accelerator.sync_gradients:
            continue

        # ---- one optimizer step done (or skipped) ----
        stop_now = bool(flags[1].item() > 0)
        stepped = not accumulation_bad
        if accumulation_bad:
            accumulation_bad = False
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
                with meter.phase("ema"):
                    ema.step(accelerator.unwrap_model(model).parameters())
            if grad_norm is not None:
                meter.add_grad_norm(grad_norm)

        if stepped and step % cfg.train.log_every == 0:
            scalars = meter.summary(accelerator, cfg.data.batch_size)
            scalars.update({"lr": lr_scheduler.get_last_lr()[0], "train/skipped_steps": skipped_steps})
            accelerator.log(scalars, step=step)
            progress.set_postfix(loss=f"{scalars['train/loss']:.4g}")
            logger.info(f"step {step}/{cfg.train.max_steps} loss {scalars['train/loss']:.4g} lr {scalars['lr']:.3g} "
                        f"{scalars['train/samples_per_s']:.2f} samples/s, data wait "
                        f"{scalars['train/data_wait_fraction']:.0%}")
            meter = LogMeter(device, cfg.train.time_phases)

        val_due = stepped and step % cfg.train.val_every == 0
        images_due = stepped and step % cfg.train.image_every == 0
        if (val_due or images_due) and val_urls:
            metrics = validate(accelerator, cfg, model=model, frozen_vae=frozen_vae, sampler=sampler, spec=spec,
                               ema=ema, val_urls=val_urls, step=step, model_dtype=model_dtype, log_metrics=val_due,
                               log_images=images_due)
            validated = (step, metrics)  # the export's model card reuses a validation of its final step
            model.train()

        if stop_now:
            stopped_by = stop.signal_name or "a signal on another rank"
        if (stepped and (step % cfg.train.checkpoint_every == 0 or step >= last_step)) or stop_now:
            counters = {"step": step, "skipped_steps": skipped_steps}
            if spec is not None:
                counters["residual_scale"] = spec.residual_scale
            save_checkpoint(accelerator, run_dir, step, counters, ema=ema, keep_last=cfg.train.checkpoints_total_limit,
                            timeout_s=cfg.train.checkpoint_timeout_s)
            if not stop_now:
                train_stream.open(step)  # the data position policy (module docstring)
        if stop_now:
            break
    progress.close()

    if stopped_by:
        logger.info(f"stopping at step {step} on {stopped_by}; resume with --train.resume=latest")
    elif step >= cfg.train.max_steps:
        export_run(accelerator, cfg, run_dir, model=model, frozen_vae=frozen_vae, noise_scheduler=noise_scheduler,
                   sampler=sampler, spec=spec, ema=ema, train_stream=train_stream, step=step,
                   validated=validated[1] if validated is not None and validated[0] == step else None)
    else:
        logger.info(f"stopped at step {step} of {cfg.train.max_steps} (train.steps_per_launch); resume with "
                    "--train.resume=latest")
    accelerator.end_training()
    stop.restore()
    if stopped_by:  # preempted, not finished: a retryable exit code for the PyTorchJob (k8s/README.md)
        exit_preempted()


# ---------------------------------------------------------------------------------------------------------------
# Models and losses
# ---------------------------------------------------------------------------------------------------------------


def _build_models(cfg: Config, accelerator: Accelerator):
    """(model to train, frozen VAE, noise scheduler, sampler, ResidualSpec, EMA); the last five are None for the
    VAE stage."""
    if cfg.train.stage == "vae":
        return AutoencoderKL3D(**asdict(cfg.vae)), None, None, None, None, None
    frozen_vae = _load_frozen_vae(cfg, accelerator.device, accelerator.mixed_precision)
    unet = UNet3D(latent_channels=frozen_vae.latent_channels, factor=cfg.data.factor, **asdict(cfg.unet))
    noise_scheduler = build_train_scheduler(cfg.diffusion)
    sampler = build_sampler(cfg.diffusion.sampler, noise_scheduler.config)
    # A closed-form fit on the first training volumes: every rank and every launch gets the same filter.
    # residual_scale is set after resume: a resumed run keeps the checkpoint's value.
    # Latent shards carry the filter their priors were encoded with; else it is fitted by the main process and sent
    # to the others, so every rank holds the same filter even if a shard read fails on one of them.
    if cfg.data.latent_shards_dir:
        slab_json = read_latent_manifest(cfg.data.latent_shards_dir)["slab_filter"]
    else:
        slab_json = [fit_slab_filter_on_shards(cfg).to_json() if accelerator.is_main_process else None]
        slab_json = broadcast_object_list(slab_json)[0]
    slab_filter = SlabFilter.from_json(slab_json)
    spec = ResidualSpec(prior=cfg.diffusion.prior, factor=cfg.data.factor, residual_scale=1.0,
                        strength=cfg.diffusion.strength, num_train_timesteps=cfg.diffusion.num_train_timesteps,
                        slab_filter=slab_filter)
    # EMA of the U-Net in fp32 (bf16 cannot hold updates of 1e-4 relative size), created before `prepare`
    # casts the model. Saved and restored with each checkpoint (ctld.checkpointing).
    # foreach: one fused update (and under ZeRO-3 one gather of all parameters instead of one per tensor).
    ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=cfg.train.ema_warmup, power=2 / 3,
                   foreach=True)
    ema.to(device=accelerator.device, dtype=torch.float32)
    return unet, frozen_vae, noise_scheduler, sampler, spec, ema


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


def _unet_loss(unet, vae, noise_scheduler, spec: ResidualSpec, batch, cfg: Config, device, meter: LogMeter
               ) -> torch.Tensor:
    """The residual objective (ctld.diffusion): on latent-shard batches directly, on pixel batches after the frozen
    VAE encodes them (outside autograd)."""
    if "z_thin" in batch:
        target, prior = batch["z_thin"].to(device, non_blocking=True), batch["z_prior"].to(device, non_blocking=True)
    else:
        with meter.phase("vae_encode"):
            target, prior = encode_pair(vae, spec, batch["thick"].to(device, non_blocking=True),
                                        batch["thin"].to(device, non_blocking=True))
    with meter.phase("forward"):
        return spec_residual_loss(unet, noise_scheduler, spec, target, prior,
                                  regression_fraction=cfg.diffusion.regression_fraction,
                                  min_snr_gamma=cfg.diffusion.min_snr_gamma)


def check_latent_shards(cfg: Config) -> None:
    """ValueError naming the difference when data.latent_shards_dir is unfinished, has no training split, or was
    encoded with another VAE export than train.vae_export, from other pixel shards, or with other patch, crop,
    augmentation, intensity or prior settings."""
    if cfg.train.stage != "diffusion":
        raise ValueError("data.latent_shards_dir is for the diffusion stage; the VAE stage trains on pixel shards: "
                         "unset it (--data.latent_shards_dir=\"\")")
    latent_dir = cfg.data.latent_shards_dir
    latent_shard_urls(latent_dir, "train")  # refuses an unfinished encode or one without a training split
    pixel_manifest = Path(cfg.data.shards_dir) / "manifest.json"
    source = sha256_of(pixel_manifest) if not cfg.data.val_urls and pixel_manifest.is_file() else None
    check_latent_manifest(read_latent_manifest(latent_dir), cfg, vae_sha256=vae_hash(cfg.train.vae_export),
                          where=f"data.latent_shards_dir={latent_dir}", shards_manifest_sha256=source)


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


def _load_frozen_vae(cfg: Config, device: torch.device, mixed_precision: str) -> AutoencoderKL3D:
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return load_frozen_vae(cfg.train.vae_export, cfg.data, device, weight_dtype)


if __name__ == "__main__":
    main()
