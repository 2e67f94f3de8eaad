"""The model card of an export: README.md for people and model_card.json with the same facts for programs.

    card = training_card(meta=meta, run=run, data=data_summary(manifest), validation=..., config=..., ...)
    write_card(export_dir, card)                                  # both files, each replaced atomically
    add_evaluation(export_dir, "held-out phantom study", report, line)   # ctld-eval --add_to_card NAME

The card holds aggregates only (counts, ranges, scores): no sample key, case id or series id. Scores are copied
from the runs that measured them (the final validation of training, `ctld-eval`), never typed in.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

CARD_VERSION = 1
CARD_JSON, CARD_MARKDOWN = "model_card.json", "README.md"
INTENDED_USE = ("Research on CT slice interpolation: predict the thin slices (factor x finer) of an axial CT series "
                "reconstructed with thick slices, on inputs like its training data (ranges below).")
NOT_FOR = ("Diagnosis or any clinical decision: slices it adds are predictions, not measurements, and may show "
           "or hide findings; inputs outside the ranges below (ctld-infer refuses or warns); tilted-gantry series; "
           "modalities other than CT.")
MODES = ("regression (one U-Net pass, the conditional mean) gives the best PSNR, SSIM and MAE and is the default; "
         "diffusion (the mean of sampled thin series) scored below it on every real CT case measured (docs/quality.md)"
         ": use diffusion to draw samples of plausible thin slices, not for the most accurate single series.")
SCORE_COLUMNS = (("psnr_wide", "PSNR wide", ".2f"), ("ssim_wide", "SSIM wide", ".3f"),
                 ("psnr_soft_tissue", "PSNR soft", ".2f"), ("ssim_soft_tissue", "SSIM soft", ".3f"),
                 ("mae_hu", "MAE HU", ".1f"))


def training_card(*, meta: dict[str, Any], run: dict[str, Any], data: dict[str, Any] | None,
                  validation: dict[str, Any] | None, config: dict[str, Any],
                  vae_export_sha256: str | None) -> dict[str, Any]:
    """The card written with an export at the end of training.

    Args:
        meta: the export's ctld.json contents (factor, spacing, window, `infer`, `domain`, ...).
        run: steps, world size, precision, wall time, git commit and package versions of the run.
        data: `ctld.data.domain.data_summary` of the training shards' manifest, or None without a manifest.
        validation: {"step", "patches", "rows": {method: {metric: value}}} of the final validation, or None.
        config: the resolved training config (`ctld.config.config_to_dict`: the salt redacted).
        vae_export_sha256: `ctld.export.vae_hash` of the VAE export a diffusion run was trained on.
    """
    thin_mm = meta.get("thin_spacing_mm")
    factor = int(meta["factor"])
    return {
        "card_version": CARD_VERSION,
        "model": {
            "name": meta.get("run_name"), "stage": meta.get("stage"), "factor": factor, "thin_spacing_mm": thin_mm,
            "thick_spacing_mm": factor * float(thin_mm) if thin_mm else None,
            "hu_window": [meta["hu_min"], meta["hu_max"]], "inplane_spacing_mm": meta.get("inplane_spacing_mm"),
            "window": {"depth_thick": meta["depth_thick"], "patch_size": meta["patch_size"]},
            "slice_spacing_policy": meta.get("slice_spacing_policy"),
            "pixel_spacing_policy": meta.get("pixel_spacing_policy"),
        },
        "intended_use": INTENDED_USE,
        "not_for": NOT_FOR,
        "inference_modes": MODES,
        "inference_settings": dict(meta.get("infer", {})),
        "domain": dict(meta.get("domain", {})),
        "training_data": data,
        "training": run,
        "validation": validation,
        "evaluations": {},
        "provenance": {"git_commit": run.get("git_commit"), "vae_export_sha256": vae_export_sha256,
                       "export_format": meta.get("format_version"), "config": config},
        "vae": {},  # sha256 filled in by ctld.export.save_export
    }


def read_card(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CARD_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this export has no model card; re-export it with this ctld")
    return json.loads(path.read_text())


def write_card(directory: str | Path, card: dict[str, Any]) -> None:
    """model_card.json and README.md (rendered from it), each written to a temporary name and renamed."""
    directory = Path(directory)
    for name, text in ((CARD_JSON, json.dumps(card, indent=2) + "\n"), (CARD_MARKDOWN, render(card))):
        tmp = directory / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(directory / name)


def add_evaluation(directory: str | Path, name: str, report: dict[str, Any], settings_line: str) -> None:
    """Record a `ctld-eval` report (its metrics.json document) in the export's card under NAME (`--add_to_card`;
    the same NAME is replaced): counts, the mean rows exactly as in metrics.json, the settings and protocol; no case
    names (salted hashes, but the card travels further than a report)."""
    from ctld.run_info import git_commit

    cases = report["cases"]
    entry = {
        "cases": len(cases),
        "scored_thin_slices": int(sum(case.get("scored_thin_slices", 0) for case in cases)),
        "thick_source": dict(Counter(case["thick_source"] for case in cases)),
        "mean": report["mean"],
        "settings": report["settings"],
        "settings_line": settings_line,
        "protocol": report["protocol"],
        "ctld_git_commit": git_commit(),
    }
    card = read_card(directory)
    card.setdefault("evaluations", {})[name] = entry
    write_card(directory, card)


# ---------------------------------------------------------------------------------------------------- markdown


def score_table(rows: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows of the columns the demo prints (PSNR/SSIM in both windows, MAE), in its number formats."""
    columns = [c for c in SCORE_COLUMNS if any(c[0] in values for values in rows.values())]
    lines = ["| method | " + " | ".join(title for _, title, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, values in rows.items():
        cells = [format(values[key], fmt) if key in values else "" for key, _, fmt in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _range(stats: dict | None, unit: str, fmt: str = ".3g") -> str:
    if not stats:
        return "unknown"
    return f"{stats['min']:{fmt}} to {stats['max']:{fmt}} {unit} (median {stats['median']:{fmt}})"


def _data_lines(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return ["Unknown: trained on explicit shard URLs (data.train_urls), without a shard manifest."]
    lines = ["| split | series | patients | pairs (real / simulated / in-plane) |", "|---|---|---|---|"]
    for split, info in data["splits"].items():
        pairs = info.get("pairs")
        kinds = " / ".join(str(pairs.get(k, 0)) for k in ("real", "simulated", "inplane")) if pairs is not None \
            else "unknown"
        patients = info["patients"] if info.get("patients") is not None else "unknown"
        lines.append(f"| {split} | {info['series']} | {patients} | {kinds} |")
    hu = (f"1st percentile {_range(data.get('hu_p1'), 'HU', '.0f')}, 99th {_range(data.get('hu_p99'), 'HU', '.0f')}"
          if data.get("hu_p1") else "unknown (shards built before ctld recorded HU percentiles)")
    resampled = data.get("inplane_resampled_to_mm")
    lines += [
        "",
        f"- thin slice spacing: {_range(data.get('thin_spacing_mm'), 'mm')}; factor {data.get('factor')}; simulated "
        f"thick slices: {data.get('thick_profile')} profile",
        f"- pixel spacing (rows, columns): {_range(data.get('pixel_spacing_y_mm'), 'mm')}, "
        f"{_range(data.get('pixel_spacing_x_mm'), 'mm')}"
        + (f" (resampled in-plane to {resampled} mm)" if resampled else " (as scanned)"),
        f"- HU per thick (input) series: {hu}",
        f"- series skipped while building the shards: {data.get('series_skipped')}"
        + (f" ({', '.join(f'{k} {v}' for k, v in data['skipped_reasons'].items())})"
           if data.get("skipped_reasons") else ""),
    ]
    return lines


def _training_lines(run: dict[str, Any]) -> list[str]:
    covers = run.get("wall_time_covers_steps")
    resumed = covers and covers[0] > 0
    return [
        f"- optimizer steps: {run.get('steps')}; processes (GPUs or CPU ranks): {run.get('world_size')} "
        f"({run.get('distributed_type')}, ZeRO {run.get('zero_stage')}, device {run.get('device')}); precision: "
        f"{run.get('mixed_precision')}; effective batch: {run.get('effective_batch')}",
        f"- wall time: {run.get('wall_seconds', 0) / 60:.1f} min"
        + (f" for steps {covers[0]}-{covers[1]} (resumed; earlier launches not counted)" if resumed else "")
        + f", started {run.get('started_at')}, finished {run.get('finished_at')}",
        f"- git commit: {run.get('git_commit')}",
    ]


def render(card: dict[str, Any]) -> str:
    """README.md of an export: the card's facts in the order a new user asks for them."""
    model = card["model"]
    thick_mm = f"{model['thick_spacing_mm']:.3g} mm" if model.get("thick_spacing_mm") else "thick"
    thin_mm = f"{model['thin_spacing_mm']:.3g} mm" if model.get("thin_spacing_mm") else "thin"
    lines = [
        f"# ctld model card: {model.get('name')} ({model.get('stage')} stage)",
        "",
        f"Turns an axial CT series of {thick_mm} slices into {thin_mm} slices (factor {model['factor']}): a 3D "
        "latent diffusion model (ctld) anchored on an interpolated prior. The model sees "
        f"{model['hu_window'][0]:g}..{model['hu_window'][1]:g} HU; where the input lies outside, the thin series "
        "carries its linear interpolation. The same facts, and the full training config, are in model_card.json.",
        *([f"Slice spacing: {model['slice_spacing_policy']}."] if model.get("slice_spacing_policy") else []),
        *([f"Pixel spacing: {model['pixel_spacing_policy']}."] if model.get("pixel_spacing_policy") else []),
        "",
        "## Intended use",
        "",
        f"- For: {card['intended_use']}",
        f"- Not for: {card['not_for']}",
        *([f"- Modes: {card['inference_modes']}"] if card.get("inference_modes") else []),
        "",
        "## How to run it",
        "",
        "```",
        "ctld-infer THICK_SERIES --checkpoint THIS_FOLDER --out thin/",
        "```",
        "",
        "`ctld-infer` and `ctld-eval` run with the settings below (the ones this model was validated with) unless a "
        "flag or `--config`'s `infer` section overrides one; they print which settings ran and where each came "
        "from. Inputs outside the training ranges below are refused or warned about (`--allow_out_of_distribution` "
        "goes on anyway).",
        "",
    ]
    settings = card.get("inference_settings") or {}
    lines += [f"- {key}: {value}" for key, value in settings.items()] or ["- none recorded (InferConfig defaults)"]
    lines += ["", "## Training data (aggregates only)", "", *_data_lines(card.get("training_data")), "",
              "## Training", "", *_training_lines(card.get("training") or {}), ""]
    validation = card.get("validation")
    lines += ["## Validation (training's validation split)", ""]
    if validation:
        lines += [f"At step {validation['step']}, on {validation['patches']} fixed patches of the validation "
                  f"split ({validation.get('protocol', '')}):", "", *score_table(validation["rows"]), ""]
    else:
        lines += ["None: the run had no validation split.", ""]
    evaluations = card.get("evaluations") or {}
    if evaluations:
        lines += ["## Evaluations (`ctld-eval --add_to_card`)", ""]
        for name, entry in evaluations.items():
            sources = ", ".join(f"{kind} {count}" for kind, count in entry["thick_source"].items())
            lines += [f"### {name}", "", f"{entry['cases']} case(s) (thick input: {sources}), "
                      f"{entry['scored_thin_slices']} thin slices scored; {entry.get('settings_line', '')}", "",
                      *score_table(entry["mean"]), ""]
    provenance = card.get("provenance", {})
    lines += [
        "## Provenance",
        "",
        f"- ctld git commit: {provenance.get('git_commit')}; export format {provenance.get('export_format')}",
        f"- VAE of this export (sha256 of vae.json + vae.safetensors): {card.get('vae', {}).get('sha256')}",
        f"- VAE export it was trained on: {provenance.get('vae_export_sha256') or 'n/a (VAE stage)'}",
        "- config: model_card.json `provenance.config` (the salt is never written)",
        "",
    ]
    return "\n".join(lines)
