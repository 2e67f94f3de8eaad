"""The shard format: what a sample holds, how it is encoded and decoded, and where the manifest says shards are.

    manifest = read_manifest("shards")                        # manifest.json written by `ctld-shards build`
    for sample in iter_samples(manifest_shards("shards", "test")):
        sample["thick"], sample["thin"], sample["factor"], sample["offset"], sample["meta"]

A sample (docs/DESIGN.md, Shard sample) is three tar members sharing a key: `thin.npy` and `thick.npy` (int16
(D, H, W) HU, .npy format 1.0/2.0) and `json` (geometry and provenance, `format_version`). Every reader of shards
goes through this module (the loader, the slab filter fit, `ctld-eval`, `ctld-shards verify`, the demo), so the
format changes in one place.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from ctld.config import DataConfig
from ctld.data.geometry import covered_pair
from ctld.data.tar_reader import iter_raw_samples

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLE_FILES = ("thin.npy", "thick.npy", "json")


def encode_sample(key: str, thin_hu: np.ndarray, thick_hu: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
    """A sample as webdataset's ShardWriter writes it: {"__key__", "thin.npy", "thick.npy", "json"} (bytes)."""
    return {
        "__key__": key,
        "thin.npy": npy_bytes(thin_hu.astype(np.int16, copy=False)),
        "thick.npy": npy_bytes(thick_hu.astype(np.int16, copy=False)),
        "json": json.dumps({**info, "format_version": FORMAT_VERSION}, sort_keys=True).encode(),
    }


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw sample (bytes per file) -> {"__key__", "__url__", "thick", "thin", "factor", "offset", "meta"}.

    Arrays are read-only views of the sample's bytes (no copy of a 150 MB volume). Raises ValueError naming
    what is missing or wrong.
    """
    missing = [name for name in SAMPLE_FILES if name not in raw]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)} (has {sorted(k for k in raw if not k.startswith('__'))})")
    meta = json.loads(raw["json"])
    try:
        factor, offset = int(meta["factor"]), int(meta["offset"])
    except (KeyError, TypeError, ValueError) as exn:
        raise ValueError(f"json needs integer 'factor' and 'offset' (format {FORMAT_VERSION}): {exn!r}") from exn
    thin, thick = npy_view(raw["thin.npy"], "thin.npy"), npy_view(raw["thick.npy"], "thick.npy")
    if thin.shape[1:] != thick.shape[1:]:
        raise ValueError(f"thin {thin.shape} and thick {thick.shape} differ in-plane")
    for name, array in (("thin", thin), ("thick", thick)):
        stated = meta.get(f"shape_{name}")
        if stated is not None and list(array.shape) != list(stated):
            raise ValueError(f"{name}.npy has shape {array.shape}, its json says {stated}")
    return {
        "__key__": raw["__key__"],
        "__url__": raw.get("__url__", ""),
        "thick": thick,
        "thin": thin,
        "factor": factor,
        "offset": offset,
        "meta": meta,
    }


def iter_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Decoded samples of `urls`, in order; a damaged shard or sample raises (the loader skips instead)."""
    for url in urls:
        for raw in iter_raw_samples(url):
            try:
                yield decode_sample(raw)
            except ValueError as error:
                raise ValueError(f"sample {raw.get('__key__')!r} in {url}: {error}") from error


def iter_covered_pairs(urls: list[str], factor: int, max_samples: int = 0):
    """(key, thick, thin) of each sample of `urls`, in order, cut to the thick slices whose whole thin slab exists
    (`covered_pair`: thin row k*factor + i is phase i of thick slice k). For whole-volume statistics such as the
    slab filter fit; a sample of another factor is an error (the shards do not fit the model), a damaged shard is
    warned about by name and the rest of it skipped (as the training stream does)."""
    seen = 0
    for url in urls:
        try:
            for sample in iter_samples([url]):
                if sample["factor"] != factor:
                    raise _FactorMismatch(f"sample {sample['__key__']!r} in {sample['__url__']} has factor "
                                          f"{sample['factor']}, the model {factor}")
                thick, thin = covered_pair(sample["thick"], sample["thin"], factor=factor, offset=sample["offset"])
                yield sample["__key__"], thick, thin
                seen += 1
                if max_samples and seen >= max_samples:
                    return
        except _FactorMismatch as error:
            raise ValueError(str(error)) from None
        except Exception as error:  # noqa: BLE001 - any read failure of one shard is reported, not fatal
            logger.warning("skipping the rest of shard %s: %r", url, error)


class _FactorMismatch(Exception):
    """A sample of another factor: an error of the whole shard set, not of one shard."""


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """The manifest of a `ctld-shards build` folder; FileNotFoundError / ValueError saying what to do."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no shard manifest at {path}: build shards with `ctld-shards build SRC... --out {shards_dir}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rebuild the shards with `ctld-shards build`") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path} has no 'shards' list; is it a manifest written by `ctld-shards build`?")
    return manifest


def manifest_shards(shards_dir: str | Path, split: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """Paths of the `split` shards a manifest lists (relative names resolved against `shards_dir`); a listed
    shard that is missing raises FileNotFoundError. An empty list when the split has no shards."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir) if manifest is None else manifest
    paths = []
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{shards_dir / MANIFEST}: shard entry {entry!r} has no 'name'; rebuild the shards")
        if entry.get("split") != split:
            continue
        path = Path(entry["name"]) if Path(entry["name"]).is_absolute() else shards_dir / entry["name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"shard {path} listed in {shards_dir / MANIFEST} is missing; copy the whole shard folder or rebuild it"
            )
        paths.append(str(path))
    return paths


def shard_urls(data_cfg: DataConfig, split: str) -> list[str]:
    """Shard URLs of one split: `data.train_urls` / `data.val_urls` when set, else `<shards_dir>/manifest.json`.

    Explicit URLs may be local paths, brace patterns (`/data/train-{000000..000099}.tar`), `pipe:` commands
    for object stores (`pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -`) or http(s) URLs; several
    patterns can be joined with `::`.
    """
    explicit = {"train": data_cfg.train_urls, "val": data_cfg.val_urls}.get(split, "")
    if explicit:
        urls = list(wds.shardlists.expand_urls(explicit))
        if not urls:
            raise ValueError(f"data.{split}_urls={explicit!r} expands to no shard URLs")
        return urls
    shards_dir = Path(data_cfg.shards_dir)
    if not (shards_dir / MANIFEST).is_file():
        raise FileNotFoundError(
            f"no shard manifest at {shards_dir / MANIFEST}: build shards with `ctld-shards build ... --out "
            f"{shards_dir}`, or set --data.shards_dir to that folder, or list shards with --data.{split}_urls=..."
        )
    manifest = read_manifest(shards_dir)
    if "factor" in manifest and manifest["factor"] != data_cfg.factor:
        raise ValueError(
            f"{shards_dir / MANIFEST} was built with factor {manifest['factor']} but data.factor is "
            f"{data_cfg.factor}: every sample would be skipped; pass --data.factor={manifest['factor']} or rebuild"
        )
    urls = manifest_shards(shards_dir, split, manifest)
    if not urls:
        raise ValueError(
            f"{shards_dir / MANIFEST} lists no '{split}' shards (too few patients for shards.val_fraction / "
            "test_fraction? `ctld-shards inspect` shows the split sizes)"
        )
    return urls


def extra_train_urls(data_cfg: DataConfig) -> list[str]:
    """The shard URLs of `data.extra_train_urls` (trained on beside the training split; [] when unset)."""
    if not data_cfg.extra_train_urls:
        return []
    urls = list(wds.shardlists.expand_urls(data_cfg.extra_train_urls))
    if not urls:
        raise ValueError(f"data.extra_train_urls={data_cfg.extra_train_urls!r} expands to no shard URLs")
    return urls


def manifest_training_grid(shards_dir: str | Path | dict) -> dict[str, float]:
    """What a model trained on these shards expects of its input: {"thin_spacing_mm": median thin slice spacing of
    the training split, "inplane_spacing_mm": the pixel spacing samples were resampled to (absent when kept as
    scanned)}; empty without a manifest. Takes a shards folder or a manifest."""
    if isinstance(shards_dir, dict):
        manifest = shards_dir
    else:
        try:
            manifest = read_manifest(shards_dir)
        except (FileNotFoundError, ValueError):
            return {}
    grid = {}
    train = manifest.get("splits", {}).get("train", {}).get("thin_spacing_z_mm") or {}
    median = train.get("median", manifest.get("geometry", {}).get("thin_spacing_z_mm", {}).get("median"))
    if median is not None:
        grid["thin_spacing_mm"] = float(median)
    inplane = float(manifest.get("settings", {}).get("inplane_spacing_mm", 0.0) or 0.0)
    if inplane > 0:
        grid["inplane_spacing_mm"] = inplane
    return grid


def training_manifest(data_cfg: DataConfig) -> dict[str, Any] | None:
    """The manifest of a run's training shards: shards_dir's; with data.train_urls, the manifests of the folders
    holding those shards, combined (`combine_manifests`: e.g. one build per hospital, or per patient as
    benchmarks/bench_real.py builds them). None when a URL is remote or a folder has no manifest."""
    if not data_cfg.train_urls:
        try:
            return read_manifest(data_cfg.shards_dir)
        except (FileNotFoundError, ValueError):
            return None
    folders: list[Path] = []
    for url in wds.shardlists.expand_urls(data_cfg.train_urls):
        if url.startswith("pipe:") or "://" in url:
            return None
        if Path(url).parent not in folders:
            folders.append(Path(url).parent)
    try:
        return combine_manifests([read_manifest(folder) for folder in folders])
    except (FileNotFoundError, ValueError):
        return None


def _combined_stats(stats: list[dict]) -> dict:
    stats = [s for s in stats if s]
    if not stats:
        return {}
    # The median of medians: exact ranges, an approximate centre.
    return {"min": min(s["min"] for s in stats), "median": float(np.median([s["median"] for s in stats])),
            "max": max(s["max"] for s in stats)}


def combine_manifests(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """One manifest's aggregates for several builds trained on together: counts summed, ranges spanned. The builds
    must agree on factor and in-plane resampling (ValueError otherwise)."""
    if len(manifests) == 1:
        return manifests[0]
    first = manifests[0]
    for key, read in (("factor", lambda m: m.get("factor")),
                      ("shards.inplane_spacing_mm", lambda m: m.get("settings", {}).get("inplane_spacing_mm"))):
        if len({json.dumps(read(m)) for m in manifests}) > 1:
            raise ValueError(f"the training shards' builds differ in {key}; train on builds of one setting")
    splits = {}
    for split in {name for m in manifests for name in m.get("splits", {})}:
        parts = [m["splits"][split] for m in manifests if split in m.get("splits", {})]
        splits[split] = {key: sum(p.get(key) or 0 for p in parts) for key in ("shards", "samples", "bytes", "patients")}
        splits[split]["thick_source"] = dict(sum((Counter(p.get("thick_source", {})) for p in parts), Counter()))
        for key in ("thin_spacing_z_mm", "pixel_spacing_mm"):
            splits[split][key] = _combined_stats([p.get(key, {}) for p in parts])
    geometry_keys = {key for m in manifests for key in m.get("geometry", {})}
    profiles = {m.get("thick_profile") for m in manifests}
    return {
        "format_version": first.get("format_version"),
        "factor": first.get("factor"),
        "thick_profile": profiles.pop() if len(profiles) == 1 else "mixed",
        "splits": splits,
        "samples": sum(m.get("samples", 0) for m in manifests),
        "thick_source": dict(sum((Counter(m.get("thick_source", {})) for m in manifests), Counter())),
        "geometry": {key: _combined_stats([m.get("geometry", {}).get(key, {}) for m in manifests])
                     for key in geometry_keys},
        "hu": {key: _combined_stats([m.get("hu", {}).get(key, {}) for m in manifests]) for key in ("p1", "p99")},
        "series_total": sum(m.get("series_total", 0) for m in manifests),
        "skipped": [entry for m in manifests for entry in m.get("skipped", [])],
        "skipped_counts": dict(sum((Counter(m.get("skipped_counts", {})) for m in manifests), Counter())),
        "settings": dict(first.get("settings", {})),
    }


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes `np.save` writes for `array` (C order). The header is written apart and joined with the array's
    memory: one copy instead of np.save's chunked writes into a BytesIO (a cost per sample in the shard builder)."""
    array = np.ascontiguousarray(array)
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(array))
    except ValueError:  # a header too long for format 1.0: np.save picks the version
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()
    return b"".join((buffer.getvalue(), memoryview(array.reshape(-1).view(np.uint8))))


def npy_view(data: bytes, name: str, dtypes: tuple = (np.int16,), ndim: int = 3) -> np.ndarray:
    """An array over the bytes of a .npy file, without copying (np.load would copy): int16 (D, H, W) HU by default;
    latent shards (ctld/data/latent_shards.py) read float arrays of another rank through it too."""
    header = io.BytesIO(data)
    version = np.lib.format.read_magic(header)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise ValueError(f"{name} is .npy format {version}; expected 1.0 or 2.0 (numpy.save writes those)")
    shape, fortran_order, dtype = read_header[version](header)
    if dtype not in [np.dtype(d) for d in dtypes] or len(shape) != ndim:
        wanted = " or ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"{name} must be a {ndim}-d {wanted} array, got {dtype} {shape}")
    count = math.prod(shape)
    if len(data) - header.tell() < count * dtype.itemsize:
        raise ValueError(f"{name} is truncated: {len(data) - header.tell()} bytes for shape {shape}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")
