"""Exports: safetensors weights with their constructor kwargs beside them, so a folder rebuilds its own models.

    runs/<name>/export/
        vae.safetensors   vae.json      {"class": "AutoencoderKL3D", "kwargs": {...}, "format_version": 2}
        unet.safetensors  unet.json     (diffusion stage; the EMA weights)
        scheduler_config.json           diffusers `save_config` of the training scheduler
        ctld.json                       meta: factor, hu_min, hu_max, depth_thick, patch_size, the inference
                                        settings (`infer`), the training domain (`domain`), vae_sha256, ...
        README.md  model_card.json      the model card (ctld.model_card): use, data, training, scores

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

from ctld.model_card import write_card
from ctld.models.unet import UNet3D
from ctld.models.vae import AutoencoderKL3D

logger = logging.getLogger(__name__)

# Model files (vae.json, unet.json). 2: the residual model (the U-Net conditioned on a prior latent and the slab
# phase; ctld.json's `residual` and `slab_filter`). Version 1 U-Nets were conditioned on repeated thick latents and
# cannot be loaded into it.
# 3: the kwargs name `norm_type`; files before it were built with GroupNorm, which `load_model` says explicitly (the
# constructors now default to the tiling-invariant "layer", ctld/models/layers.py).
FORMAT_VERSION = 3
READABLE_VERSIONS = {"AutoencoderKL3D": {1, 2, 3}, "UNet3D": {2, 3}}
# The export as a whole (ctld.json's format_version). 3: ctld.json records the inference settings the model was
# validated with (`infer`), what it saw in training (`domain`) and its VAE's hash (`vae_sha256`), and the folder
# holds a model card (README.md, model_card.json). Version 2 exports ran with whatever settings the user had.
EXPORT_VERSION = 3
REEXPORT_HINT = ("re-export it with this ctld: relaunch its training with --train.resume=latest (the final "
                 "checkpoint is exported again, no further steps), or retrain")
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
    # One metadata key: safetensors writes a header map of two in a random order, so the same weights saved twice
    # would hash differently (vae_hash identifies a VAE by its bytes). The class is in name.json.
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(weights)
    kwargs = json.loads(json.dumps(model.config))  # tuples -> lists
    _write_json(directory / f"{name}.json", {"class": cls_name, "kwargs": kwargs, "format_version": FORMAT_VERSION})


def read_json_file(path: str | Path, hint: str = REEXPORT_HINT) -> dict[str, Any]:
    """A JSON object from `path`, or ValueError naming the file (damaged, truncated, not an object) and `hint`."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is damaged: not valid JSON ({error}); {hint}") from error
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is damaged: it holds a JSON {type(doc).__name__}, not an object; {hint}")
    return doc


def load_safetensors(path: str | Path, hint: str = REEXPORT_HINT) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file on the CPU, or ValueError naming the file when it is truncated or not
    safetensors (safetensors' own error is a bare "invalid header length" with a stack trace)."""
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, ... all mean the same to the user
        raise ValueError(f"{path} is damaged (truncated or not a safetensors file: {error}); {hint}") from error


DAMAGED_HINT = "copy the export folder again, or " + REEXPORT_HINT


def load_model(directory: str | Path, name: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model from `name.json` and load `name.safetensors` (strict); returned in eval mode. A damaged
    or mismatched file is a ValueError naming it."""
    directory = Path(directory)
    spec_path, weights = directory / f"{name}.json", directory / f"{name}.safetensors"
    for path in (spec_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"model export {directory} is incomplete: {path.name} is missing")
    spec = read_json_file(spec_path, DAMAGED_HINT)
    cls_name = spec.get("class")
    if cls_name not in MODEL_CLASSES:
        raise ValueError(f"{spec_path}: unknown model class {cls_name!r}; expected one of {sorted(MODEL_CLASSES)}")
    if spec.get("format_version") not in READABLE_VERSIONS[cls_name]:
        raise ValueError(
            f"{spec_path}: {cls_name} of format_version {spec.get('format_version')!r}; this ctld reads "
            f"{sorted(READABLE_VERSIONS[cls_name])}. A version-1 U-Net predates the residual model (conditioned on "
            "repeated thick latents): retrain the diffusion stage with this ctld on the same VAE export"
        )
    try:
        kwargs = dict(spec["kwargs"])
        if spec["format_version"] < 3:
            kwargs.setdefault("norm_type", "group")
        model = MODEL_CLASSES[cls_name](**kwargs)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{spec_path}: the {cls_name} arguments are damaged ({type(error).__name__}: {error}); "
                         f"{DAMAGED_HINT}") from error
    # Read on the CPU, then move: safetensors rejects device strings such as "cpu:0" that accelerate produces.
    state = load_safetensors(weights, DAMAGED_HINT)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(f"{weights} does not match the architecture in {spec_path.name} ({len(first)} problem(s), "
                         f"first: {first[1].strip() if len(first) > 1 else first[0]}); {DAMAGED_HINT}") from err
    if isinstance(model, AutoencoderKL3D):
        model.find_untrained_branches()
    return model.to(device).eval()


def save_export(
    directory: str | Path,
    *,
    vae: torch.nn.Module,
    unet: torch.nn.Module | None = None,
    scheduler: Any | None = None,
    meta: dict[str, Any],
    card: dict[str, Any] | None = None,
) -> Path:
    """Write a complete export folder atomically (temp sibling folder, then rename; an old export is replaced).

    Args:
        directory: the export folder, e.g. runs/<name>/export.
        vae: the AutoencoderKL3D.
        unet: the UNet3D (EMA weights), or None for a VAE-only export.
        scheduler: the training scheduler (written with `save_config`), or None.
        meta: ctld.json contents; must hold factor, hu_min, hu_max, depth_thick, patch_size (JSON-serialisable).
            `vae_sha256` (`vae_hash` of the folder) and `format_version` are added.
        card: the model card (`ctld.model_card.training_card`), written as model_card.json and README.md with
            `vae.sha256` filled in; None writes no card.
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
        meta = {**meta, "vae_sha256": vae_hash(tmp), "format_version": EXPORT_VERSION}
        _write_json(tmp / "ctld.json", meta)
        if card is not None:
            write_card(tmp, {**card, "vae": {**card.get("vae", {}), "sha256": meta["vae_sha256"]}})
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

    config = read_json_file(directory / "scheduler_config.json", DAMAGED_HINT)
    cls_name = config.get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"{directory / 'scheduler_config.json'}: {cls_name!r} is not a diffusers scheduler class")
    try:
        return cls.from_config(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory / 'scheduler_config.json'} is damaged ({error}); {DAMAGED_HINT}") from error


def read_export_meta(directory: str | Path, *, min_version: int = EXPORT_VERSION) -> dict[str, Any]:
    """ctld.json of an export folder, refused in one line naming what to do when this ctld cannot use it: written
    by a newer ctld (upgrade), or older than `min_version` (re-export or retrain). Plain JSON: nothing is run."""
    path = Path(directory) / "ctld.json"
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"export folder {directory} does not exist; pass runs/<name>/export")
    if not path.is_file():
        raise FileNotFoundError(f"export {directory} is incomplete: ctld.json is missing; pass runs/<name>/export")
    meta = read_json_file(path)
    version = meta.get("format_version")
    if not isinstance(version, int) or version < min_version:
        raise ValueError(
            f"{path}: export format {version!r} is older than this ctld's {EXPORT_VERSION} (it records no inference "
            f"settings, training domain or model card); {REEXPORT_HINT}"
        )
    if version > EXPORT_VERSION:
        raise ValueError(f"{path}: export format {version} was written by a newer ctld (this one reads up to "
                         f"{EXPORT_VERSION}); upgrade ctld (pip install -U ctld, or pull and reinstall the checkout)")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}; {REEXPORT_HINT}")
    return meta


def load_export(directory: str | Path, device: str | torch.device = "cpu", *,
                min_version: int = EXPORT_VERSION, need_unet: bool = False) -> Export:
    """Load an export folder written by `save_export` (models in eval mode on `device`). Weights are safetensors
    and everything else JSON, so loading runs no pickled code. `min_version` < EXPORT_VERSION only for a VAE
    export that a diffusion run starts from (its weights did not change); `need_unet` refuses a VAE-only export
    (what `ctld-infer` and `ctld-eval --checkpoint` need is a diffusion run's)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"export folder {directory} does not exist; pass runs/<name>/export")
    if need_unet and not any((directory / f).exists() for f in ("unet.json", "unet.safetensors")):
        raise ValueError(f"{directory} is a VAE-only export (no unet.json, unet.safetensors); pass the export of a "
                         "diffusion-stage run (`ctld-eval --vae` measures a VAE export)")
    for required in ("ctld.json", "vae.json", "vae.safetensors"):
        if not (directory / required).is_file():
            raise FileNotFoundError(f"export {directory} is incomplete: {required} is missing")
    unet_files = [(directory / f).is_file() for f in ("unet.json", "unet.safetensors")]
    if any(unet_files) and not all(unet_files):
        absent = "unet.json" if not unet_files[0] else "unet.safetensors"
        raise FileNotFoundError(f"export {directory} is incomplete: {absent} is missing")
    meta = read_export_meta(directory, min_version=min_version)
    vae = load_model(directory, "vae", device)
    unet = load_model(directory, "unet", device) if all(unet_files) else None
    scheduler = _load_scheduler(directory) if (directory / "scheduler_config.json").is_file() else None
    return Export(vae=vae, unet=unet, scheduler=scheduler, meta=meta)
