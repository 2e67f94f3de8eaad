"""Shard-builder throughput against plain pydicom decoding of the same files; prints one JSON object.

    OMP_NUM_THREADS=1 python benchmarks/bench_shards.py --series 12 --slices 60 --size 256 --workers 1 2 \
        --partitions 1 2

Writes a synthetic set of thin DICOM series (uncompressed int16, one study per patient) under --work, then
times (a) `pydicom.dcmread` + `.pixel_array` of every file in one process, the floor any builder pays,
(b) `ctld-shards build` end to end (discovery, header scan, validation, decode, simulated thick, tar writing,
sha256, fsync, manifest) at each worker count, and (c) a partitioned build: P processes started together, each
`--partition i/P` with one worker (as P pods would), then `ctld-shards merge`, for each P. `ratio_to_plain_decode`
= build MB/s / plain MB/s; `builder_to_decode_ratio` is that of one worker, the goal >= 0.8 (issues 3, 25).
Wall-clock ratios need a quiet machine; `cpu_ratio_to_plain_decode` (plain CPU seconds / build CPU seconds,
workers included) does not. `load_average` is the machine's 1-minute load when the benchmark started.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from ctld.data import build_shards
from ctld.data.dicom_write import write_dicom_series
from ctld.data.volume import Volume


def write_inputs(root: Path, series: int, slices: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(series):
        hu = rng.integers(-1024, 1500, size=(slices, size, size), dtype=np.int16)
        volume = Volume(hu, (1.0, 0.7, 0.7), (0.0, 0.0, 10.0 * i), np.eye(3))
        files += write_dicom_series(volume, root / f"case{i:03d}", patient={"PatientID": f"BENCH{i:03d}"})
    return files


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the build's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def plain_decode_seconds(files: list[Path]) -> tuple[float, float]:
    """(wall, CPU) seconds of dcmread + pixel_array over `files`."""
    start, cpu = time.perf_counter(), cpu_seconds()
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 (the decode is what is timed)
    return time.perf_counter() - start, cpu_seconds() - cpu


def _build_argv(source: Path, out: Path, workers: int, shard_samples: int) -> list[str]:
    return [
        "build",
        str(source),
        "--out",
        str(out),
        "--shards.salt=bench",
        f"--shards.num_workers={workers}",
        "--log_level=ERROR",
        "--shards.val_fraction=0",
        "--shards.test_fraction=0",
        # Workers build whole shards, so give them several (a real build has many).
        f"--shards.shard_max_samples={shard_samples}",
    ]


def _run_partition(argv: list[str]) -> None:
    sys.exit(build_shards.main(argv))


def partitioned_seconds(source: Path, out: Path, count: int, shard_samples: int) -> float:
    """Wall seconds of `count` partitions built at once (forked processes, one worker each), then merged."""
    context = multiprocessing.get_context("fork")  # imports are inherited, as in a warm pod
    start = time.perf_counter()
    processes = [
        context.Process(target=_run_partition,
                        args=([*_build_argv(source, out, 1, shard_samples), "--partition", f"{index}/{count}"],))
        for index in range(count)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"partition build failed with exit code {process.exitcode}")
    with contextlib.redirect_stdout(io.StringIO()):  # merge's summary line would break this script's JSON
        merged = build_shards.main(["merge", str(out)])
    if merged != 0:
        raise SystemExit("ctld-shards merge failed")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=12, help="thin series to write (one patient each)")
    parser.add_argument("--slices", type=int, default=60, help="slices per series")
    parser.add_argument("--size", type=int, default=256, help="rows = columns per slice")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 2],
                        help="partition counts to time (each partition one process with one worker)")
    parser.add_argument("--shard_samples", type=int, default=2, help="shards.shard_max_samples for the build")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best is reported)")
    parser.add_argument("--work", default="", help="scratch folder (default: a temp folder, removed afterwards)")
    args = parser.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_shards-"))
    try:
        files = write_inputs(work / "in", args.series, args.slices, args.size)
        pixel_mb = len(files) * args.size * args.size * 2 / 1e6
        plain_decode_seconds(files[:20])  # warm the page cache and imports
        plain, plain_cpu = min(plain_decode_seconds(files) for _ in range(args.repeats))
        result = {
            "benchmark": "bench_shards",
            "python": platform.python_version(),
            "pydicom": pydicom.__version__,
            "cpus": os.cpu_count(),
            "load_average": round(os.getloadavg()[0], 2),
            "series": args.series,
            "files": len(files),
            "slice_shape": [args.size, args.size],
            "pixel_mb": round(pixel_mb, 2),
            "plain_decode": {
                "seconds": round(plain, 3),
                "mb_per_s": round(pixel_mb / plain, 1),
                "series_per_s": round(args.series / plain, 2),
                "cpu_seconds": round(plain_cpu, 3),
            },
            "build": {},
        }
        for workers in args.workers:
            times, cpu_times = [], []
            for repeat in range(args.repeats):
                out = work / f"out_{workers}_{repeat}"
                argv_build = _build_argv(work / "in", out, workers, args.shard_samples)
                start, cpu = time.perf_counter(), cpu_seconds()
                code = build_shards.main(argv_build)
                times.append(time.perf_counter() - start)
                cpu_times.append(cpu_seconds() - cpu)
                if code != 0:
                    raise SystemExit(f"build failed with exit code {code}")
                shutil.rmtree(out)
            best = min(times)
            mb_per_s = pixel_mb / best
            result["build"][str(workers)] = {
                "seconds": round(best, 3),
                "series_per_s": round(args.series / best, 2),
                "mb_per_s": round(mb_per_s, 1),
                "ratio_to_plain_decode": round(mb_per_s / (pixel_mb / plain), 3),
                "ratio_per_worker": round(mb_per_s / (pixel_mb / plain) / workers, 3),
                # CPU time does not depend on how busy the machine is: plain CPU / build CPU is the per-worker
                # efficiency a quiet machine would show.
                "cpu_seconds": round(min(cpu_times), 3),
                "cpu_ratio_to_plain_decode": round(plain_cpu / min(cpu_times), 3),
            }
        one = result["build"].get("1")
        if one is not None:
            result["builder_to_decode_ratio"] = {"wall": one["ratio_to_plain_decode"],
                                                 "cpu": one["cpu_ratio_to_plain_decode"], "goal": 0.8}
        result["partitions"] = {}
        for count in args.partitions:
            best = min(partitioned_seconds(work / "in", work / f"parts_{count}_{repeat}", count, args.shard_samples)
                       for repeat in range(args.repeats))
            result["partitions"][str(count)] = {
                "seconds": round(best, 3),
                "series_per_s": round(args.series / best, 2),
                "mb_per_s": round(pixel_mb / best, 1),
                "ratio_to_plain_decode": round(pixel_mb / best / (pixel_mb / plain), 3),
            }
        if "1" in result["partitions"]:
            for info in result["partitions"].values():
                info["speedup_over_1"] = round(result["partitions"]["1"]["seconds"] / info["seconds"], 2)
        print(json.dumps(result, indent=1))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
