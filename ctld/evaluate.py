"""Evaluate ctld against nearest/linear/cubic interpolation, or measure a VAE's reconstruction ceiling (`ctld-eval`).

    ctld-eval --checkpoint runs/ctld/export thin_ct/ more_ct.nii.gz shards/ --out report/
    ctld-eval --checkpoint runs/ctld/export --pair thick_5mm/ thin_1mm/ --out report/
    ctld-eval --vae runs/vae/export thin_ct/ --out vae_report/
    ctld-eval --method cubic --factor 5 thin_ct/ --out check/      # a baseline through the windowed engine
    ctld-eval --checkpoint runs/ctld/export --method prior thin_ct/ --out prior/   # the prior an untrained model gives
    ctld-eval --checkpoint runs/ctld/export --adapt 200 thin_ct/ --out adapted/  # base vs adapted to each case
    ctld-eval --checkpoint runs/ctld/export shards/ --out report/ --add_to_card "test split"  # into the model card

DATA may be thin series (DICOM folders/ZIPs, NIfTI files): the thick input is simulated with
`ctld.data.transforms.simulate_thick` (the slice profile the export was trained with, `--thick_profile`; box =
thick slice k is the mean of thin slices [k*f, (k+1)*f)); `--pair THICK THIN`
gives a real thick/thin pair of one study; a shards folder (with manifest.json) contributes its test split, real
or simulated pairs as stored. Every method predicts the thin grid of docs/DESIGN.md from the thick series and is scored
against the thin slices it covers, with the protocol of `ctld.metrics` (written out in metrics.json).

Outputs in REPORT_DIR: metrics.json (per case and mean, with the protocol), panels/<case>.png (axial, coronal,
sagittal: thick | cubic | slab filter | each ctld mode | target | error of the first mode) and report.md (tables and
figures). Rows: nearest, linear, cubic, slab_filter (the export's, fitted on its training split), ctld_regression,
ctld_diffusion (and with `--adapt STEPS` ctld_<mode>_adapted: the export fine-tuned on in-plane pairs of that case's
thick series alone, `ctld.adapt`; the thin target is never used for it); columns in our protocol and the field's
(RPLHR-CT, `ctld.metrics`), each named in the report.
Case names are salted hashes of the series (salt: $CTLD_SALT, else random per run): no identifiers leave.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctld.baselines import METHODS, SlabFilter, interpolate_z
from ctld.config import DataConfig
from ctld.data.domain import check_input, input_differences, model_pixel_spacing_mm
from ctld.data.geometry import AlignmentError, align, resampled_inplane_shape
from ctld.data.shards import MANIFEST, iter_samples, manifest_shards
from ctld.data.transforms import HU_WINDOWS, simulate_thick
from ctld.data.volume import Volume
from ctld.export import read_export_meta
from ctld.infer_settings import describe, resolve_settings
from ctld.inference import adapted_export, add_infer_flags, check_adapt_settings, pick_device, window_kwargs
from ctld.inferer import interpolate_at_spacing, interpolate_volume, plan_inference
from ctld.metrics import PROTOCOL, WINDOWS, all_metrics, psnr
from ctld.model_card import add_evaluation
from ctld.panels import save_panels
from ctld.predictors import CtldPredictor, baseline_predictor, prior_predictor, vae_predictor
from ctld.series_io import read_series

logger = logging.getLogger(__name__)

METRIC_KEYS = ("psnr_wide", "ssim_wide", "psnr_soft_tissue", "ssim_soft_tissue", "mae_hu", "rplhr_psnr", "rplhr_ssim")
MODES = ("regression", "diffusion")
THIN_MAX_SPACING_MM = 2.0  # a DATA series with a wider slice spacing is not a thin target (ShardsConfig default)


@dataclass
class Case:
    """One evaluation case: a thick series and the thin slices its thin grid covers."""

    name: str
    thick_hu: np.ndarray  # (Dt, H, W)
    target_hu: np.ndarray  # (Dt * factor, H, W) thin slices on the thick series' thin grid, cropped by `valid`
    valid: tuple[int, int]  # thin-grid rows [lo, hi) that have a target slice (all rows for simulated thick)
    thin_spacing_mm: tuple[float, float, float]
    direction: np.ndarray
    thick_source: str  # "simulated" | "real"


# --------------------------------------------------------------------------------------------------------------
# Loading cases


def _case_name(volume_or_key: str, salt: str, index: int) -> str:
    from ctld.data.dicom import anon_id

    return f"case{index:03d}_{anon_id(volume_or_key, salt, 'eval', length=8)}"


def _simulated_case(thin: Volume, factor: int, name: str, thick_profile: str = "box") -> Case:
    thick = simulate_thick(thin.hu, factor, thick_profile)
    depth = thick.shape[0] * factor
    return Case(name=name, thick_hu=thick, target_hu=thin.hu[:depth], valid=(0, depth),
                thin_spacing_mm=thin.spacing_mm, direction=thin.direction, thick_source="simulated")


def _pair_case(thick: Volume, thin: Volume, factor: int, name: str, where: str) -> Case:
    """A real thick series aligned to a thin one of the same study (`ctld.data.geometry.align`, the tolerances
    `ctld-shards build` pairs with)."""
    try:
        offset = align(thin, thick, factor)
    except AlignmentError as error:
        raise ValueError(f"{where}: {error}") from error
    return _aligned_case(thick.hu, thin.hu, factor, offset, name, thin.spacing_mm, thin.direction, "real")


def _aligned_case(thick_hu, thin_hu, factor, offset, name, spacing, direction, source) -> Case:
    """Thin-grid row m of the thick series <-> thin slice offset + m; keep the rows that have a thin slice."""
    depth = thick_hu.shape[0] * factor
    lo, hi = max(0, -offset), min(depth, thin_hu.shape[0] - offset)
    if hi - lo < 1:
        raise ValueError(f"{name}: the thick and thin series do not overlap along the slice axis")
    target = np.zeros((depth, *thin_hu.shape[1:]), dtype=thin_hu.dtype)
    target[lo:hi] = thin_hu[lo + offset : hi + offset]
    return Case(name=name, thick_hu=thick_hu, target_hu=target, valid=(lo, hi), thin_spacing_mm=tuple(spacing),
                direction=np.asarray(direction), thick_source=source)


def _shard_cases(folder: Path, factor: int, salt: str, start: int) -> list[Case]:
    """The test split of a shards folder, real or simulated pairs as stored."""
    urls = manifest_shards(folder, "test")
    if not urls:
        raise ValueError(f"{folder}: the manifest lists no test shards; build shards with a test_fraction > 0")
    cases = []
    for sample in iter_samples(urls):
        if sample["meta"].get("thick_source") == "inplane":  # a training device, not a through-plane case
            continue
        if sample["factor"] != factor:
            raise ValueError(f"{sample['__url__']}: sample {sample['__key__']} has factor {sample['factor']}, the "
                             f"model's is {factor}")
        info = sample["meta"]
        name = _case_name(sample["__key__"], salt, start + len(cases))
        cases.append(_aligned_case(sample["thick"], sample["thin"], factor, sample["offset"], name,
                                   info["thin_spacing_mm"], np.asarray(info["direction"]),
                                   info.get("thick_source", "real")))
    return cases


def load_cases(data: list[str], pairs: list[list[str]], factor: int, salt: str, max_cases: int = 0,
               thick_profile: str = "box") -> list[Case]:
    cases: list[Case] = []
    for item in data:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"DATA {path} does not exist")
        if path.is_dir() and (path / MANIFEST).is_file():
            cases.extend(_shard_cases(path, factor, salt, len(cases)))
            continue
        for volume in read_series(path, salt=salt):
            if volume.spacing_mm[0] > THIN_MAX_SPACING_MM:
                logger.warning("%s: series %s has %.2f mm slice spacing, not a thin series; left out (use --pair for "
                               "real thick/thin pairs)", path, volume.series_id, volume.spacing_mm[0])
                continue
            if volume.shape[0] < factor:
                logger.warning("%s: series %s has %d slices, fewer than factor %d; left out", path, volume.series_id,
                               volume.shape[0], factor)
                continue
            cases.append(_simulated_case(volume, factor, _case_name(volume.series_id, salt, len(cases)), thick_profile))
    for thick_path, thin_path in pairs:
        thick_volumes, thin_volumes = read_series(thick_path, salt=salt), read_series(thin_path, salt=salt)
        if len(thick_volumes) != 1 or len(thin_volumes) != 1:
            raise ValueError(f"--pair {thick_path} {thin_path}: each side must hold exactly one series, got "
                             f"{len(thick_volumes)} and {len(thin_volumes)}")
        name = _case_name(thin_volumes[0].series_id, salt, len(cases))
        cases.append(_pair_case(thick_volumes[0], thin_volumes[0], factor, name, f"--pair {thick_path} {thin_path}"))
    if max_cases:
        cases = cases[:max_cases]
    if not cases:
        raise ValueError("no evaluation cases: pass thin series, --pair THICK THIN, or a shards folder")
    return cases


# --------------------------------------------------------------------------------------------------------------
# Running


def _mean(per_case: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    methods = per_case[0].keys()
    return {m: {k: float(np.mean([case[m][k] for case in per_case])) for k in per_case[0][m]} for m in methods}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _table(rows: dict[str, dict[str, float]], keys=METRIC_KEYS) -> list[str]:
    keys = [k for k in keys if all(k in values for values in rows.values())]
    header = "| method | " + " | ".join(keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 1)]
    for method, values in rows.items():
        lines.append(f"| {method} | " + " | ".join(f"{values[k]:.4f}" if "ssim" in k else f"{values[k]:.2f}"
                                                     for k in keys) + " |")
    return lines


def evaluate_interpolation(cases: list[Case], models: dict, *, factor: int, depth_thick: int, patch_size: int,
                           cfg, device, out: Path, progress: bool | None, panel_window: str,
                           slab_filter: SlabFilter | None = None, export_meta: dict | None = None,
                           case_models: Callable[[Case], dict] | None = None, tiling_check: bool = False) -> dict:
    """Score the baselines (nearest, linear, cubic and, when given, the slab filter fitted on the training split)
    and every model of `models` ({name: (predict_fn, hu_range)}, run through the windowed engine at the pixel
    spacing the export `export_meta` (its ctld.json) runs each case at: `ctld.data.domain.model_pixel_spacing_mm`)
    on every case;
    returns the metrics document (also written). `models` may hold the target itself as {"target": None}.
    `case_models(case)` may add models made for one case (the export adapted to its thick series), scored after
    `models` on that case only. `tiling_check`: the first model is run again with its window grid shifted by half a
    window in every axis, and the PSNR between the two thin series is reported (`tiling_check`; identical = 100)."""
    per_case, tiling = [], []
    for case in cases:
        lo, hi = case.valid
        target = case.target_hu[lo:hi]
        predictions = {method: interpolate_z(case.thick_hu, factor, method) for method in METHODS}
        if slab_filter is not None:
            predictions["slab_filter"] = slab_filter.apply(case.thick_hu)
        here = {**models, **(case_models(case) if case_models is not None else {})}
        for name, model in here.items():
            if model is None:
                predictions[name] = case.target_hu.astype(np.float32)
                continue
            predict, hu_range = model
            model_mm = model_pixel_spacing_mm(export_meta, case.thin_spacing_mm[1:]) if export_meta else None
            run = dict(pixel_spacing_mm=case.thin_spacing_mm[1:],
                       model_pixel_spacing_mm=model_mm if hu_range is not None else None, factor=factor,
                       depth_thick=depth_thick, patch_size=patch_size, hu_range=hu_range, **window_kwargs(cfg),
                       device=device, progress=progress)
            predictions[name] = interpolate_at_spacing(case.thick_hu, predict, **run)
            if tiling_check and len(tiling) == len(per_case):  # the first model of each case
                tiling.append(check_tiling(case.thick_hu, predict, predictions[name], run, name))
        metrics = {method: all_metrics(pred[lo:hi], target, rplhr=True) for method, pred in predictions.items()}
        per_case.append(metrics)
        shown = next(iter(models))
        thick_on_grid = interpolate_z(case.thick_hu, factor, "nearest")[lo:hi]
        columns = [("thick", thick_on_grid), ("cubic", predictions["cubic"][lo:hi])]
        if slab_filter is not None:
            columns.append(("slab_filter", predictions["slab_filter"][lo:hi]))
        columns += [(name, predictions[name][lo:hi]) for name in here] + [("target", target)]
        save_panels(out / "panels" / f"{case.name}.png", columns, spacing_mm=case.thin_spacing_mm,
                    direction=case.direction, windows=(panel_window,), error_of=shown, reference="target")
        logger.info("%s: %s", case.name, {m: round(v["psnr_soft_tissue"], 2) for m, v in metrics.items()})
    doc = {
        "cases": [
            {"case": case.name, "thick_source": case.thick_source, "thick_shape": list(case.thick_hu.shape),
             "scored_thin_slices": case.valid[1] - case.valid[0], "thin_spacing_mm": list(case.thin_spacing_mm),
             "panel": f"panels/{case.name}.png", "metrics": metrics}
            for case, metrics in zip(cases, per_case, strict=True)
        ],
        "mean": _mean(per_case),
    }
    if tiling:
        for entry, check in zip(doc["cases"], tiling, strict=True):
            entry["tiling_check"] = check
        doc["tiling_check_mean"] = {key: float(np.mean([c[key] for c in tiling]))
                                    for key in tiling[0] if key.startswith("psnr_")}
    return doc


def check_tiling(thick_hu: np.ndarray, predict, thin_hu: np.ndarray, run: dict, name: str = "") -> dict:
    """`predict` on `thick_hu` again (`run`: the `interpolate_at_spacing` keywords that gave `thin_hu`) with its
    window grid moved by half a window in depth and in-plane: PSNR between the two thin series in each metric window.
    A model whose output depends on where the tiles fall (per-tile statistics, edges) shows it here; interpolation
    gives 100 (identical)."""
    keys = ("factor", "depth_thick", "patch_size", "depth_context", "depth_overlap", "inplane_overlap", "batch_size",
            "window_depth", "tile_size")
    shape = thick_hu.shape
    if run.get("model_pixel_spacing_mm"):  # the windows fall on the grid the model runs at
        shape = (shape[0], *resampled_inplane_shape(shape[1:], run["pixel_spacing_mm"], run["model_pixel_spacing_mm"]))
    plan, _ = plan_inference(predict, shape, **{key: run[key] for key in keys})
    shifted = interpolate_at_spacing(thick_hu, predict, grid_shift=plan.half_window_shift, **run)
    return {"model": name, "grid_shift": list(plan.half_window_shift),
            "window": [plan.depth_thick, plan.patch_size, plan.patch_size],
            **{f"psnr_{window}": psnr(shifted, thin_hu, bounds) for window, bounds in WINDOWS.items()},
            "max_abs_difference_hu": float(np.abs(shifted - thin_hu).max())}


def evaluate_vae(cases: list[Case], vae, *, factor: int, depth_thick: int, patch_size: int, hu_range, cfg, device,
                 out: Path, progress: bool | None, panel_window: str) -> dict:
    """encode -> decode of the thin target and of the thick input, through the same windowed engine."""
    predict = vae_predictor(vae, device)
    per_case = []
    for case in cases:
        lo, hi = case.valid
        metrics = {}
        recon = {}
        for kind, volume, depth in (("thin", case.target_hu[lo:hi], depth_thick * factor),
                                    ("thick", case.thick_hu, depth_thick)):
            recon[kind] = interpolate_volume(
                volume, predict, factor=1, depth_thick=depth, patch_size=patch_size, hu_range=hu_range,
                **window_kwargs(cfg), device=device, progress=progress, keep_beyond=False,  # the VAE alone
            )
            metrics[f"vae_{kind}"] = all_metrics(recon[kind], volume, rplhr=True)
        per_case.append(metrics)
        save_panels(out / "panels" / f"{case.name}.png", [("thin", case.target_hu[lo:hi]), ("vae", recon["thin"])],
                    spacing_mm=case.thin_spacing_mm, direction=case.direction, windows=(panel_window,),
                    error_of="vae", reference="thin")
    return {
        "cases": [{"case": c.name, "thick_source": c.thick_source, "panel": f"panels/{c.name}.png", "metrics": m}
                  for c, m in zip(cases, per_case, strict=True)],
        "mean": _mean(per_case),
    }


def write_report(out: Path, doc: dict) -> None:
    _write_json(out / "metrics.json", doc)
    title = "VAE reconstruction ceiling" if doc["mode"] == "vae" else "ctld vs interpolation baselines"
    lines = [f"# ctld-eval: {title}", "", f"{len(doc['cases'])} case(s). Settings: `{json.dumps(doc['settings'])}`",
             "", "## Mean over cases", "", *_table(doc["mean"]), "",
             "Columns `psnr_*`, `ssim_*` (windows `wide` and `soft_tissue`) and `mae_hu` follow ctld's protocol; "
             "`rplhr_psnr` and `rplhr_ssim` follow the RPLHR-CT protocol of the field. Both are spelled out below.",
             ""]
    if "tiling_check_mean" in doc:
        shown = ", ".join(f"{key} {value:.2f} dB" for key, value in doc["tiling_check_mean"].items())
        lines += [f"Tiling check ({doc['cases'][0]['tiling_check']['model']} with its window grid shifted by half a "
                  f"window, PSNR between the two thin series, mean over cases): {shown}.", ""]
    lines += ["## Protocol", ""]
    lines += [f"- {key}: {value}" for key, value in doc["protocol"].items()]
    lines += ["", "## Cases", ""]
    for case in doc["cases"]:
        lines += [f"### {case['case']} ({case['thick_source']} thick)", "", *_table(case["metrics"]), "",
                  f"![{case['case']}]({case['panel']})", ""]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(out / "report.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctld-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="*", help="thin series (DICOM folders/ZIPs, NIfTI) or shards folders")
    parser.add_argument("--out", required=True, help="report folder (metrics.json, report.md, panels/)")
    parser.add_argument("--checkpoint", default=None, help="export folder of a diffusion run: evaluate ctld")
    parser.add_argument("--vae", default=None, help="export folder: report the VAE's encode->decode ceiling")
    parser.add_argument("--method", choices=("ctld", "prior", *METHODS, "target"), default="ctld",
                        help="what fills the model rows: ctld (needs --checkpoint; one row per --modes), the "
                             "export's prior alone (what an untrained model returns), a baseline run through the "
                             "windowed engine, or the target itself (checks the metric pipeline)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="ctld inference modes to score, comma-separated (default: regression,diffusion)")
    parser.add_argument("--thick_profile", choices=("box", "gaussian", "triangle"), default=None,
                        help="slice profile simulating thick series from thin DATA (default: the export's, else box)")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("THICK", "THIN"),
                        help="a real thick/thin pair of one study (repeatable)")
    parser.add_argument("--factor", type=int, default=None, help="without an export: thin slices per thick slice")
    parser.add_argument("--depth_thick", type=int, default=None, help="without an export: thick slices per window")
    parser.add_argument("--patch_size", type=int, default=None, help="without an export: in-plane tile size")
    parser.add_argument("--max_cases", type=int, default=0, help="evaluate at most this many cases (0 = all)")
    parser.add_argument("--panel_window", choices=sorted(HU_WINDOWS), default="soft_tissue", help="HU window of panels")
    parser.add_argument("--tiling_check", action="store_true",
                        help="run the first model again with its window grid shifted by half a window and report "
                             "the PSNR between the two thin series (tiling invariance; identical = 100 dB)")
    parser.add_argument("--add_to_card", default=None, metavar="NAME",
                        help="record the mean scores in the export's model card (README.md, model_card.json) under "
                             "NAME, e.g. 'held-out test split'; the same NAME is replaced")
    add_infer_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from ctld.data.dicom import SeriesSkipped
    from ctld.export import load_export

    try:
        if args.checkpoint and args.vae:
            raise ValueError("pass either --checkpoint (ctld vs baselines) or --vae (reconstruction ceiling)")
        if args.method in ("ctld", "prior") and not (args.checkpoint or args.vae):
            raise ValueError(f"--method {args.method} needs --checkpoint EXPORT (or pick --method "
                             "cubic|linear|nearest|target)")
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or any(m not in MODES for m in modes):
            raise ValueError(f"--modes={args.modes!r}: give one or more of {','.join(MODES)}")
        export_dir = args.checkpoint or args.vae
        if args.add_to_card and not export_dir:
            raise ValueError("--add_to_card NAME records this evaluation in an export's model card: it needs "
                             "--checkpoint or --vae")
        cfg, sources = resolve_settings(args, read_export_meta(export_dir).get("infer") if export_dir else None)
        settings_line = describe(cfg, sources)
        print(settings_line, flush=True)
        check_adapt_settings(cfg)
        if cfg.adapt_steps > 0 and (args.vae or args.method != "ctld"):
            raise ValueError("--adapt scores ctld adapted to each case: it needs --checkpoint and --method ctld")
        device = pick_device(args.device)
        export = (load_export(args.checkpoint or args.vae, device, need_unet=bool(args.checkpoint))
                  if (args.checkpoint or args.vae) else None)
        defaults = DataConfig()
        meta = export.meta if export is not None else {
            "factor": defaults.factor, "depth_thick": defaults.depth_thick, "patch_size": defaults.patch_size,
            "hu_min": defaults.hu_min, "hu_max": defaults.hu_max,
        }
        for key in ("factor", "depth_thick", "patch_size"):
            given = getattr(args, key)
            if given is not None and export is not None and given != int(meta[key]):
                raise ValueError(f"--{key}={given} contradicts the export's {key}={meta[key]}")
            if given is not None:
                meta[key] = given
        factor, depth_thick, patch_size = int(meta["factor"]), int(meta["depth_thick"]), int(meta["patch_size"])
        hu_range = (float(meta["hu_min"]), float(meta["hu_max"]))
        salt = os.environ.get("CTLD_SALT") or secrets.token_hex(16)
        thick_profile = args.thick_profile or meta.get("thick_profile", "box")
        cases = load_cases(args.data, args.pair, factor, salt, args.max_cases, thick_profile)
        slab_filter = SlabFilter.from_json(meta["slab_filter"]) if "slab_filter" in meta else None
        for case in cases:  # warnings only: scoring a model outside its training domain is what ctld-eval is for
            spacing = (case.thin_spacing_mm[0] * factor, *case.thin_spacing_mm[1:])
            check_input(input_differences(case.thick_hu, spacing, meta, spacing_tolerance=cfg.spacing_tolerance),
                        name=case.name, allow=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        common = dict(factor=factor, depth_thick=depth_thick, patch_size=patch_size, cfg=cfg, device=device,
                      out=out, progress=False if args.no_progress else None, panel_window=args.panel_window)
        settings = {"factor": factor, "depth_thick": depth_thick, "patch_size": patch_size,
                    "hu_range": list(hu_range), "device": str(device), "thick_profile": thick_profile, **vars(cfg),
                    "sources": sources}
        if args.vae:
            result = evaluate_vae(cases, export.vae, hu_range=hu_range, **common)
            mode = "vae"
        else:
            if args.method == "ctld":
                models = {f"ctld_{m}": (CtldPredictor(export, mode=m, sampler=cfg.sampler,
                                                      num_inference_steps=cfg.num_inference_steps,
                                                      num_samples=cfg.num_samples, seed=cfg.seed,
                                                      self_ensemble=cfg.self_ensemble, device=device),
                                        hu_range) for m in modes}
                settings["modes"] = modes
            elif args.method == "prior":
                models = {"prior": (prior_predictor(export, device), hu_range)}
            elif args.method == "target":
                models = {"target": None}
            else:  # a baseline through the windowed engine, in HU, to check the stitching end to end
                models = {f"windowed_{args.method}": (baseline_predictor(factor, args.method), None)}
            case_models = None
            if cfg.adapt_steps > 0:
                def case_models(case: Case) -> dict:
                    # The thick series alone: the case's thin target never reaches the adaptation.
                    spacing = (case.thin_spacing_mm[0] * factor, *case.thin_spacing_mm[1:])
                    adapted = adapted_export(export, case.thick_hu, spacing, cfg, device)
                    logger.info("%s: adapted in %d steps, loss %.4f -> %.4f", case.name, cfg.adapt_steps,
                                adapted.meta["adapted"]["first_loss"], adapted.meta["adapted"]["final_loss"])
                    return {f"ctld_{m}_adapted": (CtldPredictor(adapted, mode=m, sampler=cfg.sampler,
                                                                num_inference_steps=cfg.num_inference_steps,
                                                                num_samples=cfg.num_samples, seed=cfg.seed,
                                                                self_ensemble=cfg.self_ensemble,
                                                                device=device), hu_range) for m in modes}
            result = evaluate_interpolation(cases, models, slab_filter=slab_filter,
                                            export_meta=meta,
                                            case_models=case_models, tiling_check=args.tiling_check, **common)
            mode = "interpolation"
            settings["method"] = args.method
    except (ValueError, FileNotFoundError, SeriesSkipped) as error:
        print(f"ctld-eval: error: {error}", file=sys.stderr)
        return 2
    protocol = {
        **PROTOCOL,
        "thin_grid": "thin slices of thick slice k at z_k + (i - (f - 1) / 2) * dz / f (docs/DESIGN.md)",
        "simulated_thick": f"thick slice k = the {settings.get('thick_profile', 'box')}-profile average of the thin "
                           "slices around slab [k*f, (k+1)*f) (box = their mean; ctld.data.transforms.simulate_thick)",
        "baselines": "interpolation along z only (ctld.baselines): nearest = the covering thick slice, linear, "
                     "cubic = Keys cubic convolution a=-0.5; slab_filter = the per-phase linear z-filter fitted in "
                     "closed form on the model's training split (stored in the export); edge slices replicated",
        "ctld": "ctld_regression = one pass of the residual model (the conditional mean); ctld_diffusion = the mean "
                "of num_samples diffusion samples started from the one-pass estimate noised to the strength; with "
                "self_ensemble > 1, the mean over that many mirrored copies of each window (ctld.predictors.FLIPS)",
        "scored_slices": "thin slices covered by the thick series (real pairs: where the thin series has them)",
    }
    if settings.get("adapt_steps", 0) > 0 and settings.get("method") == "ctld":
        protocol["adapted"] = (
            f"ctld_<mode>_adapted = the same export after {settings['adapt_steps']} AdamW steps (lr "
            f"{settings['adapt_lr']}, seed {settings['adapt_seed']}, {settings['adapt_batch_size']} patches per step) "
            "on in-plane pairs of that case's thick series only (ctld.adapt: an in-plane axis resampled to the thin "
            "spacing plays the slice axis); the thin target is never used for adaptation, only for scoring. The base "
            "rows use the unadapted export"
        )
    doc = {"mode": mode, "protocol": protocol, "settings": settings, **result}
    write_report(out, doc)
    if args.add_to_card:
        add_evaluation(export_dir, args.add_to_card, doc, settings_line)
        print(f"recorded in {Path(export_dir) / 'README.md'} as {args.add_to_card!r}")
    print(json.dumps({"mean": doc["mean"], "report": str(out / "report.md")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
