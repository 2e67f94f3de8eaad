"""`ctld-demo` (`make demo`): the whole ctld chain on a fresh machine, without hospital data or a GPU.

    make demo                          # phantoms -> shards -> VAE -> diffusion -> ctld-infer -> ctld-eval
    make demo DATA=/path/to/dicom      # the same chain on your own DICOM/NIfTI folder(s)
    ctld-demo --out demo_out --fresh   # start over instead of reusing finished stages
    ctld-demo --vae_steps 20 --diffusion_steps 20 --data.patch_size=32   # any --section.key=value override

Stages (each timed; a rerun reuses every stage whose inputs and settings are unchanged, and an interrupted
training stage resumes from its last checkpoint):
1. phantoms:  procedural chest CT studies written as DICOM (`ctld.data.phantom`): training studies, some with
              a thick 5 mm series of the same acquisition, and one held-out study (thin 1 mm + thick 5 mm).
              With --data the user's folders are used instead, and the held-out case is the shards' test split.
2. shards:    `ctld-shards build` -> OUT/shards (train/val split by patient).
3. vae:       `accelerate launch ctld/train.py ... --train.stage=vae` with 2 processes (DDP over gloo on CPU,
              one process per GPU on a GPU machine) -> OUT/runs/vae/{checkpoints,tb,export}.
4. diffusion: the same launch with `--train.stage=diffusion` on the VAE export -> OUT/runs/diffusion/...
5. infer:     `ctld-infer` on the held-out thick series -> OUT/infer/thin_dicom (a thin DICOM series).
6. eval:      `ctld-eval` ctld vs nearest/linear/cubic against the held-out thin series -> OUT/report
              (metrics.json, report.md, panels/), plus OUT/coronal.png (thick | linear | ctld | thin | error).

The resolved settings (configs/demo.yaml + overrides) are written to OUT/demo_config.yaml and every stage reads
that file; OUT/summary.json holds the stage times and the mean metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from ctld.config import Config, ConfigError, config_to_dict, load_config, save_config

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
STAGES = ("phantoms", "shards", "vae", "diffusion", "infer", "eval")
METRICS = (
    ("psnr_wide", "PSNR wide"),
    ("ssim_wide", "SSIM wide"),
    ("psnr_soft_tissue", "PSNR soft"),
    ("ssim_soft_tissue", "SSIM soft"),
    ("mae_hu", "MAE HU"),
)
PHANTOM_VERSION = 1  # bump when ctld.data.phantom changes what a seed produces, so reruns regenerate


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _format_seconds(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{rest}s"


class _Stages:
    """Runs stages in order; a stage whose fingerprint matches its done-marker (and whose outputs exist) is
    reused. A stage started with the same fingerprint but never finished keeps its outputs (training resumes
    from them); with another fingerprint they are removed first."""

    def __init__(self, out: Path):
        self.dir = out / ".stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.times: dict[str, dict] = {}

    def run(self, name: str, fingerprint: str, outputs: list[Path], fn) -> None:
        done = self.dir / f"{name}.json"
        if done.is_file() and all(path.exists() for path in outputs):
            record = json.loads(done.read_text())
            if record.get("fingerprint") == fingerprint:
                self.times[name] = {"seconds": record["seconds"], "reused": True}
                print(
                    f"[ctld-demo] {name}: reusing the finished stage ({_format_seconds(record['seconds'])} "
                    f"when it ran); --fresh reruns it",
                    flush=True,
                )
                return
        started = self.dir / f"{name}.started"
        if not (started.is_file() and started.read_text() == fingerprint):
            for path in outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        done.unlink(missing_ok=True)
        started.write_text(fingerprint)
        print(f"[ctld-demo] {name}: running", flush=True)
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        tmp = done.with_name(done.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "seconds": seconds}))
        tmp.replace(done)
        started.unlink(missing_ok=True)
        self.times[name] = {"seconds": seconds, "reused": False}
        print(f"[ctld-demo] {name}: done in {_format_seconds(seconds)}", flush=True)


# ------------------------------------------------------------------------------------------------- training


def _launch_command(num_processes: int) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` prefix and environment: DDP over gloo on CPU, one process per GPU otherwise."""
    import torch

    if not (REPO_ROOT / "launch" / "cpu_ddp.yaml").is_file():
        raise FileNotFoundError(
            f"{REPO_ROOT / 'launch'} not found: ctld-demo launches training with the accelerate configs of a "
            f"source checkout; run it from a clone (pip install -e .)"
        )
    env = dict(os.environ)
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        if gpus == 1:
            return [*launch, "--config_file", str(REPO_ROOT / "launch" / "single_gpu.yaml")], env
        return [
            *launch,
            "--config_file",
            str(REPO_ROOT / "launch" / "multi_gpu.yaml"),
            "--num_processes",
            str(gpus),
            "--main_process_port",
            "0",
        ], env
    # STACK.md: `--cpu --num_processes 2` silently starts one process; launch/cpu_ddp.yaml (MULTI_GPU type +
    # ACCELERATE_USE_CPU=1) starts real ranks over gloo.
    env["ACCELERATE_USE_CPU"] = "1"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // num_processes)))  # no oversubscription
    command = [
        *launch,
        "--config_file",
        str(REPO_ROOT / "launch" / "cpu_ddp.yaml"),
        "--num_processes",
        str(num_processes),
    ]
    return command, env


def _train(stage: str, config_path: Path, out: Path, shards_dir: Path, steps: int, num_processes: int) -> None:
    command, env = _launch_command(num_processes)
    command += [
        str(REPO_ROOT / "ctld" / "train.py"),
        str(config_path),
        f"--train.stage={stage}",
        f"--train.output_dir={out / 'runs'}",
        f"--train.run_name={stage}",
        f"--train.max_steps={steps}",
        f"--data.shards_dir={shards_dir}",
        "--train.resume=latest",  # an interrupted demo continues from the newest checkpoint
    ]
    if stage == "diffusion":
        command.append(f"--train.vae_export={out / 'runs' / 'vae' / 'export'}")
    print("[ctld-demo] $ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(
            f"the {stage} training launch failed (exit {result.returncode}); its log is above. Rerun `ctld-demo` "
            f"to resume from the last checkpoint in {out / 'runs' / stage / 'checkpoints'}"
        )


# ------------------------------------------------------------------------------------------------ held-out


def _held_out_from_shards(shards_dir: Path, out: Path) -> dict:
    """The first sample of the test split: its thick series as NIfTI (ctld-infer input) and its thin series."""
    from ctld.data.nifti import write_nifti
    from ctld.data.volume import Volume

    tars = sorted(shards_dir.glob("test-*.tar"))
    if not tars:
        raise ValueError(
            f"{shards_dir} has no test split to hold out: the folders given with --data hold too few patients "
            f"for shards.test_fraction; pass more patients or raise --shards.test_fraction"
        )
    files: dict[str, bytes] = {}
    with tarfile.open(tars[0]) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if files and files["__key__"] != key.encode():
                break
            files["__key__"] = key.encode()
            files[ext] = tar.extractfile(member).read()
    info = json.loads(files["json"])
    thick_hu = np.load(io.BytesIO(files["thick.npy"]), allow_pickle=False)
    thin_hu = np.load(io.BytesIO(files["thin.npy"]), allow_pickle=False)
    thick = Volume(
        hu=thick_hu,
        spacing_mm=info["thick_spacing_mm"],
        origin_mm=info["thick_origin_mm"],
        direction=np.asarray(info["direction"]),
    )
    held = out / "heldout"
    held.mkdir(parents=True, exist_ok=True)
    write_nifti(thick, held / "thick.nii.gz", overwrite=True)  # rewritten on every rerun
    factor, offset = int(info["factor"]), int(info.get("offset", 0))
    target = thin_hu[offset : offset + thick_hu.shape[0] * factor]
    np.save(held / "thin_target.npy", target)
    return {"thick": str(held / "thick.nii.gz"), "thin_target": str(held / "thin_target.npy"), "findings": []}


# ------------------------------------------------------------------------------------------------- pictures


def _coronal_panel(
    path: Path,
    columns: list[tuple[str, np.ndarray]],
    *,
    spacing_mm,
    row: int,
    reference: str,
    error_of: str,
    tile_width: int = 192,
) -> Path:
    """One coronal cut per column (superior up, physical aspect), in a lung and a mediastinal window, plus
    |error_of - reference| in HU (0-200, black to white)."""
    from PIL import Image, ImageDraw

    from ctld.data.transforms import window_to_unit

    named = dict(columns)
    entries = list(columns) + [(f"|{error_of}-{reference}|", np.abs(named[error_of] - named[reference]))]
    depth, _, width = columns[0][1].shape
    height = max(1, int(round(tile_width * depth * spacing_mm[0] / (width * spacing_mm[2]))))
    label = 13
    windows = ((-1000.0, 400.0), (-160.0, 240.0))
    canvas = Image.new("L", (tile_width * len(entries), (label + height) * len(windows)), 0)
    draw = ImageDraw.Draw(canvas)
    for r, (lo, hi) in enumerate(windows):
        top = r * (label + height)
        for c, (name, volume) in enumerate(entries):
            cut = volume[::-1, row, :].astype(np.float32)  # (D, W), superior at the top
            unit = np.clip(cut / 200.0, 0, 1) if name.startswith("|") else window_to_unit(cut, lo, hi)
            image = Image.fromarray((unit * 255).astype(np.uint8), "L").resize((tile_width, height), Image.BILINEAR)
            canvas.paste(image, (c * tile_width, top + label))
            text = name if name.startswith("|") else f"{name} [{lo:g},{hi:g}]" if c == 0 else name
            draw.text((c * tile_width + 3, top + 1), text, fill=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG", optimize=True)
    tmp.replace(path)
    return path


def _make_coronal(out: Path, held: dict, factor: int) -> Path:
    from ctld.baselines import interpolate_z
    from ctld.data.dicom import read_dicom_series
    from ctld.inference import read_input

    predicted = read_dicom_series(out / "infer" / "thin_dicom", strict=True)
    if len(predicted) != 1:
        raise RuntimeError(f"{out / 'infer' / 'thin_dicom'} should hold one thin series, found {len(predicted)}")
    prediction = predicted[0].hu.astype(np.float32)
    thick, _, _ = read_input(held["thick"])
    if "thin_dir" in held:
        target = read_dicom_series(held["thin_dir"], strict=True)[0].hu.astype(np.float32)
    else:
        target = np.load(held["thin_target"]).astype(np.float32)
    depth = min(len(prediction), len(target))
    linear = interpolate_z(thick.hu.astype(np.float32), factor, "linear")
    thick_grid = interpolate_z(thick.hu.astype(np.float32), factor, "nearest")
    # A coronal cut through a finding (nodule or embolus) when the phantom says where one is.
    rows = [f["index"][1] for f in held.get("findings", []) if f["kind"] != "embolus"]
    row = rows[0] if rows else target.shape[1] // 2
    columns = [
        ("thick 5 mm", thick_grid[:depth]),
        ("linear", linear[:depth]),
        ("ctld", prediction[:depth]),
        ("thin 1 mm", target[:depth]),
    ]
    return _coronal_panel(
        out / "coronal.png",
        columns,
        spacing_mm=predicted[0].spacing_mm,
        row=row,
        reference="thin 1 mm",
        error_of="ctld",
    )


# ------------------------------------------------------------------------------------------------------ CLI


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="ctld-demo",
        allow_abbrev=False,
        description="Run the whole ctld chain (phantoms or your data -> shards -> VAE -> diffusion -> "
        "ctld-infer -> ctld-eval). Extra --section.key=value arguments override the config for every stage.",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="your DICOM folders/ZIPs or NIfTI files instead of phantoms (held out: the test split)",
    )
    parser.add_argument("--out", default="demo_out", help="output folder (reruns reuse finished stages)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--fresh", action="store_true", help="remove earlier demo outputs in --out and start over")
    parser.add_argument("--n_studies", type=int, default=12, help="phantom training studies (one more is held out)")
    parser.add_argument("--num_slices", type=int, default=100, help="thin 1 mm slices per phantom study")
    parser.add_argument("--size", type=int, default=128, help="phantom rows = columns")
    parser.add_argument("--noise_hu", type=float, default=15.0, help="phantom noise standard deviation (HU)")
    parser.add_argument("--seed", type=int, default=0, help="phantom cohort seed")
    parser.add_argument("--vae_steps", type=int, default=0,
                        help="VAE optimizer steps; 0 exports the demo VAE as initialised, which is its lossless "
                             "space-to-channel shortcut (configs/demo.yaml)")
    parser.add_argument("--diffusion_steps", type=int, default=600, help="diffusion optimizer steps")
    parser.add_argument("--num_processes", type=int, default=2, help="training processes on CPU (DDP over gloo)")
    parser.add_argument("--skip_coronal", action="store_true", help="do not draw OUT/coronal.png")

    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args, overrides)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"ctld-demo: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    wall_start = time.perf_counter()
    bad = [arg for arg in overrides if not (arg.startswith("--") and "." in arg.split("=", 1)[0] and "=" in arg)]
    if bad:
        raise ValueError(
            f"unrecognized arguments {bad}: demo flags are listed by --help; config overrides "
            f"look like --section.key=value"
        )
    cfg: Config = load_config(args.config, overrides)
    vae_steps, diffusion_steps = args.vae_steps, args.diffusion_steps
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        for name in (
            "phantoms",
            "shards",
            "runs",
            "infer",
            "report",
            "heldout",
            ".stages",
            "coronal.png",
            "demo_config.yaml",
            "summary.json",
        ):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        missing = [p for p in args.data if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"--data {missing} not found: pass DICOM folders/ZIPs or NIfTI files")
        # Hold out the shards' test split (by patient); phantoms hold out a study of their own instead.
        if cfg.shards.test_fraction <= 0:
            cfg = load_config(args.config, ["--shards.test_fraction=0.2", *overrides])
    config_path = out / "demo_config.yaml"
    save_config(cfg, config_path, redact=False)  # the input of the stages below: keeps shards.salt
    stages = _Stages(out)
    sections = config_to_dict(cfg, redact=False)  # fingerprints change with the salt
    shards_dir = out / "shards"
    held: dict = {}

    # 1. phantoms (or the user's data)
    if args.data:
        sources = [str(Path(p).resolve()) for p in args.data]
        upstream = _fingerprint("data", sources)
        stages.times["phantoms"] = {"seconds": 0.0, "reused": True, "skipped": "--data given"}
    else:
        phantom_kwargs = {"num_slices": args.num_slices, "size": args.size, "noise_hu": args.noise_hu}
        upstream = _fingerprint("phantoms", PHANTOM_VERSION, args.n_studies, args.seed, phantom_kwargs)
        train_dir, held_dir = out / "phantoms" / "train", out / "phantoms" / "heldout"
        sources = [str(train_dir)]

        def make_phantoms() -> None:
            from ctld.data.phantom import make_cohort

            make_cohort(train_dir, args.n_studies, args.seed, **phantom_kwargs)
            # The held-out patient is never in the shards; it has a thick series of the same acquisition.
            make_cohort(
                held_dir, 1, args.seed + 1_000_003, thick_fraction=1.0, first_index=args.n_studies + 1, **phantom_kwargs
            )

        stages.run("phantoms", upstream, [out / "phantoms"], make_phantoms)
        record = json.loads((held_dir / "phantoms.json").read_text())["studies"][0]
        held = {
            "thick": str(held_dir / record["thick_dir"]),
            "thin_dir": str(held_dir / record["thin_dir"]),
            "findings": record["findings"],
        }

    # 2. shards
    shards_fp = _fingerprint(upstream, sections["shards"], cfg.data.factor)

    def build() -> None:
        from ctld.data import build_shards

        code = build_shards.main(["build", *sources, "--out", str(shards_dir), "--config", str(config_path)])
        if code != 0:
            raise RuntimeError(f"ctld-shards build failed (exit {code}); its log is above")

    stages.run("shards", shards_fp, [shards_dir], build)
    if args.data:
        held = _held_out_from_shards(shards_dir, out)

    # 3-4. training
    vae_fp = _fingerprint(shards_fp, sections["data"], sections["vae"], sections["train"], vae_steps)
    stages.run(
        "vae",
        vae_fp,
        [out / "runs" / "vae"],
        lambda: _train("vae", config_path, out, shards_dir, vae_steps, args.num_processes),
    )
    diffusion_fp = _fingerprint(vae_fp, sections["unet"], sections["diffusion"], diffusion_steps)
    stages.run(
        "diffusion",
        diffusion_fp,
        [out / "runs" / "diffusion"],
        lambda: _train("diffusion", config_path, out, shards_dir, diffusion_steps, args.num_processes),
    )
    export = out / "runs" / "diffusion" / "export"

    # 5. ctld-infer on the held-out thick series
    from ctld import evaluate, inference

    infer_fp = _fingerprint(diffusion_fp, sections["infer"], held.get("thick"))

    def infer() -> None:
        code = inference.main(
            [
                held["thick"],
                "--checkpoint",
                str(export),
                "--out",
                str(out / "infer" / "thin_dicom"),
                "--format",
                "dicom",
                "--config",
                str(config_path),
                "--no_progress",
            ]
        )
        if code != 0:
            raise RuntimeError(f"ctld-infer failed (exit {code}); its error is above")

    stages.run("infer", infer_fp, [out / "infer"], infer)

    # 6. ctld-eval: ctld vs nearest/linear/cubic on the held-out study
    report = out / "report"

    def evaluate_all() -> None:
        data = ["--pair", held["thick"], held["thin_dir"]] if "thin_dir" in held else [str(shards_dir)]
        code = evaluate.main(
            [*data, "--checkpoint", str(export), "--out", str(report), "--config", str(config_path), "--no_progress"]
        )
        if code != 0:
            raise RuntimeError(f"ctld-eval failed (exit {code}); its error is above")
        if not args.skip_coronal:
            _make_coronal(out, held, cfg.data.factor)

    stages.run("eval", infer_fp, [report], evaluate_all)

    summary = _summarize(out, cfg, stages.times, time.perf_counter() - wall_start, held, export)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
    return 0


def _summarize(out: Path, cfg: Config, times: dict, wall_seconds: float, held: dict, export: Path) -> dict:
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    mean = metrics["mean"]
    baselines = [m for m in ("nearest", "linear", "cubic", "slab_filter") if m in mean]
    methods = baselines + [m for m in mean if m not in baselines]
    print("\n" + "=" * 78)
    print(f"ctld demo finished in {_format_seconds(wall_seconds)} (this run)")
    print("\n  stage       time")
    for name in STAGES:
        if name in times:
            note = " (reused)" if times[name].get("reused") else ""
            print(f"  {name:<11} {_format_seconds(times[name]['seconds']):>7}{note}")
    case = metrics["cases"][0] if metrics["cases"] else {}
    shape = case.get("thick_shape", [])
    print(
        f"\n  held-out {'phantom study' if 'thin_dir' in held else 'test case(s)'}: {len(metrics['cases'])} "
        f"case(s); thick {shape} -> {case.get('scored_thin_slices', '?')} thin slices scored "
        f"(thick = {cfg.data.thick_profile}-profile average of {cfg.data.factor} thin slices)"
    )
    print("\n  " + f"{'method':<16}" + "".join(f"{title:>11}" for _, title in METRICS))
    for method in methods:
        row = mean[method]
        print(
            "  "
            + f"{method:<16}"
            + "".join(f"{row[key]:>11.{1 if key == 'mae_hu' else 3 if 'ssim' in key else 2}f}" for key, _ in METRICS)
        )
    print("  (PSNR/SSIM in the wide [-1024, 2048] and soft-tissue [-160, 240] HU windows; RPLHR-CT protocol "
          "columns in report.md)")
    verdicts = _verdicts(mean)
    for line in verdicts:
        print("\n  " + line if line is verdicts[0] else "  " + line)
    verdict = " ".join(verdicts)
    thin_dir = out / "infer" / "thin_dicom"
    n_files = len(list(thin_dir.glob("*.dcm"))) if thin_dir.is_dir() else 0
    rel = _relative
    print(f"\n  report:         {rel(out / 'report' / 'report.md')}  (metrics.json, panels/)")
    if (out / "coronal.png").is_file():
        print(f"  coronal panel:  {rel(out / 'coronal.png')}")
    print(f"  thin series:    {rel(thin_dir)}  ({n_files} DICOM files, from {rel(Path(held['thick']))})")
    print(f"  model export:   {rel(export)}")
    print(f"  TensorBoard:    tensorboard --logdir {rel(out / 'runs')}")
    print("=" * 78, flush=True)
    return {
        "wall_seconds": wall_seconds,
        "stages": times,
        "mean": mean,
        "verdict": verdict,
        "report": str(out / "report" / "report.md"),
        "thin_dicom": str(thin_dir),
        "export": str(export),
        "tensorboard_logdir": str(out / "runs"),
    }


def _verdicts(mean: dict) -> list[str]:
    """One line per ctld mode: its PSNR gain over cubic and over the slab filter in both windows."""
    lines = []
    for method in (m for m in mean if m.startswith("ctld")):
        gains = []
        for baseline in ("cubic", "slab_filter"):
            if baseline in mean:
                wide = mean[method]["psnr_wide"] - mean[baseline]["psnr_wide"]
                soft = mean[method]["psnr_soft_tissue"] - mean[baseline]["psnr_soft_tissue"]
                gains.append(f"{wide:+.2f} / {soft:+.2f} dB over {baseline}")
        lines.append(f"{method}: PSNR (wide / soft-tissue) " + ", ".join(gains))
    return lines


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
