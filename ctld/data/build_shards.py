"""`ctld-shards`: build, inspect and verify the WebDataset shards ctld trains on.

    ctld-shards build /data/dicom /data/more.zip /data/nifti --out shards --config configs/base.yaml \
        --shards.num_workers=8 --data.factor=5
    ctld-shards inspect shards          # manifest summary
    ctld-shards verify shards           # re-read every shard: sha256, sample count, decodable arrays

Build: find files (folders, ZIPs, NIfTI, preprocessed cache) -> scan DICOM headers (worker processes) -> group,
validate and sort series -> pair thick/thin (or plan a simulated thick) -> assign samples to shards by patient
split -> decode and write shards (worker processes, tqdm) -> manifest.json. The shard plan is fixed before any
pixel is decoded, so a rerun after an interruption rebuilds exactly the shards that were not finished and the
result equals an uninterrupted build. Each shard is written under a temporary name and renamed when complete;
`<out>/.done/<shard>.json` records it. A bad series is skipped and recorded, never fatal; the build fails (exit 1)
only when more than `shards.max_skipped_fraction` of the series are skipped.

Privacy: samples are keyed by salted HMAC-SHA256 hashes; the salt comes from `shards.salt`, else `$CTLD_SALT`,
else a random salt kept per user in `$CTLD_SALT_FILE` or `~/.config/ctld/salt` (mode 0600) so reruns hash
identically. The salt is never written to shards, the manifest or anywhere in the shard folder. Log lines about
skipped series name the hashed series id and the file path relative to its source folder (needed to fix the
input; folder names chosen by the user may still appear in logs, never in shards or the manifest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import secrets
import sys
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctld.config import REDACTED, Config, ConfigError, build_config, load_config, parse_overrides
from ctld.data import dicom
from ctld.data.archive import discover
from ctld.data.nifti import is_cache_volume, is_nifti, read_cached_volume, read_nifti, volume_ids
from ctld.data.pairing import Alignment, Geometry, find_partners, make_sample, spacing_class
from ctld.data.shards import FORMAT_VERSION, MANIFEST, decode_sample, read_manifest
from ctld.data.tar_reader import iter_raw_samples

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PLAN = ".plan.json"
DONE_DIR = ".done"
TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------------------------- planning


@dataclass
class Job:
    """One sample to build: a thin DICOM series (+ real thick partner), or a NIfTI/cache volume."""

    key: str
    split: str
    kind: str  # "dicom" | "nifti" | "cache"
    series_id: str
    est_bytes: int
    rel_path: str  # first file, relative to its source (for log lines only)
    thin_plan: dicom.SeriesPlan | None = None
    thick_plan: dicom.SeriesPlan | None = None
    alignment: Alignment | None = None
    path: str = ""


@dataclass
class ShardPlan:
    name: str
    split: str
    jobs: list[Job] = field(default_factory=list)


def default_salt_file() -> Path:
    """$CTLD_SALT_FILE, else ${XDG_CONFIG_HOME:-~/.config}/ctld/salt: per user, outside any shard folder."""
    if os.environ.get("CTLD_SALT_FILE"):
        return Path(os.environ["CTLD_SALT_FILE"]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "ctld" / "salt"


def _read_salt(path: Path) -> str:
    salt = path.read_text().strip()
    if not salt:
        raise SystemExit(f"ctld-shards: salt file {path} is empty; delete it (a new random salt is made) or fill it")
    return salt


def _write_salt_file(path: Path, salt: str) -> bool:
    """Create `path` (mode 0600) holding `salt`, never replacing one; False if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(salt + "\n")
    try:
        os.link(tmp, path)  # atomic and exclusive: two builds starting together end with one salt
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def resolve_salt(cfg_salt: str, out_dir: Path) -> str:
    """shards.salt, else $CTLD_SALT, else a random salt kept per user in `default_salt_file()` (mode 0600), so
    reruns hash identically and nothing secret sits in the shard folder users copy. A `<out>/.salt` of an older
    build is still used (its shards keep their hashes) and moved to the per-user file when that is free."""
    if cfg_salt == REDACTED:
        raise SystemExit(f"ctld-shards: shards.salt is {REDACTED!r}, the placeholder ctld writes instead of the salt; "
                         "set the real salt (shards.salt or $CTLD_SALT) or leave it empty")
    if cfg_salt:
        return cfg_salt
    if os.environ.get("CTLD_SALT"):
        return os.environ["CTLD_SALT"]
    path = default_salt_file()
    legacy = out_dir / ".salt"
    try:
        if legacy.is_file():
            salt = _read_salt(legacy)
            if _write_salt_file(path, salt) or _read_salt(path) == salt:
                legacy.unlink()
                logger.warning("moved the salt of %s out of the shard folder to %s (keep it private)", out_dir, path)
            else:
                logger.warning("%s holds a salt that differs from %s; it is used, but move it out of the shard folder "
                               "(e.g. to a file named by $CTLD_SALT_FILE) before sharing the folder", legacy, path)
            return salt
        if not path.is_file():
            _write_salt_file(path, secrets.token_hex(32))
        return _read_salt(path)
    except OSError as error:
        raise SystemExit(f"ctld-shards: cannot read or create the salt file {path} ({error}); set shards.salt, "
                         "$CTLD_SALT or $CTLD_SALT_FILE") from error


def split_of(case_id: str, val_fraction: float, test_fraction: float) -> str:
    """Split decided by the (already salted) patient hash, so all series of a patient share it."""
    u = int(hashlib.sha256(case_id.encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _scan_chunk(chunk: list[tuple[str, str]]):
    headers, skipped = [], []
    for path, rel_path in chunk:
        try:
            headers.extend(dicom.scan_file(path, rel_path))
        except dicom.SeriesSkipped as error:
            skipped.append((rel_path, error.reason, error.detail))
    return headers, skipped


def _pool(num_workers: int):
    # fork: workers inherit imported modules (no re-import of torch per worker); no threads run at this point.
    return multiprocessing.get_context("fork").Pool(num_workers)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Builder:
    def __init__(self, cfg: Config, out_dir: Path, salt: str):
        self.cfg = cfg
        self.out_dir = out_dir
        self.salt = salt
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
        self.unused = [{"series_id": sid, "reason": reason} for sid, reason in unused]
        jobs: list[Job] = []
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
        jobs = unique_jobs
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

    def plan_fingerprint(self, shards: list[ShardPlan]) -> str:
        """Changes when the inputs, the salt or any setting that changes shard bytes changes."""
        doc = {
            "format_version": FORMAT_VERSION,
            "salt_check": dicom.anon_id("plan", self.salt, "salt-check"),
            "shards": asdict(self.cfg.shards) | {"salt": "", "num_workers": 0},
            "factor": self.cfg.data.factor,
            "thick_profile": self.cfg.data.thick_profile,
            "plan": [
                [s.name]
                + [
                    [
                        j.key,
                        j.kind,
                        j.est_bytes,
                        j.alignment and asdict(j.alignment),
                        [len(p.slices) for p in (j.thin_plan, j.thick_plan) if p],
                    ]
                    for j in s.jobs
                ]
                for s in shards
            ],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- workers


def _build_job(args: tuple[Job, int, str, float, float, float, str]) -> dict:
    """Worker: decode one job into an encoded sample, or a skip record."""
    job, factor, salt, thin_max_mm, thick_min_mm, inplane_spacing_mm, thick_profile = args
    try:
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
        files = len(job.thin_plan.slices) if job.thin_plan is not None else 1
        return {"ok": False, "series_id": job.series_id, "reason": error.reason, "detail": error.detail, "files": files}
    return {"ok": True, "sample": sample}


def _build_shard(task: tuple[Path, ShardPlan, tuple]) -> dict:
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


# ----------------------------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_json(path: Path, doc) -> None:
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _HashingFile:
    """A write-only file that hashes what passes through it and buffers large writes (tarfile's stream mode
    writes 10 KiB blocks; one syscall each is slow on busy disks), so the shard is never read back to hash it."""

    def __init__(self, path: str):
        self.file = open(path, "wb", buffering=8 << 20)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

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

    def add(self, result: dict) -> None:
        if not result["ok"]:
            self.skipped.append({k: result[k] for k in ("series_id", "reason", "files")})
            return
        sample = result["sample"]
        self.writer.write(sample)
        info = json.loads(sample["json"])
        self.samples.append(
            {
                "key": sample["__key__"],
                "thick_source": info["thick_source"],
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
        # Record first, then rename: a shard counts as done only when both exist.
        _atomic_json(self.out_dir / DONE_DIR / f"{self.shard.name}.json", record)
        os.replace(self.tmp, self.out_dir / self.shard.name)
        return record


def _load_done(out_dir: Path, name: str) -> dict | None:
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


def build(sources: list[str], cfg: Config, out_dir: Path, *, overwrite: bool = False) -> int:
    """Build shards from `sources` into `out_dir`; returns the exit code (0 ok, 1 too many skipped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DONE_DIR).mkdir(exist_ok=True)
    for stale in out_dir.glob(TMP_PREFIX + "*"):  # partial shards of an interrupted run
        stale.unlink()
    salt = resolve_salt(cfg.shards.salt, out_dir)
    builder = Builder(cfg, out_dir, salt)
    archive_skips: list = []
    num_workers = max(1, cfg.shards.num_workers)
    # One pool for the header scan and the decode; forked before any plan exists, jobs travel pickled.
    pool = _pool(num_workers) if num_workers > 1 else None
    try:
        records, shards = _build_in(sources, cfg, out_dir, builder, archive_skips, pool, overwrite)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return _write_manifest(builder, shards, records, archive_skips, out_dir)


def _build_in(sources, cfg: Config, out_dir: Path, builder: Builder, archive_skips: list, pool, overwrite: bool):
    from tqdm import tqdm

    with discover(
        sources,
        max_bytes=cfg.shards.max_archive_bytes,
        max_members=cfg.shards.max_archive_members,
        skipped=archive_skips,
    ) as files:
        shards = builder.plan(files, pool)
        logger.info(
            "%d files, %d series: %d samples planned in %d shards",
            len(files), builder.series_total, sum(len(s.jobs) for s in shards), len(shards),
        )  # fmt: skip
        fingerprint = builder.plan_fingerprint(shards)
        plan_path = out_dir / PLAN
        previous = json.loads(plan_path.read_text()).get("fingerprint") if plan_path.is_file() else None
        if previous is not None and previous != fingerprint:
            if not overwrite:
                raise SystemExit(
                    f"ctld-shards: {out_dir} holds shards of a different build (other inputs or settings). Use a new "
                    "--out folder, or pass --overwrite to delete them and rebuild."
                )
            for old in [*out_dir.glob("*.tar"), *(out_dir / DONE_DIR).glob("*.json"), out_dir / MANIFEST]:
                old.unlink(missing_ok=True)
        _atomic_json(plan_path, {"fingerprint": fingerprint})
        planned = {s.name for s in shards}
        for old in out_dir.glob("*.tar"):  # shards no plan names (e.g. a smaller rebuild) would confuse loaders
            if old.name not in planned:
                old.unlink()

        records = {s.name: _load_done(out_dir, s.name) for s in shards}
        todo = [s for s in shards if records[s.name] is None]
        if len(shards) > len(todo):
            logger.info("resuming: %d of %d shards already complete", len(shards) - len(todo), len(shards))
        settings = (
            cfg.data.factor,
            builder.salt,
            cfg.shards.thin_max_spacing_mm,
            cfg.shards.thick_min_spacing_mm,
            cfg.shards.inplane_spacing_mm,
            cfg.data.thick_profile,
        )
        tasks = [(out_dir, shard, settings) for shard in todo]
        # Workers write whole shards: shipping decoded volumes back to one writer process costs more than the
        # decode itself (pickling ~10 MB per series). Parallelism is therefore over shards.
        finished = pool.imap_unordered(_build_shard, tasks) if pool is not None and len(tasks) > 1 else None
        with tqdm(total=sum(len(s.jobs) for s in todo), desc="ctld-shards", unit="series", disable=None) as bar:
            for record in finished if finished is not None else map(_build_shard, tasks):
                records[record["name"]] = record
                bar.update(record["samples"] + len(record["skipped"]))
    return records, shards


def _write_manifest(builder: Builder, shards, records, archive_skips, out_dir: Path) -> int:
    cfg = builder.cfg
    skipped = list(builder.skipped)
    for record in records.values():  # series that failed while their shard was built (this run or an earlier one)
        skipped.extend(record["skipped"])
    skipped.sort(key=lambda s: (s["reason"], s["series_id"]))
    samples = [info for record in records.values() for info in record["sample_info"]]
    split_summary = {
        split: {
            "shards": sum(1 for s in shards if s.split == split),
            "samples": sum(records[s.name]["samples"] for s in shards if s.split == split),
            "bytes": sum(records[s.name]["bytes"] for s in shards if s.split == split),
        }
        for split in SPLITS
    }
    total = builder.series_total
    skipped_fraction = len(skipped) / total if total else 0.0
    manifest = {
        "format_version": FORMAT_VERSION,
        "factor": cfg.data.factor,
        "thick_profile": cfg.data.thick_profile,  # of the simulated thick series
        "shards": [{k: records[s.name][k] for k in ("name", "split", "samples", "bytes", "sha256")} for s in shards],
        "splits": split_summary,
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
        "series_total": total,
        "skipped": skipped,
        "skipped_counts": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped_fraction": round(skipped_fraction, 6),
        "unused": builder.unused,
        "files_skipped": dict(sorted(builder.file_skips.items())),
        "archives_skipped": len(archive_skips),
        "settings": {k: v for k, v in asdict(cfg.shards).items() if k not in ("salt", "out_dir", "num_workers")},
    }
    _atomic_json(out_dir / MANIFEST, manifest)
    if skipped_fraction > cfg.shards.max_skipped_fraction:
        print(
            f"ctld-shards: {len(skipped)} of {total} series skipped ({skipped_fraction:.0%}), more than "
            f"shards.max_skipped_fraction={cfg.shards.max_skipped_fraction}; reasons: {manifest['skipped_counts']}. "
            f"See {out_dir / MANIFEST} and the log for the files, fix the inputs or change the shards.on_* policies.",
            file=sys.stderr,
        )
        return 1
    return 0


# ----------------------------------------------------------------------------------------------- inspect / verify


def inspect(out_dir: Path) -> int:
    manifest = read_manifest(out_dir)
    print(
        f"{out_dir}: format {manifest['format_version']}, factor {manifest['factor']}, {manifest['samples']} samples "
        f"({', '.join(f'{k} {v}' for k, v in sorted(manifest['thick_source'].items())) or 'none'})"
    )
    for split, info in manifest["splits"].items():
        print(f"  {split:5s} {info['shards']:4d} shards {info['samples']:6d} samples {info['bytes'] / 1e6:10.1f} MB")
    for name, stats in manifest["geometry"].items():
        if stats:
            print(f"  {name:20s} min {stats['min']:g}  median {stats['median']:g}  max {stats['max']:g}")
    print(
        f"  series {manifest['series_total']}, skipped {len(manifest['skipped'])} "
        f"({manifest['skipped_fraction']:.1%}): {manifest['skipped_counts']}"
    )
    if manifest["unused"]:
        print(f"  unused series: {dict(Counter(u['reason'] for u in manifest['unused']))}")
    if manifest["files_skipped"]:
        print(f"  files skipped: {manifest['files_skipped']}")
    return 0


def verify_shard(path: Path, expected: dict) -> str | None:
    """None if the shard matches its manifest entry and every sample decodes, else what is wrong."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"size {size} bytes, manifest says {expected['bytes']} (truncated or replaced)"
    if _sha256(path) != expected["sha256"]:
        return "sha256 differs from the manifest (corrupt)"
    samples = 0
    try:
        for raw in iter_raw_samples(str(path)):
            extra = sorted(set(raw) - {"__key__", "__url__", "thin.npy", "thick.npy", "json"})
            if extra:
                return f"sample {raw['__key__']} has unexpected files {extra}"
            decode_sample(raw)  # every file present, int16 arrays of the shapes its json states
            samples += 1
    except (tarfile.TarError, ValueError, OSError) as error:
        return f"undecodable after {samples} samples: {type(error).__name__}: {error}"
    if samples != expected["samples"]:
        return f"{samples} samples, manifest says {expected['samples']}"
    return None


def verify(out_dir: Path) -> int:
    manifest = read_manifest(out_dir)
    bad = 0
    for entry in manifest["shards"]:
        problem = verify_shard(out_dir / entry["name"], entry)
        if problem:
            bad += 1
            print(f"BAD  {entry['name']}: {problem}")
        else:
            print(f"ok   {entry['name']}: {entry['samples']} samples")
    print(f"{len(manifest['shards']) - bad} of {len(manifest['shards'])} shards ok")
    if bad:
        print(
            f"ctld-shards verify: {bad} bad shard(s); rebuild with `ctld-shards build ... --out {out_dir}` after "
            "deleting them (complete shards are kept)",
            file=sys.stderr,
        )
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctld-shards", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build shards from DICOM folders/ZIPs, NIfTI, cache volumes")
    build_parser.add_argument("sources", nargs="+", help="input folders, ZIP files, NIfTI or cache files")
    build_parser.add_argument("--out", help="output folder (default: shards.out_dir from the config)")
    build_parser.add_argument("--config", help="YAML config (default: built-in defaults = configs/base.yaml)")
    build_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete shards of a different earlier build in --out instead of refusing",
    )
    build_parser.add_argument("--log_level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    for name, text in (("inspect", "print the manifest summary"), ("verify", "re-read and check every shard")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("out", help="a folder written by `ctld-shards build`")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`ctld-shards build|inspect|verify`; extra `--section.key=value` arguments override the config."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command != "build":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            return inspect(Path(args.out)) if args.command == "inspect" else verify(Path(args.out))
        except (FileNotFoundError, ValueError) as error:
            print(f"ctld-shards {args.command}: error: {error}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # Bad arguments end in one line on stderr and exit code 2, never a traceback.
    try:
        cfg = load_config(args.config, extra) if args.config else build_config(parse_overrides(extra))
    except ConfigError as error:
        print(f"ctld-shards build: error: {error}", file=sys.stderr)
        return 2
    missing = [source for source in args.sources if not Path(source).exists()]
    if missing:
        print(f"ctld-shards build: error: input {', '.join(missing)} does not exist; pass DICOM folders, ZIP files, "
              "NIfTI or cache files", file=sys.stderr)
        return 2
    return build(args.sources, cfg, Path(args.out or cfg.shards.out_dir), overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
