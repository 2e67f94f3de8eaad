"""Window predictors for the inferer (ctld/inferer.py): what turns a batch of thick windows into thin ones.

    predictor = CtldPredictor(export, mode="regression", device="cuda")      # the residual model
    predictor = baseline_predictor(factor=5, method="cubic")               # interpolation, same code path

A predictor maps (B, 1, depth_thick, P, P) windows to (B, 1, depth_thick * factor, P, P); one with a `prior_fn`
attribute also gets the matching windows of a prior computed once on the whole volume (`ctld.inferer.PredictFn`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ctld.baselines import METHODS, interpolate_z
from ctld.inferer import PredictFn


def baseline_predictor(factor: int, method: str) -> PredictFn:
    """A window predictor that interpolates along z (use with `hu_range=None`): the same code path as the model,
    for checking the stitching and the evaluation against `ctld.baselines`."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {list(METHODS)}")
    return lambda thick: interpolate_z(thick, factor, method)


def is_fully_convolutional(*models) -> bool:
    """True when no layer of `models` computes statistics over voxels (norm_type "layer", no attention): their output
    on a voxel depends on its receptive field only, so inference windows may be larger than the training patch
    (ctld.inferer.resolve_window)."""
    return all(getattr(m, "norm_type", "group") == "layer" and not getattr(m, "has_attention", True) for m in models)


def tile_multiple(vae, unet=None) -> int:
    """The in-plane size every tile must be a multiple of: the VAE's strides (times the U-Net's on the latent)."""
    return int(vae.inplane_factor) * (int(unet.inplane_multiple) if unet is not None else 1)


def autocast_context(device: torch.device | str):
    """bf16 autocast on CUDA; fp32 elsewhere (bf16 Conv3d on CPU is about 35x slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# Window axes (B, C, z, y, x) mirrored for each copy of `self_ensemble` copies: z first (the slice profile is
# symmetric, so thick slice k of the mirrored window still averages its own thin slices), then x, then y.
FLIPS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((),),
    2: ((), (2,)),
    4: ((), (2,), (4,), (2, 4)),
    8: ((), (2,), (4,), (2, 4), (3,), (2, 3), (3, 4), (2, 3, 4)),
}


def _flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.flip(dims) if dims else x


class CtldPredictor:
    """thick window -> prior latent -> the residual model (one regression pass, or diffusion samples averaged)
    -> VAE decode.

    Args:
        export: a loaded `ctld.export.Export` with a U-Net and a scheduler.
        mode: "regression" (one pass: the conditional mean) or "diffusion" (samples started from the prior plus the
            one-pass residual estimate, noised to the export's strength).
        sampler: "ddim" | "dpm" | "ddpm" (built from the export's training scheduler config), diffusion mode.
        num_inference_steps: sampler steps per window below the export's strength, diffusion mode.
        num_samples: diffusion samples averaged per window (their mean is a lower-variance estimate).
        seed: seeds the sampling noise; the same seed, settings and batch size give the same output.
        self_ensemble: 1, 2, 4 or 8 mirrored copies of each window run and averaged (`FLIPS`): the degradation
            (a symmetric slice profile, the same in every in-plane direction) is unchanged by mirroring, the model's
            errors are not all, so the average is the better estimate.
        device: where the models run.
    """

    def __init__(self, export, *, mode: str = "regression", sampler: str = "ddim", num_inference_steps: int = 4,
                 num_samples: int = 1, seed: int = 0, self_ensemble: int = 1, device: torch.device | str = "cpu"):
        from ctld.diffusion import ResidualSpec, build_sampler

        if export.unet is None or export.scheduler is None:
            raise ValueError(
                "the export holds no diffusion U-Net/scheduler (a VAE-only export); ctld-infer needs the export of a "
                "diffusion-stage run (use `ctld-eval --vae` to measure a VAE export)"
            )
        if mode not in ("regression", "diffusion"):
            raise ValueError(f"unknown inference mode {mode!r}; choose regression or diffusion")
        if self_ensemble not in FLIPS:
            raise ValueError(f"self_ensemble must be one of {sorted(FLIPS)}, got {self_ensemble}")
        if num_samples < 1 or num_inference_steps < 1:
            raise ValueError(f"num_samples and num_inference_steps must be >= 1, got {num_samples}, "
                             f"{num_inference_steps}")
        self.vae, self.unet = export.vae, export.unet
        self.spec = ResidualSpec.from_meta(export.meta)
        self.mode = mode
        self.sampler = build_sampler(sampler, export.scheduler.config)
        self.num_inference_steps = num_inference_steps
        self.num_samples = num_samples
        self.flips = FLIPS[self_ensemble]
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # The engine computes pixel-space priors once per volume; a latent-space prior comes from each window.
        self.prior_fn = None if self.spec.prior == "latent_cubic" else self.spec.prior_pixels
        self.fully_convolutional = is_fully_convolutional(self.vae, self.unet)
        self.tile_multiple = tile_multiple(self.vae, self.unet)
        self.depth_multiple = int(self.unet.depth_multiple)  # thin slices: the U-Net's depth strides

    def __call__(self, thick: torch.Tensor, prior_pixels: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for dims in self.flips:
            mirrored = None if prior_pixels is None else _flip(prior_pixels, dims)
            thin = _flip(self._predict(_flip(thick, dims), mirrored), dims)
            total = thin if total is None else total + thin
        return total / len(self.flips)

    def _predict(self, thick: torch.Tensor, prior_pixels: torch.Tensor | None) -> torch.Tensor:
        from ctld.diffusion import decode_latents, regress, sample

        spec = self.spec
        with autocast_context(self.device):
            prior = spec.prior_latents(self.vae, thick, pixels=prior_pixels)
            if self.mode == "regression":
                latents = regress(self.unet, prior, residual_scale=spec.residual_scale,
                                  num_train_timesteps=spec.num_train_timesteps)
                return decode_latents(self.vae, latents).float()
            total = None
            for _ in range(self.num_samples):
                latents = sample(self.unet, self.sampler, prior, residual_scale=spec.residual_scale,
                                 strength=spec.strength, num_inference_steps=self.num_inference_steps,
                                 generator=self.generator)
                thin = decode_latents(self.vae, latents).float()
                total = thin if total is None else total + thin
        return total / self.num_samples


def prior_predictor(export, device: torch.device | str = "cpu") -> PredictFn:
    """The export's prior alone, decoded: what an untrained residual model returns (a check of the anchor)."""
    from ctld.diffusion import ResidualSpec, decode_latents

    spec = ResidualSpec.from_meta(export.meta)
    vae = export.vae

    def predict(thick: torch.Tensor, prior_pixels: torch.Tensor | None = None) -> torch.Tensor:
        with autocast_context(device):
            return decode_latents(vae, spec.prior_latents(vae, thick, pixels=prior_pixels)).float()

    predict.prior_fn = None if spec.prior == "latent_cubic" else spec.prior_pixels
    predict.fully_convolutional = is_fully_convolutional(vae)
    predict.tile_multiple = tile_multiple(vae)
    return predict


def vae_predictor(vae, device: torch.device | str = "cpu") -> PredictFn:
    """encode -> posterior mode -> decode (factor 1): the VAE's reconstruction, for its quality ceiling."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        with autocast_context(device):
            return vae.decode(vae.encode(x).mode()).float()

    predict.fully_convolutional = is_fully_convolutional(vae)
    predict.tile_multiple = tile_multiple(vae)
    return predict
