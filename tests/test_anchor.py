"""The residual model's anchor, end to end through `ctld-infer`: an untrained U-Net returns its prior.

The export holds a VAE at its exact identity start (its learned residual branches zeroed, so only DC-AE's
space-to-channel shortcut is left: the test isolates the U-Net's anchor from VAE quality) and a U-Net that was never
trained. Its prior is the slab filter fitted on two training phantoms; the case is a held-out phantom study.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from ctld.baselines import fit_slab_filter
from ctld.config import load_config
from ctld.data.nifti import read_nifti, write_nifti
from ctld.data.transforms import simulate_thick
from ctld.data.volume import Volume
from ctld.demo.phantom import make_phantom
from ctld.diffusion import ResidualSpec, build_train_scheduler
from ctld.export import save_export
from ctld.inference import main as infer_main
from ctld.metrics import WINDOWS, psnr
from ctld.models.unet import UNet3D
from ctld.models.vae import AutoencoderKL3D

FACTOR = 5
PHANTOM = dict(num_slices=60, size=64)


def _identity_vae(cfg) -> AutoencoderKL3D:
    vae = AutoencoderKL3D(**asdict(cfg.vae))
    with torch.no_grad():
        latent = cfg.vae.latent_channels
        vae.encoder.conv_out.weight[:latent].zero_()
        vae.encoder.conv_out.bias[:latent].zero_()
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.zero_()
    return vae


@pytest.fixture(scope="module")
def untrained_export(tmp_path_factory, repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    training = [make_phantom(seed, **PHANTOM).hu for seed in (11, 12)]
    slab = fit_slab_filter([(simulate_thick(thin, FACTOR), thin) for thin in training], FACTOR)
    spec = ResidualSpec(prior="encode_slab", factor=FACTOR, residual_scale=5.0, strength=0.5,
                        num_train_timesteps=cfg.diffusion.num_train_timesteps, slab_filter=slab)
    unet = UNet3D(latent_channels=cfg.vae.latent_channels, factor=FACTOR, **asdict(cfg.unet))
    meta = {"factor": FACTOR, "hu_min": cfg.data.hu_min, "hu_max": cfg.data.hu_max, "depth_thick": 4,
            "patch_size": 32, "thin_spacing_mm": 1.0, **spec.to_meta()}
    out = tmp_path_factory.mktemp("anchor") / "export"
    return save_export(out, vae=_identity_vae(cfg), unet=unet, scheduler=build_train_scheduler(cfg.diffusion),
                       meta=meta), slab


@pytest.fixture(scope="module")
def held_out_case(tmp_path_factory):
    thin = make_phantom(99, **PHANTOM).hu
    thick = simulate_thick(thin, FACTOR)
    path = tmp_path_factory.mktemp("heldout") / "thick.nii.gz"
    write_nifti(Volume(thick, (5.0, 1.5, 1.5), (0.0, 0.0, 2.0), np.eye(3)), path)
    return path, thick, thin


def _ctld_psnr(export, case, tmp_path, mode: str) -> float:
    path, _, thin = case
    out = tmp_path / f"{mode}.nii.gz"
    code = infer_main([str(path), "--checkpoint", str(export), "--out", str(out), "--mode", mode, "--steps", "2",
                       "--depth_context", "1", "--depth_overlap", "0", "--no_progress"])
    assert code == 0
    return psnr(read_nifti(out).hu, thin, WINDOWS["wide"])


@pytest.mark.parametrize("mode", ["regression", "diffusion"])
def test_untrained_model_reproduces_its_prior(untrained_export, held_out_case, tmp_path, mode):
    export, slab = untrained_export
    _, thick, thin = held_out_case
    prior_db = psnr(slab.apply(thick), thin, WINDOWS["wide"])
    assert abs(_ctld_psnr(export, held_out_case, tmp_path, mode) - prior_db) < 0.5


def test_without_the_anchor_an_untrained_model_is_far_from_the_prior(untrained_export, held_out_case, tmp_path,
                                                                      monkeypatch):
    """The control: with the prior taken away (a zero prior latent, as sampling from structureless noise gives an
    untrained model nothing), the same export is nowhere near the prior, so the test above can fail."""
    export, slab = untrained_export
    _, thick, thin = held_out_case
    prior_db = psnr(slab.apply(thick), thin, WINDOWS["wide"])
    real = ResidualSpec.prior_latents
    monkeypatch.setattr(ResidualSpec, "prior_latents", lambda self, *a, **k: torch.zeros_like(real(self, *a, **k)))
    assert prior_db - _ctld_psnr(export, held_out_case, tmp_path, "regression") > 5.0
