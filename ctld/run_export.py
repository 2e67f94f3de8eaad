"""The end of a finished training run: its export folder (ctld.export) with the inference settings it was validated
with, the training domain and the model card (ctld.model_card). Called by ctld/train.py on every rank."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger

from ctld.calibration import estimate_scaling_factor
from ctld.config import Config, config_to_dict
from ctld.data.domain import PIXEL_SPACING_POLICY, SLICE_SPACING_POLICY, data_summary, training_domain
from ctld.data.shards import manifest_training_grid, shard_urls, training_manifest
from ctld.data.train_stream import TrainStream
from ctld.export import EXPORT_VERSION, save_export, vae_hash
from ctld.infer_settings import recorded_settings
from ctld.metrics import WINDOWS
from ctld.model_card import training_card
from ctld.models.unet import UNet3D
from ctld.models.vae import AutoencoderKL3D
from ctld.run_info import git_commit
from ctld.validation import score_rows, validate

logger = get_logger(__name__)


def export_run(accelerator: Accelerator, cfg: Config, run_dir: Path, *, model, frozen_vae, noise_scheduler, sampler,
               spec, ema, train_stream: TrainStream, step: int, validated: dict | None = None) -> None:
    """run_dir/export: what inference needs (VAE; for the diffusion stage also the EMA U-Net and scheduler), the
    inference settings to use, the training domain and the model card. Every rank calls it (collectives inside).
    `validated`: the metrics of a validation the loop ran at this step (same weights), so it is not run twice."""
    state_dict, scaling_factor = None, None
    if cfg.train.stage == "vae":  # (the diffusion stage exports the EMA weights, which every rank holds whole)
        state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every rank calls it
    if cfg.train.stage == "vae" and cfg.train.scale_batches > 0:
        scaling_factor = estimate_scaling_factor(accelerator, model, train_stream, cfg, step)
    # The model card's scores: one validation of the exported weights (on every rank: it is a collective).
    validation = _final_validation(accelerator, cfg, model=model, frozen_vae=frozen_vae, sampler=sampler, spec=spec,
                                   ema=ema, step=step, metrics=validated)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    meta = {
        "factor": cfg.data.factor, "hu_min": cfg.data.hu_min, "hu_max": cfg.data.hu_max,
        "depth_thick": cfg.data.depth_thick, "patch_size": cfg.data.patch_size,
        "stage": cfg.train.stage, "step": step, "run_name": cfg.train.run_name, "git_commit": git_commit(),
        # ctld-infer and ctld-eval run with these unless a flag or --config overrides (ctld.infer_settings).
        "infer": recorded_settings(cfg.infer),
    }
    # ctld-infer checks a thick input's spacing against factor x thin_spacing_mm and runs it in-plane at
    # inplane_spacing_mm when the shards were resampled to it, else inside domain.pixel_spacing_mm
    # (ctld.data.domain.model_pixel_spacing_mm); `domain` holds the ranges it warns or refuses by.
    meta.update(_training_grid(cfg))
    manifest = training_manifest(cfg.data)
    meta["domain"] = _training_domain(cfg, manifest)
    meta["slice_spacing_policy"] = SLICE_SPACING_POLICY
    meta["pixel_spacing_policy"] = PIXEL_SPACING_POLICY
    card = training_card(
        meta={**meta, "format_version": EXPORT_VERSION}, run=_card_run(run_dir, step),
        data=data_summary(manifest) if manifest is not None else None, validation=validation,
        config=config_to_dict(cfg),
        vae_export_sha256=vae_hash(cfg.train.vae_export) if cfg.train.stage == "diffusion" else None,
    )
    if cfg.train.stage == "vae":
        vae = AutoencoderKL3D(**{**asdict(cfg.vae), **({"scaling_factor": scaling_factor} if scaling_factor else {})})
        vae.load_state_dict({k: v.float() for k, v in state_dict.items()})
        save_export(run_dir / "export", vae=vae, meta=meta, card=card)
    else:
        unet = UNet3D(latent_channels=frozen_vae.latent_channels, factor=cfg.data.factor, **asdict(cfg.unet))
        ema.copy_to(unet.parameters())  # the exported U-Net holds the EMA weights
        vae = AutoencoderKL3D(**frozen_vae.config)
        vae.load_state_dict({k: v.float() for k, v in frozen_vae.state_dict().items()})
        meta.update(spec.to_meta())
        meta["thick_profile"] = cfg.data.thick_profile
        save_export(run_dir / "export", vae=vae, unet=unet, scheduler=noise_scheduler, meta=meta, card=card)
    logger.info(f"exported {run_dir / 'export'}")
    accelerator.wait_for_everyone()


def _final_validation(accelerator: Accelerator, cfg: Config, *, model, frozen_vae, sampler, spec, ema, step: int,
                      metrics: dict | None) -> dict | None:
    """{"step", "patches", "protocol", "rows"} of a validation of the weights being exported (EMA for the U-Net),
    with the baseline rows, for the model card (`metrics` when the loop validated this step, else run now); None
    without a validation split."""
    try:
        val_urls = shard_urls(cfg.data, "val")
    except (ValueError, FileNotFoundError):
        return None
    if metrics is None:
        metrics = validate(accelerator, cfg, model=model, frozen_vae=frozen_vae, sampler=sampler, spec=spec, ema=ema,
                           val_urls=val_urls, step=step, model_dtype=next(model.parameters()).dtype,
                           log_metrics=False, log_images=False)
    windows = ", ".join(f"{name} [{lo:g}, {hi:g}] HU" for name, (lo, hi) in WINDOWS.items())
    protocol = f"PSNR/SSIM after mapping HU to [0, 1] in the {windows} windows (ctld.metrics)"
    if cfg.train.stage == "diffusion":
        protocol += (f"; EMA weights; ctld_diffusion = one sample of {cfg.diffusion.num_inference_steps} "
                     f"{cfg.diffusion.sampler} steps")
    return {"step": step, "patches": cfg.train.val_batches * cfg.data.batch_size * accelerator.num_processes,
            "protocol": protocol, "rows": score_rows(metrics)}


def _card_run(run_dir: Path, step: int) -> dict:
    """The model card's training block, from config.yaml's `_run` (this launch) and the clock."""
    info = yaml.safe_load((run_dir / "config.yaml").read_text()).get("_run", {})
    started = datetime.fromisoformat(info["started_at"])
    finished = datetime.now(UTC)
    keep = ("world_size", "distributed_type", "zero_stage", "mixed_precision", "device", "effective_batch",
            "git_commit", "packages", "started_at")
    return {
        "steps": step, **{key: info.get(key) for key in keep},
        "finished_at": finished.isoformat(timespec="seconds"),
        "wall_seconds": round((finished - started).total_seconds(), 1),
        "wall_time_covers_steps": [int(info.get("start_step", 0)), step],  # a resumed run's earlier launches: not
    }


def _training_domain(cfg: Config, manifest: dict | None) -> dict:
    """ctld.json's `domain`: from the manifest, else the VAE export's (a VAE run on the same shards)."""
    if manifest is not None:
        return training_domain(manifest, hu_window=(cfg.data.hu_min, cfg.data.hu_max))
    vae_meta = Path(cfg.train.vae_export) / "ctld.json" if cfg.train.vae_export else None
    if vae_meta is not None and vae_meta.is_file():
        known = json.loads(vae_meta.read_text()).get("domain")
        if known:
            return known
    return {"hu_window": [cfg.data.hu_min, cfg.data.hu_max]}


def _training_grid(cfg: Config) -> dict[str, float]:
    """thin_spacing_mm (median thin slice spacing) and inplane_spacing_mm (when the shards were resampled in-plane)
    the model was trained on: from the shard manifest, else from the VAE export."""
    manifest = training_manifest(cfg.data)
    grid = manifest_training_grid(manifest) if manifest is not None else {}
    vae_meta = Path(cfg.train.vae_export) / "ctld.json" if cfg.train.vae_export else None
    if vae_meta is not None and vae_meta.is_file():
        known = json.loads(vae_meta.read_text())
        grid = {key: known[key] for key in ("thin_spacing_mm", "inplane_spacing_mm") if key in known} | grid
    return grid
