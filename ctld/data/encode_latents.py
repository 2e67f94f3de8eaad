"""`ctld-shards encode`: pixel shards -> latent shards for the diffusion stage (format: ctld/data/latent_shards.py).

    ctld-shards encode --vae runs/vae1/export shards --out latent_shards --config configs/base.yaml \
        --patches_per_volume 16 --batch_size 8

Every volume of the chosen splits is cut into `--patches_per_volume` patch pairs exactly as the pixel loader cuts
them (data.depth_thick, data.patch_size, data.min_foreground_fraction, data.small_volume, data.augment), and both
sides are encoded once by the frozen VAE (posterior mode; the prior from diffusion.prior), batched, on the GPU when
there is one (bf16 where the trainer would use it, else fp32). Crops and symmetries are drawn from a generator
seeded by (--seed, the sample key), so a rerun writes the same patches. One latent shard per pixel shard (same
relative name, so the shards of a merged partitioned build keep their part-* folders), written under a temporary
name, renamed, then recorded in `<out>/.done/<shard>.json`; an interrupted encode resumes where it stopped when
run again with the same arguments.

Many GPUs: under `accelerate launch --num_processes K -m ctld.data.build_shards encode ...` each process encodes
every K-th pixel shard on its own device; `--partition I/N` (or N with $JOB_COMPLETION_INDEX, one pod of an Indexed
Job) does the same across separately started processes or machines, and both combine (N pods x K processes). A
latent sample depends only on its pixel sample, the VAE, the settings and the seed, never on which process encoded
it, so K processes write the same bytes as one. The manifest is written complete by whichever process finds every
shard recorded when it finishes its share (no process waits for another at the end); one process alone also keeps
the manifest up to date after each shard.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from ctld.baselines import SlabFilter
from ctld.config import Config
from ctld.data.latent_shards import (
    DTYPES,
    FORMAT_VERSION,
    KIND,
    encode_latent_sample,
    matched_settings,
    read_latent_manifest,
)
from ctld.data.patches import sample_patch_pairs
from ctld.data.shard_plan import DONE_DIR, TMP_PREFIX
from ctld.data.shard_writer import atomic_json, sha256_of
from ctld.data.shards import MANIFEST, decode_sample, manifest_shards, read_manifest
from ctld.data.tar_reader import iter_raw_samples
from ctld.data.transforms import hu_to_model
from ctld.diffusion import ResidualSpec, encode_pair
from ctld.distributed import resolve_mixed_precision
from ctld.export import vae_hash
from ctld.frozen_vae import load_frozen_vae

logger = logging.getLogger(__name__)


def encode_settings(cfg: Config, *, patches_per_volume: int, seed: int, dtype: str, precision: str) -> dict[str, Any]:
    """What the latent patches depend on besides the VAE; a resumed encode must match them exactly. The config's
    part (`matched_settings`) is what the trainer compares."""
    return {**matched_settings(cfg), "patches_per_volume": patches_per_volume, "seed": seed, "dtype": dtype,
            "precision": precision}


def patch_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one sample's crops and symmetries: (--seed, the sample key), so reruns cut the same patches."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")])


def encode(shards_dir: Path, vae_export: Path, out_dir: Path, cfg: Config, *, patches_per_volume: int = 16,
           batch_size: int = 8, splits: tuple[str, ...] = ("train",), dtype: str = "float32", seed: int = 0,
           overwrite: bool = False, device: str | None = None,
           partition: tuple[int, int] | None = None) -> dict[str, Any]:
    """Encode the `splits` of `shards_dir` into `out_dir` (this process's share: `partition` (index, count) times
    the processes of an `accelerate launch`); returns the manifest, complete when every shard is done. ValueError /
    FileNotFoundError with what to do on a mismatch."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Rank and world size under `accelerate launch`, one process otherwise. PartialState (unlike Accelerator) does
    # not read ACCELERATE_USE_CPU itself: without it, CPU processes would each think they are the only one.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    index, count = partition or (0, 1)
    share, shares = index * state.num_processes + state.process_index, count * state.num_processes
    if partition is not None and overwrite:
        raise ValueError("--overwrite with --partition: partitions start apart and would delete each other's shards; "
                         f"delete {out_dir} first instead")
    if patches_per_volume < 1 or batch_size < 1:
        raise ValueError(f"--patches_per_volume ({patches_per_volume}) and --batch_size ({batch_size}) must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source = read_manifest(shards_dir)
    if "factor" in source and source["factor"] != cfg.data.factor:
        raise ValueError(f"{shards_dir / MANIFEST} was built with factor {source['factor']} but data.factor is "
                         f"{cfg.data.factor}; pass --data.factor={source['factor']}")
    device = torch.device(device) if device else state.device
    if device.type == "cuda":
        # cuDNN's autotuner may pick another convolution algorithm per process (other rounding): deterministic
        # algorithms keep a shard's bytes independent of which process encoded it.
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    # The precision the trainer's frozen VAE runs in (train.mixed_precision; auto = bf16 on a bf16 GPU).
    precision = resolve_mixed_precision(cfg.train.mixed_precision) if device.type == "cuda" else "no"
    dtype_of = {"bf16": torch.bfloat16, "fp16": torch.float16}
    vae = load_frozen_vae(str(vae_export), cfg.data, device, dtype_of.get(precision, torch.float32))
    settings = encode_settings(cfg, patches_per_volume=patches_per_volume, seed=seed, dtype=dtype,
                               precision=precision)
    shards = [(split, path, name) for split in splits for path, name in _source_shards(shards_dir, source, split)]
    if not shards:
        raise ValueError(f"{shards_dir / MANIFEST} lists no shards of the splits {list(splits)}")
    if out_dir.resolve() == shards_dir.resolve():
        raise ValueError(f"--out {out_dir} is the pixel shard folder; write latent shards to a folder of their own")
    start_args = (out_dir, vae_export, settings, splits, sha256_of(shards_dir / MANIFEST))
    fit = functools.partial(_fit_slab_filter, cfg, shards_dir)
    if state.num_processes > 1:  # one process starts (or replaces) the encode, the others then resume it
        if state.is_main_process:
            _start_or_resume(*start_args, overwrite, fit_slab_filter=fit)
        state.wait_for_everyone()
    manifest = _start_or_resume(*start_args, overwrite and state.num_processes == 1, fit_slab_filter=fit)
    spec = ResidualSpec(prior=cfg.diffusion.prior, factor=cfg.data.factor, residual_scale=1.0,
                        strength=cfg.diffusion.strength, num_train_timesteps=cfg.diffusion.num_train_timesteps,
                        slab_filter=SlabFilter.from_json(manifest["slab_filter"]))
    listed = {entry["name"]: entry for entry in manifest["shards"]}
    if shares > 1:
        logger.info("encoding share %d of %d: %d of %d shards", share, shares,
                    len(shards[share::shares]), len(shards))  # fmt: skip
    start = time.perf_counter()
    for split, path, name in shards[share::shares]:  # every shares-th shard from this share's index
        if name in listed or _done_record(out_dir, name) is not None:
            continue
        record = _encode_shard(Path(path), out_dir, name, split, vae, spec, cfg, settings, batch_size, device)
        record["share"] = f"{share}/{shares}"  # which process encoded it (the bytes do not depend on it)
        done_path = out_dir / DONE_DIR / f"{name}.json"
        done_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(done_path, record)  # after the rename: a recorded shard is complete
        if shares == 1:
            manifest["shards"].append(record)
            manifest["encode_seconds"] = round(manifest.get("encode_seconds", 0.0) + record["seconds"], 1)
            atomic_json(out_dir / MANIFEST, manifest)
        logger.info("encoded %s: %d samples, %d patches in %.1f s", name, record["samples"], record["patches"],
                    record["seconds"])
    records = [listed.get(name) or _done_record(out_dir, name) for _, _, name in shards]
    missing = sum(record is None for record in records)
    if missing:  # another process's share is still running: the last one to finish completes the manifest
        logger.info("share %d of %d done in %.1f s; %d shards of other shares still to come", share, shares,
                    time.perf_counter() - start, missing)
        return manifest
    manifest["shards"] = records
    manifest["encode_seconds"] = round(sum(record["seconds"] for record in records), 1)
    manifest["status"] = "complete"
    manifest["totals"] = {key: sum(entry[key] for entry in manifest["shards"])
                          for key in ("samples", "patches", "skipped", "bytes")}
    atomic_json(out_dir / MANIFEST, manifest)
    totals = manifest["totals"]
    logger.info("latent shards in %s: %d shards, %d samples, %d patches, %d skipped; %.1f s this run",
                out_dir, len(manifest["shards"]), totals["samples"], totals["patches"], totals["skipped"],
                time.perf_counter() - start)
    return manifest


def _source_shards(shards_dir: Path, source: dict, split: str) -> list[tuple[str, str]]:
    """(path, name) of the `split` pixel shards: `name` relative to the shard folder as the manifest lists it
    (`part-0000-of-0003/train-000000.tar` after a merge), the file name of an absolute entry."""
    names = [Path(e["name"]) for e in source["shards"] if isinstance(e, dict) and e.get("split") == split]
    paths = manifest_shards(shards_dir, split, source)
    return [(path, name.name if name.is_absolute() else name.as_posix()) for path, name in zip(paths, names)]


def _done_record(out_dir: Path, name: str) -> dict | None:
    """The record of a latent shard some process finished (its file there with the recorded size), else None."""
    path = out_dir / DONE_DIR / f"{name}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    shard = out_dir / name
    return record if shard.is_file() and shard.stat().st_size == record.get("bytes") else None


def _fit_slab_filter(cfg: Config, shards_dir: Path) -> dict[str, Any]:
    """The slab filter the trainer would fit on these shards (ctld.calibration), as JSON."""
    from accelerate import PartialState

    from ctld.calibration import fit_slab_filter_on_shards

    PartialState()  # the fit logs through accelerate's logger, which needs its state
    data = dataclasses.replace(cfg.data, shards_dir=str(shards_dir), train_urls="")
    return fit_slab_filter_on_shards(dataclasses.replace(cfg, data=data)).to_json()


def _start_or_resume(out_dir: Path, vae_export: Path, settings: dict, splits, source_sha256: str, overwrite: bool,
                     fit_slab_filter: Callable[[], dict]) -> dict[str, Any]:
    """The manifest to continue: the one in `out_dir` when it was started from the same pixel shards (their
    manifest's sha256), VAE and settings, else a new one. --overwrite replaces only an earlier latent encode; a
    folder holding anything else is refused."""
    vae_sha256 = vae_hash(vae_export)
    old = None
    if (out_dir / MANIFEST).is_file():
        try:
            old = read_latent_manifest(out_dir)
        except ValueError as error:
            raise ValueError(f"--out {out_dir} holds a manifest.json that is not a latent encode's ({error}); choose "
                             "another --out") from None
    elif out_dir.exists() and any(not p.name.startswith(TMP_PREFIX) for p in out_dir.iterdir()):
        # (a partition started at the same moment may be writing its manifest under a temporary name)
        raise ValueError(f"--out {out_dir} is not empty and holds no latent manifest; choose another --out")
    if old is not None and not overwrite:
        same = (old.get("vae_sha256"), old.get("settings"), old.get("splits"), old.get("source_manifest_sha256")) == (
            vae_sha256, settings, list(splits), source_sha256)
        if not same:
            raise ValueError(f"{out_dir} holds latent shards encoded from other shards or with another VAE or "
                             "settings; pass --overwrite to replace them, or another --out")
        listed = [entry for entry in old["shards"] if (out_dir / entry["name"]).is_file()]
        logger.info("resuming the encode in %s: %d shards done", out_dir, len(listed))
        return {**old, "shards": listed, "status": "incomplete"}
    fresh = {"kind": KIND, "format_version": FORMAT_VERSION, "status": "incomplete", "vae_export": str(vae_export),
             "vae_sha256": vae_sha256, "source_manifest_sha256": source_sha256, "settings": settings,
             "splits": list(splits), "shards": [], "slab_filter": fit_slab_filter()}
    out_dir.mkdir(parents=True, exist_ok=True)
    if old is not None:  # --overwrite: only what the earlier encode wrote
        for entry in old["shards"]:
            (out_dir / entry["name"]).unlink(missing_ok=True)
        for stale in out_dir.rglob(f"{TMP_PREFIX}*"):
            stale.unlink()
        shutil.rmtree(out_dir / DONE_DIR, ignore_errors=True)
    atomic_json(out_dir / MANIFEST, fresh)
    return fresh


def _encode_shard(path: Path, out_dir: Path, name: str, split: str, vae, spec: ResidualSpec, cfg: Config,
                  settings: dict, batch_size: int, device: torch.device) -> dict[str, Any]:
    start = time.perf_counter()
    final = out_dir / name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    samples = patches = skipped = 0
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, mtime=0.0)
        for raw in _readable_samples(path):
            where = f"sample {raw.get('__key__')!r} in {path}"
            try:
                sample = decode_sample(raw)
            except ValueError as error:
                skipped += 1
                logger.warning("skipping %s: %s", where, error)
                continue
            encoded = _encode_sample(sample, vae, spec, cfg, settings, batch_size, device)
            if encoded is None:
                skipped += 1
                logger.warning("skipping %s: it holds no whole %dx%dx%d patch (data.small_volume=%s)", where,
                               cfg.data.depth_thick, cfg.data.patch_size, cfg.data.patch_size, cfg.data.small_volume)
                continue
            z_thin, z_prior = encoded
            info = {"factor": sample["factor"], "thick_source": sample["meta"].get("thick_source", "real")}
            writer.write(encode_latent_sample(sample["__key__"], z_thin, z_prior, info))
            samples += 1
            patches += z_thin.shape[0]
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, final)
    return {"name": name, "split": split, "samples": samples, "patches": patches, "skipped": skipped,
            "bytes": final.stat().st_size, "sha256": sha256_of(final), "seconds": round(time.perf_counter() - start, 2)}


def _readable_samples(path: Path):
    """The shard's raw samples; a damaged shard (truncated, corrupt) is reported and its complete samples before
    the damage are kept, as the loader does, so one bad shard does not end a long encode."""
    yielded = 0
    try:
        for raw in iter_raw_samples(str(path)):
            yielded += 1
            yield raw
    except Exception as error:  # noqa: BLE001 - any read failure of one shard is reported, not fatal
        logger.warning("shard %s is damaged after %d samples (%r): keeping those; `ctld-shards verify` names what "
                       "to rebuild", path, yielded, error)


def _encode_sample(sample: dict, vae, spec: ResidualSpec, cfg: Config, settings: dict, batch_size: int,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray] | None:
    """(z_thin, z_prior) (N, C, D, h, w) of the sample's patches, or None when the volume holds no patch."""
    data = cfg.data
    rng = patch_rng(settings["seed"], sample["__key__"])
    pairs = sample_patch_pairs(
        sample["thick"], sample["thin"], factor=sample["factor"], offset=sample["offset"], rng=rng,
        depth_thick=data.depth_thick, patch_size=data.patch_size, count=settings["patches_per_volume"],
        augment=data.augment, min_foreground_fraction=data.min_foreground_fraction, small_volume=data.small_volume,
    )
    if pairs is None:
        return None
    out_dtype = DTYPES[settings["dtype"]]
    thin_latents, prior_latents = [], []
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first:first + batch_size]
        thick = torch.from_numpy(hu_to_model(np.stack([p[0] for p in chunk]), data.hu_min, data.hu_max)).unsqueeze(1)
        thin = torch.from_numpy(hu_to_model(np.stack([p[1] for p in chunk]), data.hu_min, data.hu_max)).unsqueeze(1)
        target, prior = encode_pair(vae, spec, thick.to(device), thin.to(device))
        thin_latents.append(target.cpu().numpy().astype(out_dtype))
        prior_latents.append(prior.cpu().numpy().astype(out_dtype))
    return np.concatenate(thin_latents), np.concatenate(prior_latents)
