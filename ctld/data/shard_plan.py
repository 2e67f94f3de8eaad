"""The shard plan of `ctld-shards build`: which series become samples, paired how, in which split, partition and
shard.

Fixed before any pixel is decoded (headers only), so a rerun after an interruption rebuilds exactly the shards
that were not finished and the result equals an uninterrupted build. A partitioned build (`--partition I/N`) plans
every input like a whole build, then keeps the samples of the patients whose salted hash falls in partition I, so
a patient's series never straddle partitions and every split is the one a whole build gives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ctld.config import Config
from ctld.data import dicom
from ctld.data.nifti import is_cache_volume, is_nifti, volume_ids
from ctld.data.pairing import Alignment, Geometry, find_partners
from ctld.data.shards import FORMAT_VERSION

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PLAN = ".plan.json"
DONE_DIR = ".done"
TMP_PREFIX = ".tmp-"
PARTITION = "partition.json"  # a partition's record, written when all its shards are complete


@dataclass
class Job:
    """One sample to build: a thin DICOM series (+ real thick partner), or a NIfTI/cache volume."""

    key: str
    split: str
    kind: str  # "dicom" | "nifti" | "cache" | "inplane" (thick_plan only)
    series_id: str
    est_bytes: int
    rel_path: str  # first file, relative to its source (for log lines only)
    thin_plan: dicom.SeriesPlan | None = None
    thick_plan: dicom.SeriesPlan | None = None
    alignment: Alignment | None = None
    path: str = ""
    inplane_axis: str = ""  # kind "inplane": the in-plane axis that plays the slice axis

    @property
    def case_id(self) -> str:
        return self.key.split("_", 1)[0]  # keys are "<case_id>_<series_id>[-axis]", hex hashes


@dataclass
class ShardPlan:
    name: str
    split: str
    jobs: list[Job] = field(default_factory=list)


def _split_position(case_id: str) -> float:
    """A patient's place in [0, 1) for the split: from its (already salted) hash."""
    return int(hashlib.sha256(case_id.encode()).hexdigest()[:12], 16) / float(1 << 48)


def split_of(case_id: str, val_fraction: float, test_fraction: float) -> str:
    """Split decided by the (already salted) patient hash, so all series of a patient share it."""
    u = _split_position(case_id)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def fill_empty_test_split(jobs: list[Job], test_fraction: float) -> list[Job]:
    """Hold out one patient when test_fraction > 0 but the hashes left the test split empty (4 patients and
    test_fraction 0.2 do so 41% of the time): the training patient of the smallest hash position, while at least
    two training patients remain. Decided on every input of the build before partitioning, so each partition agrees.
    An empty validation split only turns validation off."""
    training = sorted({j.case_id for j in jobs if j.split == "train"}, key=_split_position)
    if test_fraction <= 0 or any(j.split == "test" for j in jobs) or len(training) < 3:
        return jobs
    logger.info(f"the test split was empty ({len(training)} training patients); it holds one patient")
    return [replace(j, split="test") if j.case_id == training[0] else j for j in jobs]


def partition_of(case_id: str, count: int) -> int:
    """Partition of a patient (the salted case hash), from other bits than `split_of` uses so that partitions and
    splits are independent."""
    return int(hashlib.sha256(f"partition\0{case_id}".encode()).hexdigest()[:12], 16) % count


def partition_dir(index: int, count: int) -> str:
    """The sub-folder of `--out` a partition writes: its own shards, plan, done records and partition.json."""
    return f"part-{index:04d}-of-{count:04d}"


def parse_partition(spec: str, environ=os.environ) -> tuple[int, int]:
    """`--partition I/N` (0 <= I < N) -> (I, N); `--partition N` takes I from $JOB_COMPLETION_INDEX, which a
    Kubernetes Indexed Job sets in each pod. ValueError saying what is wrong."""
    index_text, _, count_text = spec.rpartition("/")
    if not index_text:
        index_text = environ.get("JOB_COMPLETION_INDEX", "")
        if not index_text:
            raise ValueError(f"--partition {spec} takes the index from $JOB_COMPLETION_INDEX, which is not set; pass "
                             f"--partition I/{spec} (I from 0 to {spec}-1)")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--partition {spec!r} is not I/N or N (integers, 0 <= I < N)") from None
    if not 0 <= index < count:
        raise ValueError(f"--partition {index}/{count}: the index must be in 0..{count - 1}")
    return index, count


def _scan_chunk(chunk: list[tuple[str, str]]):
    headers, skipped = [], []
    for path, rel_path in chunk:
        try:
            headers.extend(dicom.scan_file(path, rel_path))
        except dicom.SeriesSkipped as error:
            skipped.append((rel_path, error.reason, error.detail))
    return headers, skipped


def worker_pool(num_workers: int):
    # fork: workers inherit imported modules (no re-import of torch per worker); no threads run at this point.
    return multiprocessing.get_context("fork").Pool(num_workers)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Builder:
    def __init__(self, cfg: Config, out_dir: Path, salt: str, partition: tuple[int, int] | None = None):
        self.cfg = cfg
        self.out_dir = out_dir
        self.salt = salt
        self.partition = partition  # (index, count): keep only that partition's patients
        self.inputs_sha256 = ""  # of every planned sample, before the partition is cut: equal in all partitions
        self.policy = dicom.Policy.from_config(cfg.shards)
        self.skipped: list[dict] = []  # series-level: {"series_id", "reason", "detail", "files"}
        self.file_skips: Counter = Counter()  # file-level reasons (not DICOM, undecodable syntax, ...)
        self.unused: list[dict] = []
        self.series_total = 0

    def _skip_series(self, series_id: str, reason: str, detail: str, files: int, rel_path: str) -> None:
        logger.warning("skipped series %s (%s): %s [first file: %s]", series_id, reason, detail, rel_path)
        # `detail` may name files (e.g. conflicting duplicates): keep it in the log, not in the manifest.
        self.skipped.append({"series_id": series_id, "reason": reason, "files": files})

    def plan(self, files: list[tuple[Path, str]], pool=None) -> list[ShardPlan]:
        cfg = self.cfg
        factor = cfg.data.factor
        cache_sidecars = {p.with_suffix(".json") for p, _ in files if is_cache_volume(p)}
        dicom_files, volume_jobs = [], []
        for path, rel_path in files:
            if is_nifti(path):
                volume_jobs.append(("nifti", path, rel_path))
            elif is_cache_volume(path):
                volume_jobs.append(("cache", path, rel_path))
            elif path not in cache_sidecars:
                dicom_files.append((str(path), rel_path))

        headers = []
        chunks = _chunks(dicom_files, 64)
        if pool is not None and len(chunks) > 1:
            results = pool.map(_scan_chunk, chunks)
        else:
            results = [_scan_chunk(chunk) for chunk in chunks]
        for chunk_headers, chunk_skips in results:
            headers.extend(chunk_headers)
            for rel_path, reason, detail in chunk_skips:
                self.file_skips[reason] += 1
                if reason != "not_dicom":
                    logger.warning("skipped file %s (%s): %s", rel_path, reason, detail)

        plans: dict[str, dicom.SeriesPlan] = {}
        for slices in dicom.group_series(headers).values():
            self.series_total += 1
            try:
                plan = dicom.plan_series(slices, self.salt, self.policy)
            except dicom.SeriesSkipped as error:
                series_id = dicom.anon_id(slices[0].series_key, self.salt, "series")
                self._skip_series(series_id, error.reason, error.detail, len(slices), slices[0].rel_path)
                continue
            for repair in plan.repairs:
                logger.info("series %s repaired: %s [first file: %s]", plan.series_id, repair, plan.slices[0].rel_path)
            plans[plan.series_id] = plan

        geometries = [Geometry.of(p) for p in plans.values()]
        partners, unused = find_partners(
            geometries, factor, cfg.shards.thin_max_spacing_mm, cfg.shards.thick_min_spacing_mm
        )
        jobs: list[Job] = []
        if cfg.shards.pairs == "inplane":  # thick-only series become in-plane pairs instead of going unused
            for sid in [sid for sid, reason in unused if reason == "unpaired_thick"]:
                jobs.extend(self._inplane_jobs(plans[sid]))
            unused = [(sid, reason) for sid, reason in unused if reason != "unpaired_thick"]
        self.unused = [{"series_id": sid, "reason": reason} for sid, reason in unused]
        for series_id, alignment in partners.items():
            thin = plans[series_id]
            d, h, w = thin.shape
            if d < factor:
                self._skip_series(
                    series_id, "too_few_slices", f"{d} thin slices < factor {factor}", d, thin.slices[0].rel_path
                )
                continue
            thick = plans[alignment.thick_series_id] if alignment else None
            est = 2 * h * w * (d + (alignment.thick_stop - alignment.thick_start if alignment else d // factor))
            jobs.append(
                Job(
                    key=f"{thin.case_id}_{series_id}",
                    split=split_of(thin.case_id, cfg.shards.val_fraction, cfg.shards.test_fraction),
                    kind="dicom",
                    series_id=series_id,
                    est_bytes=est,
                    rel_path=thin.slices[0].rel_path,
                    thin_plan=thin,
                    thick_plan=thick,
                    alignment=alignment,
                )
            )

        for kind, path, rel_path in volume_jobs:
            self.series_total += 1
            ids = volume_ids(path, rel_path, self.salt)
            jobs.append(
                Job(
                    key=f"{ids[0]}_{ids[1]}",
                    split=split_of(ids[0], cfg.shards.val_fraction, cfg.shards.test_fraction),
                    kind=kind,
                    series_id=ids[1],
                    est_bytes=int(path.stat().st_size) * 2,
                    rel_path=rel_path,
                    path=str(path),
                )
            )

        seen: set[str] = set()
        unique_jobs = []
        for job in sorted(jobs, key=lambda j: (j.key, j.rel_path)):
            if job.key in seen:  # e.g. the same series twice, in a folder and in a ZIP of it
                self._skip_series(job.series_id, "duplicate_series", "another input has the same ids", 0, job.rel_path)
                continue
            seen.add(job.key)
            unique_jobs.append(job)
        jobs = fill_empty_test_split(unique_jobs, cfg.shards.test_fraction)
        everything = [[_job_fingerprint(j) for j in jobs], self.series_total, self.skipped, self.unused,
                      sorted(self.file_skips.items())]
        self.inputs_sha256 = hashlib.sha256(json.dumps(everything, default=str).encode()).hexdigest()
        if self.partition is not None:
            index, count = self.partition
            jobs = [j for j in jobs if partition_of(j.case_id, count) == index]
        shards: list[ShardPlan] = []
        for split in SPLITS:
            current: ShardPlan | None = None
            size = 0
            for job in sorted((j for j in jobs if j.split == split), key=lambda j: j.key):
                full = current is not None and (
                    len(current.jobs) >= cfg.shards.shard_max_samples
                    or size + job.est_bytes > cfg.shards.shard_max_bytes
                )
                if current is None or full:
                    current = ShardPlan(f"{split}-{sum(s.split == split for s in shards):06d}.tar", split)
                    shards.append(current)
                    size = 0
                current.jobs.append(job)
                size += job.est_bytes
        return shards

    def _inplane_jobs(self, thick: dicom.SeriesPlan) -> list[Job]:
        """Two samples of one thick series: its y and x axes in turn play the slice axis (same patient split)."""
        d, h, w = thick.shape
        split = split_of(thick.case_id, self.cfg.shards.val_fraction, self.cfg.shards.test_fraction)
        return [Job(key=f"{thick.case_id}_{thick.series_id}-{axis}", split=split, kind="inplane",
                    series_id=thick.series_id, est_bytes=2 * d * h * w * 4, rel_path=thick.slices[0].rel_path,
                    thick_plan=thick, inplane_axis=axis) for axis in ("y", "x")]

    def settings(self) -> dict:
        """The settings that change shard bytes (no salt): equal in every partition of one build."""
        return {
            "format_version": FORMAT_VERSION,
            "shards": asdict(self.cfg.shards) | {"salt": "", "num_workers": 0},
            "factor": self.cfg.data.factor,
            "thick_profile": self.cfg.data.thick_profile,
        }

    def plan_fingerprint(self, shards: list[ShardPlan]) -> str:
        """Changes when the inputs, the salt or any setting that changes shard bytes changes."""
        doc = {
            **self.settings(),
            "salt_check": dicom.anon_id("plan", self.salt, "salt-check"),
            "plan": [[s.name] + [_job_fingerprint(j) for j in s.jobs] for s in shards],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _job_fingerprint(job: Job) -> list:
    return [job.key, job.kind, job.est_bytes, job.alignment and asdict(job.alignment), job.inplane_axis,
            [len(p.slices) for p in (job.thin_plan, job.thick_plan) if p]]
