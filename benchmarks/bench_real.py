"""Leave-one-patient-out quality on real CT: train on all patients but one, score the one left out; prints JSON.

    python benchmarks/bench_real.py --out bench_real_out                          # every fold, configs/real.yaml
    python benchmarks/bench_real.py --folds cptac_head_1p25mm --out bench_real_out  # one fold
    python benchmarks/bench_real.py --config configs/real_gpu.yaml --out real_gpu    # the GPU recipe
    python benchmarks/bench_real.py --patient mine=/data/ct_0042.zip ...            # your own patients

Protocol:
- patients: one thin series each (DICOM folder/ZIP or NIfTI). By default the five real patients found beside the
  repository: the four thin series of ../shared/data/real_thin_ct (chest, head, lumbar spine, abdomen) and the
  TotalSegmentator contrast chest CT of ../shared/data/ct (skipped with a reason when those folders are absent).
- shards: `ctld-shards build` once per patient (thick simulated with data.thick_profile), reused by every fold;
  and ctld-demo's procedural phantom studies (`--phantoms`, 12 by default, synthetic: part of the recipe, trained
  on through data.extra_train_urls in every fold, never scored and never in the slab filter's fit).
- a fold: `accelerate launch ctld/train.py` (VAE stage, then the diffusion stage; 2 CPU processes or one per GPU)
  on the other patients' shards (and the phantoms) only, then `ctld-eval` on the held-out patient's own thin
  series (thick simulated from it with the export's slice profile; its thin slices are used only for scoring). No
  validation split: the held-out patient is never read before scoring. The recipe itself was chosen on these
  folds (docs/quality.md says how), so they measure development progress; real CT outside them is the test.
- rows: nearest, linear, cubic, slab_filter (fitted by the training run on that fold's training patients only),
  ctld_regression, ctld_diffusion (and ctld_*_adapted with --adapt); columns: PSNR/SSIM in the wide and the
  soft-tissue windows, MAE in HU, and the RPLHR-CT protocol (ctld.metrics); per fold, the mean over folds, the gains
  over cubic and the slab filter, and the training budget of each fold (steps, wall seconds, processes).
Stages are fingerprinted and reused from --out when their settings are unchanged (an interrupted fold resumes).
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
from emit import emit_json, gains_db, write_json  # noqa: E402  (benchmarks/emit.py)

from ctld import evaluate  # noqa: E402
from ctld.config import config_to_dict, load_config, save_config  # noqa: E402
from ctld.data import build_shards  # noqa: E402
from ctld.demo.cli import phantom_training_shards  # noqa: E402
from ctld.demo.stages import Stages, fingerprint, train_stage  # noqa: E402
from ctld.export import EXPORT_VERSION  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "data"
DEFAULT_PATIENTS = {
    "chest_midrc": SHARED / "real_thin_ct" / "midrc_ricord_chest_1p25mm.zip",
    "head_cptac": SHARED / "real_thin_ct" / "cptac_head_1p25mm.zip",
    "lumbar_spine": SHARED / "real_thin_ct" / "lumbar_spine_1p0mm.zip",
    "abdomen_ircadb": SHARED / "real_thin_ct" / "ircadb_abdomen_1p6mm.zip",
    "chest_cta_totalseg": SHARED / "ct" / "totalsegmentator_ct" / "tests" / "reference_files" / "aorta_report"
    / "test_result" / "models" / "ct_cropped.nii.gz",
}


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_real_out", help="work folder (finished stages are reused)")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "real.yaml"), help="training recipe")
    parser.add_argument("--patient", action="append", default=[], metavar="NAME=PATH",
                        help="a patient's thin series (repeatable; replaces the default five)")
    parser.add_argument("--folds", nargs="*", default=None, help="held-out patients to run (default: every one)")
    parser.add_argument("--vae_steps", type=int, default=0,
                        help="VAE steps; 0 exports the zero-initialised VAE, its lossless shortcut (as ctld-demo)")
    parser.add_argument("--diffusion_steps", type=int, default=None, help="default: the config's train.max_steps")
    parser.add_argument("--modes", default="regression,diffusion", help="ctld-eval --modes")
    parser.add_argument("--adapt", type=int, default=0, help="also score ctld adapted to each case (ctld-eval --adapt)")
    parser.add_argument("--phantoms", type=int, default=12,
                        help="also train every fold on this many procedural phantom studies (ctld-demo's; synthetic, "
                             "never a patient); 0 = real patients only")
    parser.add_argument("--num_processes", type=int, default=2, help="training processes on CPU (DDP over gloo)")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    return parser.parse_known_args(argv)


def _patients(args) -> tuple[dict[str, Path], dict[str, str]]:
    if args.patient:
        chosen = {}
        for item in args.patient:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise SystemExit(f"bench_real: --patient {item!r}: expected NAME=PATH")
            chosen[name] = Path(path)
    else:
        chosen = dict(DEFAULT_PATIENTS)
    missing = {name: f"{path} not found" for name, path in chosen.items() if not path.exists()}
    return {n: p for n, p in chosen.items() if n not in missing}, missing


def _mean_rows(rows: list[dict]) -> dict:
    methods = [m for m in rows[0] if all(m in r for r in rows)]
    return {m: {k: round(sum(r[m][k] for r in rows) / len(rows), 4) for k in rows[0][m]} for m in methods}


def _run_fold(held_out: str, args, overrides: list[str], patients: dict[str, Path], shard_dirs: dict[str, Path],
              phantoms: tuple[str, str], stages: Stages, steps: int) -> dict:
    """Train on every patient but `held_out` (VAE stage, then diffusion stage), then score `held_out` with ctld-eval."""
    fold = Path(args.out).resolve() / "folds" / held_out
    fold.mkdir(parents=True, exist_ok=True)
    training = [name for name in patients if name != held_out]
    train_urls = "::".join(sorted(str(p) for n in training for p in shard_dirs[n].glob("*.tar")))
    phantom_urls, phantoms_fp = phantoms
    cfg = load_config(args.config, [*overrides, f"--data.train_urls={train_urls}",
                                     f"--data.extra_train_urls={phantom_urls}"])
    config_path = fold / "config.yaml"
    save_config(cfg, config_path)
    sections = config_to_dict(cfg)
    # shards_dir: a training patient's folder, which has no validation split: validation is off in the run.
    no_val_shards = shard_dirs[training[0]]
    # The shard files' names stay when their contents change: the builds' fingerprints stand for them.
    built = [stages.fingerprints[f"shards_{name}"] for name in training]
    fp_vae = fingerprint(built, phantoms_fp, sections["data"], sections["vae"], sections["train"], args.vae_steps,
                         args.num_processes, EXPORT_VERSION)
    stages.run(f"{held_out}_vae", fp_vae, [fold / "runs" / "vae"],
               lambda: train_stage("vae", config_path, fold, no_val_shards, args.vae_steps, args.num_processes))
    fp_diff = fingerprint(fp_vae, sections["unet"], sections["diffusion"], steps)
    stages.run(f"{held_out}_diffusion", fp_diff, [fold / "runs" / "diffusion"],
               lambda: train_stage("diffusion", config_path, fold, no_val_shards, steps, args.num_processes))
    export, report = fold / "runs" / "diffusion" / "export", fold / "report"
    flags = ["--modes", args.modes, "--no_progress"] + (["--adapt", str(args.adapt)] if args.adapt else [])

    def score() -> None:
        code = evaluate.main([str(patients[held_out]), "--checkpoint", str(export), "--out", str(report),
                              "--config", str(config_path), *flags])
        if code != 0:
            raise RuntimeError(f"ctld-eval of fold {held_out} failed (exit {code})")

    fp_eval = fingerprint(fp_diff, sections["infer"], args.modes, args.adapt, str(patients[held_out]))
    stages.run(f"{held_out}_eval", fp_eval, [report], score)
    mean = json.loads((report / "metrics.json").read_text())["mean"]
    return {
        "trained_on": training,
        "train_seconds": round(stages.times[f"{held_out}_vae"]["seconds"]
                               + stages.times[f"{held_out}_diffusion"]["seconds"], 1),
        "eval_seconds": round(stages.times[f"{held_out}_eval"]["seconds"], 1),
        "rows": mean,
        "gains_db": gains_db(mean),
    }


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parse_args(argv)
    patients, missing = _patients(args)
    if len(patients) < 2:
        result = {"benchmark": "real_lopo", "skipped": f"needs at least 2 patients; missing: {missing}"}
        emit_json(result, args.json, indent=1)
        return 0
    folds = args.folds or list(patients)
    unknown = [f for f in folds if f not in patients]
    if unknown:
        print(f"bench_real: --folds {unknown} are not among the patients {list(patients)}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CTLD_SALT", "ctld-bench-real")  # fixed: the same case names and data order every run
    base_cfg = load_config(args.config, overrides)
    steps = args.diffusion_steps if args.diffusion_steps is not None else base_cfg.train.max_steps
    stages = Stages(out, label="bench_real")
    start = time.perf_counter()

    # One shards folder per patient, every sample in its training split, reused by every fold.
    shard_cfg = out / "shards_config.yaml"
    save_config(load_config(args.config, [*overrides, "--shards.val_fraction=0", "--shards.test_fraction=0"]),
                shard_cfg)
    sections = config_to_dict(base_cfg)
    shard_dirs = {}
    for name, source in patients.items():
        shard_dirs[name] = out / "shards" / name
        fp = fingerprint(str(source.resolve()), sections["shards"], sections["data"]["factor"],
                         sections["data"]["thick_profile"])

        def build(source=source, target=shard_dirs[name]) -> None:
            code = build_shards.main(["build", str(source), "--out", str(target), "--config", str(shard_cfg)])
            if code != 0:
                raise RuntimeError(f"ctld-shards build {source} failed (exit {code})")

        stages.run(f"shards_{name}", fp, [shard_dirs[name]], build)

    # ctld-demo's phantoms (data.extra_train_urls): trained on in every fold, never scored or fitted the slab filter.
    phantom_urls, phantoms_fp = (phantom_training_shards(out, stages, shard_cfg, n_studies=args.phantoms)
                                 if args.phantoms else ("", ""))

    result = {
        "benchmark": "real_lopo",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "config": str(args.config),
        "overrides": overrides,
        "patients": {name: str(path) for name, path in patients.items()},
        "missing_patients": missing,
        "protocol": "leave one patient out; thick simulated from the held-out thin series with the export's "
                    f"slice profile ({base_cfg.data.thick_profile}), factor {base_cfg.data.factor}",
        "training_budget": {"vae_steps": args.vae_steps, "diffusion_steps": steps, "phantom_studies": args.phantoms,
                            "num_processes": args.num_processes, "patch": [base_cfg.data.depth_thick,
                                                                           base_cfg.data.patch_size],
                            "batch_size_per_process": base_cfg.data.batch_size},
        "folds": {},
    }
    for held_out in folds:
        result["folds"][held_out] = _run_fold(held_out, args, overrides, patients, shard_dirs,
                                              (phantom_urls, phantoms_fp), stages, steps)
        write_json(result, out / "partial.json", indent=1)  # a long run shows its finished folds as it goes

    rows = [f["rows"] for f in result["folds"].values()]
    mean = _mean_rows(rows)
    result["mean_over_folds"] = {"rows": mean, "gains_db": gains_db(mean)}
    if "ctld_regression" in mean and "slab_filter" in mean:
        result["worst_fold_minus_slab_filter_db"] = {
            key: round(min(f["rows"]["ctld_regression"][key] - f["rows"]["slab_filter"][key]
                           for f in result["folds"].values()), 3) for key in ("psnr_wide", "psnr_soft_tissue")}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    emit_json(result, args.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
