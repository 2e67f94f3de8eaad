"""The latent shard format: training patches of the diffusion stage, encoded once by the frozen VAE.

    ctld-shards encode --vae runs/vae1/export shards --out latent_shards      # ctld/data/encode_latents.py
    accelerate launch ctld/train.py CONFIG --train.stage=diffusion --train.vae_export=runs/vae1/export \
        --data.latent_shards_dir=latent_shards

A latent sample holds the patches of one pixel sample (same key, same shard name and order): `z_thin.npy` and
`z_prior.npy`, (N, C, depth_thick * factor, P/f, P/f) float32 or float16 diffusion-space latents (VAE posterior
mode x scaling_factor) of N patch pairs cut from the volume exactly as the pixel loader cuts them (random crop with
the foreground redraw, one random in-plane symmetry each when data.augment), and `json` (factor, patches,
thick_source, format_version). The prior latent is the one the config's `diffusion.prior` makes of the thick patch.

Why whole patches and not crops of a whole-volume latent: the VAE's GroupNorm normalises over its whole input,
so a crop of a volume's latent is not the latent of the crop (27% relative difference measured on a random base
VAE), and in-plane flips do not commute with the encoder (its space-to-channel shortcut permutes channels). The
trainer and `ctld-infer` encode patch-sized tiles; latent shards keep exactly that, with the crops and symmetries
drawn before encoding. The price: a finite pool of N crops per volume instead of a fresh crop every time.

`manifest.json` (kind "latent") records the VAE export's hash (`ctld.export.vae_hash`), the data and prior
settings the patches were cut and encoded with, the slab filter, and the shards; the trainer refuses latent
shards that do not match its VAE export or config (`check_latent_manifest`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ctld.data.shards import MANIFEST, manifest_shards, npy_bytes, npy_view

FORMAT_VERSION = 1
KIND = "latent"
SAMPLE_FILES = ("z_thin.npy", "z_prior.npy", "json")
DTYPES = {"float32": np.float32, "float16": np.float16}
# The settings a latent manifest records that the diffusion stage must share (config key -> manifest key).
MATCHED_SETTINGS = {
    "data.factor": "factor",
    "data.depth_thick": "depth_thick",
    "data.patch_size": "patch_size",
    "data.hu_min": "hu_min",
    "data.hu_max": "hu_max",
    "diffusion.prior": "prior",
    "diffusion.slab_taps": "slab_taps",
    "diffusion.slab_fit_volumes": "slab_fit_volumes",
    "data.augment": "augment",
    "data.min_foreground_fraction": "min_foreground_fraction",
    "data.small_volume": "small_volume",
}


def encode_latent_sample(key: str, z_thin: np.ndarray, z_prior: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
    """A latent sample as webdataset's TarWriter writes it: {"__key__", "z_thin.npy", "z_prior.npy", "json"}."""
    if z_thin.shape != z_prior.shape or z_thin.ndim != 5:
        raise ValueError(f"z_thin {z_thin.shape} and z_prior {z_prior.shape} must be equal (N, C, D, h, w) arrays")
    return {
        "__key__": key,
        "z_thin.npy": npy_bytes(z_thin),
        "z_prior.npy": npy_bytes(z_prior),
        "json": json.dumps({**info, "patches": int(z_thin.shape[0]), "format_version": FORMAT_VERSION,
                            "kind": KIND}, sort_keys=True).encode(),
    }


def decode_latent_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw latent sample -> {"__key__", "__url__", "z_thin", "z_prior", "factor", "meta"} (read-only views)."""
    missing = [name for name in SAMPLE_FILES if name not in raw]
    if missing:
        have = sorted(k for k in raw if not k.startswith("__"))
        hint = " (a pixel shard? pass it as data.shards_dir, not data.latent_shards_dir)" if "thin.npy" in raw else ""
        raise ValueError(f"lacks {', '.join(missing)} (has {have}){hint}")
    meta = json.loads(raw["json"])
    if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") != KIND:
        raise ValueError(f"is latent format {meta.get('format_version')!r}; this ctld reads {FORMAT_VERSION}: "
                         "re-encode with `ctld-shards encode`")
    dtypes = tuple(DTYPES.values())
    z_thin = npy_view(raw["z_thin.npy"], "z_thin.npy", dtypes, ndim=5)
    z_prior = npy_view(raw["z_prior.npy"], "z_prior.npy", dtypes, ndim=5)
    if z_thin.shape != z_prior.shape:
        raise ValueError(f"z_thin {z_thin.shape} and z_prior {z_prior.shape} differ")
    return {"__key__": raw["__key__"], "__url__": raw.get("__url__", ""), "z_thin": z_thin, "z_prior": z_prior,
            "factor": int(meta["factor"]), "meta": meta}


def read_latent_manifest(latent_dir: str | Path) -> dict[str, Any]:
    """The manifest of a `ctld-shards encode` folder; FileNotFoundError / ValueError saying what to do."""
    path = Path(latent_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no latent shard manifest at {path}: encode shards with `ctld-shards encode --vae "
                                f"VAE_EXPORT SHARDS --out {latent_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run `ctld-shards encode`") from error
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise ValueError(f"{path} is not a latent shard manifest (kind {manifest.get('kind')!r}); pixel shards go in "
                         "data.shards_dir, `ctld-shards encode` output in data.latent_shards_dir")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is latent format {manifest.get('format_version')!r}; this ctld reads "
                         f"{FORMAT_VERSION}: re-encode with `ctld-shards encode`")
    return manifest


def latent_shard_urls(latent_dir: str | Path, split: str = "train") -> list[str]:
    """Paths of the `split` latent shards of a complete encode (an interrupted one is refused: resume it)."""
    manifest = read_latent_manifest(latent_dir)
    if manifest.get("status") != "complete":
        raise ValueError(f"{Path(latent_dir) / MANIFEST} is from an unfinished encode; run the same `ctld-shards "
                         "encode` command again to finish it")
    urls = manifest_shards(latent_dir, split, manifest)
    if not urls:
        raise ValueError(f"{Path(latent_dir) / MANIFEST} lists no '{split}' latent shards (encoded splits: "
                         f"{manifest.get('splits')})")
    return urls


def matched_settings(cfg) -> dict[str, Any]:
    """The MATCHED_SETTINGS of a Config, by their manifest names: what `ctld-shards encode` records and the trainer
    compares."""
    return {name: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key, name in MATCHED_SETTINGS.items()}


def check_latent_manifest(manifest: dict[str, Any], cfg, *, vae_sha256: str, where: str,
                          shards_manifest_sha256: str | None = None) -> None:
    """Refuse latent shards encoded with another VAE, from other pixel shards than the run's data.shards_dir (the
    sha256 of its manifest, when the run has one) or with other patch/prior settings than the run's Config `cfg`,
    naming the difference."""
    recorded_source = manifest.get("source_manifest_sha256")
    if shards_manifest_sha256 is not None and recorded_source != shards_manifest_sha256:
        raise ValueError(
            f"{where} was encoded from other pixel shards than data.shards_dir (manifest sha256 "
            f"{str(recorded_source)[:12]}... vs {shards_manifest_sha256[:12]}...): validation would not be held out "
            "from the latent training set; re-encode these shards with `ctld-shards encode`, or point "
            "data.shards_dir at the shards the latent ones came from"
        )
    if manifest.get("vae_sha256") != vae_sha256:
        raise ValueError(
            f"{where} was encoded with the VAE export {manifest.get('vae_export')!r} (sha256 "
            f"{str(manifest.get('vae_sha256'))[:12]}...), not train.vae_export (sha256 {vae_sha256[:12]}...); "
            "re-encode with `ctld-shards encode --vae <train.vae_export> ...` or train with that VAE"
        )
    settings, values = manifest.get("settings", {}), matched_settings(cfg)
    for config_key, manifest_key in MATCHED_SETTINGS.items():
        recorded, wanted = settings.get(manifest_key), values[manifest_key]
        numeric = isinstance(wanted, int | float) and not isinstance(wanted, bool) and recorded is not None
        same = float(recorded) == float(wanted) if numeric else recorded == wanted
        if not same:
            raise ValueError(f"{where} was encoded with {manifest_key}={recorded!r} but {config_key}={wanted!r}; "
                             f"pass --{config_key}={recorded} or re-encode with this config")
