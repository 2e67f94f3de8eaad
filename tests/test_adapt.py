"""Adaptation to one series (issue 14, part 2): a copy of the export's U-Net fine-tuned on in-plane pairs of the thick
series at hand; `ctld-infer --adapt` and `ctld-eval --adapt`."""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import synthetic_ct

from ctld.adapt import adapt_export, adapt_unet, batch_loss, draw_batch, save_adapted, series_pairs
from ctld.data.nifti import read_nifti, write_nifti
from ctld.data.transforms import simulate_thick
from ctld.data.volume import Volume
from ctld.diffusion import ResidualSpec
from ctld.export import load_export

THICK_SPACING = (7.5, 1.5, 1.5)  # the tiny export makes 1.5 mm slices at factor 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models gain nothing from a second thread, and on shared cores two threads spin: ~5x slower steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def thick_hu() -> np.ndarray:
    """A thick (8, 32, 32) series: the synthetic body of 40 thin 1.5 mm slices, box-averaged by 5."""
    return simulate_thick(synthetic_ct(40, 32, seed=1), 5)


def _hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _state(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adaptation_is_seeded_changes_only_a_copy_and_saves_a_loadable_export(tmp_path, infer_tiny_export, thick_hu):
    before = _hashes(infer_tiny_export)
    export = load_export(infer_tiny_export)
    base_state, base_meta = _state(export.unet), json.loads(json.dumps(export.meta))

    settings = dict(steps=3, lr=1e-3, batch_size=2)
    first = adapt_export(export, thick_hu, THICK_SPACING, seed=0, **settings)
    again = adapt_export(export, thick_hu, THICK_SPACING, seed=0, **settings)
    other = adapt_export(export, thick_hu, THICK_SPACING, seed=1, **settings)
    assert _same(_state(first.unet), _state(again.unet))  # same seed -> the same weights
    assert not _same(_state(first.unet), _state(other.unet))  # another seed -> other weights
    assert not _same(_state(first.unet), base_state)  # the adaptation moved the U-Net...
    assert _same(_state(export.unet), base_state) and export.meta == base_meta  # ...a copy of it
    assert first.unet is not export.unet and first.vae is export.vae and not first.unet.training

    block = first.meta["adapted"]
    assert {k: block[k] for k in ("steps", "seed", "lr", "batch_size")} == {"steps": 3, "seed": 0, "lr": 1e-3,
                                                                             "batch_size": 2}
    assert [p["axis"] for p in block["pairs"]] == ["y", "x"]
    assert block["pairs"][0]["thick_shape"] == [6, 8, 32] and block["pairs"][0]["thin_shape"] == [30, 8, 32]
    assert np.isfinite(block["first_loss"]) and np.isfinite(block["final_loss"])

    saved = save_adapted(first, tmp_path / "adapted")
    loaded = load_export(saved)
    assert _same(_state(loaded.unet), _state(first.unet)) and loaded.meta["adapted"] == block
    assert {k: v for k, v in loaded.meta.items() if k != "adapted"} == base_meta  # the rest of the meta as it was
    with pytest.raises(ValueError, match="not adapted"):
        save_adapted(export, tmp_path / "unadapted")
    with pytest.raises(ValueError, match="steps >= 1"):
        adapt_export(export, thick_hu, THICK_SPACING, steps=0)
    assert _hashes(infer_tiny_export) == before  # the base export's files are byte-identical


def test_adaptation_lowers_the_loss_on_in_plane_patches(infer_tiny_export, thick_hu):
    """A few dozen steps, fixed seed: the loss of the last steps is below that of the first ones, and the one-pass
    (regression) loss on a fixed held-out set of in-plane patches drops (measured: 0.97 -> 0.88 and 1.10 -> 0.96)."""
    export = load_export(infer_tiny_export)
    result = adapt_unet(export, thick_hu, THICK_SPACING, steps=24, seed=0, lr=1e-3, batch_size=2)
    losses = result.losses
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < np.mean(losses[:8])

    meta = export.meta
    pairs = series_pairs(thick_hu, THICK_SPACING, meta)
    thick, thin = draw_batch(pairs, np.random.default_rng(123), count=8, factor=5, depth_thick=int(meta["depth_thick"]),
                             patch_size=int(meta["patch_size"]), hu_range=(meta["hu_min"], meta["hu_max"]))
    spec = ResidualSpec.from_meta(meta)
    with torch.no_grad():
        base, adapted = (float(batch_loss(unet, export.vae, export.scheduler, spec, thick, thin,
                                          regression_fraction=1.0)) for unet in (export.unet, result.unet))
    assert adapted < 0.95 * base, (base, adapted)


def test_adapt_settings_come_from_the_config_and_flags_override(tmp_path):
    from ctld.inference import add_infer_flags, infer_config_from

    parser = argparse.ArgumentParser()
    add_infer_flags(parser)
    config = tmp_path / "adapt.yaml"
    config.write_text("infer:\n  adapt_steps: 7\n  adapt_lr: 5.0e-4\n")
    cfg = infer_config_from(parser.parse_args(["--config", str(config)]))
    assert (cfg.adapt_steps, cfg.adapt_lr, cfg.adapt_seed) == (7, 5e-4, 0)
    cfg = infer_config_from(parser.parse_args(["--config", str(config), "--adapt", "2", "--adapt_seed", "3"]))
    assert (cfg.adapt_steps, cfg.adapt_lr, cfg.adapt_seed) == (2, 5e-4, 3)
    assert infer_config_from(parser.parse_args([])).adapt_steps == 0  # off by default


def test_ctld_infer_adapt_end_to_end(tmp_path, infer_tiny_export, thick_hu, capsys):
    from ctld.inference import main

    before = _hashes(infer_tiny_export)
    write_nifti(Volume(thick_hu, THICK_SPACING, (0.0, 0.0, 0.0), np.eye(3)), tmp_path / "thick.nii.gz")
    common = [str(tmp_path / "thick.nii.gz"), "--checkpoint", str(infer_tiny_export), "--batch_size", "8",
              "--no_progress"]
    assert main([*common, "--out", str(tmp_path / "base.nii.gz")]) == 0
    assert main([*common, "--out", str(tmp_path / "adapted.nii.gz"), "--adapt", "3", "--adapt_lr", "1e-3",
                 "--adapt_batch_size", "2", "--save_adapted", str(tmp_path / "adapted_export")]) == 0
    base, adapted = read_nifti(tmp_path / "base.nii.gz"), read_nifti(tmp_path / "adapted.nii.gz")
    assert adapted.shape == base.shape == (40, 32, 32) and adapted.spacing_mm == pytest.approx((1.5, 1.5, 1.5))
    assert not np.array_equal(adapted.hu, base.hu)  # the adapted model interpolated it
    loaded = load_export(tmp_path / "adapted_export")
    assert loaded.meta["adapted"]["steps"] == 3 and loaded.meta["adapted"]["lr"] == 1e-3
    assert _hashes(infer_tiny_export) == before

    # The saved adapted export interpolates like the adapted run did (same weights, same engine).
    assert main([str(tmp_path / "thick.nii.gz"), "--checkpoint", str(tmp_path / "adapted_export"), "--batch_size", "8",
                 "--no_progress", "--out", str(tmp_path / "reloaded.nii.gz")]) == 0
    np.testing.assert_array_equal(read_nifti(tmp_path / "reloaded.nii.gz").hu, adapted.hu)

    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "x.nii.gz"), "--save_adapted", str(tmp_path / "y")]) == 2
    assert "--save_adapted needs --adapt" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "x.nii.gz"), "--adapt", "-1"]) == 2
    assert main([*common, "--out", str(tmp_path / "x.nii.gz"), "--adapt", "2", "--save_adapted",
                 str(infer_tiny_export)]) == 2
    assert "never replaced" in capsys.readouterr().err
    assert _hashes(infer_tiny_export) == before


def test_ctld_eval_adapt_reports_base_and_adapted_rows(tmp_path, infer_tiny_export):
    from ctld.evaluate import main

    thin = synthetic_ct(40, 32, seed=2)
    write_nifti(Volume(thin, (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3)), tmp_path / "thin.nii.gz")
    out = tmp_path / "report"
    assert main([str(tmp_path / "thin.nii.gz"), "--checkpoint", str(infer_tiny_export), "--adapt", "2",
                 "--adapt_batch_size", "2", "--steps", "2", "--batch_size", "8", "--no_progress",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    rows = {"ctld_regression", "ctld_diffusion", "ctld_regression_adapted", "ctld_diffusion_adapted"}
    assert rows <= set(doc["mean"]) and rows <= set(doc["cases"][0]["metrics"])
    assert doc["settings"]["adapt_steps"] == 2
    assert "thin target is never used for adaptation" in doc["protocol"]["adapted"]
    assert doc["mean"]["ctld_regression_adapted"] != doc["mean"]["ctld_regression"]
    assert "| ctld_regression_adapted |" in (out / "report.md").read_text()
    assert main([str(tmp_path / "thin.nii.gz"), "--method", "cubic", "--factor", "5", "--adapt", "2",
                 "--out", str(tmp_path / "bad")]) == 2
