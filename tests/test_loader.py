"""Streaming patch loader (ctld/data/loader.py) on real tar shards, in-process and under a 2-process
`accelerate launch` on CPU."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from ctld.data.loader import make_patch_loader
from ctld.data.patches import AIR_HU, DIHEDRAL, dihedral
from ctld.data.shards import shard_urls
from ctld.data.tar_reader import iter_tar_members
from ctld.data.transforms import hu_to_int16, model_to_hu, simulate_thick

FACTOR = 5
LOADER_LOG = "ctld.data.loader"


def make_pair(rng: np.random.Generator, key: str, thin_depth: int, size: int, *, offset: int = 0, factor: int = FACTOR):
    """A simulated pair in the shard format: thick slice k = rounded mean of thin [offset + k*f, offset + (k+1)*f)."""
    core = rng.integers(-1024, 2049, size=(thin_depth, size, size)).astype(np.int16)
    thin = np.concatenate([rng.integers(-1024, 2049, size=(offset, size, size)).astype(np.int16), core])
    thick = simulate_thick(core, factor)
    meta = {
        "format_version": 1,
        "case_id": key.split("_")[0],
        "series_id": key.split("_")[1],
        "split": "train",
        "factor": factor,
        "offset": offset,
        "thick_source": "simulated",
        "shape_thin": list(thin.shape),
        "shape_thick": list(thick.shape),
    }
    return {"__key__": key, "thin.npy": thin, "thick.npy": thick, "json": meta}


def write_shards(out_dir: Path, samples: list[dict], per_shard: int) -> list[str]:
    """Shards in the sample format of `ctld-shards build` (docs/DESIGN.md, Shard sample), written directly, for what
    the builder never writes: other factors, volumes smaller than a patch, many shards of noise volumes.
    Tests of the normal path use shards built by `ctld-shards build` (the `built_shards` / `make_shards` fixtures)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out_dir / "train-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    return [str(path) for path in sorted(out_dir.glob("train-*.tar"))]


def make_samples(count: int, seed: int = 0, **kwargs) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        make_pair(rng, f"{i:04x}case_{i:04x}series", int(rng.integers(12, 31)), int(rng.integers(16, 23)), **kwargs)
        for i in range(count)
    ]


@pytest.fixture
def data_cfg(tiny_cfg):
    return tiny_cfg.data  # depth_thick 2, patch 16, 2 patches per volume, batch 2, no workers


def to_hu(x: torch.Tensor, cfg) -> np.ndarray:
    return hu_to_int16(model_to_hu(x, cfg.hu_min, cfg.hu_max))


def locate(patch: np.ndarray, volume: np.ndarray, factor: int, symmetries: bool) -> tuple | None:
    """(k0, y0, x0, symmetry) such that `patch` is the window of `volume` at (k0 * factor, y0, x0) under that
    in-plane symmetry (only the identity when symmetries=False), or None."""
    depth, size = patch.shape[0], patch.shape[1]
    # Candidates from the first slice only (cheap), then the whole window is compared.
    first_slices = np.lib.stride_tricks.sliding_window_view(
        volume[: len(volume) - depth + 1 : factor], (size, size), axis=(1, 2)
    )
    for element in DIHEDRAL if symmetries else DIHEDRAL[:1]:
        # dihedral(window, e) == patch  <=>  window == dihedral(patch, e^-1): try every group element on the
        # patch, then recover the element that maps the window onto the patch.
        candidate = dihedral(patch, *element)
        for k0, y0, x0 in np.argwhere((first_slices == candidate[0]).all(axis=(-2, -1))):
            window = volume[k0 * factor : k0 * factor + depth, y0 : y0 + size, x0 : x0 + size]
            if np.array_equal(window, candidate):
                forward = next(e for e in DIHEDRAL if np.array_equal(dihedral(window, *e), patch))
                return int(k0), int(y0), int(x0), forward
    return None


def read_shards(paths: list[str]) -> dict[str, dict]:
    """Samples of tar shards read with tarfile + np.load (not with the code under test): key -> {ext: value}."""
    samples: dict[str, dict] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else np.load(io.BytesIO(data))
    return samples


@pytest.mark.parametrize("augment", [True, False])
def test_every_patch_is_aligned_with_its_source(built_shards, data_cfg, augment):
    """Shards from `ctld-shards build` (a real thick/thin pair with offset 2, simulated pairs): every patch
    is a slab-aligned window of its source, and its thick patch equals the slab means of its thin patch."""
    data_cfg.augment = augment
    urls = [str(p) for p in sorted(built_shards.glob("*.tar"))]
    sources = read_shards(urls)
    assert {s["json"]["offset"] for s in sources.values()} == {0, 2}  # both alignments are covered
    hu_range = (data_cfg.hu_min, data_cfg.hu_max)  # the model range clips the air noise below -1024 HU
    loader = make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=0)
    seen = set()
    for batch in loader:
        assert batch["thick"].dtype == torch.float32 and batch["thin"].dtype == torch.float32
        assert batch["thick"].shape == (2, 1, 2, 16, 16) and batch["thin"].shape == (2, 1, 10, 16, 16)
        assert batch["thick"].abs().max() <= 1 and batch["thin"].abs().max() <= 1
        for i, key in enumerate(batch["key"]):
            thick_hu, thin_hu = to_hu(batch["thick"][i, 0], data_cfg), to_hu(batch["thin"][i, 0], data_cfg)
            source = sources[key]
            thin_source = source["thin.npy"][source["json"]["offset"] :]  # thick k <-> these slices [5k, 5k + 5)
            found = locate(thin_hu, np.clip(thin_source, *hu_range), FACTOR, symmetries=augment)
            assert found is not None, f"thin patch of {key} is no slab-aligned window of its source"
            k0, y0, x0, symmetry = found
            # The thick patch comes from the same place, under the same symmetry.
            thick_window = source["thick.npy"][k0 : k0 + 2, y0 : y0 + 16, x0 : x0 + 16]
            np.testing.assert_array_equal(thick_hu, dihedral(np.clip(thick_window, *hu_range), *symmetry))
            if source["json"]["thick_source"] == "simulated":  # thick = slab means of thin, exactly, in HU
                thin_window = thin_source[k0 * FACTOR : (k0 + 2) * FACTOR, y0 : y0 + 16, x0 : x0 + 16]
                np.testing.assert_array_equal(
                    thick_hu, dihedral(np.clip(simulate_thick(thin_window, FACTOR), *hu_range), *symmetry)
                )
                unclipped = (thin_hu > data_cfg.hu_min).reshape(2, FACTOR, 16, 16).all(axis=1)
                np.testing.assert_array_equal(thick_hu[unclipped], simulate_thick(thin_hu, FACTOR)[unclipped])
            seen.add(key)
    assert len(loader) == data_cfg.samples_per_epoch // data_cfg.batch_size
    assert seen == set(sources)  # 64 patches from 4 volumes: every volume is drawn


def test_small_volumes_padded_or_skipped_and_counted(tmp_path, data_cfg, caplog):
    rng = np.random.default_rng(3)
    small = make_pair(rng, "aaaa_small", 8, 12)  # 1 thick slice, 12x12 < 2x16x16
    urls = write_shards(tmp_path, [small, *make_samples(2)], per_shard=3)
    data_cfg.augment = False
    with caplog.at_level(logging.INFO, logger=LOADER_LOG):
        batches = list(make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=0, resampled=False))
    padded = [batch["thick"][i, 0] for batch in batches for i, key in enumerate(batch["key"]) if key == "aaaa_small"]
    assert len(padded) == data_cfg.patches_per_volume
    for thick in padded:
        hu = to_hu(thick, data_cfg)
        assert (hu == AIR_HU).sum() >= hu.size - 12 * 12  # at most one 12x12 slice of real voxels
    assert "padding sample 'aaaa_small'" in caplog.text

    caplog.clear()
    data_cfg.small_volume = "skip"
    with caplog.at_level(logging.WARNING, logger=LOADER_LOG):
        batches = list(make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=0, resampled=False))
    keys = [key for batch in batches for key in batch["key"]]
    assert "aaaa_small" not in keys and len(keys) == 2 * data_cfg.patches_per_volume
    assert "skipping sample 'aaaa_small'" in caplog.text and "too_small #1" in caplog.text


def test_truncated_corrupt_and_missing_shards_are_reported_and_skipped(tmp_path, built_shards, data_cfg, caplog):
    originals = sorted(built_shards.glob("*.tar"))  # train-000000 (2 samples), train-000001, val-000000 (1 each)
    by_shard = [list(read_shards([str(path)])) for path in originals]
    urls = []
    for path in originals:
        shutil.copy(path, tmp_path / path.name)
        urls.append(str(tmp_path / path.name))
    damaged = Path(urls[0])
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size * 6 // 10])  # cut inside the 2nd sample
    garbage, missing = tmp_path / "garbage.tar", str(tmp_path / "train-000099.tar")
    garbage.write_bytes(np.random.default_rng(0).bytes(20_000))
    with caplog.at_level(logging.WARNING, logger=LOADER_LOG):
        loader = make_patch_loader(
            [*urls, str(garbage), missing], data_cfg, rank=0, world_size=1, seed=0, resampled=False
        )
        keys = {key for batch in loader for key in batch["key"]}
    assert keys == {by_shard[0][0], *by_shard[1], *by_shard[2]}  # the sample before the damage is kept
    assert f"skipping the rest of shard {damaged} after 1 samples" in caplog.text
    assert f"skipping the rest of shard {garbage} after 0 samples" in caplog.text
    assert f"skipping the rest of shard {missing} after 0 samples" in caplog.text
    # The resampled stream keeps going past the damaged shard too.
    stream = make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=0)
    assert sum(len(batch["key"]) for batch in stream) == data_cfg.samples_per_epoch


@pytest.mark.parametrize("form", ["pax", "gnu", "gzip"])
def test_tar_reader_matches_tarfile(tmp_path, form):
    """The loader's one-read-per-member tar reader yields what tarfile reads, for long names (pax and GNU
    headers) and gzip-compressed shards; a cut anywhere inside a member raises."""
    rng = np.random.default_rng(0)
    files = {f"{'d' * 120}_{i}.thin.npy": rng.bytes(int(rng.integers(0, 3000))) for i in range(3)}
    files["short.json"] = b"{}"
    path = tmp_path / ("shard.tar.gz" if form == "gzip" else "shard.tar")
    tar_format = tarfile.GNU_FORMAT if form == "gnu" else tarfile.PAX_FORMAT
    with tarfile.open(path, "w:gz" if form == "gzip" else "w", format=tar_format) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as stream:
        read = {m["fname"]: m["data"] for m in iter_tar_members(stream, str(path))}
    assert read == files
    if form != "gzip":
        cut = path.read_bytes()[: path.stat().st_size // 2]
        with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
            list(iter_tar_members(io.BytesIO(cut), "cut.tar"))


def test_other_factor_is_skipped_and_counted(tmp_path, data_cfg, caplog):
    other = make_samples(1, seed=5, factor=3)[0]
    other["__key__"] = "ffff_factor3"
    urls = write_shards(tmp_path, [other, *make_samples(3)], per_shard=4)
    with caplog.at_level(logging.WARNING, logger=LOADER_LOG):
        keys = [
            k
            for b in make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=0, resampled=False)
            for k in b["key"]
        ]
    assert "ffff_factor3" not in keys and len(set(keys)) == 3
    assert "skipping sample 'ffff_factor3'" in caplog.text and "factor 3 != data.factor 5" in caplog.text


def test_a_stream_of_only_skipped_samples_fails_instead_of_spinning(tmp_path, data_cfg):
    urls = write_shards(tmp_path, make_samples(3, factor=3), per_shard=3)
    with pytest.raises(RuntimeError, match="max_skipped_fraction"):
        next(iter(make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=0)))
    with pytest.raises(RuntimeError, match="shards in a row failed"):
        next(iter(make_patch_loader([str(tmp_path / "nope.tar")], data_cfg, rank=0, world_size=1, seed=0)))


def test_stream_is_reproducible_and_each_pass_epoch_rank_draws_anew(tmp_path, data_cfg):
    urls = write_shards(tmp_path, make_samples(6), per_shard=2)
    data_cfg.samples_per_epoch = 8

    def first_pass(loader):
        return torch.cat([batch["thin"] for batch in loader])

    loader = make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=7)
    pass0, pass1 = first_pass(loader), first_pass(loader)
    again = make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=7)
    assert torch.equal(first_pass(again), pass0) and torch.equal(first_pass(again), pass1)
    assert not torch.equal(pass0, pass1)
    resumed = make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=7, epoch=1000)
    assert not torch.equal(first_pass(resumed), pass0)
    other_rank = make_patch_loader(urls, data_cfg, rank=1, world_size=2, seed=7)
    assert not torch.equal(first_pass(other_rank), pass0)
    # Same stream with DataLoader workers: seeds depend on the worker index, not on process ids or time.
    workers = [first_pass(make_patch_loader(urls, data_cfg, rank=0, world_size=1, seed=7, num_workers=2)) for _ in "ab"]
    assert torch.equal(workers[0], workers[1])


def test_one_pass_is_split_disjointly_over_ranks_and_workers(tmp_path, data_cfg):
    samples = make_samples(10)
    urls = write_shards(tmp_path, samples, per_shard=2)  # 5 shards over 2 ranks x 2 workers
    per_rank = []
    for rank in (0, 1):
        loader = make_patch_loader(urls, data_cfg, rank=rank, world_size=2, seed=0, resampled=False, num_workers=2)
        keys = [key for batch in loader for key in batch["key"]]
        assert len(keys) == len(set(keys)) * data_cfg.patches_per_volume
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {s["__key__"] for s in samples}


def test_shard_urls_from_manifest_patterns_and_pipes(tmp_path, built_shards, data_cfg):
    data_cfg.shards_dir = str(built_shards)
    train = shard_urls(data_cfg, "train")
    assert train == [str(built_shards / "train-000000.tar"), str(built_shards / "train-000001.tar")]
    assert shard_urls(data_cfg, "val") == [str(built_shards / "val-000000.tar")]
    with pytest.raises(ValueError, match="no 'test' shards"):
        shard_urls(data_cfg, "test")
    data_cfg.factor = 3
    with pytest.raises(ValueError, match="built with factor 5 but data.factor is 3"):
        shard_urls(data_cfg, "train")
    data_cfg.factor = 5
    data_cfg.train_urls = str(built_shards / "train-{000000..000001}.tar")
    assert shard_urls(data_cfg, "train") == train
    data_cfg.train_urls = "pipe:cat " + str(built_shards / "train-{000000..000001}.tar")
    pipes = shard_urls(data_cfg, "train")
    assert pipes == [f"pipe:cat {url}" for url in train]
    loader = make_patch_loader(pipes, data_cfg, rank=0, world_size=1, seed=0, resampled=False)
    assert len({key for batch in loader for key in batch["key"]}) == 3  # read through the pipe: command
    data_cfg.train_urls, data_cfg.shards_dir = "", str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="ctld-shards build"):
        shard_urls(data_cfg, "train")
    copy = tmp_path / "copy"
    shutil.copytree(built_shards, copy)
    (copy / "train-000001.tar").unlink()
    data_cfg.shards_dir = str(copy)
    with pytest.raises(FileNotFoundError, match="train-000001.tar listed in .* is missing"):
        shard_urls(data_cfg, "train")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_accelerate_launch(tmp_path, repo_root, make_shards):
    """Real `accelerate launch` with 2 ranks x 2 workers on shards from `ctld-shards build` (4 shards of one
    sample): one pass is disjoint and complete over the ranks; resampled passes have equal length."""
    shards = make_shards("--shards.val_fraction=0", "--shards.test_fraction=0", "--shards.shard_max_samples=1")
    all_keys = set(read_shards([str(p) for p in shards.glob("*.tar")]))
    assert len(all_keys) == 4
    out = tmp_path / "out"
    out.mkdir()
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--main_process_port", str(free_port()),
        str(repo_root / "tests" / "loader_worker.py"), str(shards), str(out),
        str(repo_root / "configs" / "tiny.yaml"), "--data.num_workers=2", "--data.samples_per_epoch=12",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2] and [r["rank"] for r in reports] == [0, 1]
    assert [r["num_workers"] for r in reports] == [2, 2]
    pass_keys = [set(r["pass_keys"]) for r in reports]
    assert not pass_keys[0] & pass_keys[1]
    assert pass_keys[0] | pass_keys[1] == all_keys
    assert [len(r["pass_keys"]) for r in reports] == [4, 4]  # 2 volumes x 2 patches each, nothing twice
    for report in reports:
        assert report["resampled_batches"] == [6, 6] and report["len"] == 6
        assert report["resampled_keys"][0] != report["resampled_keys"][1]  # a new pass draws anew
    assert reports[0]["resampled_keys"][0] != reports[1]["resampled_keys"][0]  # ranks draw different streams


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("patch_size", 0, "data.patch_size must be >= 1"),
        ("hu_max", -2000.0, "data.hu_max"),
        ("small_volume", "crop", "data.small_volume"),
        ("min_foreground_fraction", 1.5, "data.min_foreground_fraction"),
    ],
)
def test_bad_settings_fail_up_front(data_cfg, name, value, match):
    setattr(data_cfg, name, value)
    with pytest.raises(ValueError, match=match):
        make_patch_loader(["train-000000.tar"], data_cfg, rank=0, world_size=1, seed=0)


def test_rank_outside_world_size_fails(data_cfg):
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        make_patch_loader(["train-000000.tar"], data_cfg, rank=2, world_size=2, seed=0)


def test_rank_without_a_shard_yields_nothing_and_says_so(tmp_path, data_cfg, caplog):
    urls = write_shards(tmp_path, make_samples(2), per_shard=2)  # one shard for two ranks
    with caplog.at_level(logging.WARNING, logger=LOADER_LOG):
        loader = make_patch_loader(urls, data_cfg, rank=1, world_size=2, seed=0, resampled=False, num_workers=2)
        assert list(loader) == []
    assert "rank 1 of 2 gets none of the 1 shards" in caplog.text


def test_train_seed_reaches_the_trainers_data_stream(built_shards, tiny_cfg):
    """The trainer's stream (TrainStream) is seeded by train.seed as well as data.seed: the same seeds replay the
    same batches, another train.seed draws other ones (the rank fields are all TrainStream reads of an Accelerator)."""
    import dataclasses
    from types import SimpleNamespace

    from ctld.data.train_stream import TrainStream

    def first_batch(train_seed: int) -> torch.Tensor:
        cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, shards_dir=str(built_shards)),
                                  train=dataclasses.replace(tiny_cfg.train, seed=train_seed))
        stream = TrainStream(shard_urls(cfg.data, "train"), cfg, SimpleNamespace(process_index=0, num_processes=1))
        stream.open(0)
        return stream.next(0)["thin"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_pair_kinds_are_mixed_in_the_configured_shares(tmp_path, data_cfg):
    """data.weight_*: with in-plane pairs weighted 1/4 of simulated ones, about a quarter as many in-plane patches
    reach the batches; with equal weights every sample is used (and nothing extra is drawn)."""
    import dataclasses

    samples = make_samples(8)
    for sample in samples[:4]:
        sample["json"] = {**sample["json"], "thick_source": "inplane", "inplane_axis": "y"}
    urls = write_shards(tmp_path, samples, per_shard=8)
    inplane_keys = {s["__key__"] for s in samples[:4]}

    def inplane_share(cfg) -> float:
        loader = make_patch_loader(urls, cfg, rank=0, world_size=1, seed=0, num_workers=0)
        keys = [key for batch in itertools.islice(loader, 200) for key in batch["key"]]
        return sum(key in inplane_keys for key in keys) / len(keys)

    cfg = dataclasses.replace(data_cfg, samples_per_epoch=400)
    assert 0.4 < inplane_share(cfg) < 0.6
    assert 0.1 < inplane_share(dataclasses.replace(cfg, weight_inplane=0.25)) < 0.3
    with pytest.raises(ValueError, match="weight"):
        make_patch_loader(urls, dataclasses.replace(cfg, weight_real=0, weight_simulated=0, weight_inplane=0), rank=0,
                          world_size=1, seed=0)


def test_weights_that_drop_every_sample_fail_instead_of_hanging(tmp_path, data_cfg):
    """Shards of simulated pairs only, with weight_simulated 0: a clear error, not a stream that never yields."""
    import dataclasses

    urls = write_shards(tmp_path, make_samples(4), per_shard=4)
    cfg = dataclasses.replace(data_cfg, weight_simulated=0.0)
    with pytest.raises(RuntimeError, match="dropped by the pair-kind weights"):
        next(iter(make_patch_loader(urls, cfg, rank=0, world_size=1, seed=0, num_workers=0)))
