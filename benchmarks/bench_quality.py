"""Quality benchmark: ctld against interpolation and the slab filter on data the model never saw; prints JSON.

    python benchmarks/bench_quality.py --out bench_quality_out                      # the demo's budget
    python benchmarks/bench_quality.py --vae_steps 240 --diffusion_steps 600 --out q600
    python benchmarks/bench_quality.py --config configs/base.yaml --out q_base     # on a GPU machine

Protocol:
- training: the `ctld-demo` chain (procedural phantom chest CT studies -> shards -> VAE -> residual diffusion
  U-Net, 2 CPU processes or one per GPU) with the given config and step counts; stages are reused from --out
  when their settings are unchanged. The training budget (steps, wall seconds per stage) is part of the output.
- data, never trained on: (1) the held-out phantom study (a patient of its own, a thick 5 mm series of the same
  acquisition and its thin 1 mm series); (2) the real contrast chest CT of ../shared/data/ct/totalsegmentator_ct
  (1.5 mm slices, thick simulated from it with the export's slice profile; its thin slices used only for scoring),
  skipped with a reason when that folder is absent.
- rows: nearest, linear, cubic, slab_filter (fitted on the training split), ctld_regression, ctld_diffusion (mean of
  `infer.num_samples` samples); columns: PSNR/SSIM in the wide and soft-tissue windows (ctld.metrics) and the
  RPLHR-CT protocol (rplhr_psnr, rplhr_ssim); gains of each ctld row over cubic and the slab filter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # benchmarks/emit.py, also when imported by path
from emit import emit_json, gains_db  # noqa: E402  (benchmarks/emit.py)

from ctld import evaluate  # noqa: E402
from ctld.demo import cli as demo  # noqa: E402

REAL_CT = REPO_ROOT.parent / "shared" / "data" / "ct" / "totalsegmentator_ct" / "tests" / "reference_files" / \
    "aorta_report" / "test_result" / "models" / "ct_cropped.nii.gz"


def _rounded(mean: dict) -> dict:
    return {method: {k: round(v, 4) for k, v in row.items()} for method, row in mean.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_quality_out", help="work folder (reused between runs)")
    parser.add_argument("--config", default=str(demo.DEFAULT_CONFIG), help="training config (default: the demo's)")
    parser.add_argument("--vae_steps", type=int, default=None, help="VAE steps (default: ctld-demo's)")
    parser.add_argument("--diffusion_steps", type=int, default=None, help="diffusion steps (default: ctld-demo's)")
    parser.add_argument("--real_ct", default=str(REAL_CT), help="a thin real CT (NIfTI/DICOM) to score on")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out).resolve()
    demo_args = ["--out", str(out), "--config", args.config, "--skip_coronal", *overrides]
    if args.vae_steps is not None:
        demo_args += ["--vae_steps", str(args.vae_steps)]
    if args.diffusion_steps is not None:
        demo_args += ["--diffusion_steps", str(args.diffusion_steps)]
    start = time.perf_counter()
    if demo.main(demo_args) != 0:
        print("bench_quality: ctld-demo failed; its error is above", file=sys.stderr)
        return 2
    summary = json.loads((out / "summary.json").read_text())
    export = out / "runs" / "diffusion" / "export"
    result = {
        "benchmark": "quality",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "config": args.config,
        "overrides": overrides,
        "training": {"stages": summary["stages"],
                     "vae_steps": "ctld-demo default" if args.vae_steps is None else args.vae_steps,
                     "diffusion_steps": "ctld-demo default" if args.diffusion_steps is None else args.diffusion_steps},
        "held_out_phantom": {"mean": _rounded(summary["mean"]), "gains_db": gains_db(summary["mean"])},
    }
    real = Path(args.real_ct)
    if real.exists():
        report = out / "report_real_ct"
        code = evaluate.main([str(real), "--checkpoint", str(export), "--out", str(report), "--config",
                              str(out / "demo_config.yaml"), "--no_progress"])
        if code != 0:
            print("bench_quality: ctld-eval on the real CT failed; its error is above", file=sys.stderr)
            return 2
        mean = json.loads((report / "metrics.json").read_text())["mean"]
        result["real_chest_ct"] = {"data": str(real), "thick": "simulated (export's slice profile), factor 5",
                                   "mean": _rounded(mean), "gains_db": gains_db(mean)}
    else:
        result["real_chest_ct"] = {"skipped": f"{real} not found (a clone without ../shared)"}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    emit_json(result, args.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
