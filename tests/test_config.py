from __future__ import annotations

from dataclasses import asdict

import pytest
import yaml

from ctld.config import (
    Config,
    ConfigError,
    build_config,
    config_to_dict,
    flatten_config,
    load_config,
    load_saved_config,
    parse_overrides,
    save_config,
)


def test_base_yaml_lists_every_key_with_dataclass_defaults(repo_root):
    """base.yaml documents every key; its values are the dataclass defaults except where it says so."""
    with open(repo_root / "configs" / "base.yaml") as f:
        raw = yaml.safe_load(f)
    defaults = asdict(Config())
    assert raw.keys() == defaults.keys()
    for section, values in defaults.items():
        assert raw[section].keys() == values.keys(), section


@pytest.mark.parametrize("name", ["base.yaml", "tiny.yaml", "demo.yaml", "large.yaml", "real.yaml", "real_gpu.yaml"])
def test_every_shipped_config_loads(repo_root, name):
    cfg = load_config(repo_root / "configs" / name)
    assert isinstance(cfg, Config)


def test_tiny_extends_base(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    base = load_config(repo_root / "configs" / "base.yaml")
    assert cfg.data.patch_size == 16
    assert cfg.data.hu_min == base.data.hu_min  # inherited
    assert isinstance(cfg.vae.channels, tuple)


def test_overrides_are_typed(repo_root):
    cfg = load_config(
        repo_root / "configs" / "base.yaml",
        ["--train.lr=2e-4", "--data.patch_size=64", "--vae.channels=[8,16]", "--diffusion.min_snr_gamma=null",
         "--train.run_name=exp1", "--data.augment=false"],
    )
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.patch_size == 64
    assert cfg.vae.channels == (8, 16)
    assert cfg.diffusion.min_snr_gamma is None
    assert cfg.train.run_name == "exp1"
    assert cfg.data.augment is False


def test_int_is_accepted_for_float():
    assert parse_overrides(["--train.lr=1"]) == {"train": {"lr": "1"}}  # text, typed by the field
    cfg = load_config_from_dict({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def load_config_from_dict(raw):
    from ctld.config import build_config

    return build_config(raw)


def test_unknown_key_suggests_closest(repo_root):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_config(repo_root / "configs" / "base.yaml", ["--train.lrr=1e-3"])


def test_unknown_section_suggests_closest(repo_root):
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config(repo_root / "configs" / "base.yaml", ["--trian.lr=1e-3"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  patch_sise: 64\n")
    with pytest.raises(ConfigError, match="data.patch_sise.*did you mean 'data.patch_size'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--data.patch_size=abc", "must be an integer"),
        ("--data.patch_size=1.5", "must be an integer"),
        ("--data.augment=3", "must be true or false"),
        ("--train.stage=gan", "must be one of"),
        ("--vae.channels=7", "must be a list"),
        ("--train.lr=fast", "must be a number"),
    ],
)
def test_type_errors(repo_root, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(repo_root / "configs" / "base.yaml", [override])


def test_malformed_override(repo_root):
    with pytest.raises(ConfigError, match="--section.key=value"):
        load_config(repo_root / "configs" / "base.yaml", ["train.lr=1"])


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_save_and_reload_round_trip(tmp_path, repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["--train.lr=3e-4"])
    save_config(cfg, tmp_path / "run" / "config.yaml", extra={"git_commit": "abc"})
    again = load_saved_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert not (tmp_path / "run" / "config.yaml.tmp").exists()


def test_flatten_gives_tensorboard_types(repo_root):
    flat = flatten_config(load_config(repo_root / "configs" / "base.yaml"))
    assert flat["train.lr"] == pytest.approx(1e-4)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["diffusion.min_snr_gamma"] == "None"  # null: TensorBoard hparams hold no None


# Issue 15: a str field takes the text the user wrote, whatever YAML would make of it.
@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("--train.mixed_precision=no", "train", "mixed_precision", "no"),
        ("--train.run_name=2.0", "train", "run_name", "2.0"),
        ("--train.run_name=2.10", "train", "run_name", "2.10"),
        ("--train.run_name=007", "train", "run_name", "007"),
        ("--train.run_name=yes", "train", "run_name", "yes"),
        ("--train.resume=1e3", "train", "resume", "1e3"),
        ("--shards.salt=0123", "shards", "salt", "0123"),
        ("--train.lr_scheduler=off", "train", "lr_scheduler", "off"),
        ("--diffusion.beta_schedule=true", "diffusion", "beta_schedule", "true"),
    ],
)
def test_str_override_keeps_the_literal_text(repo_root, override, section, key, expected):
    cfg = load_config(repo_root / "configs" / "base.yaml", [override])
    assert getattr(getattr(cfg, section), key) == expected


def test_str_field_in_yaml_keeps_the_literal_text(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\n  run_name: 2.10\n  resume: 1e3\nshards:\n  salt: 0x1F\n"
                    "data:\n  augment: no\n  factor: 5\n  hu_min: -1_000\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.train.run_name == "2.10" and cfg.train.resume == "1e3"
    assert cfg.shards.salt == "0x1F"
    assert cfg.data.augment is False and cfg.data.factor == 5 and cfg.data.hu_min == -1000.0  # non-str: YAML values


def test_quoted_number_is_not_an_int(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text('data:\n  factor: "5"\n')
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(path)


def test_literal_text_survives_save_and_reload(tmp_path, repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["--train.mixed_precision=no", "--train.run_name=2.0"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_saved_config(tmp_path / "config.yaml") == cfg


def test_salt_is_redacted_wherever_the_config_is_written(tmp_path, repo_root):
    """Issue 15: shards.salt never reaches a run's config.yaml, TensorBoard hparams or the start log."""
    secret = "s3cret-salt-value-42"
    cfg = load_config(repo_root / "configs" / "tiny.yaml", [f"--shards.salt={secret}"])
    assert cfg.shards.salt == secret  # the builder still gets it
    save_config(cfg, tmp_path / "config.yaml", extra={"git_commit": "abc"})
    text = (tmp_path / "config.yaml").read_text()
    assert secret not in text and "<redacted>" in text
    flat = flatten_config(cfg)
    assert flat["shards.salt"] == "<redacted>" and secret not in repr(flat)
    assert config_to_dict(cfg)["shards"]["salt"] == "<redacted>"
    assert config_to_dict(cfg, redact=False)["shards"]["salt"] == secret
    empty = load_config(repo_root / "configs" / "tiny.yaml")
    assert flatten_config(empty)["shards.salt"] == ""  # nothing set: nothing to hide


def test_null_is_not_the_text_null(tmp_path):
    """`salt: null` must not become the public salt "null" (nor `resume: ~` a path named "~")."""
    for text in ("shards:\n  salt: null\n", "train:\n  resume: ~\n"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match="is null"):
            load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="is null"):
        build_config(parse_overrides(["--shards.salt=null"]))


def test_extra_training_shards_cannot_mix_with_latent_shards(repo_root):
    from ctld.config_checks import check

    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["--data.extra_train_urls=/phantoms/train-000000.tar"])
    check(cfg)  # pixel shards beside pixel shards
    latent = load_config(repo_root / "configs" / "tiny.yaml", ["--data.extra_train_urls=/phantoms/train-000000.tar",
                                                                "--data.latent_shards_dir=/latents"])
    with pytest.raises(ValueError, match="extra_train_urls are pixel shards"):
        check(latent)
