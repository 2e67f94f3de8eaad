"""Latent shards (`ctld-shards encode`, ctld/data/latent_shards.py): round trip, refusals, resume, and a 2-process
diffusion run on them that follows the same loss curve as on the pixel shards they came from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SHARDS_SALT, synthetic_ct
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ctld.config import load_config
from ctld.data import build_shards, encode_latents
from ctld.data.latent_shards import decode_latent_sample, latent_shard_urls, read_latent_manifest
from ctld.data.loader import make_patch_loader
from ctld.data.patches import sample_patch_pairs
from ctld.data.shards import iter_samples, manifest_shards
from ctld.data.tar_reader import iter_raw_samples
from ctld.data.transforms import hu_to_model
from ctld.diffusion import ResidualSpec, encode_pair
from ctld.export import load_export, save_export, vae_hash

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / "configs" / "tiny.yaml")
# Volumes of exactly one patch (6 thick slices -> 30 thin, 16x16), without augmentation: the pixel loader then cuts
# the same patch every time, so a run on latent shards must follow the pixel run step for step.
ONE_PATCH = ["--data.depth_thick=6", "--data.augment=false"]


def _encode(shards: Path, vae: Path, out: Path, *extra: str) -> int:
    return build_shards.main(["encode", str(shards), "--vae", str(vae), "--out", str(out), "--config", TINY,
                              "--log_level=ERROR", *ONE_PATCH, *extra])


@pytest.fixture(scope="module")
def one_patch_nifti(tmp_path_factory) -> Path:
    """6 NIfTI volumes (30 x 16 x 16 at 1 mm; simulated 5 mm thick: 6 slices)."""
    from ctld.data.nifti import write_nifti
    from ctld.data.volume import Volume

    source = tmp_path_factory.mktemp("one_patch_nifti")
    for index in range(6):
        volume = Volume(synthetic_ct(30, 16, index), (1.0, 0.7, 0.7), (0.0, 0.0, 0.0), np.eye(3))
        write_nifti(volume, source / f"volume{index}.nii.gz")
    return source


ONE_PATCH_SHARDS = ["--shards.val_fraction=0.2", "--shards.test_fraction=0", "--shards.shard_max_samples=2"]


@pytest.fixture(scope="module")
def one_patch_shards(one_patch_nifti, make_shards) -> Path:
    """Pixel shards of the one_patch_nifti volumes, 2 per shard."""
    return make_shards(*ONE_PATCH_SHARDS, sources=[one_patch_nifti])


def _vae_export(out: Path, seed: int) -> Path:
    from ctld.models.vae import AutoencoderKL3D

    cfg = load_config(TINY)
    torch.manual_seed(seed)
    vae = AutoencoderKL3D(**asdict(cfg.vae))
    meta = {"factor": 5, "hu_min": cfg.data.hu_min, "hu_max": cfg.data.hu_max, "depth_thick": 6, "patch_size": 16}
    return save_export(out, vae=vae, meta=meta)


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory) -> Path:
    return _vae_export(tmp_path_factory.mktemp("latent_vae") / "export", seed=0)


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, one_patch_shards, vae_export) -> Path:
    out = tmp_path_factory.mktemp("latent") / "latent_shards"
    assert _encode(one_patch_shards, vae_export, out, "--patches_per_volume=3") == 0
    return out


def test_latent_samples_are_the_encoded_patches_the_pixel_loader_cuts(latent_dir, one_patch_shards, vae_export):
    manifest = read_latent_manifest(latent_dir)
    assert manifest["status"] == "complete" and manifest["vae_sha256"] == vae_hash(vae_export)
    assert manifest["settings"]["patch_size"] == 16 and manifest["settings"]["depth_thick"] == 6
    pixel = {s["__key__"]: s for s in iter_samples(manifest_shards(one_patch_shards, "train"))}
    assert manifest["totals"] == {"samples": len(pixel), "patches": 3 * len(pixel), "skipped": 0,
                                  "bytes": sum(e["bytes"] for e in manifest["shards"])}
    cfg = load_config(TINY, ONE_PATCH)
    vae = load_export(vae_export).vae
    from ctld.baselines import SlabFilter

    spec = ResidualSpec(prior=cfg.diffusion.prior, factor=5, residual_scale=1.0, strength=cfg.diffusion.strength,
                        num_train_timesteps=1000, slab_filter=SlabFilter.from_json(manifest["slab_filter"]))
    seen = 0
    for url in latent_shard_urls(latent_dir):
        for raw in iter_raw_samples(url):
            sample = decode_latent_sample(raw)
            source = pixel[sample["__key__"]]
            assert sample["meta"]["thick_source"] == source["meta"]["thick_source"]
            pairs = sample_patch_pairs(source["thick"], source["thin"], factor=5, offset=source["offset"],
                                       rng=np.random.default_rng(0), depth_thick=6, patch_size=16, count=3)
            thick = torch.from_numpy(hu_to_model(np.stack([p[0] for p in pairs]), -1024, 2048)).unsqueeze(1)
            thin = torch.from_numpy(hu_to_model(np.stack([p[1] for p in pairs]), -1024, 2048)).unsqueeze(1)
            target, prior = encode_pair(vae, spec, thick, thin)
            assert sample["z_thin"].shape == (3, 4, 30, 8, 8)
            torch.testing.assert_close(torch.from_numpy(sample["z_thin"].copy()), target, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(sample["z_prior"].copy()), prior, rtol=1e-5, atol=1e-5)
            seen += 1
    assert seen == len(pixel)


def test_augmented_patches_of_larger_volumes_are_the_seeded_crops_and_symmetries(built_shards, vae_export, tmp_path):
    """Volumes larger than a patch with data.augment on: each latent patch is the encoding of the crop and in-plane
    symmetry that `sample_patch_pairs` draws from the generator seeded by (--seed, key)."""
    out = tmp_path / "augmented"
    assert build_shards.main(["encode", str(built_shards), "--vae", str(vae_export), "--out", str(out), "--config",
                              TINY, "--log_level=ERROR", "--patches_per_volume=4", "--seed=7"]) == 0
    cfg = load_config(TINY)
    assert cfg.data.augment and cfg.data.patch_size < 32
    manifest = read_latent_manifest(out)
    from ctld.baselines import SlabFilter

    spec = ResidualSpec(prior=cfg.diffusion.prior, factor=5, residual_scale=1.0, strength=cfg.diffusion.strength,
                        num_train_timesteps=1000, slab_filter=SlabFilter.from_json(manifest["slab_filter"]))
    vae = load_export(vae_export).vae
    pixel = {s["__key__"]: s for s in iter_samples(manifest_shards(built_shards, "train"))}
    latent = [decode_latent_sample(r) for u in latent_shard_urls(out) for r in iter_raw_samples(u)]
    assert {s["__key__"] for s in latent} == set(pixel)
    distinct_crops = set()
    for sample in latent:
        source = pixel[sample["__key__"]]
        pairs = sample_patch_pairs(source["thick"], source["thin"], factor=5, offset=source["offset"],
                                   rng=encode_latents.patch_rng(7, sample["__key__"]), depth_thick=2, patch_size=16,
                                   count=4, augment=True)
        distinct_crops |= {(sample["__key__"], origin) for *_, origin in pairs}
        thick = torch.from_numpy(hu_to_model(np.stack([p[0] for p in pairs]), -1024, 2048)).unsqueeze(1)
        thin = torch.from_numpy(hu_to_model(np.stack([p[1] for p in pairs]), -1024, 2048)).unsqueeze(1)
        target, prior = encode_pair(vae, spec, thick, thin)
        torch.testing.assert_close(torch.from_numpy(sample["z_thin"].copy()), target, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(sample["z_prior"].copy()), prior, rtol=1e-5, atol=1e-5)
    assert len(distinct_crops) > len(latent), "the crops must vary within a volume"


def test_latent_loader_batches_and_splits_shards_over_ranks(latent_dir):
    cfg = load_config(TINY, ONE_PATCH)
    urls = latent_shard_urls(latent_dir)
    keys = []
    for rank in range(2):
        loader = make_patch_loader(urls, cfg.data, rank=rank, world_size=2, seed=0, resampled=False, latent=True)
        batches = list(loader)
        assert batches and all(b["z_thin"].shape[1:] == (4, 30, 8, 8) for b in batches)
        assert all(b["z_thin"].dtype == torch.float32 and b["z_prior"].shape == b["z_thin"].shape for b in batches)
        keys.append({key for b in batches for key in b["key"]})
    assert keys[0] and keys[1] and not keys[0] & keys[1], "ranks must read disjoint shards"


def test_float16_latents_are_the_float32_ones_rounded(latent_dir, one_patch_shards, vae_export, tmp_path):
    assert _encode(one_patch_shards, vae_export, tmp_path / "half", "--patches_per_volume=3", "--dtype=float16") == 0
    full = [decode_latent_sample(r) for u in latent_shard_urls(latent_dir) for r in iter_raw_samples(u)]
    half = [decode_latent_sample(r) for u in latent_shard_urls(tmp_path / "half") for r in iter_raw_samples(u)]
    assert [s["__key__"] for s in full] == [s["__key__"] for s in half]
    for a, b in zip(full, half, strict=True):
        assert b["z_thin"].dtype == np.float16
        np.testing.assert_array_equal(a["z_thin"].astype(np.float16), b["z_thin"])


def test_an_interrupted_encode_resumes_to_the_same_shards(latent_dir, one_patch_shards, vae_export, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "resumed"
    real_encode_shard, calls = encode_latents._encode_shard, []

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_encode_shard(*args, **kwargs)

    monkeypatch.setattr(encode_latents, "_encode_shard", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _encode(one_patch_shards, vae_export, out, "--patches_per_volume=3")
    partial = read_latent_manifest(out)
    assert partial["status"] == "incomplete" and len(partial["shards"]) == 1
    with pytest.raises(ValueError, match="unfinished encode"):
        latent_shard_urls(out)
    monkeypatch.setattr(encode_latents, "_encode_shard", real_encode_shard)
    assert _encode(one_patch_shards, vae_export, out, "--patches_per_volume=3") == 0
    resumed = read_latent_manifest(out)
    assert [(e["name"], e["sha256"]) for e in resumed["shards"]] == [
        (e["name"], e["sha256"]) for e in read_latent_manifest(latent_dir)["shards"]]
    assert not list(out.glob(".tmp-*")), "a temporary shard was left behind"


def test_encode_refuses_another_encode_in_its_output_and_bad_arguments(latent_dir, one_patch_shards, vae_export,
                                                                       tmp_path, capsys):
    assert _encode(one_patch_shards, vae_export, latent_dir, "--patches_per_volume=4") == 2
    assert "with another VAE or settings; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert _encode(one_patch_shards, vae_export, tmp_path / "busy", "--overwrite") == 2
    assert "is not empty and holds no latent manifest; choose another --out" in capsys.readouterr().err
    assert _encode(tmp_path / "nothing", vae_export, tmp_path / "x") == 2
    assert "no shard manifest" in capsys.readouterr().err
    # The pixel shards are never an output, not even with --overwrite.
    pixel_tars = sorted(one_patch_shards.glob("*.tar"))
    assert _encode(one_patch_shards, vae_export, one_patch_shards, "--overwrite") == 2
    assert "is the pixel shard folder" in capsys.readouterr().err
    copy = tmp_path / "pixel_copy"
    shutil.copytree(one_patch_shards, copy)
    assert _encode(one_patch_shards, vae_export, copy, "--overwrite") == 2
    assert "not a latent encode's" in capsys.readouterr().err
    assert sorted(one_patch_shards.glob("*.tar")) == pixel_tars and len(list(copy.glob("*.tar"))) == len(pixel_tars)


def test_overwrite_replaces_only_what_the_earlier_encode_wrote(one_patch_shards, vae_export, tmp_path):
    out = tmp_path / "latent"
    assert _encode(one_patch_shards, vae_export, out, "--patches_per_volume=1") == 0
    (out / "notes.txt").write_text("mine")
    assert _encode(one_patch_shards, vae_export, out, "--patches_per_volume=2", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    manifest = read_latent_manifest(out)
    assert manifest["settings"]["patches_per_volume"] == 2 and manifest["totals"]["patches"] == 2 * 5


@pytest.mark.parametrize("change, message", [
    ("vae", "encoded with the VAE export"),
    ("shards", "encoded from other pixel shards than data.shards_dir"),
    ("--diffusion.slab_taps=3", "encoded with slab_taps=5 but diffusion.slab_taps=3"),
    ("--data.augment=true", "encoded with augment=False but data.augment=True"),
    ("--data.patch_size=8", "encoded with patch_size=16 but data.patch_size=8"),
    ("--diffusion.prior=latent_cubic", "encoded with prior='encode_cubic' but diffusion.prior='latent_cubic'"),
])
def test_the_trainer_refuses_latent_shards_of_another_vae_or_config(latent_dir, one_patch_shards, vae_export,
                                                                    tmp_path, capsys, change, message):
    from ctld.train import main

    vae = _vae_export(tmp_path / "other_vae", seed=1) if change == "vae" else vae_export
    shards = one_patch_shards
    if change == "shards":  # another build of the shards: its manifest differs
        shards = tmp_path / "rebuilt"
        shutil.copytree(one_patch_shards, shards)
        manifest = json.loads((shards / "manifest.json").read_text())
        manifest["rebuilt"] = True
        (shards / "manifest.json").write_text(json.dumps(manifest))
    argv = [TINY, *ONE_PATCH, f"--data.shards_dir={shards}", f"--data.latent_shards_dir={latent_dir}",
            "--train.stage=diffusion", f"--train.vae_export={vae}", f"--train.output_dir={tmp_path}"]
    if change.startswith("--"):
        argv.append(change)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_two_process_training_on_latent_shards_follows_the_pixel_run(latent_dir, one_patch_shards, vae_export,
                                                                     tmp_path):
    """Same seed, same shards: the stream draws the same volumes in the same order, and each volume's one patch is
    the one the latent shard holds, so the loss curves of the two runs agree step by step."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    losses = {}
    for kind in ("pixel", "latent"):
        overrides = [*ONE_PATCH, f"--data.shards_dir={one_patch_shards}", "--train.stage=diffusion",
                     f"--train.vae_export={vae_export}", f"--train.output_dir={tmp_path}", f"--train.run_name={kind}",
                     "--train.max_steps=5", "--train.val_every=100", "--train.image_every=100",
                     "--train.checkpoint_every=100"]
        if kind == "latent":
            overrides.append(f"--data.latent_shards_dir={latent_dir}")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_ddp.yaml",
               "ctld/train.py", TINY, *overrides]
        log = tmp_path / f"{kind}.log"
        with open(log, "w") as out:
            code = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
        assert code.returncode == 0, log.read_text()[-4000:]
        run_dir = tmp_path / kind
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["_run"]["world_size"] == 2
        events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        losses[kind] = [e.value for e in events.Scalars("train/loss")]
        assert (run_dir / "export" / "unet.safetensors").is_file()
    assert len(losses["pixel"]) == 5
    np.testing.assert_allclose(losses["latent"], losses["pixel"], rtol=1e-4)
    pixel_meta = json.loads((tmp_path / "pixel" / "export" / "ctld.json").read_text())
    latent_meta = json.loads((tmp_path / "latent" / "export" / "ctld.json").read_text())
    assert latent_meta["slab_filter"] == pixel_meta["slab_filter"]
    np.testing.assert_allclose(latent_meta["residual"]["residual_scale"], pixel_meta["residual"]["residual_scale"],
                               rtol=1e-5)


def test_a_damaged_pixel_shard_keeps_its_complete_samples_and_the_encode_goes_on(one_patch_shards, vae_export,
                                                                                   tmp_path, caplog):
    shards = tmp_path / "shards"
    shutil.copytree(one_patch_shards, shards)
    damaged = shards / "train-000000.tar"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size * 2 // 3])  # the second sample cut off
    with caplog.at_level("WARNING"):
        assert _encode(shards, vae_export, tmp_path / "latent", "--patches_per_volume=1") == 0
    assert "train-000000.tar is damaged after 1 samples" in caplog.text
    manifest = read_latent_manifest(tmp_path / "latent")
    counts = {entry["name"]: entry["samples"] for entry in manifest["shards"]}
    assert counts["train-000000.tar"] == 1 and manifest["status"] == "complete"
    assert sum(counts.values()) == manifest["totals"]["samples"] == 4


def test_a_small_volume_encode_names_the_setting_to_change_and_works_with_it(make_shards, vae_export, tmp_path,
                                                                             capsys):
    """Issue 24: configs/tiny.yaml's own shard size (4 thick slices) cannot fit the default 5-tap slab filter. The
    encode says which setting fits (--diffusion.slab_taps=3), and takes it as a `--section.key=value` override."""
    from ctld.data.nifti import write_nifti
    from ctld.data.volume import Volume

    source = tmp_path / "nifti"
    source.mkdir()
    for index in range(3):
        write_nifti(Volume(synthetic_ct(20, 16, index), (1.0, 0.7, 0.7), (0.0, 0.0, 0.0), np.eye(3)),
                    source / f"small{index}.nii.gz")
    shards = make_shards("--shards.val_fraction=0", "--shards.test_fraction=0", sources=[source])
    argv = ["encode", str(shards), "--vae", str(vae_export), "--config", TINY, "--log_level=ERROR",
            "--patches_per_volume=1"]
    assert build_shards.main([*argv, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at most 4 thick slices" in err and "--diffusion.slab_taps=3" in err, err
    assert build_shards.main([*argv, "--out", str(tmp_path / "b"), "--diffusion.slab_taps=3"]) == 0
    assert read_latent_manifest(tmp_path / "b")["slab_filter"]["taps"] == 3
    # An override the config does not have is one line and exit code 2, as in the trainer.
    assert build_shards.main([*argv, "--out", str(tmp_path / "c"), "--diffusion.slab_tapz=3"]) == 2
    assert "slab_tapz" in capsys.readouterr().err


# ------------------------------------------------------------------------------ many processes (issue 25)


def _comparable(manifest: dict) -> list[tuple]:
    """A latent manifest's shard entries without what depends on who encoded them and how fast."""
    return [(e["name"], e["split"], e["samples"], e["patches"], e["skipped"], e["bytes"], e["sha256"])
            for e in manifest["shards"]]


def test_two_process_encode_writes_the_bytes_of_one_process(latent_dir, one_patch_shards, vae_export, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each encodes every other shard; the latent shards and the
    manifest's entries equal the one-process encode's byte for byte."""
    out = tmp_path / "latent2"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "-m", "ctld.data.build_shards", "encode",
           str(one_patch_shards), "--vae", str(vae_export), "--out", str(out), "--config", TINY, "--log_level=INFO",
           *ONE_PATCH, "--patches_per_volume=3"]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    two, one = read_latent_manifest(out), read_latent_manifest(latent_dir)
    assert len(one["shards"]) >= 2 and two["status"] == "complete"
    # The world size it got (`--cpu --num_processes 2` would silently run one process): both shares encoded.
    assert sorted({entry["share"] for entry in two["shards"]}) == ["0/2", "1/2"]
    assert _comparable(two) == _comparable(one) and two["totals"] == one["totals"]
    assert two["slab_filter"] == one["slab_filter"] and two["settings"] == one["settings"]
    for entry in one["shards"]:
        assert (out / entry["name"]).read_bytes() == (latent_dir / entry["name"]).read_bytes(), entry["name"]
    assert not list(out.rglob(".tmp-*"))


def test_partitioned_encode_of_merged_partitions_completes_with_the_last_share(one_patch_nifti, vae_export,
                                                                             tmp_path):
    """Pixel shards built as 2 partitions and merged (names `part-000I-of-0002/...`), encoded as --partition 0/2
    and 1/2 started apart: the first leaves the manifest incomplete, the second completes it, and the latent shards
    equal a one-process encode of the same folder."""
    pixel = tmp_path / "pixel"
    for index in range(2):
        assert build_shards.main(["build", str(one_patch_nifti), "--out", str(pixel), "--partition", f"{index}/2",
                                  f"--shards.salt={SHARDS_SALT}", "--shards.num_workers=1", "--log_level=ERROR",
                                  *ONE_PATCH_SHARDS]) == 0
    assert build_shards.main(["merge", str(pixel)]) == 0
    whole = tmp_path / "whole"
    assert _encode(pixel, vae_export, whole, "--patches_per_volume=2", "--splits=train,val") == 0
    out = tmp_path / "shared"
    assert _encode(pixel, vae_export, out, "--patches_per_volume=2", "--splits=train,val", "--partition=1/2") == 0
    assert read_latent_manifest(out)["status"] == "incomplete"
    with pytest.raises(ValueError, match="unfinished encode"):
        latent_shard_urls(out)
    assert _encode(pixel, vae_export, out, "--patches_per_volume=2", "--splits=train,val", "--partition=0/2") == 0
    shared, one = read_latent_manifest(out), read_latent_manifest(whole)
    assert shared["status"] == "complete" and _comparable(shared) == _comparable(one)
    names = [entry["name"] for entry in one["shards"]]
    assert all(name.startswith("part-000") for name in names)
    for name in names:
        assert (out / name).read_bytes() == (whole / name).read_bytes()
    assert latent_shard_urls(out, "val") == [str(out / n) for n in names if "/val-" in n]
    assert _encode(pixel, vae_export, out, "--partition=0/2", "--overwrite") == 2  # partitions never delete

