"""Range checks of a config that its types do not express (`check(cfg)`, `check_data(cfg.data)`), kept beside
ctld/config.py: train.py, the loader and the CLIs call them before anything runs."""

from __future__ import annotations

from ctld.config import Config, DataConfig


def check(cfg: Config) -> None:
    """Raise ValueError naming the first value no stage can work with (ranges and combinations the types do not
    express); `train.py` and the loader call it before anything runs."""
    check_data(cfg.data)
    if cfg.data.extra_train_urls and cfg.data.latent_shards_dir:
        raise ValueError("data.extra_train_urls are pixel shards; a run on data.latent_shards_dir cannot mix them in: "
                         "build them into the training shards' folder before `ctld-shards encode`, or train on "
                         "pixel shards")
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
    if t.checkpoint_timeout_s < 0:
        raise ValueError(f"train.checkpoint_timeout_s must be >= 0 (0 = no limit), got {t.checkpoint_timeout_s}")
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


def check_data(data_cfg: DataConfig) -> None:
    """Raise ValueError naming the first `data.*` value the loader cannot work with."""
    for name in ("factor", "depth_thick", "patch_size", "patches_per_volume", "batch_size", "samples_per_epoch"):
        if getattr(data_cfg, name) < 1:
            raise ValueError(f"data.{name} must be >= 1, got {getattr(data_cfg, name)}")
    if data_cfg.num_workers < 0 or data_cfg.shuffle_buffer < 0:
        raise ValueError(f"data.num_workers ({data_cfg.num_workers}) and data.shuffle_buffer must be >= 0")
    if data_cfg.hu_max <= data_cfg.hu_min:
        raise ValueError(f"data.hu_max ({data_cfg.hu_max}) must be greater than data.hu_min ({data_cfg.hu_min})")
    if data_cfg.small_volume not in ("pad", "skip"):
        raise ValueError(f"data.small_volume must be 'pad' or 'skip', got {data_cfg.small_volume!r}")
    weights = (data_cfg.weight_real, data_cfg.weight_simulated, data_cfg.weight_inplane)
    if min(weights) < 0 or max(weights) <= 0:
        raise ValueError(f"data.weight_real/simulated/inplane must be >= 0 with one > 0, got {weights}")
    for name in ("min_foreground_fraction", "max_skipped_fraction"):
        if not 0.0 <= getattr(data_cfg, name) <= 1.0:
            raise ValueError(f"data.{name} must be within [0, 1], got {getattr(data_cfg, name)}")
