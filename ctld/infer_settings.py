"""Which inference settings a `ctld-infer` / `ctld-eval` run uses, and where each one came from.

    cfg, sources = resolve_settings(args, export_meta.get("infer"))
    print(describe(cfg, sources))   # settings: mode=diffusion (export), num_inference_steps=4 (flag), ...

Precedence, highest first: a command-line flag; a key that `--config`'s YAML (with its `base:` chain) sets in its
`infer` section; the settings the export was validated with (ctld.json `infer`, recorded at the end of training
from the training config's `infer` section); `InferConfig`'s defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields

from ctld.config import ConfigError, InferConfig, build_config, keys_set_in, load_config

# What an export records: the settings that shape its output. The adaptation (--adapt) and the spacing guard are
# choices of one run, not part of what the model was validated with, so they always start from the defaults.
RECORDED_FIELDS = ("mode", "sampler", "num_inference_steps", "num_samples", "self_ensemble", "seed", "batch_size",
                   "depth_context", "depth_overlap", "inplane_overlap", "window_depth", "tile_size")
ADAPT_FIELDS = ("adapt_lr", "adapt_seed", "adapt_batch_size")  # shown only when adapt_steps > 0


def recorded_settings(infer: InferConfig) -> dict:
    """The `infer` block of ctld.json: the RECORDED_FIELDS of the training config's inference section."""
    return {name: getattr(infer, name) for name in RECORDED_FIELDS}


def resolve_settings(args: argparse.Namespace, recorded: dict | None) -> tuple[InferConfig, dict[str, str]]:
    """InferConfig for this run and the source of every field: "flag", "config", "export" or "default".

    Args:
        args: parsed flags of `ctld.inference.add_infer_flags` (None = not given), `args.config` a YAML path or None.
        recorded: ctld.json's `infer` block, or None (no export, or one without recorded settings).
    """
    values = asdict(InferConfig())
    sources = dict.fromkeys(values, "default")
    for name, value in (recorded or {}).items():
        if name in RECORDED_FIELDS:  # a key a newer ctld added is not ours to apply
            values[name], sources[name] = value, "export"
    if getattr(args, "config", None):
        from_file = load_config(args.config).infer
        for name in keys_set_in(args.config, "infer"):
            values[name], sources[name] = getattr(from_file, name), "config"
    for name in values:
        given = getattr(args, name, None)
        if given is not None:
            values[name], sources[name] = given, "flag"
    try:
        cfg = build_config({"infer": values}).infer  # type-checks recorded values as a config file's would be
    except (TypeError, ConfigError) as error:
        where = " (recorded in the export's ctld.json)" if "export" in sources.values() else ""
        raise ValueError(f"bad inference settings{where}: {error}") from error
    return cfg, sources


def describe(cfg: InferConfig, sources: dict[str, str]) -> str:
    """One line naming every setting that shapes the output and its source."""
    shown = [f.name for f in fields(InferConfig) if f.name not in ADAPT_FIELDS or cfg.adapt_steps > 0]
    return "settings: " + ", ".join(f"{name}={getattr(cfg, name)} ({sources[name]})" for name in shown)
