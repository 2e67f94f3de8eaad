"""Streaming loader of aligned (thick, thin) patch pairs from WebDataset shards, one loader per rank.

    accelerator = Accelerator()
    urls = shard_urls(cfg.data, "train")  # ctld.data.shards
    loader = make_patch_loader(urls, cfg.data, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, seed=cfg.train.seed, epoch=step)
    batch = next(iter(loader))  # {"thick": (B, 1, 8, P, P), "thin": (B, 1, 40, P, P), "key": [...]}

Do NOT pass the loader through `accelerator.prepare`: it is already split by rank here, and prepare would
split it a second time: with float batches only half of the samples are ever seen, and gloo's broadcast of int16
batches fails.

The pipeline, per rank and DataLoader worker (one stage per line in `_PatchPipeline`):
shard URLs -> node split -> worker split -> read tar (bad shards warned and skipped) -> decode -> K aligned
patch pairs per volume (ctld/data/patches.py) -> shuffle patches -> batch (HU -> [-1, 1]). Tar members are
read with one `read` each (ctld/data/tar_reader.py), at page-cache speed, and volumes are decoded without a copy,
so one decode of a 150 MB volume is shared by its `patches_per_volume` patches.

Training streams (`resampled=True`) draw shards with replacement, independently on every rank and worker,
forever; each pass over the loader is cut to `ceil(samples_per_epoch / batch_size)` batches (`with_epoch`),
so every rank runs the same number of steps whatever its shards hold: uneven shard counts cannot hang DDP.
`resampled=False` reads each shard once, split disjointly over ranks and then workers (validation); ranks
may then yield different numbers of batches, so gather results after the loop, not per batch.

Randomness and resume: every random choice (shard draws, crops, flips, shuffle order) comes from a numpy
generator seeded with (seed, data.seed, rank, worker, epoch, pass, stage), where `pass` counts `iter()` calls on the
loader (resampled only; a validation loader yields the same patches every pass). Building the loader again
with the same arguments replays the same stream exactly. The trainer passes `epoch=<resume step>`, so a
resumed run draws a fresh stream, reproducible from (seed, step). Resume does NOT restore the position inside
the old stream (shuffle buffer, the shard being read, patches not yet consumed): with resampling the stream
has no position to restore, and a resumed run may see a patch it saw before the checkpoint. Changing the
number of ranks or workers changes the stream.

Bad input is counted per worker and logged as warnings naming the shard or sample: unreadable or truncated
shards (the samples before the damage are kept), samples that fail to decode, samples whose factor differs
from `data.factor`, and volumes smaller than a patch when `small_volume: skip` (padded volumes are counted
and logged at INFO). A worker fails with RuntimeError once more than `max_skipped_fraction` of its samples
were skipped, or once 8 shards in a row fail, instead of spinning forever on a broken dataset.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import numpy as np
import torch
import webdataset as wds

from ctld.config import DataConfig
from ctld.config_checks import check_data
from ctld.data.geometry import covered_pair
from ctld.data.latent_patches import collate_latents, sample_latent_patches
from ctld.data.latent_shards import decode_latent_sample
from ctld.data.patches import collate_patches, fits_patch, sample_patch_pairs_d
from ctld.data.shards import decode_sample
from ctld.data.tar_reader import iter_raw_samples

# Not accelerate's get_logger: this code also runs in DataLoader workers and without an Accelerator
# (benchmarks), and a damaged shard must be reported by whichever rank reads it, not only the main one.
logger = logging.getLogger(__name__)

# Fail a worker after this many shards in a row could not be read (every URL wrong, bucket unreachable).
MAX_CONSECUTIVE_BAD_SHARDS = 8
# Fail a worker whose pair-kind weights dropped this many samples in a row (the shards hold no weighted kind).
MAX_DROPPED_IN_A_ROW = 200
# Judge the skipped fraction only after this many samples, so one bad sample at the start is not fatal.
MIN_SAMPLES_BEFORE_FAILING = 20
# Warn for the first few events of each kind, then every 100th, so a large damaged set does not flood logs.
_WARN_FIRST = 5
_WARN_EVERY = 100
# Seed stage tags: each random stage gets its own generator, so adding draws in one leaves the others alone.
_STAGE_SHARDS, _STAGE_PATCHES, _STAGE_SHUFFLE, _STAGE_MIX = 1, 2, 3, 4


class _StreamState:
    """What the seeds and the counters of one stream depend on; copied into each worker when it starts."""

    def __init__(
        self, *, seed: int, data_seed: int, rank: int, world_size: int, epoch: int, max_skipped_fraction: float
    ):
        for name, value in (("seed", seed), ("data.seed", data_seed), ("rank", rank), ("epoch", epoch)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.seed, self.data_seed, self.rank, self.world_size, self.epoch = seed, data_seed, rank, world_size, epoch
        self.max_skipped_fraction = max_skipped_fraction
        self.pass_index = 0
        self.counts: Counter[str] = Counter()
        self.bad_shards_in_a_row = 0

    @staticmethod
    def worker() -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def rng(self, stage: int) -> np.random.Generator:
        worker, _ = self.worker()
        return np.random.default_rng([self.seed, self.data_seed, self.rank, worker, self.epoch, self.pass_index, stage])

    def where(self) -> str:
        worker, num_workers = self.worker()
        return f"rank {self.rank}/{self.world_size}, worker {worker}/{num_workers}"

    def count(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        """Count one event; log the first few of each kind, then every 100th, with the running totals."""
        self.counts[kind] += 1
        number = self.counts[kind]
        if number <= _WARN_FIRST or number % _WARN_EVERY == 0:
            logger.log(level, "%s (%s; %s #%d; totals %s)", message, self.where(), kind, number, dict(self.counts))

    def check_skipped(self) -> None:
        seen = self.counts["volumes"]
        skipped = sum(self.counts[kind] for kind in ("bad_sample", "factor_mismatch", "too_small"))
        if seen >= MIN_SAMPLES_BEFORE_FAILING and skipped > self.max_skipped_fraction * seen:
            raise RuntimeError(
                f"{self.where()} skipped {skipped} of {seen} samples ({dict(self.counts)}), more than "
                f"data.max_skipped_fraction={self.max_skipped_fraction}: check data.factor against the shards' "
                "factor, data.small_volume, and the warnings above"
            )


class _ShardSource:
    """First stage: {"url": ...} dicts, drawn with replacement forever (resampled) or the list once."""

    def __init__(self, urls: list[str], state: _StreamState, resampled: bool):
        self.urls, self.state, self.resampled = urls, state, resampled

    def __call__(self):
        self.state.counts.clear()
        self.state.bad_shards_in_a_row = 0
        if not self.resampled:
            for url in self.urls:
                yield {"url": url}
            return
        rng = self.state.rng(_STAGE_SHARDS)
        while True:
            yield {"url": self.urls[int(rng.integers(len(self.urls)))]}


class _SplitByRank:
    """Node split from the rank and world size the trainer passes, not from RANK/WORLD_SIZE env variables
    (webdataset's split_by_node reads those, and in a PyTorchJob pod they count nodes, not processes)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src):
        for index, shard in enumerate(src):
            if index % self.world_size == self.rank:
                yield shard


class _ReadShards:
    """Tar shards -> raw samples. A shard that fails to open or read (truncated, corrupt, pipe: command that
    exits non-zero) is reported with its URL and skipped; the complete samples before the damage are kept."""

    def __init__(self, state: _StreamState):
        self.state = state

    def __call__(self, src):
        state = self.state
        for shard in src:
            url = shard["url"]
            yielded = 0
            try:
                # Closing the stream at the end checks a pipe: command's exit status; a consumer that stops
                # mid-shard (end of a pass) closes it when this generator is closed.
                for sample in iter_raw_samples(url):
                    yielded += 1
                    yield sample
            except Exception as exn:  # noqa: BLE001 - any read failure of one shard is reported, not fatal
                state.bad_shards_in_a_row += 1
                state.count("bad_shard", f"skipping the rest of shard {url} after {yielded} samples: {exn!r}")
                if state.bad_shards_in_a_row >= MAX_CONSECUTIVE_BAD_SHARDS:
                    raise RuntimeError(
                        f"{state.where()}: {state.bad_shards_in_a_row} shards in a row failed to read, the last "
                        f"{url}: {exn!r}. Check data.train_urls / data.shards_dir and the storage"
                    ) from exn
            else:
                state.bad_shards_in_a_row = 0


class _DecodePairs:
    """Raw samples -> decoded pairs of the configured factor; bad samples and other factors counted, skipped; pair
    kinds kept in the configured shares (data.weight_*)."""

    def __init__(self, state: _StreamState, factor: int, weights: dict[str, float], decode=decode_sample):
        self.state, self.factor, self.decode = state, factor, decode
        top = max(weights.values())
        self.keep = {kind: weight / top for kind, weight in weights.items()}

    def __call__(self, src):
        state = self.state
        # Its own generator: with equal weights nothing is drawn and the other stages' streams are unchanged.
        rng = state.rng(_STAGE_MIX)
        dropped_in_a_row = 0
        for raw in src:
            state.counts["volumes"] += 1
            where = f"sample {raw.get('__key__')!r} in shard {raw.get('__url__')}"
            try:
                sample = self.decode(raw)
            except Exception as exn:  # noqa: BLE001 - undecodable bytes come in many exception types
                state.count("bad_sample", f"skipping {where}: {exn}")
                state.check_skipped()
                continue
            if sample["factor"] != self.factor:
                state.count(
                    "factor_mismatch",
                    f"skipping {where}: factor {sample['factor']} != data.factor {self.factor}",
                )
                state.check_skipped()
                continue
            kind = sample["meta"].get("thick_source", "real")
            keep = self.keep.get(kind, 1.0)
            if keep < 1.0 and rng.random() >= keep:
                state.counts[f"share_{kind}_dropped"] += 1
                dropped_in_a_row += 1
                if dropped_in_a_row >= MAX_DROPPED_IN_A_ROW:
                    raise RuntimeError(
                        f"{state.where()}: the last {dropped_in_a_row} samples were all dropped by the pair-kind "
                        f"weights (data.weight_real/simulated/inplane = {self.keep}); these shards hold kinds whose "
                        f"weight is 0 or tiny. Raise the weight of a kind the shards hold (e.g. data.weight_{kind})"
                    )
                continue
            dropped_in_a_row = 0
            yield sample


class _SamplePatches:
    """Decoded pair -> K aligned patch pairs (ctld/data/patches.py); small volumes padded or skipped, counted."""

    def __init__(self, state: _StreamState, data_cfg: DataConfig):
        self.state, self.cfg = state, data_cfg

    def __call__(self, src):
        state, cfg = self.state, self.cfg
        rng = state.rng(_STAGE_PATCHES)
        for sample in src:
            shape = sample["thick"].shape
            covered, _ = covered_pair(sample["thick"], sample["thin"], factor=sample["factor"], offset=sample["offset"])
            small = not fits_patch(covered.shape, depth_thick=cfg.depth_thick, patch_size=cfg.patch_size)
            patches = sample_patch_pairs_d(
                sample,
                rng=rng,
                depth_thick=cfg.depth_thick,
                patch_size=cfg.patch_size,
                count=cfg.patches_per_volume,
                augment=cfg.augment,
                min_foreground_fraction=cfg.min_foreground_fraction,
                small_volume=cfg.small_volume,
            )
            where = f"sample {sample['__key__']!r} in shard {sample['__url__']}"
            if patches is None:
                why = (
                    "no thick slice has its whole thin slab"
                    if covered.shape[0] == 0
                    else f"holds no whole {cfg.depth_thick}x{cfg.patch_size}x{cfg.patch_size} patch "
                    f"(data.small_volume={cfg.small_volume})"
                )
                state.count(
                    "too_small",
                    f"skipping {where}: thick {shape} / thin {sample['thin'].shape} (offset {sample['offset']}) {why}",
                )
                state.check_skipped()
                continue
            if small:
                state.count(
                    "padded", f"padding {where} (covered thick {covered.shape}) with air to a whole patch", logging.INFO
                )
            yield from patches


class _SampleLatentPatches:
    """Decoded latent sample -> K of its encoded patch pairs (ctld/data/latent_patches.py)."""

    def __init__(self, state: _StreamState, count: int):
        self.state, self.count = state, count

    def __call__(self, src):
        rng = self.state.rng(_STAGE_PATCHES)
        for sample in src:
            patches = sample_latent_patches(sample, rng=rng, count=self.count)
            if not patches:
                self.state.count("too_small", f"skipping sample {sample['__key__']!r} in shard {sample['__url__']}: "
                                              "it holds no encoded patch")
                self.state.check_skipped()
            yield from patches


class _ShufflePatches:
    """Shuffle buffer of patch pairs, so the K patches of one volume spread over several batches."""

    def __init__(self, state: _StreamState, size: int):
        self.state, self.size = state, size

    def __call__(self, src):
        if self.size < 2:
            yield from src
            return
        rng = self.state.rng(_STAGE_SHUFFLE)
        buffer: list[dict] = []
        for item in src:
            buffer.append(item)
            if len(buffer) >= self.size:
                index = int(rng.integers(len(buffer)))
                buffer[index], buffer[-1] = buffer[-1], buffer[index]
                yield buffer.pop()
        order = rng.permutation(len(buffer))
        yield from (buffer[i] for i in order)


class _Collate:
    def __init__(self, hu_min: float, hu_max: float):
        self.hu_min, self.hu_max = hu_min, hu_max

    def __call__(self, patches: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_patches(patches, hu_min=self.hu_min, hu_max=self.hu_max)


class _PatchPipeline(wds.DataPipeline):
    """The per-worker stream of batches; `state.pass_index` is read when a worker starts."""

    def __init__(
        self,
        urls: list[str],
        data_cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        seed: int,
        resampled: bool,
        epoch: int,
        latent: bool = False,
    ):
        self.state = _StreamState(
            seed=seed,
            data_seed=data_cfg.seed,
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            max_skipped_fraction=data_cfg.max_skipped_fraction,
        )
        super().__init__(
            _ShardSource(urls, self.state, resampled),  # shard URLs: drawn with replacement, or the list once
            None if resampled else _SplitByRank(rank, world_size),  # node split (resampled: every rank draws)
            None if resampled else wds.split_by_worker,  # worker split (resampled: every worker draws its own)
            _ReadShards(self.state),  # tar -> raw samples; unreadable/truncated shards warned and skipped
            _DecodePairs(self.state, data_cfg.factor, {  # npy/json -> arrays; bad samples skipped; pair-kind shares
                "real": data_cfg.weight_real,
                "simulated": data_cfg.weight_simulated,
                "inplane": data_cfg.weight_inplane,
            }, decode_latent_sample if latent else decode_sample),
            # K aligned patch pairs per volume, cropped/padded/augmented (latent shards: K of the encoded ones)
            _SampleLatentPatches(self.state, data_cfg.patches_per_volume) if latent else _SamplePatches(
                self.state, data_cfg),
            _ShufflePatches(self.state, data_cfg.shuffle_buffer),  # mix patches of different volumes
            wds.batched(  # batch: stack (pixels: and map HU -> [-1, 1])
                data_cfg.batch_size, partial=not resampled,
                collation_fn=collate_latents if latent else _Collate(data_cfg.hu_min, data_cfg.hu_max),
            ),
        )


class PatchLoader(wds.WebLoader):
    """A WebLoader that starts each pass of a resampled stream with a new seed (see the module docstring)."""

    def __init__(self, dataset: _PatchPipeline, *, resampled: bool, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.patch_pipeline, self.resampled, self.passes_started = dataset, resampled, 0

    def __iter__(self):
        # Set before the DataLoader starts its workers, which copy the pipeline (and this index) when they start.
        if self.resampled:
            self.patch_pipeline.state.pass_index = self.passes_started
        self.passes_started += 1
        return super().__iter__()


def make_patch_loader(
    urls: list[str] | str,
    data_cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    seed: int,
    resampled: bool = True,
    num_workers: int | None = None,
    epoch: int = 0,
    latent: bool = False,
) -> PatchLoader:
    """Loader of aligned patch-pair batches for one rank; do not pass it through `accelerator.prepare`.

    Args:
        urls: shard URLs (`shard_urls(cfg.data, split)`), or one pattern string (`train-{000000..000009}.tar`).
        data_cfg: `cfg.data` (patch geometry, factor, intensities, batch size, workers, shuffle, augmentation).
        rank, world_size: `accelerator.process_index`, `accelerator.num_processes`.
        seed: base seed (`cfg.train.seed`); see the module docstring for what the stream depends on.
        resampled: True = infinite shard resampling cut into passes of equal length on every rank (training);
            False = each shard once, disjoint over ranks and workers (validation).
        num_workers: DataLoader workers for this rank; None = `data_cfg.num_workers`.
        epoch: folded into every seed; the trainer passes the resume step so a resumed run draws fresh data.
        latent: `urls` are latent shards (`ctld-shards encode`); batches are then {"z_thin", "z_prior", "key"},
            (B, C, depth_thick * factor, P/f, P/f) float32 latents, with the same rank/worker split and seeds.

    Returns:
        An iterable of {"thick": float32 (B, 1, depth_thick, P, P) in [-1, 1], "thin": float32
        (B, 1, depth_thick * factor, P, P), "key": list of B shard sample keys}. With `resampled=True` every
        pass yields exactly `ceil(samples_per_epoch / batch_size)` batches (`len(loader)`).
    """
    check_data(data_cfg)
    urls = list(wds.shardlists.expand_urls(urls)) if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("no shard URLs given; use shard_urls(cfg.data, split) or set --data.train_urls=...")
    num_workers = data_cfg.num_workers if num_workers is None else num_workers
    if not resampled:
        # Shards are split over ranks, then workers: a worker without a shard would only cost a process.
        rank_shards = len(range(rank, len(urls), world_size))
        num_workers = min(num_workers, rank_shards)
        if rank_shards == 0:
            logger.warning(
                "rank %d of %d gets none of the %d shards and yields no batches; write smaller shards "
                "(shards.shard_max_samples) so every rank gets some",
                rank,
                world_size,
                len(urls),
            )
    dataset = _PatchPipeline(
        urls, data_cfg, rank=rank, world_size=world_size, seed=seed, resampled=resampled, epoch=epoch, latent=latent
    )
    loader = PatchLoader(
        dataset,
        resampled=resampled,
        batch_size=None,  # batched inside the workers
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers must restart each pass to pick up the new pass seed
    )
    if resampled:
        num_batches = math.ceil(data_cfg.samples_per_epoch / data_cfg.batch_size)
        loader = loader.with_epoch(num_batches).with_length(num_batches, silent=True)
    return loader
