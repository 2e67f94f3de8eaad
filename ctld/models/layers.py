"""Blocks shared by the VAE and the U-Net: timestep embedding, normalisation, residual block, SDPA attention.

Everything works on 5D tensors `(B, C, D, H, W)`. Blocks take plain ints so each one can be tested alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# "group": GroupNorm, statistics over every voxel of a sample (the LDM/diffusers default). "layer": LayerNorm over the
# channels of each voxel (NAFNet's LayerNorm2d, Restormer, ConvNeXt's channels_first LayerNorm, in 3D). Inference runs
# on tiles: with GroupNorm a voxel's output depends on what else its tile holds (a tile of lung and one of
# mediastinum normalise differently), which shows as tile-to-tile brightness steps that no blending removes. With
# "layer" no statistic spans voxels, so the model is fully convolutional: its output on a voxel depends only on its
# receptive field, whatever the tile, and windows larger than the training patch give the same values.
NORM_TYPES = ("group", "layer")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, D, H, W), per voxel, with a per-channel affine.

    Runs as `F.layer_norm` over a channels-last view: its output is channels_last_3d, which the next convolution
    keeps, so after the first norm of a network no further copies are made (a plain mean/var over dim 1 was ~5x
    slower than GroupNorm on CPU; this is ~2x).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.permute(0, 2, 3, 4, 1)  # (B, D, H, W, C)
        # Under autocast layer_norm runs in fp32 with the fp32 affine; without it (a model cast to bf16) the dtypes
        # must match.
        weight, bias = self.weight, self.bias
        if not torch.is_autocast_enabled(x.device.type):
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        y = F.layer_norm(channels_last, (x.shape[1],), weight, bias, self.eps)
        return y.permute(0, 4, 1, 2, 3)  # (B, C, D, H, W), channels_last_3d strides


def make_norm(channels: int, norm_num_groups: int, norm_type: str = "layer") -> nn.Module:
    """The normalisation layer a model's `norm_type` asks for (`NORM_TYPES`)."""
    if norm_type == "group":
        return group_norm(channels, norm_num_groups)
    if norm_type == "layer":
        return ChannelLayerNorm(channels, eps=1e-6)
    raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")


def group_norm(channels: int, norm_num_groups: int) -> nn.GroupNorm:
    """GroupNorm with the divisibility check up front (eps as in diffusers/MONAI autoencoders)."""
    if channels % norm_num_groups != 0:
        raise ValueError(
            f"norm_num_groups={norm_num_groups} must divide every channel count, but {channels} channels do not "
            f"split into {norm_num_groups} groups; choose channels that are multiples of norm_num_groups"
        )
    return nn.GroupNorm(norm_num_groups, channels, eps=1e-6, affine=True)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps (DDPM/"Attention is all you need"; cos first, as in diffusers'
    `flip_sin_to_cos=True`).

    Args:
        timesteps: (B,) integer or float timesteps.
        dim: embedding width (even).

    Returns:
        (B, dim) float32 embedding.
    """
    if dim % 2 != 0:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features -> MLP, as in the DDPM/diffusers U-Nets."""

    def __init__(self, *, base_dim: int, embed_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.linear_1 = nn.Linear(base_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.base_dim)
        emb = emb.to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))  # (B, embed_dim)


class ResBlock3D(nn.Module):
    """Norm -> SiLU -> Conv3d, twice, with a residual path; an optional timestep embedding is added after
    the first conv (the DDPM ResNet block). Kernel 3x3x3, stride 1: the shape is kept."""

    def __init__(
        self, *, in_channels: int, out_channels: int, norm_num_groups: int, temb_channels: int | None = None,
        norm_type: str = "layer",
    ):
        super().__init__()
        self.norm1 = make_norm(in_channels, norm_num_groups, norm_type)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = make_norm(out_channels, norm_num_groups, norm_type)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # Without autograd, activations are updated in place: whole-series inference on a CPU is bound by memory
        # traffic as much as by the convolutions (each fresh 0.7 GB tensor costs its page faults).
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if self.temb_proj is not None:
            if temb is None:
                raise ValueError("this ResBlock3D was built with temb_channels and needs a timestep embedding")
            emb = self.temb_proj(F.silu(temb))[:, :, None, None, None]  # (B, C, 1, 1, 1)
            h = h.add_(emb) if inplace else h + emb
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        residual = x if self.skip is None else self.skip(x)
        return h.add_(residual) if inplace else residual + h


class AttentionBlock3D(nn.Module):
    """Multi-head self-attention over all voxels of a (low-resolution) feature map, through
    `torch.nn.functional.scaled_dot_product_attention` (flash/memory-efficient kernels on GPU)."""

    def __init__(self, *, channels: int, norm_num_groups: int, head_dim: int, norm_type: str = "layer"):
        super().__init__()
        if channels % head_dim != 0:
            raise ValueError(
                f"attention_head_dim={head_dim} must divide the channel count {channels} of every attention level"
            )
        self.num_heads = channels // head_dim
        self.norm = make_norm(channels, norm_num_groups, norm_type)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, d * h * w).transpose(1, 2)  # (B, N, C)
        qkv = self.to_qkv(tokens).reshape(b, d * h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(b, d * h * w, c)  # (B, N, C)
        out = self.to_out(out).transpose(1, 2).reshape(b, c, d, h, w)  # (B, C, D, H, W)
        return x + out
