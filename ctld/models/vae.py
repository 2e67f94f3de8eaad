"""AutoencoderKL3D: a 3D KL autoencoder that compresses CT in-plane and keeps every slice.

Each level after the first halves H and W (stride (1, 2, 2)); depth is never strided, so a thick patch of 8
slices and a thin patch of 40 slices give latents with 8 and 40 slices on the same in-plane grid. With the
default 4 levels the in-plane factor is 8: a (B, 1, 40, 192, 192) patch becomes a (B, 8, 40, 24, 24) latent.
The layout follows MONAI's AutoencoderKL and diffusers' AutoencoderKL (encoder -> mean/logvar -> decoder),
in 3D and with anisotropic strides, plus DC-AE's "residual autoencoding" shortcuts (Chen et al. 2024, Deep
Compression Autoencoder): a parameter-free space-to-channel of the image (channel-averaged to `latent_channels`)
is added to the posterior mean, and the decoder adds back a channel-to-space of the latent. The networks learn
residuals around that shortcut, so a fresh VAE starts near a sensible reconstruction: without it a small VAE
trained for a few hundred steps stayed at ~150 HU mean error (it had to learn the identity first), with it
the same run reaches ~15-30 HU. The encoder's log-variance also starts small (`_LOGVAR_INIT`), so posterior
samples are not swamped by unit noise while the (weak-KL) log-variance would otherwise take thousands of steps
to shrink.

    vae = AutoencoderKL3D(**asdict(cfg.vae))
    posterior = vae.encode(x)                     # x: (B, 1, D, H, W) in [-1, 1]
    latents = posterior.sample(generator) * vae.scaling_factor
    recon = vae.decode(latents / vae.scaling_factor)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctld.models.layers import NORM_TYPES, AttentionBlock3D, ResBlock3D, make_norm

# Initial bias of the encoder's log-variance outputs: posterior std exp(-3) ~ 0.05 at the start. With LDM's
# tiny KL weight the log-variance ends near here anyway; starting at 0 (std 1) made early posterior samples mostly
# noise and cost the decoder hundreds of steps.
_LOGVAR_INIT = -6.0


def _space_to_channel(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C * f * f, D, H / f, W / f): each f x f in-plane block into channels."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d, h // f, f, w // f, f).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * f * f, d, h // f, w // f)


def _channel_to_space(x: torch.Tensor, f: int) -> torch.Tensor:
    """Inverse of `_space_to_channel`: (B, C * f * f, D, h, w) -> (B, C, D, h * f, w * f)."""
    b, cff, d, h, w = x.shape
    c = cff // (f * f)
    x = x.reshape(b, c, f, f, d, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c, d, h * f, w * f)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """DC-AE's shortcut channel matching: average consecutive groups of channels down to `channels`, or repeat
    each channel up to `channels` (groups of unequal size when the counts do not divide)."""
    c = x.shape[1]
    if c == channels:
        return x
    weight = torch.zeros(channels, c, dtype=x.dtype, device=x.device)
    if c > channels:
        weight[torch.arange(c, device=x.device) * channels // c, torch.arange(c, device=x.device)] = 1.0
        weight = weight / weight.sum(dim=1, keepdim=True)
    else:
        weight[torch.arange(channels, device=x.device), torch.arange(channels, device=x.device) * c // channels] = 1.0
    return torch.einsum("oc,bc...->bo...", weight, x)


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) over latents of shape (B, C, D, h, w)."""

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.float().chunk(2, dim=1)
        self.mean = mean
        # Clamped as in diffusers' DiagonalGaussianDistribution, so exp() stays finite early in training.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) summed over latent elements: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3, 4))


class _Downsample(nn.Module):
    """Halve H and W, keep D: a strided conv (asymmetric zero padding as in diffusers' Downsample2D)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, stride=(1, 2, 2), padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1, 1, 1))  # (W left, W right, H top, H bottom, D front, D back)
        return self.conv(x)


class _Upsample(nn.Module):
    """Double H and W, keep D: nearest upsampling then a conv that already narrows to the next level's channels,
    so no full-resolution conv runs at the wider width (the decoder's largest cost)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return self.conv(x)


class _MidBlock(nn.Module):
    def __init__(self, channels: int, norm_num_groups: int, attention: bool, norm_type: str):
        super().__init__()
        self.res1 = ResBlock3D(in_channels=channels, out_channels=channels, norm_num_groups=norm_num_groups,
                               norm_type=norm_type)
        # One head over all channels, as in the LDM autoencoder's mid-block attention.
        self.attn = (
            AttentionBlock3D(channels=channels, norm_num_groups=norm_num_groups, head_dim=channels,
                             norm_type=norm_type)
            if attention
            else None
        )
        self.res2 = ResBlock3D(in_channels=channels, out_channels=channels, norm_num_groups=norm_num_groups,
                               norm_type=norm_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x)


class _Encoder(nn.Module):
    def __init__(self, in_channels, channels, num_res_blocks, latent_channels, norm_num_groups, mid_attention,
                 norm_type):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels[0], kernel_size=3, padding=1)
        blocks: list[nn.Module] = []
        prev = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock3D(in_channels=prev, out_channels=ch, norm_num_groups=norm_num_groups,
                                         norm_type=norm_type))
                prev = ch
            if level < len(channels) - 1:
                blocks.append(_Downsample(ch))
        blocks.append(_MidBlock(prev, norm_num_groups, mid_attention, norm_type))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = make_norm(prev, norm_num_groups, norm_type)
        self.conv_out = nn.Conv3d(prev, 2 * latent_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = F.silu(self.norm_out(x), inplace=not torch.is_grad_enabled())
        return self.conv_out(x)  # (B, 2 * latent_channels, D, h, w)


class _Decoder(nn.Module):
    def __init__(self, out_channels, channels, num_res_blocks, latent_channels, norm_num_groups, mid_attention,
                 norm_type):
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = nn.Conv3d(latent_channels, rev[0], kernel_size=3, padding=1)
        blocks: list[nn.Module] = [_MidBlock(rev[0], norm_num_groups, mid_attention, norm_type)]
        prev = rev[0]
        for level, ch in enumerate(rev):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock3D(in_channels=prev, out_channels=ch, norm_num_groups=norm_num_groups,
                                         norm_type=norm_type))
                prev = ch
            if level < len(rev) - 1:
                blocks.append(_Upsample(ch, rev[level + 1]))
                prev = rev[level + 1]
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = make_norm(prev, norm_num_groups, norm_type)
        self.conv_out = nn.Conv3d(prev, out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = F.silu(self.norm_out(x), inplace=not torch.is_grad_enabled())
        return self.conv_out(x)  # (B, out_channels, D, H, W)


class AutoencoderKL3D(nn.Module):
    """3D KL autoencoder, stride 1 in depth and 2 in-plane per level after the first.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: reconstructed channels (1 for CT).
        channels: feature channels per level; the in-plane factor is 2 ** (len(channels) - 1).
        num_res_blocks: residual blocks per level (encoder and decoder).
        latent_channels: channels of the latent.
        norm_num_groups: GroupNorm groups; must divide every entry of `channels` (norm_type "group").
        norm_type: "layer" (per-voxel LayerNorm over channels: tiling-invariant) or "group" (GroupNorm over each
            sample; VAEs before the option), see ctld/models/layers.py.
        mid_attention: self-attention in the mid blocks (at the lowest resolution).
        scaling_factor: latents are multiplied by this before diffusion (`posterior.sample() * scaling_factor`)
            and divided by it before `decode`; set it so the scaled latents have unit variance.
        gradient_checkpointing: recompute block activations in backward to save memory.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 128),
        num_res_blocks: int = 1,
        latent_channels: int = 8,
        norm_num_groups: int = 16,
        mid_attention: bool = False,
        scaling_factor: float = 1.0,
        gradient_checkpointing: bool = False,
        zero_init_residual: bool = False,
        norm_type: str = "layer",
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("num_res_blocks", num_res_blocks), ("latent_channels", latent_channels),
                            ("norm_num_groups", norm_num_groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AutoencoderKL3D: {name} must be a positive integer, got {value!r}")
        if len(channels) < 1 or any(c < 1 for c in channels):
            raise ValueError(f"AutoencoderKL3D: channels must be a non-empty list of positive ints, got {channels}")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"AutoencoderKL3D: norm_type must be one of {NORM_TYPES}, got {norm_type!r}")
        bad = [c for c in channels if c % norm_num_groups != 0]
        if bad and norm_type == "group":
            raise ValueError(
                f"AutoencoderKL3D: norm_num_groups={norm_num_groups} must divide every entry of channels={channels} "
                f"(not {bad}); pick channels that are multiples of norm_num_groups"
            )
        if not scaling_factor > 0:
            raise ValueError(f"AutoencoderKL3D: scaling_factor must be > 0, got {scaling_factor}")
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "channels": channels,
            "num_res_blocks": num_res_blocks,
            "latent_channels": latent_channels,
            "norm_num_groups": norm_num_groups,
            "mid_attention": bool(mid_attention),
            "scaling_factor": float(scaling_factor),
            "gradient_checkpointing": bool(gradient_checkpointing),
            "zero_init_residual": bool(zero_init_residual),
            "norm_type": norm_type,
        }
        self.norm_type = norm_type
        self.has_attention = bool(mid_attention)
        self._untrained_encoder = self._untrained_decoder = False  # find_untrained_branches
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.scaling_factor = float(scaling_factor)
        self.inplane_factor = 2 ** (len(channels) - 1)
        self.out_channels = out_channels
        self.encoder = _Encoder(in_channels, channels, num_res_blocks, latent_channels, norm_num_groups,
                                mid_attention, norm_type)
        with torch.no_grad():
            self.encoder.conv_out.bias[latent_channels:].fill_(_LOGVAR_INIT)
        self.decoder = _Decoder(out_channels, channels, num_res_blocks, latent_channels, norm_num_groups,
                                mid_attention, norm_type)
        if zero_init_residual:
            # The log-variance weights too: the posterior starts with a constant std (its bias) everywhere.
            with torch.no_grad():
                self.encoder.conv_out.weight.zero_()
                self.encoder.conv_out.bias[:latent_channels].zero_()
                self.decoder.conv_out.weight.zero_()
                self.decoder.conv_out.bias.zero_()
        self.set_gradient_checkpointing(gradient_checkpointing)

    def find_untrained_branches(self) -> None:
        """Mark an encoder or decoder whose output layer is exactly zero (an untrained zero-initialised VAE, as
        ctld-demo exports it), so that inference skips its convolutions; `ctld.export.load_model` calls it. Only on
        whole weights: a ZeRO-3-partitioned parameter is empty and would look untrained. Training clears the marks."""
        with torch.no_grad():
            self._untrained_encoder = not bool(self.encoder.conv_out.weight.any())
            conv_out = self.decoder.conv_out
            self._untrained_decoder = not bool(conv_out.weight.any()) and not bool(conv_out.bias.any())

    def train(self, mode: bool = True):
        if mode:  # weights are about to change
            self._untrained_encoder = self._untrained_decoder = False
        return super().train(mode)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled
        self.config["gradient_checkpointing"] = bool(enabled)

    def _check_input(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 5:
            raise ValueError(f"AutoencoderKL3D.{what} expects a 5D tensor (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(
                f"AutoencoderKL3D.{what} expects {channels} channels, got shape {tuple(x.shape)} (B, C, D, H, W)"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Args:
            x: (B, in_channels, D, H, W) image in [-1, 1]; any D >= 1, H and W divisible by `inplane_factor`.

        Returns:
            The posterior over (B, latent_channels, D, H / inplane_factor, W / inplane_factor) latents.
        """
        self._check_input(x, self.in_channels, "encode")
        f = self.inplane_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"AutoencoderKL3D.encode: H and W must be divisible by the in-plane factor {f} "
                f"(2 ** (levels - 1)), got H={x.shape[-2]}, W={x.shape[-1]}; crop or pad the patch to a multiple of {f}"
            )
        if self._untrained_encoder and not self.training:
            # An untrained zero-initialised encoder (ctld-demo exports one): its output is its bias everywhere, so the
            # full-resolution convolutions are skipped; exact, and half the cost of inference on a CPU.
            h, w = x.shape[-2] // f, x.shape[-1] // f
            moments = self.encoder.conv_out.bias.float()[None, :, None, None, None].expand(x.shape[0], -1, x.shape[2],
                                                                                           h, w)
        else:
            moments = self.encoder(x).float()
        shortcut = _match_channels(_space_to_channel(x.float(), f), self.latent_channels)
        return DiagonalGaussian(moments + torch.cat([shortcut, torch.zeros_like(shortcut)], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Args:
            z: (B, latent_channels, D, h, w) unscaled latents (divide diffusion latents by `scaling_factor`).

        Returns:
            (B, out_channels, D, h * inplane_factor, w * inplane_factor).
        """
        self._check_input(z, self.latent_channels, "decode")
        # Posterior samples are fp32; a model cast to bf16 (DeepSpeed bf16) needs bf16 input.
        f = self.inplane_factor
        shortcut = _channel_to_space(_match_channels(z.float(), self.out_channels * f * f), f)
        if self._untrained_decoder and not self.training:
            # An untrained zero-initialised decoder adds exactly 0 (see encode).
            return shortcut.to(self.decoder.conv_out.weight.dtype)
        out = self.decoder(z.to(self.decoder.conv_in.weight.dtype))
        return out + shortcut.to(out.dtype)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
