"""AutoencoderKL3D and UNet3D: shapes, gradients, overfitting, bf16 parity, bad inputs."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from ctld.models.layers import AttentionBlock3D, timestep_embedding
from ctld.models.unet import UNet3D
from ctld.models.vae import AutoencoderKL3D, DiagonalGaussian

TINY_VAE = dict(channels=(4, 8), num_res_blocks=1, latent_channels=4, norm_num_groups=4)
TINY_UNET = dict(channels=(8, 16), num_res_blocks=1, depth_downsample=(True,), attention_levels=(False, True),
                 norm_num_groups=4, attention_head_dim=8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _unet(**kwargs) -> UNet3D:
    """A UNet3D whose output layer is random: a fresh one outputs exactly zero (its residual starts at zero)."""
    unet = UNet3D(**kwargs)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    return unet


@pytest.mark.parametrize(
    ("channels", "depth", "height", "width"),
    [((4, 4), 1, 16, 16), ((4, 4), 5, 8, 12), ((4, 4, 4), 7, 16, 8), ((4, 4, 4, 4), 3, 16, 24)],
)
def test_vae_shapes(channels, depth, height, width):
    vae = AutoencoderKL3D(channels=channels, latent_channels=3, norm_num_groups=4)
    f = 2 ** (len(channels) - 1)
    assert vae.inplane_factor == f
    x = torch.randn(2, 1, depth, height, width)
    posterior = vae.encode(x)
    latent_shape = (2, 3, depth, height // f, width // f)  # depth is kept: stride 1
    assert posterior.sample().shape == latent_shape
    assert posterior.mode().shape == latent_shape
    assert posterior.kl().shape == (2,)
    recon, _ = vae(x)
    assert recon.shape == x.shape
    assert vae.decode(posterior.mode()).shape == x.shape


def test_vae_from_config_sections(tiny_cfg):
    vae = AutoencoderKL3D(**asdict(tiny_cfg.vae))
    assert vae.config == {**asdict(tiny_cfg.vae), "channels": tuple(tiny_cfg.vae.channels)}
    unet = UNet3D(latent_channels=vae.latent_channels, factor=tiny_cfg.data.factor, **asdict(tiny_cfg.unet))
    assert unet.config["factor"] == tiny_cfg.data.factor


def test_posterior_sample_is_seeded_and_kl_is_zero_for_standard_normal():
    vae = AutoencoderKL3D(**TINY_VAE)
    posterior = vae.encode(torch.randn(1, 1, 2, 8, 8))
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (posterior.kl() > 0).all()
    standard = DiagonalGaussian(torch.zeros(2, 8, 3, 4, 4))  # mean 0, logvar 0
    assert torch.allclose(standard.kl(), torch.zeros(2))
    shifted = DiagonalGaussian(torch.cat([torch.ones(1, 4, 1, 2, 2), torch.zeros(1, 4, 1, 2, 2)], dim=1))
    assert torch.allclose(shifted.kl(), torch.tensor([0.5 * 16]))  # 0.5 * sum(mean^2) over 16 elements


@pytest.mark.parametrize("kwargs", [{"channels": (4, 6), "norm_type": "group"}, {"norm_num_groups": 0},
                                    {"channels": ()}, {"latent_channels": 0}, {"scaling_factor": 0.0},
                                    {"norm_type": "batch"}])
def test_vae_bad_config_raises(kwargs):
    with pytest.raises(ValueError, match="AutoencoderKL3D"):
        AutoencoderKL3D(**{**TINY_VAE, **kwargs})


def test_vae_bad_shapes_raise():
    vae = AutoencoderKL3D(channels=(4, 4, 4), norm_num_groups=4, latent_channels=2)
    with pytest.raises(ValueError, match="divisible by the in-plane factor 4"):
        vae.encode(torch.randn(1, 1, 4, 16, 10))
    with pytest.raises(ValueError, match="5D"):
        vae.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="expects 1 channels"):
        vae.encode(torch.randn(1, 2, 4, 16, 16))
    with pytest.raises(ValueError, match="expects 2 channels"):
        vae.decode(torch.randn(1, 3, 4, 4, 4))


def _assert_all_grads(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reached {missing}"


def test_vae_gradients_reach_every_parameter():
    vae = AutoencoderKL3D(**{**TINY_VAE, "mid_attention": True})
    x = torch.randn(2, 1, 3, 8, 8)
    recon, posterior = vae(x)
    (F.mse_loss(recon, x) + 1e-3 * posterior.kl().mean()).backward()
    _assert_all_grads(vae)


def test_unet_gradients_reach_every_parameter():
    unet = _unet(latent_channels=2, factor=3, **TINY_UNET)
    out = unet(torch.randn(2, 2, 6, 4, 4), torch.tensor([3, 700]), torch.randn(2, 2, 6, 4, 4))
    out.square().mean().backward()
    _assert_all_grads(unet)


@pytest.mark.parametrize("model_name", ["vae", "unet"])
def test_gradient_checkpointing_gives_the_same_gradients(model_name):
    if model_name == "vae":
        model = AutoencoderKL3D(**{**TINY_VAE, "mid_attention": True})
        x = torch.randn(1, 1, 2, 8, 8)

        def loss_fn():
            return model(x, sample_posterior=False)[0].square().mean()
    else:
        model = _unet(latent_channels=2, factor=2, **TINY_UNET)
        args = (torch.randn(1, 2, 4, 4, 4), torch.tensor([5]), torch.randn(1, 2, 4, 4, 4))

        def loss_fn():
            return model(*args).square().mean()

    loss_fn().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    assert model.config["gradient_checkpointing"] is True
    loss_fn().backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_tiny_vae_overfits_one_patch():
    """Reconstruction loss on one smooth 8x16x16 patch falls 20x within 200 Adam steps (~50 in practice)."""
    d, hw = 8, 16
    zz, yy, xx = torch.meshgrid(torch.linspace(-1, 1, d), torch.linspace(-1, 1, hw), torch.linspace(-1, 1, hw),
                                indexing="ij")
    x = (0.6 * torch.sin(3 * xx + 2 * yy) * torch.cos(2 * zz) + 0.3 * (xx**2 + yy**2 < 0.4).float())[None, None]
    vae = AutoencoderKL3D(channels=(8, 8), num_res_blocks=1, latent_channels=4, norm_num_groups=4)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(200):
        recon, posterior = vae(x, generator=generator)
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
        if loss.item() < first / 20:
            break
    assert loss.item() < first / 20, (first, loss.item())


@pytest.mark.parametrize(
    ("factor", "d_thick", "h", "w"),
    [(5, 2, 4, 4), (3, 1, 3, 6), (6, 8, 8, 8), (2, 3, 5, 7), (1, 4, 2, 2)],
)
def test_unet_shapes_any_size(factor, d_thick, h, w):
    """Sizes that are not multiples of the strides are padded inside and cropped back."""
    unet = _unet(latent_channels=3, factor=factor, **{**TINY_UNET, "channels": (8, 8, 16),
                                                      "depth_downsample": (True, False),
                                                      "attention_levels": (False, True, True)})
    noisy = torch.randn(2, 3, d_thick * factor, h, w)
    out = unet(noisy, torch.tensor([1, 999]), torch.randn_like(noisy))
    assert out.shape == noisy.shape
    assert torch.isfinite(out).all()
    assert unet(noisy, 10, torch.randn_like(noisy)).shape == noisy.shape  # scalar timestep


def test_unet_uses_the_prior_the_timestep_and_the_phase():
    unet = _unet(latent_channels=2, factor=2, **TINY_UNET).eval()
    noisy, prior = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 4, 4, 4)
    out = unet(noisy, torch.tensor([10]), prior)
    assert not torch.allclose(out, unet(noisy, torch.tensor([10]), torch.randn_like(prior)))
    assert not torch.allclose(out, unet(noisy, torch.tensor([900]), prior))
    # A constant input differs between the two phases of each slab only through the phase channels.
    flat = unet(torch.zeros(1, 2, 4, 4, 4), torch.tensor([10]), torch.zeros(1, 2, 4, 4, 4))
    assert not torch.allclose(flat[:, :, 1], flat[:, :, 2])


def test_fresh_unet_predicts_a_zero_residual():
    unet = UNet3D(latent_channels=2, factor=2, **TINY_UNET).eval()
    out = unet(torch.randn(1, 2, 4, 4, 4), torch.tensor([1000]), torch.randn(1, 2, 4, 4, 4))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth_downsample": (True, True)}, "depth_downsample needs one entry per level transition"),
        ({"attention_levels": (True,)}, "attention_levels needs one entry per level"),
        ({"norm_num_groups": 3, "norm_type": "group"}, "norm_num_groups=3 must divide"),
        ({"norm_type": "instance"}, "norm_type must be one of"),
        ({"attention_head_dim": 5}, "attention_head_dim=5 must divide"),
        ({"factor": 0}, "factor must be a positive integer"),
    ],
)
def test_unet_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet3D(**{"latent_channels": 2, "factor": 2, **TINY_UNET, **kwargs})


def test_unet_bad_shapes_raise():
    unet = UNet3D(latent_channels=2, factor=5, **TINY_UNET)
    with pytest.raises(ValueError, match=r"thin latent depth 12 must be a multiple of factor 5"):
        unet(torch.randn(1, 2, 12, 4, 4), torch.tensor([1]), torch.randn(1, 2, 12, 4, 4))
    with pytest.raises(ValueError, match="latent_channels=2"):
        unet(torch.randn(1, 3, 10, 4, 4), torch.tensor([1]), torch.randn(1, 3, 10, 4, 4))
    with pytest.raises(ValueError, match="must have the shape of noisy_latents"):
        unet(torch.randn(1, 2, 10, 4, 4), torch.tensor([1]), torch.randn(1, 2, 10, 4, 6))
    with pytest.raises(ValueError, match="timesteps"):
        unet(torch.randn(2, 2, 10, 4, 4), torch.tensor([1, 2, 3]), torch.randn(2, 2, 10, 4, 4))


def test_attention_block_matches_explicit_softmax_attention():
    block = AttentionBlock3D(channels=8, norm_num_groups=4, head_dim=4)
    x = torch.randn(2, 8, 2, 3, 3)
    b, c, d, h, w = x.shape
    tokens = block.norm(x).reshape(b, c, -1).transpose(1, 2)
    q, k, v = block.to_qkv(tokens).reshape(b, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # scale 1/sqrt(head_dim=4)
    expected = x + block.to_out(attn.transpose(1, 2).reshape(b, -1, c)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_distinguishes_timesteps():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 16)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb[0, :8], torch.ones(8))  # cos(0)
    assert not torch.allclose(emb[1], emb[2])


def test_bf16_autocast_matches_fp32_on_cpu():
    """bf16 autocast output agrees with fp32 to 3% relative L2 error (bf16 has an 8-bit mantissa, ~0.4% per op)."""
    vae = AutoencoderKL3D(**TINY_VAE).eval()
    unet = _unet(latent_channels=4, factor=2, **TINY_UNET).eval()
    x = torch.randn(1, 1, 2, 8, 8)
    noisy, cond = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        ref_recon, _ = vae(x, sample_posterior=False)
        ref_out = unet(noisy, torch.tensor([50]), cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recon, _ = vae(x, sample_posterior=False)
            out = unet(noisy, torch.tensor([50]), cond)
    assert out.dtype == torch.bfloat16
    for ref, low in ((ref_recon, recon), (ref_out, out)):
        rel = (low.float() - ref).norm() / ref.norm()
        assert rel < 0.03, rel


def test_channels_last_3d_gives_the_same_output():
    unet = _unet(latent_channels=2, factor=2, **TINY_UNET).eval()
    noisy, cond = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 4, 4, 4)
    with torch.no_grad():
        ref = unet(noisy, torch.tensor([5]), cond)
        unet = unet.to(memory_format=torch.channels_last_3d)
        out = unet(noisy.to(memory_format=torch.channels_last_3d), torch.tensor([5]),
                   cond.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bench_models_runs_and_writes_json(tmp_path, repo_root):
    """The benchmark script the lead runs on a GPU: a tiny in-process CPU run must produce every figure."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_models", repo_root / "benchmarks" / "bench_models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--device", "cpu", "--shapes", "train", "--repeats", "1", "--ddim_steps", "2",
                "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["params"]["unet"] > 0 and result["params"]["vae"] > 0
    shape = result["shapes"]["train"]
    for name in ("vae_step", "unet_step", "train_step", "ddim2"):
        assert "error" not in shape[name], shape[name]
        assert shape[name]["seconds"] > 0 and shape[name]["gflop"] > 0


@pytest.mark.gpu
def test_cuda_bf16_channels_last_matches_fp32():
    """On a GPU: bf16 autocast + channels_last_3d agrees with fp32 to 3% relative L2 error, and trains."""
    device = torch.device("cuda")
    vae = AutoencoderKL3D(channels=(16, 32, 32), latent_channels=4, norm_num_groups=8, mid_attention=True).to(device)
    unet = _unet(latent_channels=4, factor=5, channels=(32, 64), num_res_blocks=1, depth_downsample=(True,),
                 attention_levels=(False, True), norm_num_groups=8, attention_head_dim=32).to(device)
    x = torch.rand(2, 1, 10, 32, 32, device=device) * 2 - 1
    noisy, cond = torch.randn(2, 4, 10, 8, 8, device=device), torch.randn(2, 4, 10, 8, 8, device=device)
    with torch.no_grad():
        ref_recon, _ = vae.eval()(x, sample_posterior=False)
        ref_out = unet.eval()(noisy, torch.tensor([50, 500], device=device), cond)
    vae, unet = vae.to(memory_format=torch.channels_last_3d), unet.to(memory_format=torch.channels_last_3d)
    cl = torch.channels_last_3d
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            recon, _ = vae(x.to(memory_format=cl), sample_posterior=False)
            out = unet(noisy.to(memory_format=cl), torch.tensor([50, 500], device=device), cond.to(memory_format=cl))
        unet.train()
        loss = unet(noisy.to(memory_format=cl), torch.tensor([50, 500], device=device), cond).float().square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters())
    for ref, low in ((ref_recon, recon), (ref_out, out)):
        rel = (low.float() - ref).norm() / ref.norm()
        assert rel < 0.03, rel


@pytest.mark.parametrize(
    ("preset", "vae_params", "unet_params"),
    [("tiny", 9_521, 47_396), ("base", 8_756_977, 39_675_272), ("large", 51_745_489, 159_852_808)],
)
def test_presets_build_with_the_parameter_counts_in_their_comments(repo_root, preset, vae_params, unet_params):
    """configs/{tiny,base,large}.yaml state these counts; update both when an architecture changes."""
    from ctld.config import load_config

    cfg = load_config(repo_root / "configs" / f"{preset}.yaml")
    with torch.device("meta"):  # no memory for the large preset's weights
        vae = AutoencoderKL3D(**asdict(cfg.vae))
        unet = UNet3D(latent_channels=vae.latent_channels, factor=cfg.data.factor, **asdict(cfg.unet))
    assert sum(p.numel() for p in vae.parameters()) == vae_params
    assert sum(p.numel() for p in unet.parameters()) == unet_params


def test_vae_shortcut_is_exact_when_the_latent_holds_every_pixel():
    """DC-AE's residual shortcut (ctld/models/vae.py): with both networks' output convs zeroed, the VAE is the
    parameter-free space-to-channel and back; with latent_channels = f * f it reconstructs the input exactly."""
    vae = AutoencoderKL3D(channels=(4, 4), latent_channels=4, norm_num_groups=2)  # in-plane factor 2: 2*2 = 4
    with torch.no_grad():
        for conv in (vae.encoder.conv_out, vae.decoder.conv_out):
            conv.weight.zero_()
            conv.bias.zero_()
    x = torch.rand(2, 1, 3, 8, 6) * 2 - 1
    latents = vae.encode(x).mode()
    assert latents.shape == (2, 4, 3, 4, 3)
    torch.testing.assert_close(vae.decode(latents), x)
    # Fewer latent channels than pixels per block: the shortcut carries block means, the networks the rest.
    vae8 = AutoencoderKL3D(channels=(4, 4, 4), latent_channels=4, norm_num_groups=2)  # factor 4: 16 px -> 4 ch
    with torch.no_grad():
        for conv in (vae8.encoder.conv_out, vae8.decoder.conv_out):
            conv.weight.zero_()
            conv.bias.zero_()
    flat = torch.full((1, 1, 2, 8, 8), 0.25)
    torch.testing.assert_close(vae8.decode(vae8.encode(flat).mode()), flat)


# ---------------------------------------------------------------------------------------------- tiling invariance


def _interior_difference(model_fn, whole: torch.Tensor, offset: int, margin: int) -> float:
    """Max |model(crop) - model(whole)| on the crop's part that is `margin` pixels from its new (top/left) edges;
    the crop keeps the whole input's bottom/right edges, so only the cut edges can matter."""
    full = model_fn(whole)
    cropped = model_fn(whole[..., offset:, offset:])
    return float((cropped[..., margin:, margin:] - full[..., offset + margin :, offset + margin :]).abs().max())


@pytest.mark.parametrize("norm_type", ["layer", "group"])
def test_layer_norm_models_are_fully_convolutional(norm_type):
    """With norm_type layer a voxel's output depends on its receptive field only: a crop gives the same values as the
    whole input away from the cut. GroupNorm normalises over the whole input, so every value moves (what made tiles
    of a real CT differ in brightness); this is also what shows the check can fail."""
    torch.manual_seed(0)
    unet = UNet3D(latent_channels=2, factor=2, channels=(8, 8), num_res_blocks=1, depth_downsample=(True,),
                  attention_levels=(False, False), norm_num_groups=4, norm_type=norm_type).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    vae = AutoencoderKL3D(channels=(4, 8), latent_channels=2, norm_num_groups=4, norm_type=norm_type).eval()
    noisy, prior = torch.randn(1, 2, 4, 96, 96), torch.randn(1, 2, 4, 96, 96)
    # Content that differs across the image (left half bright), as anatomy does.
    noisy[..., :48] += 2.0
    prior[..., :48] -= 1.0
    image = torch.randn(1, 1, 4, 96, 96)
    image[..., :48] += 1.5
    # Both models see about 36 pixels around a voxel (measured: differences fall to 0 from 32-36 px off the cut).
    with torch.no_grad():
        unet_diff = _interior_difference(lambda x: unet(x[:, :2], torch.tensor([3]), x[:, 2:]),
                                         torch.cat([noisy, prior], dim=1), offset=32, margin=40)
        vae_diff = _interior_difference(lambda x: vae.decode(vae.encode(x).mode()), image, offset=32, margin=40)
    if norm_type == "layer":
        assert unet_diff < 1e-5 and vae_diff < 1e-5
    else:
        assert unet_diff > 1e-2 and vae_diff > 1e-2


def test_channel_layer_norm_normalises_each_voxel_over_channels():
    from ctld.models.layers import ChannelLayerNorm

    norm = ChannelLayerNorm(6)
    x = torch.randn(2, 6, 3, 4, 5) * 3 + 1
    expected = F.layer_norm(x.permute(0, 2, 3, 4, 1), (6,), eps=1e-6).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_models_without_norm_type_in_their_files_load_as_group_norm(tmp_path):
    """Model files before format 3 were built with GroupNorm: they load as such, weights and outputs unchanged."""
    import json

    from ctld.export import load_model, save_model

    torch.manual_seed(0)
    unet = UNet3D(latent_channels=2, factor=2, **{**TINY_UNET, "norm_type": "group"}).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    save_model(unet, tmp_path, "unet")
    spec = json.loads((tmp_path / "unet.json").read_text())
    assert spec["format_version"] == 3 and spec["kwargs"]["norm_type"] == "group"
    del spec["kwargs"]["norm_type"]
    spec["format_version"] = 2
    (tmp_path / "unet.json").write_text(json.dumps(spec))
    loaded = load_model(tmp_path, "unet")
    assert loaded.norm_type == "group"
    x, prior = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, torch.tensor([5]), prior), unet(x, torch.tensor([5]), prior))


@pytest.mark.parametrize("norm_type", ["layer", "group"])
def test_inference_without_autograd_matches_the_graph_path(norm_type):
    """Without autograd the blocks update activations in place: the same outputs as with autograd, skip
    connections and the VAE shortcut untouched."""
    torch.manual_seed(0)
    vae = AutoencoderKL3D(**{**TINY_VAE, "norm_type": norm_type}).eval()
    unet = UNet3D(latent_channels=4, factor=2, **{**TINY_UNET, "norm_type": norm_type}).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    x, noisy, prior = torch.randn(1, 1, 4, 16, 16), torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 4, 8, 8)
    graph = (vae.decode(vae.encode(x).mode()), unet(noisy, torch.tensor([7]), prior))
    with torch.no_grad():
        inplace = (vae.decode(vae.encode(x).mode()), unet(noisy, torch.tensor([7]), prior))
    for a, b in zip(graph, inplace, strict=True):
        torch.testing.assert_close(b, a.detach(), rtol=1e-5, atol=1e-5)


def test_an_untrained_zero_initialised_vae_is_skipped_exactly_and_only_when_marked():
    """`find_untrained_branches` (called by ctld.export.load_model on whole weights) lets inference skip the
    convolutions of exactly-zero branches: bit-identical results. Unmarked (e.g. ZeRO-3, whose partitioned weights
    are empty tensors) or in training mode, the full path runs; training clears the marks."""
    torch.manual_seed(0)
    vae = AutoencoderKL3D(channels=(8, 16), latent_channels=4, zero_init_residual=True).eval()
    x = torch.rand(2, 1, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        full = vae.encode(x)
        full_decoded = vae.decode(full.mode())
        vae.find_untrained_branches()
        assert vae._untrained_encoder and vae._untrained_decoder
        skipped = vae.encode(x)
        torch.testing.assert_close(skipped.mean, full.mean, rtol=0, atol=0)
        torch.testing.assert_close(skipped.logvar, full.logvar, rtol=0, atol=0)
        torch.testing.assert_close(vae.decode(skipped.mode()), full_decoded, rtol=0, atol=0)
    vae.train()
    assert not vae._untrained_encoder and not vae._untrained_decoder
    trained = AutoencoderKL3D(channels=(8, 16), latent_channels=4)
    trained.find_untrained_branches()
    assert not trained._untrained_encoder and not trained._untrained_decoder
