"""Training where hospitals are: a model trained ONLY on in-plane pairs of a thick series, scored on that series'
through-plane task; prints JSON.

Protocol (issue 14):
- data: a real thin CT (default: the public TotalSegmentator chest CT crop, 1.5 mm isotropic). Its thick series is
  simulated (box profile, factor 5: 7.5 mm) and written as DICOM; the thin series is used ONLY for scoring.
- training: `ctld-shards build --pairs inplane` on the thick series alone (two in-plane pairs: its y and x axes,
  resampled to dz / factor, play the slice axis), then the demo recipe (`configs/demo.yaml`: lossless VAE exported
  untrained, residual U-Net, slab filter fitted on the same in-plane pairs), 2 processes on CPU, `--steps` steps.
- scoring: `ctld-eval` on the thin series (thick simulated from it the same way) with rows nearest, linear, cubic,
  slab_filter (fitted on in-plane pairs) and ctld_regression; optionally (`--thin_export`) the same rows for a
  model trained on thin data (e.g. the demo's phantom export) for comparison.

    python benchmarks/bench_inplane.py --out bench_out/inplane --steps 1200
    python benchmarks/bench_inplane.py --out bench_out/inplane --thin_export demo_out/runs/diffusion/export
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # benchmarks/emit.py, also when imported by path
from emit import emit_json  # noqa: E402

from ctld import evaluate  # noqa: E402
from ctld.config import load_config, save_config  # noqa: E402
from ctld.data import build_shards  # noqa: E402
from ctld.data.dicom_write import write_dicom_series  # noqa: E402
from ctld.data.geometry import thick_origin_mm  # noqa: E402
from ctld.data.transforms import simulate_thick  # noqa: E402
from ctld.data.volume import Volume  # noqa: E402
from ctld.demo.stages import launch_command  # noqa: E402
from ctld.series_io import read_series  # noqa: E402

REAL_CT = REPO_ROOT.parent / "shared" / "data" / "ct" / "totalsegmentator_ct" / "tests" / "reference_files" / \
    "aorta_report" / "test_result" / "models" / "ct_cropped.nii.gz"
FACTOR = 5
# In-plane pairs of a 32-slice thick series have 32 rows: 32-pixel patches (the demo's 48 would be mostly padding).
# The slab filter fitted on the in-plane pairs already beats cubic here, so the residual model is anchored on it.
OVERRIDES = ["--data.patch_size=32", "--diffusion.prior=encode_slab", "--shards.val_fraction=0",
             "--shards.test_fraction=0", "--shards.min_slices=2"]


def _train(stage: str, config: Path, out: Path, steps: int, processes: int, extra: list[str]) -> None:
    command, env = launch_command(processes)
    command += [str(REPO_ROOT / "ctld" / "train.py"), str(config), f"--train.stage={stage}",
                f"--train.output_dir={out / 'runs'}", f"--train.run_name={stage}", f"--train.max_steps={steps}",
                f"--data.shards_dir={out / 'shards'}", "--train.resume=latest", *extra]
    log = out / f"{stage}.log"
    with open(log, "w") as handle:
        code = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{stage} training failed (exit {code}); see {log}")


def _score(data: Path, export: Path, config: Path, out: Path, extra: list[str]) -> dict:
    code = evaluate.main([str(data), "--checkpoint", str(export), "--out", str(out), "--config", str(config),
                          "--modes", "regression", "--no_progress", *extra])
    if code != 0:
        raise RuntimeError(f"ctld-eval failed (exit {code})")
    mean = json.loads((out / "metrics.json").read_text())["mean"]
    return {method: {k: round(v, 4) for k, v in row.items()} for method, row in mean.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/inplane", help="work folder")
    parser.add_argument("--real_ct", default=str(REAL_CT), help="a thin real CT (NIfTI/DICOM) to score on")
    parser.add_argument("--steps", type=int, default=1200, help="diffusion optimizer steps on the in-plane pairs")
    parser.add_argument("--processes", type=int, default=2, help="training processes")
    parser.add_argument("--thin_export", default=None, help="also score this export (trained on thin data)")
    parser.add_argument("--thin_config", default=None, help="its config, e.g. demo_out/demo_config.yaml")
    parser.add_argument("--adapt", type=int, default=0, help="also score --thin_export adapted for this many steps")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CTLD_SALT", "ctld-bench-inplane")  # a public CT: a fixed salt keeps runs comparable

    thin = read_series(args.real_ct)[0]
    thick_hu = simulate_thick(thin.hu, FACTOR, "box")
    dz = thin.spacing_mm[0] * FACTOR
    thick = Volume(thick_hu, (dz, *thin.spacing_mm[1:]),
                   tuple(thick_origin_mm(thin.origin_mm, thin.spacing_mm[0], thin.direction, FACTOR)), thin.direction,
                   meta={"slice_thickness_mm": dz})
    thick_dir = out / "thick_dicom"
    if not thick_dir.is_dir():
        write_dicom_series(thick, thick_dir, patient={"PatientName": "BENCH^INPLANE", "PatientID": "BENCH1"})

    config = out / "config.yaml"
    save_config(load_config(REPO_ROOT / "configs" / "demo.yaml", OVERRIDES), config)
    timings = {}
    t0 = time.perf_counter()
    code = build_shards.main(["build", str(thick_dir), "--out", str(out / "shards"), "--config", str(config),
                              "--pairs", "inplane", "--log_level", "WARNING"])
    if code != 0:
        raise RuntimeError(f"ctld-shards build failed (exit {code})")
    timings["shards_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    _train("vae", config, out, 0, args.processes, [])
    _train("diffusion", config, out, args.steps, args.processes,
           [f"--train.vae_export={out / 'runs' / 'vae' / 'export'}"])
    timings["training_s"] = round(time.perf_counter() - t0, 1)

    sources = json.loads((out / "shards" / "manifest.json").read_text())["thick_source"]
    result = {
        "protocol": {
            "data": f"{args.real_ct} (thin {list(thin.shape)} at {list(thin.spacing_mm)} mm); thick simulated "
                    f"(box, factor {FACTOR}); the thin series is used only for scoring",
            "training": f"in-plane pairs of the thick series only ({sources}); configs/demo.yaml with "
                        f"{' '.join(OVERRIDES[:2])}, VAE exported untrained, {args.steps} diffusion steps, "
                        f"{args.processes} CPU processes",
            "scoring": "ctld-eval, ctld's protocol and RPLHR-CT (report.md); slab_filter fitted on the in-plane pairs",
        },
        "timings": timings,
        "inplane_only": _score(Path(args.real_ct), out / "runs" / "diffusion" / "export", config,
                               out / "report_inplane", []),
    }
    if args.thin_export:
        thin_config = Path(args.thin_config or REPO_ROOT / "configs" / "demo.yaml")
        result["thin_trained"] = _score(Path(args.real_ct), Path(args.thin_export), thin_config,
                                        out / "report_thin_trained", [])
        if args.adapt:
            result["thin_trained_adapted"] = _score(Path(args.real_ct), Path(args.thin_export), thin_config,
                                                    out / "report_adapted", ["--adapt", str(args.adapt)])
    rows = result["inplane_only"]
    result["gains_db"] = {f"ctld_regression_minus_{b}": {k: round(rows["ctld_regression"][k] - rows[b][k], 3)
                                                         for k in ("psnr_wide", "psnr_soft_tissue", "rplhr_psnr")}
                          for b in ("cubic", "slab_filter")}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
