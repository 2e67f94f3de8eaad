"""Exports: safetensors weights with their constructor kwargs beside them, so a folder rebuilds its own models.

    runs/<name>/export/
        vae.safetensors   vae.json      {"class": "AutoencoderKL3D", "kwargs": {...}, "format_version": 2}
        unet.safetensors  unet.json     (diffusion stage; the EMA weights)
        scheduler_config.json           diffusers `save_config` of the training scheduler
        ctld.json                       meta: factor, hu_min, hu_max, depth_thick, patch_size, ...

`save_export` writes into a temporary sibling folder and renames it into place, so a reader never sees a
half-written export. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ctld.models.unet import UNet3D
from ctld.models.vae import AutoencoderKL3D

logger = logging.getLogger(__name__)

# 2: the residual model (the U-Net conditioned on a prior latent and the slab phase; ctld.json's `residual` and
# `slab_filter`). Version 1 U-Nets were conditioned on repeated thick latents and cannot be loaded into it.
FORMAT_VERSION = 2
READABLE_VERSIONS = {"AutoencoderKL3D": {1, 2}, "UNet3D": {2}}  # the VAE did not change
MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {"AutoencoderKL3D": AutoencoderKL3D, "UNet3D": UNet3D}
REQUIRED_META = ("factor", "hu_min", "hu_max", "depth_thick", "patch_size")


@dataclass
class Export:
    """A loaded export folder."""

    vae: AutoencoderKL3D
    unet: UNet3D | None
    scheduler: Any | None  # a diffusers scheduler (DDPMScheduler for training exports)
    meta: dict[str, Any] = field(default_factory=dict)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def save_model(model: torch.nn.Module, directory: str | Path, name: str) -> None:
    """Write `name.safetensors` (weights) and `name.json` (class + constructor kwargs) into `directory`."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    cls_name = type(model).__name__
    if cls_name not in MODEL_CLASSES:
        raise ValueError(f"save_model: {cls_name} is not an exportable model; expected one of {sorted(MODEL_CLASSES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = directory / f"{name}.safetensors"
    tmp = weights.with_name(f".{weights.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata={"format": "pt", "class": cls_name})
    tmp.replace(weights)
    kwargs = json.loads(json.dumps(model.config))  # tuples -> lists
    _write_json(directory / f"{name}.json", {"class": cls_name, "kwargs": kwargs, "format_version": FORMAT_VERSION})


def load_model(directory: str | Path, name: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model from `name.json` and load `name.safetensors` (strict); returned in eval mode."""
    directory = Path(directory)
    spec_path, weights = directory / f"{name}.json", directory / f"{name}.safetensors"
    for path in (spec_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"model export {directory} is incomplete: {path.name} is missing")
    spec = json.loads(spec_path.read_text())
    cls_name = spec.get("class")
    if cls_name not in MODEL_CLASSES:
        raise ValueError(f"{spec_path}: unknown model class {cls_name!r}; expected one of {sorted(MODEL_CLASSES)}")
    if spec.get("format_version") not in READABLE_VERSIONS[cls_name]:
        raise ValueError(
            f"{spec_path}: {cls_name} of format_version {spec.get('format_version')!r}; this ctld reads "
            f"{sorted(READABLE_VERSIONS[cls_name])}. A version-1 U-Net predates the residual model (conditioned on "
            "repeated thick latents): retrain the diffusion stage with this ctld on the same VAE export"
        )
    model = MODEL_CLASSES[cls_name](**spec["kwargs"])
    # Read on the CPU, then move: safetensors rejects device strings such as "cpu:0" that accelerate produces.
    state = load_file(str(weights), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match the architecture in {spec_path.name}: {err}") from err
    return model.to(device).eval()


def save_export(
    directory: str | Path,
    *,
    vae: torch.nn.Module,
    unet: torch.nn.Module | None = None,
    scheduler: Any | None = None,
    meta: dict[str, Any],
) -> Path:
    """Write a complete export folder atomically (temp sibling folder, then rename; an old export is replaced).

    Args:
        directory: the export folder, e.g. runs/<name>/export.
        vae: the AutoencoderKL3D.
        unet: the UNet3D (EMA weights), or None for a VAE-only export.
        scheduler: the training scheduler (written with `save_config`), or None.
        meta: ctld.json contents; must hold factor, hu_min, hu_max, depth_thick, patch_size (JSON-serialisable).
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"save_export: meta lacks {missing}; ctld.json must hold {list(REQUIRED_META)}")
    base_unet = getattr(unet, "module", unet)
    if base_unet is not None and base_unet.factor != meta["factor"]:
        raise ValueError(f"save_export: unet.factor={base_unet.factor} differs from meta factor={meta['factor']}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_model(vae, tmp, "vae")
        if unet is not None:
            save_model(unet, tmp, "unet")
        if scheduler is not None:
            scheduler.save_config(str(tmp))
        _write_json(tmp / "ctld.json", {**meta, "format_version": FORMAT_VERSION})
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote export %s", directory)
    return directory


def vae_hash(directory: str | Path) -> str:
    """The identity of an export's VAE: sha256 over vae.json and vae.safetensors (hex). Latent shards record the
    VAE they were encoded with, and a diffusion export the VAE export it was trained on, by this hash."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in ("vae.json", "vae.safetensors"):
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"export {directory} is incomplete: {name} is missing")
        digest.update(name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _load_scheduler(directory: Path):
    import diffusers

    config = json.loads((directory / "scheduler_config.json").read_text())
    cls_name = config.get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"{directory / 'scheduler_config.json'}: {cls_name!r} is not a diffusers scheduler class")
    return cls.from_config(config)


def load_export(directory: str | Path, device: str | torch.device = "cpu") -> Export:
    """Load an export folder written by `save_export` (models in eval mode on `device`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"export folder {directory} does not exist; pass runs/<name>/export")
    for required in ("ctld.json", "vae.json", "vae.safetensors"):
        if not (directory / required).is_file():
            raise FileNotFoundError(f"export {directory} is incomplete: {required} is missing")
    unet_files = [(directory / f).is_file() for f in ("unet.json", "unet.safetensors")]
    if any(unet_files) and not all(unet_files):
        absent = "unet.json" if not unet_files[0] else "unet.safetensors"
        raise FileNotFoundError(f"export {directory} is incomplete: {absent} is missing")
    meta = json.loads((directory / "ctld.json").read_text())
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{directory / 'ctld.json'} lacks {missing}")
    vae = load_model(directory, "vae", device)
    unet = load_model(directory, "unet", device) if all(unet_files) else None
    scheduler = _load_scheduler(directory) if (directory / "scheduler_config.json").is_file() else None
    return Export(vae=vae, unet=unet, scheduler=scheduler, meta=meta)
