"""One config system for every ctld stage: YAML files -> typed dataclasses, `--section.key=value` overrides.

    cfg = load_config("configs/tiny.yaml", ["--train.lr=2e-4", "--data.patch_size=64"])
    UNet3D(**asdict(cfg.unet))

A YAML file may name a file it extends with a top-level `base:` key (a path relative to that file);
sections are merged key by key, so `configs/tiny.yaml` only lists what differs from `configs/base.yaml`.
Unknown keys fail with the closest valid key; values are checked against the field types.

Values are typed by their field, not by YAML's guess: a str field (or a choice of strings) takes the text as
written, unquoted in a YAML file or on the command line, so `--train.mixed_precision=no`, `mixed_precision: no`
(a YAML 1.1 boolean), `--train.run_name=2.10` and `shards.salt: 0123` keep their exact text. Other fields read
unquoted text as YAML would (`augment: no` is false, `lr: 2e-4` a number); quoted text is always a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class DataConfig:
    """What the loader feeds the trainer (see docs/DESIGN.md: thick/thin alignment, intensities)."""

    shards_dir: str = "shards"  # a folder with manifest.json from `ctld-shards build`
    train_urls: str = ""  # explicit shard URLs/brace pattern/pipe: command; empty = from shards_dir
    val_urls: str = ""
    # Shards trained on beside the training split and never validated, tested or described by the export's domain
    # (same URL forms as train_urls), e.g. ctld-demo's procedural phantoms mixed into a real-CT run: every shard of
    # either list is drawn alike. The slab filter and residual scale come from the training split alone.
    extra_train_urls: str = ""
    # Diffusion stage: train on latent shards (`ctld-shards encode`) instead of encoding every patch at every step;
    # validation still reads the pixel shards above. "" = encode on the fly.
    latent_shards_dir: str = ""
    hu_min: float = -1024.0  # intensity window mapped to [-1, 1]; wide so lung, soft tissue and bone survive
    hu_max: float = 2048.0
    factor: int = 5  # thick spacing / thin spacing, e.g. 5 mm -> 1 mm
    depth_thick: int = 8  # thick slices per patch; the thin patch has depth_thick * factor slices
    patch_size: int = 192  # in-plane patch edge in pixels
    patches_per_volume: int = 4  # patches drawn from one decoded volume, sharing the decode cost
    batch_size: int = 2  # patch pairs per device per micro-step
    num_workers: int = 4  # DataLoader workers per rank
    shuffle_buffer: int = 32  # patch pairs held per worker for shuffling, so one volume's K patches spread out
    samples_per_epoch: int = 10_000  # with_epoch length per rank (patch pairs), so every rank runs the same steps
    small_volume: Literal["pad", "skip"] = "pad"  # volumes smaller than a patch: pad with air or skip
    augment: bool = True  # in-plane flips and 90-degree rotations, identical on thick and thin
    min_foreground_fraction: float = 0.05  # resample crops whose fraction of non-air voxels is below this
    max_skipped_fraction: float = 0.5  # a loader worker fails once it skipped more than this share of samples
    seed: int = 0  # data stream seed, combined with the trainer's seed, rank, worker and step (ctld/data/loader.py)
    # Slice sensitivity profile of simulated thick slices (shard builder, ctld-eval): box = the slab mean; gaussian /
    # triangle = FWHM equal to the thick slice thickness, closer to a scanner's reconstructed thick slice.
    thick_profile: Literal["box", "gaussian", "triangle"] = "box"
    # Relative shares of the pair kinds in the training stream (the manifest's thick_source): a sample is kept with
    # probability weight / the largest weight, so e.g. weight_inplane 0.25 draws a quarter as many in-plane pairs.
    weight_real: float = 1.0
    weight_simulated: float = 1.0
    weight_inplane: float = 1.0


@dataclass
class ShardsConfig:
    """`ctld-shards build` settings."""

    out_dir: str = "shards"
    salt: str = ""  # secret salt for the patient/series hashes; empty = $CTLD_SALT or a per-user random salt
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    thick_min_spacing_mm: float = 3.0  # a series with slice spacing >= this is "thick"
    thin_max_spacing_mm: float = 2.0  # a series with slice spacing <= this is "thin"
    min_slices: int = 8
    on_duplicate_positions: Literal["skip", "repair"] = "repair"  # repair = drop exact duplicates
    on_missing_slices: Literal["skip", "repair"] = "skip"
    on_nonuniform_spacing: Literal["skip", "repair"] = "skip"
    on_gantry_tilt: Literal["skip", "repair"] = "skip"
    max_archive_bytes: int = 32 * 2**30  # refuse ZIPs that would unpack to more than this
    max_archive_members: int = 200_000
    shard_max_samples: int = 64
    shard_max_bytes: int = 2 * 2**30
    num_workers: int = 2
    max_skipped_fraction: float = 0.5  # fail the build when more than this fraction of series is skipped
    inplane_spacing_mm: float = 0.0  # resample thin and thick in-plane to this pixel spacing (linear); 0 = keep
    # through = thin series (with a real or simulated thick partner); inplane = also two in-plane pairs (an in-plane
    # axis plays the slice axis, ctld/data/inplane.py) from every thick series that has no thin partner
    pairs: Literal["through", "inplane"] = "through"


@dataclass
class VAEConfig:
    """AutoencoderKL3D keyword arguments (ctld/models/vae.py)."""

    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128, 128)  # one entry per level; in-plane factor 2**(levels-1)
    num_res_blocks: int = 1
    latent_channels: int = 8
    norm_num_groups: int = 16
    mid_attention: bool = False
    scaling_factor: float = 1.0
    gradient_checkpointing: bool = False
    zero_init_residual: bool = False  # a fresh VAE is exactly its space-to-channel shortcut (ctld/models/vae.py)
    norm_type: Literal["layer", "group"] = "layer"  # layer: per-voxel, tiling-invariant (ctld/models/layers.py)


@dataclass
class UNetConfig:
    """UNet3D keyword arguments (ctld/models/unet.py); in/out channels come from the VAE's latent_channels."""

    channels: tuple[int, ...] = (64, 128, 256)
    num_res_blocks: int = 2
    depth_downsample: tuple[bool, ...] = (True, True)  # per level transition: halve depth too?
    attention_levels: tuple[bool, ...] = (False, False, True)
    norm_num_groups: int = 32
    attention_head_dim: int = 32
    gradient_checkpointing: bool = False
    norm_type: Literal["layer", "group"] = "layer"  # layer: per-voxel, tiling-invariant (ctld/models/layers.py)


@dataclass
class DiffusionConfig:
    """Noise schedule and loss; schedulers come from diffusers only (ctld/diffusion.py)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "sample"
    min_snr_gamma: float | None = None  # Min-SNR weighting, https://arxiv.org/abs/2303.09556; null = off
    # Spread of the few sampling timesteps; "trailing" starts at the last training step (arXiv:2305.08891, table 2).
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (arXiv:2305.08891); needs v_prediction or sample
    sampler: Literal["ddim", "dpm", "ddpm"] = "ddim"
    num_inference_steps: int = 20
    # The residual model (ctld/diffusion.py): the prior it corrects, how far sampling starts from it, the share of
    # regression samples in each batch, and the residual's scale (0 = 1/std measured at the start of training).
    prior: Literal["encode_slab", "encode_cubic", "latent_cubic"] = "encode_cubic"  # see configs/demo.yaml
    strength: float = 0.5  # sampling starts from the one-pass estimate noised to this fraction of the schedule
    regression_fraction: float = 0.5
    residual_scale: float = 0.0
    slab_taps: int = 5  # slab filter taps over neighbouring thick slices (ctld.baselines.SlabFilter)
    slab_fit_volumes: int = 64  # training volumes the slab filter is fitted on (closed form)


@dataclass
class TrainConfig:
    stage: Literal["vae", "diffusion"] = "vae"
    output_dir: str = "runs"
    run_name: str = "ctld"
    max_steps: int = 10_000  # optimizer steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"  # any name diffusers.optimization.get_scheduler accepts
    lr_warmup_steps: int = 500
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    val_every: int = 500
    image_every: int = 1000
    checkpoint_every: int = 1000
    checkpoints_total_limit: int = 3
    # A checkpoint save not finished on a rank within this many seconds (a rank died inside a collective save, e.g.
    # DeepSpeed's) ends that rank with CHECKPOINT_TIMEOUT_EXIT_CODE, so the launch ends; 0 = no limit.
    checkpoint_timeout_s: float = 900.0
    resume: str = ""  # "" | "latest" | a checkpoint folder
    vae_export: str = ""  # diffusion stage: the VAE run's export/ folder
    ema_decay: float = 0.9999  # the EMA's final decay
    # Ramp the decay up as 1 - (1 + step)^(-2/3) (diffusers' EMA warmup), capped at ema_decay: early EMA weights
    # are not dominated by the random start, which matters for short runs.
    ema_warmup: bool = True
    thick_fraction: float = 0.5  # VAE stage: fraction of thick patches in a batch
    kl_weight: float = 1e-6
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses in a row
    steps_per_launch: int = 0  # stop with a checkpoint after this many steps in one launch (schedule kept); 0 = off
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto = bf16 on a bf16 GPU, fp32 on CPU
    # GPU step options (benchmarks/bench_train.py measures them): torch.compile of the trained model (inductor;
    # minutes of compilation at start), channels_last_3d weights for the convolutions, and per-phase step timing
    # (syncs the device at each phase boundary: for benchmarks, logged as time/<phase>_ms).
    compile: bool = False
    channels_last: bool = False
    time_phases: bool = False
    val_batches: int = 2  # validation batches per rank (fixed seed: the same patches every validation)
    scale_batches: int = 8  # VAE export: batches to set scaling_factor = 1/std(latents); 0 = keep vae.scaling_factor


@dataclass
class InferConfig:
    """`ctld-infer` / `ctld-eval` sliding-window settings (ctld/inferer.py); window size comes from the export."""

    mode: Literal["regression", "diffusion"] = "regression"  # one pass (conditional mean) or diffusion samples
    sampler: Literal["ddim", "dpm", "ddpm"] = "ddim"
    num_inference_steps: int = 20  # diffusion mode: sampler steps below the export's strength
    depth_context: int = 2  # thick slices at each window end that are context only (their output is dropped)
    depth_overlap: int = 1  # contributing thick slices shared (blended) by neighbouring windows
    inplane_overlap: float = 0.25  # fraction of the tile shared by neighbouring tiles
    # Window depth (thick slices) and tile edge (pixels); 0 = automatic (ctld.inferer.resolve_window): a fully
    # convolutional model gets whole slices up to 512 px and windows of up to 32 thick slices, any other model its
    # training patch.
    window_depth: int = 0
    tile_size: int = 0
    batch_size: int = 16  # windows per forward pass at the training window size (scaled down for larger windows)
    num_samples: int = 1  # average this many diffusion samples per window
    self_ensemble: Literal[1, 2, 4, 8] = 1  # mirrored copies of each window averaged (ctld.predictors.FLIPS)
    seed: int = 0
    # Refuse a thick spacing more than this ratio outside factor x the trained thin spacings (ctld.data.domain); <0 =
    # never. 50%: a 2.5-3 mm series into a 5 mm model is refused, 8 mm into one trained on 1.0-1.25 mm thin is warned.
    spacing_tolerance: float = 0.5
    adapt_steps: int = 0  # >0: fine-tune a copy of the U-Net this many steps on the input's in-plane pairs (ctld.adapt)
    adapt_lr: float = 2e-4  # AdamW learning rate of the adaptation (ctld.adapt.DEFAULT_LR)
    adapt_seed: int = 0  # seeds the adaptation's patch draws and noise: same seed -> same adapted weights
    adapt_batch_size: int = 4  # patches per adaptation step


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


# Section name -> dataclass (Field.type is only a string under `from __future__ import annotations`).
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "shards": ShardsConfig,
    "vae": VAEConfig,
    "unet": UNetConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "infer": InferConfig,
}


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses above."""


class _PlainText(str):
    """Unquoted text from a YAML file or a `--key=value` override; `_coerce` types it by the field it is for.
    (Mapping YAML's booleans back to words would be guesswork: `no`, `No`, `off` and `false` all read as False.)"""


class _TextLoader(yaml.SafeLoader):
    """SafeLoader that keeps every unquoted scalar as `_PlainText` (only `<<` merge keys are still resolved)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag == "tag:yaml.org,2002:merge"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        if any(tag == "tag:yaml.org,2002:merge" for tag, _ in resolvers)
    }

    def construct_text(self, node: yaml.ScalarNode) -> str:
        value = self.construct_scalar(node)
        return _PlainText(value) if node.style is None else str(value)


_TextLoader.add_constructor("tag:yaml.org,2002:str", _TextLoader.construct_text)


def _yaml_value(text: str) -> Any:
    """What YAML makes of unquoted `text` (bool, int, float, None or str); "2e-4" is a number too (YAML 1.1
    wants "2.0e-4"), as users mean it."""
    tag = yaml.resolver.Resolver().resolve(yaml.ScalarNode, str(text), (True, False))
    value = yaml.constructor.SafeConstructor().construct_object(yaml.ScalarNode(tag, str(text)))
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return value


def _takes_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    return typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in typing.get_args(annotation))


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path} extends itself through 'base:' ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/base.yaml")
    with open(path) as f:
        try:
            raw = yaml.load(f, Loader=_TextLoader) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(raw, dict):
        kind = "text" if isinstance(raw, str) else type(raw).__name__
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {kind}")
    base = raw.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        merged = _read_yaml_chain(path.parent / base, seen + (path,))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _all_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key_error(key: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(sorted(candidates))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against the field type; convert the few lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(value, _PlainText):
        if _takes_text(annotation):
            if _yaml_value(value) is None:  # `null` / `~` is no value, not the text "null" (a guessable salt)
                raise ConfigError(f"config key '{key}' is null; write '' for empty, or leave the key out")
            value = str(value)  # the text as written
        elif origin in (tuple, list):
            try:  # a `--key=[1, 2]` override
                value = yaml.load(value, Loader=_TextLoader)
            except yaml.YAMLError:
                pass
            if isinstance(value, _PlainText):
                value = _yaml_value(value)
        elif origin not in (typing.Union, types.UnionType):
            value = _yaml_value(value)
        elif _yaml_value(value) is None and type(None) in args:
            return None
    if isinstance(value, list) and origin not in (tuple, list):  # shown in the error below as YAML reads it
        value = [_yaml_value(v) if isinstance(v, _PlainText) else v for v in value]
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} fits none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r} ({type(value).__name__})")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, key) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {annotation}")  # a bug in this file


def parse_overrides(argv: list[str]) -> dict[str, dict[str, Any]]:
    """`["--train.lr=2e-4"]` -> `{"train": {"lr": "2e-4"}}`: the text as written, typed by its field when the
    config is built (a number for train.lr; the exact text for a str field such as train.run_name)."""
    overrides: dict[str, dict[str, Any]] = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --section.key=value (e.g. --train.lr=2e-4)")
        key, text = arg[2:].split("=", 1)
        if key.count(".") != 1:
            raise _unknown_key_error(key, _all_keys())
        section, name = key.split(".")
        overrides.setdefault(section, {})[name] = _PlainText(text)
    return overrides


def build_config(raw: dict[str, Any]) -> Config:
    """Typed Config from nested dicts; every key is checked."""
    built = {}
    for section_name, values in raw.items():
        if section_name not in SECTIONS:
            raise _unknown_key_error(str(section_name), list(SECTIONS))
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section_name}' must be a mapping, got {values!r}")
    for section_name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = raw.get(section_name) or {}
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            full = f"{section_name}.{key}"
            if key not in valid:
                raise _unknown_key_error(full, [f"{section_name}.{v}" for v in valid] + _all_keys())
            kwargs[key] = _coerce(value, hints[key], full)
        built[section_name] = cls(**kwargs)
    return Config(**built)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (following `base:`), apply `--section.key=value` overrides, check every type."""
    raw = _read_yaml_chain(Path(path))
    for section, values in parse_overrides(overrides or []).items():
        if isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return build_config(raw)


def keys_set_in(path: str | Path, section: str) -> set[str]:
    """The keys of `section` that a YAML config (with its `base:` chain) sets, as opposed to dataclass defaults:
    `ctld-infer --config` overrides an export's recorded inference settings with these only."""
    values = _read_yaml_chain(Path(path)).get(section)
    return set(values) if isinstance(values, dict) else set()


REDACTED = "<redacted>"  # shards.salt as written out: it keys the patient hashes, so it never leaves the config


def config_to_dict(cfg: Config, *, redact: bool = True) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON. A set `shards.salt` reads REDACTED (an empty one stays
    empty), so the salt never reaches a run's config.yaml, TensorBoard or a log; `redact=False` only for a config
    that is the input of a later stage."""
    doc = json.loads(json.dumps(asdict(cfg)))
    if redact and doc["shards"]["salt"]:
        doc["shards"]["salt"] = REDACTED
    return doc


def save_config(cfg: Config, path: str | Path, extra: dict[str, Any] | None = None, *, redact: bool = True) -> None:
    """Write the resolved config (plus e.g. git commit and package versions) atomically; the salt is redacted
    (`config_to_dict`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = config_to_dict(cfg, redact=redact)
    if extra:
        doc["_run"] = extra
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    tmp.replace(path)


def load_saved_config(path: str | Path) -> Config:
    """Read a config written by `save_config` (ignores its `_run` block)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    raw.pop("_run", None)
    return build_config(raw)


def flatten_config(cfg: Config) -> dict[str, bool | int | float | str]:
    """`{"train.lr": 1e-4, ...}` with only bool/str/int/float values, as TensorBoard hparams require (salt
    redacted)."""
    flat: dict[str, bool | int | float | str] = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat
