"""Patches from latent shards (ctld/data/latent_shards.py): the loader's patch and batch stages for them.

A latent sample already holds N encoded patch pairs, cut and augmented before encoding; the loader draws
`data.patches_per_volume` of them per volume (without replacement; with replacement only when K > N) and stacks them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def sample_latent_patches(sample: dict[str, Any], *, rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
    """`count` of the sample's encoded patches, drawn uniformly (distinct ones while the sample has enough):
    [{"__key__", "z_thin", "z_prior"}]."""
    available = sample["z_thin"].shape[0]
    if available == 0:
        return []
    picks = rng.choice(available, size=count, replace=count > available)
    return [{"__key__": sample["__key__"], "z_thin": sample["z_thin"][i], "z_prior": sample["z_prior"][i]}
            for i in picks.tolist()]


def collate_latents(patches: list[dict[str, Any]]) -> dict[str, Any]:
    """Latent patch dicts -> {"z_thin": (B, C, D, h, w), "z_prior": (B, C, D, h, w) float32, "key": [...]}."""
    return {
        "z_thin": torch.from_numpy(np.stack([p["z_thin"] for p in patches]).astype(np.float32, copy=False)),
        "z_prior": torch.from_numpy(np.stack([p["z_prior"] for p in patches]).astype(np.float32, copy=False)),
        "key": [p["__key__"] for p in patches],
    }
