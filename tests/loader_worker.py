"""Run by tests/test_loader.py under a real 2-process `accelerate launch` (CPU, gloo):

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --main_process_port 29555 tests/loader_worker.py <shards_dir> <out_dir> configs/tiny.yaml [--key=value ...]

Each rank builds its own loader from the accelerator's process index and count (never `accelerator.prepare`)
and writes `<out_dir>/rank<r>.json` with what it saw: the sample keys of one non-resampled pass, and the
batch counts and keys of two passes of the resampled stream.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from ctld.config import load_config
from ctld.data.loader import make_patch_loader
from ctld.data.shards import shard_urls


def main(argv: list[str]) -> None:
    shards_dir, out_dir, config_path, *overrides = argv
    accelerator = Accelerator()
    cfg = load_config(config_path, [f"--data.shards_dir={shards_dir}", *overrides])
    urls = shard_urls(cfg.data, "train")
    rank, world_size = accelerator.process_index, accelerator.num_processes
    common = {"rank": rank, "world_size": world_size, "seed": cfg.train.seed}

    one_pass = make_patch_loader(urls, cfg.data, resampled=False, **common)
    pass_keys, pass_batches = [], 0
    for batch in one_pass:
        pass_batches += 1
        pass_keys += batch["key"]
        assert batch["thick"].shape[2] * cfg.data.factor == batch["thin"].shape[2]

    stream = make_patch_loader(urls, cfg.data, resampled=True, **common)
    resampled_batches, resampled_keys = [], []
    for _ in range(2):  # two passes: each must have the same length on every rank
        keys = [key for batch in stream for key in batch["key"]]
        resampled_batches.append(len(keys) // cfg.data.batch_size)
        resampled_keys.append(keys)

    report = {
        "rank": rank,
        "world_size": world_size,
        "num_workers": cfg.data.num_workers,
        "pass_keys": pass_keys,
        "pass_batches": pass_batches,
        "resampled_batches": resampled_batches,
        "resampled_keys": resampled_keys,
        "len": len(stream),
    }
    out = Path(out_dir) / f"rank{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
