"""`ctld-demo` (`make demo`): the whole ctld chain on a fresh machine, without hospital data or a GPU.

    make demo                          # phantoms -> shards -> VAE -> diffusion -> ctld-infer -> ctld-eval
    make demo DATA=/path/to/dicom      # the same chain on your own DICOM/NIfTI folder(s), configs/real.yaml
    ctld-demo --out demo_out --fresh   # start over instead of reusing finished stages
    ctld-demo --vae_steps 20 --diffusion_steps 20 --data.patch_size=32   # any --section.key=value override

Stages (each timed; a rerun reuses every stage whose inputs and settings are unchanged, and an interrupted
training stage resumes from its last checkpoint):
1. phantoms:  procedural chest CT studies written as DICOM (`ctld.demo.phantom`): training studies, some with
              a thick 5 mm series of the same acquisition, and one held-out study (thin 1 mm + thick 5 mm).
              With --data the user's folders are used instead, and the held-out case is the shards' test split.
2. shards:    `ctld-shards build` -> OUT/shards (train/val split by patient).
3. vae:       `accelerate launch ctld/train.py ... --train.stage=vae` with 2 processes (DDP over gloo on CPU,
              one process per GPU on a GPU machine) -> OUT/runs/vae/{checkpoints,tb,export}.
4. diffusion: the same launch with `--train.stage=diffusion` on the VAE export -> OUT/runs/diffusion/...
5. infer:     `ctld-infer` on the held-out thick series -> OUT/infer/thin_dicom (a thin DICOM series).
6. eval:      `ctld-eval` ctld vs nearest/linear/cubic against the held-out thin series -> OUT/report
              (metrics.json, report.md, panels/), plus OUT/coronal.png (thick | linear | ctld | thin | error);
              the same scores are recorded in the export's model card (`--add_to_card`).

The resolved settings (configs/demo.yaml + overrides) are written to OUT/demo_config.yaml and every stage reads
that file; OUT/summary.json holds the stage times and the mean metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from ctld.config import Config, ConfigError, config_to_dict, load_config, save_config
from ctld.data.dicom import anon_id
from ctld.demo.results import held_out_from_shards, make_coronal, summarize
from ctld.demo.stages import REPO_ROOT, Stages, fingerprint, train_stage
from ctld.export import EXPORT_VERSION

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DATA_CONFIG = REPO_ROOT / "configs" / "real.yaml"  # --data: the real-CT recipe
PHANTOM_VERSION = 1  # bump when ctld.demo.phantom changes what a seed produces, so reruns regenerate
PHANTOM_SALT = "ctld-demo-phantoms"  # public: phantoms identify no one
CARD_EVALUATION_PHANTOM = "ctld-demo: held-out phantom study"  # the name of the report's entry in the model card
CARD_EVALUATION_DATA = "ctld-demo: test split of --data"


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
    parser.add_argument("--config", default=None,
                        help="YAML config (default: configs/demo.yaml; with --data configs/real.yaml)")
    parser.add_argument("--fresh", action="store_true", help="remove earlier demo outputs in --out and start over")
    parser.add_argument("--n_studies", type=int, default=12,
                        help="phantom training studies (one more is held out); with --data, phantom studies trained "
                             "on beside your data (0 = none)")
    parser.add_argument("--num_slices", type=int, default=100, help="thin 1 mm slices per phantom study")
    parser.add_argument("--size", type=int, default=128, help="phantom rows = columns")
    parser.add_argument("--noise_hu", type=float, default=15.0, help="phantom noise standard deviation (HU)")
    parser.add_argument("--seed", type=int, default=0, help="phantom cohort seed")
    parser.add_argument("--vae_steps", type=int, default=0,
                        help="VAE optimizer steps; 0 exports the demo VAE as initialised, which is its lossless "
                             "space-to-channel shortcut (configs/demo.yaml)")
    parser.add_argument("--diffusion_steps", type=int, default=None,
                        help="diffusion optimizer steps (default: the config's train.max_steps)")
    parser.add_argument("--num_processes", type=int, default=2, help="training processes on CPU (DDP over gloo)")
    parser.add_argument("--skip_coronal", action="store_true", help="do not draw OUT/coronal.png")

    return parser.parse_known_args(argv)


def phantom_training_shards(out: Path, stages: Stages, config_path: Path, *, n_studies: int, seed: int = 0,
                            num_slices: int = 100, size: int = 128, noise_hu: float = 15.0) -> tuple[str, str]:
    """`n_studies` procedural phantom studies (out/phantom_studies; not the phantom demo's out/phantoms, so the two
    modes can share an --out) as training-only shards (out/phantom_shards,
    built with `config_path`'s settings, no validation or test split). A stage of `stages` ("phantom_shards"),
    reused when unchanged. Returns their URLs for data.extra_train_urls and the stage's fingerprint (for the
    training stages downstream: the URLs name files whose contents may change)."""
    phantom_kwargs = {"num_slices": num_slices, "size": size, "noise_hu": noise_hu}
    studies, shards = out / "phantom_studies", out / "phantom_shards"
    cfg = load_config(config_path)
    stage_fp = fingerprint("phantom_shards", PHANTOM_VERSION, n_studies, seed, phantom_kwargs,
                           config_to_dict(cfg)["shards"], cfg.data.factor, cfg.data.thick_profile)

    def make() -> None:
        from ctld.data import build_shards
        from ctld.demo.phantom import make_cohort

        make_cohort(studies, n_studies, seed, **phantom_kwargs)
        code = build_shards.main(["build", str(studies), "--out", str(shards), "--config", str(config_path),
                                  "--shards.val_fraction=0", "--shards.test_fraction=0"])
        if code != 0:
            raise RuntimeError(f"ctld-shards build of the phantoms failed (exit {code}); its log is above")

    stages.run("phantom_shards", stage_fp, [studies, shards], make)
    urls = sorted(str(path) for path in shards.glob("*.tar"))
    if not urls:
        raise RuntimeError(f"{shards} holds no shards: the phantom build wrote none (its log is above)")
    return "::".join(urls), stage_fp


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
    if args.config is None:
        args.config = str(DATA_CONFIG if args.data else DEFAULT_CONFIG)
    cfg: Config = load_config(args.config, overrides)
    vae_steps = args.vae_steps
    diffusion_steps = args.diffusion_steps if args.diffusion_steps is not None else cfg.train.max_steps
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        for name in (
            "phantoms",
            "phantom_studies",
            "phantom_shards",
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
    # The salt never goes into demo_config.yaml: the stages get it from $CTLD_SALT. Phantoms are synthetic, so
    # their demo uses a fixed, public salt: the same patient split and shard order, hence the same numbers, on
    # every machine. Your data (--data) gets shards.salt, $CTLD_SALT or your per-user salt file.
    salt = cfg.shards.salt or os.environ.get("CTLD_SALT", "") or ("" if args.data else PHANTOM_SALT)
    if salt:
        os.environ["CTLD_SALT"] = salt
    cfg = dataclasses.replace(cfg, shards=dataclasses.replace(cfg.shards, salt=""))
    config_path = out / "demo_config.yaml"
    save_config(cfg, config_path)  # the input of the stages below
    stages = Stages(out)
    # Fingerprints change with the salt (through a hash of it: the salt itself is never written).
    sections = config_to_dict(cfg) | {"salt": anon_id("demo", salt, "salt-check") if salt else "per-user"}
    shards_dir = out / "shards"
    held: dict = {}
    phantoms_fp = ""  # --data: the training-only phantom shards' stage

    # 1. phantoms (or the user's data)
    if args.data:
        sources = [str(Path(p).resolve()) for p in args.data]
        upstream = fingerprint("data", sources)
        if args.n_studies > 0:
            # The real-CT recipe also trains on phantoms (data.extra_train_urls): docs/quality.md measured it on
            # real patients it never saw. They are never held out, validated on or part of the slab filter's fit.
            phantom_urls, phantoms_fp = phantom_training_shards(
                out, stages, config_path, n_studies=args.n_studies, seed=args.seed, num_slices=args.num_slices,
                size=args.size, noise_hu=args.noise_hu)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, extra_train_urls=phantom_urls))
            save_config(cfg, config_path)
            sections = config_to_dict(cfg) | {"salt": sections["salt"]}
        else:
            stages.times["phantoms"] = {"seconds": 0.0, "reused": True, "skipped": "--data given, --n_studies 0"}
    else:
        phantom_kwargs = {"num_slices": args.num_slices, "size": args.size, "noise_hu": args.noise_hu}
        upstream = fingerprint("phantoms", PHANTOM_VERSION, args.n_studies, args.seed, phantom_kwargs)
        train_dir, held_dir = out / "phantoms" / "train", out / "phantoms" / "heldout"
        sources = [str(train_dir)]

        def make_phantoms() -> None:
            from ctld.demo.phantom import make_cohort

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
    shards_fp = fingerprint(upstream, sections["shards"], sections["salt"], cfg.data.factor)

    def build() -> None:
        from ctld.data import build_shards

        code = build_shards.main(["build", *sources, "--out", str(shards_dir), "--config", str(config_path)])
        if code != 0:
            raise RuntimeError(f"ctld-shards build failed (exit {code}); its log is above")

    stages.run("shards", shards_fp, [shards_dir], build)
    if args.data:
        held = held_out_from_shards(shards_dir, out)

    # 3-4. training
    vae_fp = fingerprint(shards_fp, phantoms_fp, sections["data"], sections["vae"], sections["train"], vae_steps)
    stages.run(
        "vae",
        vae_fp,
        [out / "runs" / "vae"],
        lambda: train_stage("vae", config_path, out, shards_dir, vae_steps, args.num_processes),
    )
    # The export format: an export an older ctld wrote is refused by ctld-infer, so it is trained again.
    diffusion_fp = fingerprint(vae_fp, sections["unet"], sections["diffusion"], diffusion_steps, EXPORT_VERSION)
    stages.run(
        "diffusion",
        diffusion_fp,
        [out / "runs" / "diffusion"],
        lambda: train_stage("diffusion", config_path, out, shards_dir, diffusion_steps, args.num_processes),
    )
    export = out / "runs" / "diffusion" / "export"

    # 5. ctld-infer on the held-out thick series
    from ctld import evaluate, inference

    infer_fp = fingerprint(diffusion_fp, sections["infer"], held.get("thick"))

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
        # The report's scores also go into the export's model card (README.md), so the card shows these numbers.
        code = evaluate.main(
            [*data, "--checkpoint", str(export), "--out", str(report), "--config", str(config_path), "--no_progress",
             "--add_to_card", CARD_EVALUATION_DATA if args.data else CARD_EVALUATION_PHANTOM]
        )
        if code != 0:
            raise RuntimeError(f"ctld-eval failed (exit {code}); its error is above")
        if not args.skip_coronal:
            make_coronal(out, held, cfg.data.factor)

    stages.run("eval", infer_fp, [report], evaluate_all)

    summary = summarize(out, cfg, stages.times, time.perf_counter() - wall_start, held, export)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
