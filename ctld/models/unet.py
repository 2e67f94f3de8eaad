"""UNet3D: the residual denoiser over thin-slice latents, conditioned on the prior latent (ctld/diffusion.py).

Input = the noisy residual (B, C, D_thin, h, w), the prior latent (B, C, D_thin, h, w) (the thin latent estimated
from the thick slices, e.g. the encoded slab-filter volume) and a one-hot of each thin slice's phase inside its
thick slab (`factor` channels: the prior's error depends on where in the slab a slice sits, which convolutions
cannot tell on their own). Windows start on slab boundaries (docs/DESIGN.md, thick/thin alignment), so the phase of
latent slice d is d % factor. The output layer starts at zero: an untrained model predicts a zero residual, i.e.
returns its prior. Each level transition halves h and w and, where
`depth_downsample` says so, depth too: the 40-slice latent of a 8 -> 40 patch becomes 20 and 10 slices deep,
so the deep levels are cheap and attention (SDPA) at the lowest resolutions sees the whole patch.
Any D_thin, h, w are accepted: the input is padded (replicate) to the multiple the strides need and the
output is cropped back, so inference windows of any size work.

    unet = UNet3D(latent_channels=vae.latent_channels, factor=cfg.data.factor, **asdict(cfg.unet))
    model_output = unet(noisy_residual, timesteps, prior_latents)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctld.models.layers import NORM_TYPES, AttentionBlock3D, ResBlock3D, TimestepEmbedding, make_norm


class _Downsample(nn.Module):
    """Strided conv: H and W halve, D halves when `depth` is set."""

    def __init__(self, channels: int, depth: bool):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, stride=(2 if depth else 1, 2, 2), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    """Nearest upsampling (x2 in-plane, x2 in depth when `depth` is set), then a conv that narrows to the
    finer level's channels: the conv runs at the finer resolution, so keeping the coarse width there would
    cost 2-4x more for no gain in what reaches the next block."""

    def __init__(self, in_channels: int, out_channels: int, depth: bool):
        super().__init__()
        self.scale = (2.0 if depth else 1.0, 2.0, 2.0)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class _ResAttn(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, in_channels, out_channels, norm_num_groups, temb_channels, attention, head_dim, norm_type):
        super().__init__()
        self.res = ResBlock3D(in_channels=in_channels, out_channels=out_channels, norm_num_groups=norm_num_groups,
                              temb_channels=temb_channels, norm_type=norm_type)
        self.attn = (
            AttentionBlock3D(channels=out_channels, norm_num_groups=norm_num_groups, head_dim=head_dim,
                             norm_type=norm_type)
            if attention
            else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, temb)
        return self.attn(x) if self.attn is not None else x


def _check_positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


class UNet3D(nn.Module):
    """Conditional 3D U-Net over latents with anisotropic down/upsampling.

    Args:
        latent_channels: C of the VAE latent; the input has 2C + factor channels (noisy residual, prior, phase).
        factor: thin slices per thick slice (the phase one-hot has this many channels).
        channels: feature channels per level.
        num_res_blocks: residual blocks per level on the way down (one more on the way up, as in diffusers).
        depth_downsample: one entry per level transition (len(channels) - 1): halve depth too?
            In-plane size always halves.
        attention_levels: one entry per level: self-attention after the residual blocks of that level.
            The mid block has attention when the last level does.
        norm_num_groups: GroupNorm groups; must divide every entry of `channels` (norm_type "group").
        norm_type: "layer" (per-voxel LayerNorm over channels: fully convolutional, tiling-invariant) or "group"
            (GroupNorm over each sample: a voxel's output depends on its inference tile; models before the option).
        attention_head_dim: channels per attention head.
        gradient_checkpointing: recompute block activations in backward to save memory.
    """

    def __init__(
        self,
        *,
        latent_channels: int,
        factor: int,
        channels: Sequence[int] = (64, 128, 256),
        num_res_blocks: int = 2,
        depth_downsample: Sequence[bool] = (True, True),
        attention_levels: Sequence[bool] = (False, False, True),
        norm_num_groups: int = 32,
        attention_head_dim: int = 32,
        gradient_checkpointing: bool = False,
        norm_type: str = "layer",
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        depth_downsample = tuple(bool(d) for d in depth_downsample)
        attention_levels = tuple(bool(a) for a in attention_levels)
        for name, value in (("latent_channels", latent_channels), ("factor", factor),
                            ("num_res_blocks", num_res_blocks), ("norm_num_groups", norm_num_groups),
                            ("attention_head_dim", attention_head_dim)):
            _check_positive_int("UNet3D", name, value)
        if len(channels) < 1 or any(c < 1 for c in channels):
            raise ValueError(f"UNet3D: channels must be a non-empty list of positive ints, got {channels}")
        if len(depth_downsample) != len(channels) - 1:
            raise ValueError(
                f"UNet3D: depth_downsample needs one entry per level transition ({len(channels) - 1} for "
                f"channels={channels}), got {depth_downsample}"
            )
        if len(attention_levels) != len(channels):
            raise ValueError(
                f"UNet3D: attention_levels needs one entry per level ({len(channels)} for channels={channels}), "
                f"got {attention_levels}"
            )
        if norm_type not in NORM_TYPES:
            raise ValueError(f"UNet3D: norm_type must be one of {NORM_TYPES}, got {norm_type!r}")
        bad = [c for c in channels if c % norm_num_groups != 0]
        if bad and norm_type == "group":
            raise ValueError(
                f"UNet3D: norm_num_groups={norm_num_groups} must divide every entry of channels={channels} (not {bad})"
            )
        bad = [c for c, a in zip(channels, attention_levels, strict=True) if a and c % attention_head_dim != 0]
        if bad:
            raise ValueError(
                f"UNet3D: attention_head_dim={attention_head_dim} must divide the channels of every attention level "
                f"(not {bad})"
            )
        self.config = {
            "latent_channels": latent_channels,
            "factor": factor,
            "channels": channels,
            "num_res_blocks": num_res_blocks,
            "depth_downsample": depth_downsample,
            "attention_levels": attention_levels,
            "norm_num_groups": norm_num_groups,
            "attention_head_dim": attention_head_dim,
            "gradient_checkpointing": bool(gradient_checkpointing),
            "norm_type": norm_type,
        }
        self.norm_type = norm_type
        self.has_attention = any(attention_levels)
        self.latent_channels = latent_channels
        self.factor = factor
        self.gradient_checkpointing = bool(gradient_checkpointing)
        # Padding multiples: every transition halves h, w; depth only where depth_downsample says so.
        self.depth_multiple = 2 ** sum(depth_downsample)
        self.inplane_multiple = 2 ** (len(channels) - 1)

        temb_channels = 4 * channels[0]
        self.time_embedding = TimestepEmbedding(base_dim=channels[0], embed_dim=temb_channels)
        self.conv_in = nn.Conv3d(2 * latent_channels + factor, channels[0], kernel_size=3, padding=1)

        head = attention_head_dim
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [channels[0]]
        prev = channels[0]
        for level, ch in enumerate(channels):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_ResAttn(prev, ch, norm_num_groups, temb_channels, attention_levels[level], head,
                                       norm_type))
                prev = ch
                skip_channels.append(ch)
            self.down_blocks.append(blocks)
            if level < len(channels) - 1:
                self.downsamplers.append(_Downsample(ch, depth_downsample[level]))
                skip_channels.append(ch)

        self.mid_block1 = _ResAttn(prev, prev, norm_num_groups, temb_channels, attention_levels[-1], head, norm_type)
        self.mid_block2 = _ResAttn(prev, prev, norm_num_groups, temb_channels, False, head, norm_type)

        self.up_blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(len(channels))):
            ch = channels[level]
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(_ResAttn(prev + skip_channels.pop(), ch, norm_num_groups, temb_channels,
                                       attention_levels[level], head, norm_type))
                prev = ch
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamplers.append(_Upsample(ch, channels[level - 1], depth_downsample[level - 1]))
                prev = channels[level - 1]
        assert not skip_channels, skip_channels

        self.norm_out = make_norm(prev, norm_num_groups, norm_type)
        self.conv_out = nn.Conv3d(prev, latent_channels, kernel_size=3, padding=1)
        # Zero residual at initialisation: an untrained model reproduces its prior (SRDiff, ResShift).
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = bool(enabled)
        self.config["gradient_checkpointing"] = bool(enabled)

    def _run(self, block: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, temb, use_reentrant=False)
        return block(x, temb)

    def _check_inputs(self, noisy_latents, timesteps, prior_latents) -> torch.Tensor:
        c = self.latent_channels
        for name, t in (("noisy_latents", noisy_latents), ("prior_latents", prior_latents)):
            if t.ndim != 5 or t.shape[1] != c:
                raise ValueError(
                    f"UNet3D: {name} must be (B, {c}, D, h, w) (latent_channels={c}), got shape {tuple(t.shape)}"
                )
        if prior_latents.shape != noisy_latents.shape:
            raise ValueError(
                f"UNet3D: prior_latents {tuple(prior_latents.shape)} must have the shape of noisy_latents "
                f"{tuple(noisy_latents.shape)} (both on the thin grid)"
            )
        b, d_thin = noisy_latents.shape[0], noisy_latents.shape[2]
        if d_thin % self.factor:
            raise ValueError(
                f"UNet3D: thin latent depth {d_thin} must be a multiple of factor {self.factor}: windows hold whole "
                "thick slabs"
            )
        timesteps = torch.as_tensor(timesteps, device=noisy_latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        if timesteps.shape != (b,):
            raise ValueError(f"UNet3D: timesteps must be a scalar or shape ({b},), got shape {tuple(timesteps.shape)}")
        return timesteps

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, prior_latents: torch.Tensor
                ) -> torch.Tensor:
        """Args:
            noisy_latents: (B, C, D_thin, h, w) noisy residual (zeros for regression).
            timesteps: (B,) diffusion timesteps (or a scalar for the whole batch); `num_train_timesteps` marks the
                regression task.
            prior_latents: (B, C, D_thin, h, w) prior latents; D_thin a multiple of factor.

        Returns:
            model_output: (B, C, D_thin, h, w): the residual (regression), else the scheduler's prediction type.
        """
        timesteps = self._check_inputs(noisy_latents, timesteps, prior_latents)
        b, _, d, h, w = noisy_latents.shape
        phase = torch.arange(d, device=noisy_latents.device) % self.factor
        phase = F.one_hot(phase, self.factor).T.to(noisy_latents.dtype)  # (factor, D_thin)
        phase = phase[None, :, :, None, None].expand(b, self.factor, d, h, w)
        x = torch.cat([noisy_latents, prior_latents.to(noisy_latents.dtype), phase], dim=1)  # (B, 2C + f, D, h, w)
        pad_d = -d % self.depth_multiple
        pad_h = -h % self.inplane_multiple
        pad_w = -w % self.inplane_multiple
        if pad_d or pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h, 0, pad_d), mode="replicate")
        x = x.to(self.conv_in.weight.dtype)

        temb = self.time_embedding(timesteps)  # (B, 4 * channels[0])
        x = self.conv_in(x)
        skips = [x]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                x = self._run(block, x, temb)
                skips.append(x)
            if level < len(self.downsamplers):
                x = self.downsamplers[level](x)
                skips.append(x)
        x = self._run(self.mid_block1, x, temb)
        x = self._run(self.mid_block2, x, temb)
        for i, blocks in enumerate(self.up_blocks):
            for block in blocks:
                x = self._run(block, torch.cat([x, skips.pop()], dim=1), temb)
            if i < len(self.upsamplers):
                x = self.upsamplers[i](x)
        x = F.silu(self.norm_out(x), inplace=not torch.is_grad_enabled())
        x = self.conv_out(x)  # (B, C, D_pad, h_pad, w_pad)
        return x[:, :, :d, :h, :w]
