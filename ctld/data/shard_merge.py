"""Partitioned builds: each partition's record (partition.json) and `ctld-shards merge`, which joins N complete
partitions into the one manifest.json the loader, `ctld-shards verify/inspect` and the latent encode read.

    ctld-shards build /data/raw --out /data/shards --partition 0/3      # ... 1/3, 2/3: any order, any machines
    ctld-shards merge /data/shards                                      # -> /data/shards/manifest.json

Layout: partition I of N writes `OUT/part-IIII-of-NNNN/` (its shards `train-000000.tar`..., `.plan.json`, `.done/`
and, once every shard is complete, `partition.json`); the merged manifest lists the shards by their path relative
to OUT (`part-0001-of-0003/train-000000.tar`), which `ctld.data.shards.manifest_shards` resolves like any name.
A partition's record holds its shard records (sample counts, bytes, sha256, per-sample geometry for the manifest's
statistics), the plan's counts (equal in every partition: each plans all inputs), the build settings, a hash of
every planned sample (`inputs_sha256`) and `salt_check` (ctld.data.salt), never the salt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ctld.data.salt import salt_check
from ctld.data.shard_plan import PARTITION, Builder, partition_dir
from ctld.data.shard_writer import atomic_json, manifest_doc, write_manifest
from ctld.data.shards import FORMAT_VERSION, MANIFEST

KIND = "partition"
_PART_DIR = re.compile(r"^part-(\d{4})-of-(\d{4})$")


def write_partition(build_dir: Path, builder: Builder, records: list[dict], plan_info: dict) -> None:
    """partition.json of a complete partition (atomic: it exists only whole, after every shard it lists)."""
    index, count = builder.partition
    atomic_json(build_dir / PARTITION, {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "index": index,
        "count": count,
        "salt_check": salt_check(builder.salt),
        "settings": builder.settings(),
        "inputs_sha256": builder.inputs_sha256,
        "plan": plan_info,
        "shards": records,
    })


def _read_partition(out_dir: Path, index: int, count: int) -> dict:
    """One complete partition's record; ValueError naming the partition, what is wrong and what to do."""
    name = f"partition {index}/{count}"
    folder = out_dir / partition_dir(index, count)
    rerun = f"run `ctld-shards build SRC... --out {out_dir} --partition {index}/{count}` (it resumes)"
    if not folder.is_dir():
        raise ValueError(f"{name} is missing (no {folder}): {rerun}")
    path = folder / PARTITION
    if not path.is_file():
        raise ValueError(f"{name} is incomplete (no {path}): {rerun}")
    try:
        doc = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{name} is damaged ({path} is not JSON: {error}): delete it and {rerun}") from None
    if not isinstance(doc, dict) or (doc.get("kind"), doc.get("index"), doc.get("count")) != (KIND, index, count):
        raise ValueError(f"{name} is damaged ({path} is not that partition's record): delete it and {rerun}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{name} is shard format {doc.get('format_version')!r}, this ctld writes {FORMAT_VERSION}: "
                         f"rebuild it with --overwrite")
    for record in doc["shards"]:
        shard = folder / record["name"]
        size = shard.stat().st_size if shard.is_file() else None
        if size != record["bytes"]:
            what = "missing" if size is None else f"{size} bytes, its record says {record['bytes']}"
            raise ValueError(f"{name} is damaged (shard {shard} {what}): {rerun}")
    return doc


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key} {b.get(key)!r} vs {a.get(key)!r}")
    return out


def merged_manifest(out_dir: Path) -> dict:
    """The manifest of the complete, matching partitions in `out_dir`; ValueError (one line) naming every missing,
    incomplete or damaged partition, or the first one built with other settings, salt or inputs."""
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} does not exist; build partitions into it with `ctld-shards build SRC... --out "
                         f"{out_dir} --partition I/N`")
    counts = sorted({int(m.group(2)) for p in out_dir.iterdir() if p.is_dir() and (m := _PART_DIR.match(p.name))})
    if not counts:
        raise ValueError(f"{out_dir} holds no partitions (part-IIII-of-NNNN folders); build them with `ctld-shards "
                         f"build SRC... --out {out_dir} --partition I/N` for I = 0..N-1")
    if len(counts) > 1:
        raise ValueError(f"{out_dir} holds partitions of {' and '.join(map(str, counts))}-way builds; delete the "
                         "part-*-of-* folders of the one you do not want")
    if list(out_dir.glob("*.tar")):
        raise ValueError(f"{out_dir} also holds shards of a whole (unpartitioned) build; merge partitions into a "
                         "folder of their own")
    (count,) = counts
    docs, problems = [], []
    for index in range(count):
        try:
            docs.append(_read_partition(out_dir, index, count))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("; ".join(problems))
    first = docs[0]
    for doc in docs[1:]:
        name = f"partition {doc['index']}/{count}"
        if doc["salt_check"] != first["salt_check"]:
            raise ValueError(f"{name} was built with another salt than partition 0/{count} (their salt checks "
                             "differ): rebuild it with the same shards.salt / $CTLD_SALT / salt file and --overwrite")
        if doc["settings"] != first["settings"]:
            diff = ", ".join(_differences(first["settings"], doc["settings"]))
            raise ValueError(f"{name} was built with other settings than partition 0/{count} ({diff}): rebuild it "
                             "with the same config and --overwrite")
        if doc["inputs_sha256"] != first["inputs_sha256"]:
            raise ValueError(f"{name} was planned from other inputs than partition 0/{count} (other files, or "
                             "files that changed): rebuild the partitions that differ from the same sources with "
                             "--overwrite")
    records = []
    for doc in docs:
        folder = partition_dir(doc["index"], count)
        records += [{**record, "name": f"{folder}/{record['name']}"} for record in doc["shards"]]
    # Shards in split order as a whole build lists them, partitions in order within a split.
    order = {"train": 0, "val": 1, "test": 2}
    records.sort(key=lambda r: order.get(r["split"], 3))
    manifest = manifest_doc(first["settings"], records, first["plan"])
    manifest["partitions"] = {"count": count, "inputs_sha256": first["inputs_sha256"]}
    return manifest


def merge(out_dir: Path) -> int:
    """`ctld-shards merge OUT`: write OUT/manifest.json from its partitions; 0, or 1 when more than
    shards.max_skipped_fraction of the series were skipped (the manifest is written then too, as by a whole build).
    Raises ValueError before writing anything when a partition is missing, incomplete, damaged or mismatched."""
    manifest = merged_manifest(out_dir)
    code = write_manifest(out_dir, manifest, float(manifest["settings"]["max_skipped_fraction"]))
    print(f"{out_dir / MANIFEST}: {manifest['partitions']['count']} partitions, {len(manifest['shards'])} shards, "
          f"{manifest['samples']} samples")
    return code
