"""How every benchmark reports: the JSON document on stdout and, with --out, the same text in a file written
atomically (a benchmark killed mid-write leaves no half file)."""

from __future__ import annotations

import json
from pathlib import Path


def emit_json(doc: dict, out: str | Path | None = None, *, indent: int = 2) -> str:
    text = json.dumps(doc, indent=indent)
    print(text, flush=True)
    if out:
        write_json(doc, out, indent=indent)
    return text


def write_json(doc: dict, out: str | Path, *, indent: int = 2) -> None:
    """The document in `out` only (atomically): for partial results a long benchmark saves as it goes."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent) + "\n")
    tmp.replace(path)


GAIN_KEYS = ("psnr_wide", "psnr_soft_tissue", "rplhr_psnr", "ssim_wide", "ssim_soft_tissue", "mae_hu")


def gains_db(mean: dict) -> dict:
    """Each ctld row of a metrics mean ({method: {metric: value}}) minus cubic and minus the slab filter."""
    out = {}
    for method in (m for m in mean if m.startswith("ctld")):
        for baseline in ("cubic", "slab_filter"):
            if baseline in mean:
                out[f"{method}_minus_{baseline}"] = {key: round(mean[method][key] - mean[baseline][key], 3)
                                                     for key in GAIN_KEYS if key in mean[method]}
    return out
