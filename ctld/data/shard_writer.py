"""Writing planned shards (worker processes): decode each job into a sample, write the shard under a temporary
name, record it in `<out>/.done/<shard>.json`, then rename it; a shard counts as done only when both exist. The
manifest is summarised from those records (`manifest_doc`), by a whole build and by `ctld-shards merge` alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from ctld.data import dicom
from ctld.data.domain import hu_percentiles
from ctld.data.nifti import read_cached_volume, read_nifti
from ctld.data.pairing import make_inplane_sample, make_sample, spacing_class
from ctld.data.shard_plan import DONE_DIR, SPLITS, TMP_PREFIX, Job, ShardPlan
from ctld.data.shards import FORMAT_VERSION, MANIFEST, decode_sample

logger = logging.getLogger(__name__)


def _build_job(args: tuple[Job, int, str, float, float, float, str]) -> dict:
    """Worker: decode one job into an encoded sample, or a skip record."""
    job, factor, salt, thin_max_mm, thick_min_mm, inplane_spacing_mm, thick_profile = args
    try:
        if job.kind == "inplane":
            thick = dicom.load_series(job.thick_plan)
            return {"ok": True, "sample": make_inplane_sample(thick, job.inplane_axis, factor=factor, split=job.split,
                                                              thick_profile=thick_profile,
                                                              inplane_spacing_mm=inplane_spacing_mm)}
        if job.kind == "dicom":
            thin = dicom.load_series(job.thin_plan)
            thick = None
            if job.thick_plan is not None:
                try:
                    thick = dicom.load_series(job.thick_plan)
                except dicom.SeriesSkipped as error:
                    # The thin series is still good: fall back to a simulated thick input.
                    logger.warning(
                        "thick partner %s of %s unusable (%s); simulating thick instead",
                        job.thick_plan.series_id,
                        job.series_id,
                        error,
                    )
            alignment = job.alignment if thick is not None else None
        else:
            reader = read_nifti if job.kind == "nifti" else read_cached_volume
            thin = reader(job.path, salt, rel_path=job.rel_path)
            thick = alignment = None
            kind = spacing_class(thin.spacing_mm[0], thin_max_mm, thick_min_mm)
            if kind != "thin":
                raise dicom.SeriesSkipped(
                    f"{kind}_volume",
                    f"slice spacing {thin.spacing_mm[0]:.3f} mm is not thin "
                    f"(<= {thin_max_mm} mm); a lone volume needs a thin series",
                )
            if thin.hu.shape[0] < factor:
                raise dicom.SeriesSkipped("too_few_slices", f"{thin.hu.shape[0]} slices < factor {factor}")
        sample = make_sample(
            thin, thick, alignment, factor=factor, split=job.split, inplane_spacing_mm=inplane_spacing_mm,
            thick_profile=thick_profile,
        )
    except dicom.SeriesSkipped as error:
        plan = job.thin_plan or job.thick_plan
        files = len(plan.slices) if plan is not None else 1
        return {"ok": False, "series_id": job.series_id, "reason": error.reason, "detail": error.detail, "files": files}
    return {"ok": True, "sample": sample}


def build_shard(task: tuple[Path, ShardPlan, tuple]) -> dict:
    """Worker: build every sample of one planned shard and write it (temp name, then rename); returns its record."""
    out_dir, shard, settings = task
    sink = _ShardSink(out_dir, shard)
    for job in shard.jobs:
        result = _build_job((job, *settings))
        if not result["ok"]:
            logger.warning(
                "skipped series %s (%s): %s [first file: %s]",
                result["series_id"], result["reason"], result["detail"], job.rel_path,
            )  # fmt: skip
        sink.add(result)
    return sink.close()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_json(path: Path, doc, *, durable: bool = True) -> None:
    """Write `doc` to `path` whole or not at all (temporary name, then rename); `durable`: fsync before the rename
    (a record whose loss after a crash only costs redoing its shard skips it: an fsync per shard is a round trip
    on network volumes)."""
    # The process id keeps writers of one file apart (encode processes finishing together write one manifest).
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class _HashingFile:
    """A write-only file that hashes what passes through it and buffers small writes (tar headers and padding;
    the 4 MiB data writes go straight through), so the shard is never read back to hash it."""

    def __init__(self, path: str):
        self.file = open(path, "wb", buffering=1 << 20)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def start_writeback(self) -> None:
        """Hand what was written so far to the disk without waiting (Linux starts writeback of dirty pages on
        POSIX_FADV_DONTNEED and drops them from the page cache once written): the fsync in `close` then waits for
        the last sample only, not the whole shard, and a long build does not fill the page cache with shards."""
        self.file.flush()
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


class _ShardSink:
    """Writes one planned shard with `webdataset.ShardWriter` under a temporary name; `close` renames it."""

    def __init__(self, out_dir: Path, shard: ShardPlan):
        import webdataset as wds

        self.out_dir, self.shard = out_dir, shard
        self.tmp = out_dir / f"{TMP_PREFIX}{shard.name}"
        self.samples: list[dict] = []
        self.skipped: list[dict] = []
        # One ShardWriter per planned shard (maxcount above the plan) so shard boundaries come from the plan,
        # not from write timing; mtime=0 makes the tar bytes depend on the samples only.
        split, index = shard.name.removesuffix(".tar").rsplit("-", 1)
        pattern = str(out_dir).replace("%", "%%") + f"/{TMP_PREFIX}{split}-%06d.tar"
        self.file: _HashingFile | None = None

        def opener(path: str) -> _HashingFile:
            self.file = _HashingFile(path)
            return self.file

        self.writer = wds.ShardWriter(
            pattern,
            maxcount=len(shard.jobs) + 1,
            maxsize=float("inf"),
            start_shard=int(index),
            verbose=0,
            opener=opener,
            mtime=0.0,
        )
        # webdataset opens the tar in stream mode ("w|"), which re-buffers everything in 10 KiB blocks through
        # bytes concatenation: 3 more copies of every byte, a third of the shard builder's time after decoding.
        # A plain "w" tar on the same (never seeked) file writes the same bytes, in 4 MiB copies.
        streamed = self.writer.tarstream.tarstream
        self.writer.tarstream.tarstream = tarfile.TarFile(fileobj=self.file, mode="w", format=streamed.format,
                                                          copybufsize=4 << 20)

    def add(self, result: dict) -> None:
        if not result["ok"]:
            self.skipped.append({k: result[k] for k in ("series_id", "reason", "files")})
            return
        sample = result["sample"]
        self.writer.write(sample)
        self.file.start_writeback()
        info = json.loads(sample["json"])
        # The manifest's HU ranges (ctld.data.domain): percentiles of the thick side, the model's input (slab
        # averages have narrower tails than thin slices, so a thick input is compared with thick series).
        hu_p1, hu_p99 = hu_percentiles(decode_sample(sample)["thick"])
        self.samples.append(
            {
                "key": sample["__key__"],
                "hu_p1": hu_p1,
                "hu_p99": hu_p99,
                "thick_source": info["thick_source"],
                **({"inplane_axis": info["inplane_axis"]} if "inplane_axis" in info else {}),
                "shape_thin": info["shape_thin"],
                "shape_thick": info["shape_thick"],
                "thin_spacing_mm": info["thin_spacing_mm"],
            }
        )

    def close(self) -> dict:
        self.writer.close()  # TarWriter leaves a caller-opened stream open
        self.file.close()
        assert self.file.size == self.tmp.stat().st_size
        record = {
            "name": self.shard.name,
            "split": self.shard.split,
            "samples": len(self.samples),
            "bytes": self.file.size,
            "sha256": self.file.sha256.hexdigest(),
            "sample_info": self.samples,
            "skipped": self.skipped,
        }
        # Record first, then rename: a shard counts as done only when both exist. The shard's bytes are on disk
        # (fsync in close); a record lost in a crash only means the shard is built again.
        atomic_json(self.out_dir / DONE_DIR / f"{self.shard.name}.json", record, durable=False)
        os.replace(self.tmp, self.out_dir / self.shard.name)
        return record


def load_done(out_dir: Path, name: str) -> dict | None:
    record_path = out_dir / DONE_DIR / f"{name}.json"
    if not (out_dir / name).is_file() or not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        return None
    return record if record.get("bytes") == (out_dir / name).stat().st_size else None


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "median": float(np.median(array)), "max": float(array.max())}


def manifest_doc(settings: dict, records: list[dict], plan_info: dict) -> dict:
    """manifest.json (shards/README.md) from the build's settings (`Builder.settings()`), the shard records in
    manifest order (`name` as the manifest lists it) and the plan's counts: {"skipped", "unused", "files_skipped",
    "series_total", "archives_skipped"}."""
    skipped = list(plan_info["skipped"])
    for record in records:  # series that failed while their shard was built (this run or an earlier one)
        skipped.extend(record["skipped"])
    skipped.sort(key=lambda s: (s["reason"], s["series_id"]))
    samples = [info for record in records for info in record["sample_info"]]

    def split_summary(split: str) -> dict:
        mine = [record for record in records if record["split"] == split]
        infos = [info for record in mine for info in record["sample_info"]]
        return {
            "shards": len(mine),
            "samples": sum(record["samples"] for record in mine),
            "bytes": sum(record["bytes"] for record in mine),
            # Counts only (the model card's training data): keys are "<case_id>_<series_id>".
            "patients": len({info["key"].split("_")[0] for info in infos}),
            "thick_source": dict(Counter(info["thick_source"] for info in infos)),
            # What this split's series span (the export's domain is the training split's: ctld.data.domain).
            "thin_spacing_z_mm": _stats([info["thin_spacing_mm"][0] for info in infos]),
            "pixel_spacing_mm": _stats([v for info in infos for v in info["thin_spacing_mm"][1:]]),
        }

    total = plan_info["series_total"]
    return {
        "format_version": FORMAT_VERSION,
        "factor": settings["factor"],
        "thick_profile": settings["thick_profile"],  # of the simulated thick series
        "shards": [{k: record[k] for k in ("name", "split", "samples", "bytes", "sha256")} for record in records],
        "splits": {split: split_summary(split) for split in SPLITS},
        "samples": len(samples),
        "thick_source": dict(Counter(s["thick_source"] for s in samples)),
        "geometry": {
            "thin_depth": _stats([s["shape_thin"][0] for s in samples]),
            "thick_depth": _stats([s["shape_thick"][0] for s in samples]),
            "height": _stats([s["shape_thin"][1] for s in samples]),
            "width": _stats([s["shape_thin"][2] for s in samples]),
            "thin_spacing_z_mm": _stats([s["thin_spacing_mm"][0] for s in samples]),
            "pixel_spacing_y_mm": _stats([s["thin_spacing_mm"][1] for s in samples]),
            "pixel_spacing_x_mm": _stats([s["thin_spacing_mm"][2] for s in samples]),
        },
        # Percentiles of each thick series' HU (ctld.data.domain.hu_percentiles), summarised over series; absent
        # from records of shards built before they were recorded.
        "hu": {key: _stats([s[f"hu_{key}"] for s in samples if f"hu_{key}" in s]) for key in ("p1", "p99")},
        "series_total": total,
        "skipped": skipped,
        "skipped_counts": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped_fraction": round(len(skipped) / total if total else 0.0, 6),
        "unused": plan_info["unused"],
        "files_skipped": plan_info["files_skipped"],
        "archives_skipped": plan_info["archives_skipped"],
        "settings": {k: v for k, v in settings["shards"].items() if k not in ("salt", "out_dir", "num_workers")},
    }


def write_manifest(out_dir: Path, manifest: dict, max_skipped_fraction: float) -> int:
    """Write manifest.json atomically; 1 (with a message) when more than `max_skipped_fraction` of the series were
    skipped, else 0."""
    atomic_json(out_dir / MANIFEST, manifest)
    fraction, skipped, total = manifest["skipped_fraction"], manifest["skipped"], manifest["series_total"]
    if fraction > max_skipped_fraction:
        print(
            f"ctld-shards: {len(skipped)} of {total} series skipped ({fraction:.0%}), more than "
            f"shards.max_skipped_fraction={max_skipped_fraction}; reasons: {manifest['skipped_counts']}. "
            f"See {out_dir / MANIFEST} and the log for the files, fix the inputs or change the shards.on_* policies.",
            file=sys.stderr,
        )
        return 1
    return 0
