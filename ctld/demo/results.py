"""What the demo shows at the end: the held-out case, the coronal panel and the summary table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ctld.config import Config
from ctld.demo.stages import format_seconds

STAGES = ("phantoms", "shards", "vae", "diffusion", "infer", "eval")
METRICS = (
    ("psnr_wide", "PSNR wide"),
    ("ssim_wide", "SSIM wide"),
    ("psnr_soft_tissue", "PSNR soft"),
    ("ssim_soft_tissue", "SSIM soft"),
    ("mae_hu", "MAE HU"),
)


def held_out_from_shards(shards_dir: Path, out: Path) -> dict:
    """The first sample of the test split: its thick series as NIfTI (ctld-infer input) and its thin series."""
    from ctld.data.nifti import write_nifti
    from ctld.data.shards import iter_samples, manifest_shards
    from ctld.data.volume import Volume

    test_urls = manifest_shards(shards_dir, "test")
    if not test_urls:
        raise ValueError(
            f"{shards_dir} has no test split to hold out: the folders given with --data hold too few patients "
            f"for shards.test_fraction; pass more patients or raise --shards.test_fraction"
        )
    through_plane = (s for s in iter_samples(test_urls) if s["meta"].get("thick_source") != "inplane")
    sample = next(through_plane, None)
    if sample is None:
        raise ValueError(f"{shards_dir}: the test split holds only in-plane pairs; no through-plane case to hold out")
    info, thick_hu, thin_hu = sample["meta"], sample["thick"], sample["thin"]
    thick = Volume(
        hu=thick_hu,
        spacing_mm=info["thick_spacing_mm"],
        origin_mm=info["thick_origin_mm"],
        direction=np.asarray(info["direction"]),
    )
    held = out / "heldout"
    held.mkdir(parents=True, exist_ok=True)
    write_nifti(thick, held / "thick.nii.gz", overwrite=True)  # rewritten on every rerun
    factor, offset = sample["factor"], sample["offset"]
    target = thin_hu[offset : offset + thick_hu.shape[0] * factor]
    np.save(held / "thin_target.npy", target)
    return {"thick": str(held / "thick.nii.gz"), "thin_target": str(held / "thin_target.npy"), "findings": []}


def make_coronal(out: Path, held: dict, factor: int) -> Path:
    from ctld.baselines import interpolate_z
    from ctld.data.dicom import read_dicom_series
    from ctld.panels import save_panels
    from ctld.series_io import read_input

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
    return save_panels(out / "coronal.png", columns, spacing_mm=predicted[0].spacing_mm,
                       direction=predicted[0].direction, views=("coronal",), windows=("lung", "soft_tissue"),
                       index={"coronal": row}, error_of="ctld", reference="thin 1 mm", tile=192)


def summarize(out: Path, cfg: Config, times: dict, wall_seconds: float, held: dict, export: Path) -> dict:
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    mean = metrics["mean"]
    baselines = [m for m in ("nearest", "linear", "cubic", "slab_filter") if m in mean]
    methods = baselines + [m for m in mean if m not in baselines]
    print("\n" + "=" * 78)
    print(f"ctld demo finished in {format_seconds(wall_seconds)} (this run)")
    print("\n  stage       time")
    for name in STAGES:
        if name in times:
            note = " (reused)" if times[name].get("reused") else ""
            print(f"  {name:<11} {format_seconds(times[name]['seconds']):>7}{note}")
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
    lines = verdicts(mean)
    for line in lines:
        print("\n  " + line if line is lines[0] else "  " + line)
    verdict = " ".join(lines)
    thin_dir = out / "infer" / "thin_dicom"
    n_files = len(list(thin_dir.glob("*.dcm"))) if thin_dir.is_dir() else 0
    rel = relative
    print(f"\n  report:         {rel(out / 'report' / 'report.md')}  (metrics.json, panels/)")
    if (out / "coronal.png").is_file():
        print(f"  coronal panel:  {rel(out / 'coronal.png')}")
    print(f"  thin series:    {rel(thin_dir)}  ({n_files} DICOM files, from {rel(Path(held['thick']))})")
    print(f"  model export:   {rel(export)}  (model card: README.md, with these scores)")
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


def verdicts(mean: dict) -> list[str]:
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


def relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
