"""An export is a model you can hand over: a tiny trained export carries its inference settings, the training
domain and a model card (aggregates only), and `ctld-infer` / `ctld-eval` use them (issue 17)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO_ROOT, SHARDS_SALT, synthetic_ct

from ctld.data.nifti import write_nifti
from ctld.data.shards import iter_samples, manifest_shards, read_manifest
from ctld.data.transforms import simulate_thick
from ctld.data.volume import Volume
from ctld.export import vae_hash
from ctld.inference import main as infer_main
from ctld.model_card import CARD_JSON, CARD_MARKDOWN, read_card

# The training config of the export: inference settings far from InferConfig's defaults (regression, seed 0, ...),
# so an export run that ignored them would give another output.
TRAINING_CONFIG = f"""base: {REPO_ROOT / "configs" / "tiny.yaml"}
infer:
  mode: diffusion
  num_inference_steps: 2
  depth_context: 1
  inplane_overlap: 0.0
  num_samples: 2
  seed: 7
"""


def _train(config: Path, out: Path, name: str, *overrides: str) -> Path:
    cmd = [sys.executable, "ctld/train.py", str(config), f"--train.output_dir={out}", f"--train.run_name={name}",
           "--train.max_steps=2", *overrides]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / name / "export"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, built_shards):
    """A VAE run and a diffusion run (2 steps each, one process) on the session's shards, read via the manifest."""
    out = tmp_path_factory.mktemp("card_runs")
    config = out / "train.yaml"
    config.write_text(TRAINING_CONFIG)
    data = f"--data.shards_dir={built_shards}"
    vae = _train(config, out, "vae", data, "--train.scale_batches=1")
    diffusion = _train(config, out, "diffusion", data, "--train.stage=diffusion", f"--train.vae_export={vae}")
    thick = out / "thick.nii.gz"  # 5 mm, 0.7 mm pixels, HU like the shards': inside the training domain
    write_nifti(Volume(simulate_thick(synthetic_ct(30, 32, seed=11), 5), (5.0, 0.7, 0.7), (0.0, 0.0, 0.0),
                       np.eye(3)), thick)
    return {"config": config, "vae": vae, "export": diffusion, "shards": built_shards, "thick": thick, "out": out}


def _infer(trained, tmp_path, name: str, *flags: str, capsys) -> tuple[np.ndarray, str]:
    out = tmp_path / f"{name}.nii.gz"
    code = infer_main([str(trained["thick"]), "--checkpoint", str(trained["export"]), "--out", str(out),
                       "--no_progress", *flags])
    printed = capsys.readouterr().out
    assert code == 0, printed
    return np.asarray(nib.load(out).dataobj), next(line for line in printed.splitlines()
                                                  if line.startswith("settings:"))


def test_an_export_runs_with_the_settings_it_was_validated_with(trained, tmp_path, capsys):
    recorded, line = _infer(trained, tmp_path, "plain", capsys=capsys)
    assert "mode=diffusion (export)" in line and "num_samples=2 (export)" in line and "seed=7 (export)" in line
    with_config, config_line = _infer(trained, tmp_path, "config", "--config", str(trained["config"]), capsys=capsys)
    np.testing.assert_array_equal(recorded, with_config)
    assert "mode=diffusion (config)" in config_line
    # The settings matter: the built-in defaults give another output.
    defaults, _ = _infer(trained, tmp_path, "defaults", "--mode", "regression", "--seed", "0", "--num_samples", "1",
                         "--depth_context", "2", "--inplane_overlap", "0.25", capsys=capsys)
    assert not np.array_equal(recorded, defaults)


def test_a_flag_and_a_config_beat_the_export(trained, tmp_path, capsys):
    recorded, _ = _infer(trained, tmp_path, "plain", capsys=capsys)
    flagged, line = _infer(trained, tmp_path, "seed", "--seed", "8", capsys=capsys)
    assert "seed=8 (flag)" in line and "mode=diffusion (export)" in line
    assert not np.array_equal(recorded, flagged)
    config = tmp_path / "seed.yaml"  # no base: only the key it sets overrides the export
    config.write_text("infer:\n  seed: 8\n")
    configured, line = _infer(trained, tmp_path, "seed_config", "--config", str(config), capsys=capsys)
    assert "seed=8 (config)" in line and "num_samples=2 (export)" in line
    np.testing.assert_array_equal(configured, flagged)
    both, line = _infer(trained, tmp_path, "both", "--config", str(config), "--seed", "7", capsys=capsys)
    assert "seed=7 (flag)" in line
    np.testing.assert_array_equal(both, recorded)


def test_the_card_holds_the_aggregates_scores_and_provenance(trained):
    export, manifest = trained["export"], read_manifest(trained["shards"])
    assert (export / CARD_MARKDOWN).is_file() and (export / CARD_JSON).is_file()
    card = read_card(export)
    data = card["training_data"]
    assert data["splits"]["train"] == {"series": 3, "patients": 3, "pairs": {"real": 1, "simulated": 2}}
    assert data["splits"]["val"] == {"series": 1, "patients": 1, "pairs": {"simulated": 1}}
    assert data["thin_spacing_mm"]["median"] == 1.0 and data["pixel_spacing_x_mm"]["median"] == pytest.approx(0.7)
    assert -1030 < data["hu_p1"]["min"] < -990 and 650 < data["hu_p99"]["max"] < 750  # air and 'spine'
    run = card["training"]
    assert run["steps"] == 2 and run["world_size"] == 1 and run["mixed_precision"] == "no"
    assert run["wall_seconds"] > 0 and run["git_commit"]
    rows = card["validation"]["rows"]
    assert list(rows) == ["nearest", "linear", "cubic", "slab_filter", "ctld_regression", "ctld_diffusion"]
    assert all(np.isfinite(values["psnr_wide"]) for values in rows.values())
    # The loop validated the final step (val_every 2 = max_steps): the card holds that validation, not a rerun.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained["out"] / "diffusion" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("val/regression_psnr_wide")[-1]
    assert card["validation"]["step"] == logged.step == 2
    assert rows["ctld_regression"]["psnr_wide"] == pytest.approx(logged.value, rel=1e-6)
    assert card["provenance"]["vae_export_sha256"] == vae_hash(trained["vae"]) == card["vae"]["sha256"]
    assert card["provenance"]["config"]["infer"]["seed"] == 7
    assert card["inference_settings"]["mode"] == "diffusion"
    meta = json.loads((export / "ctld.json").read_text())
    assert meta["infer"] == card["inference_settings"] and meta["format_version"] == 3
    assert meta["domain"]["pixel_spacing_mm"]["max"] == pytest.approx(0.7)
    assert meta["slice_spacing_policy"].startswith("slices:")
    assert "Slice spacing: slices:" in (export / CARD_MARKDOWN).read_text()
    assert meta["pixel_spacing_policy"].startswith("pixels:")
    assert "Pixel spacing: pixels:" in (export / CARD_MARKDOWN).read_text()
    assert "- Modes: regression" in (export / CARD_MARKDOWN).read_text()
    readme = (export / CARD_MARKDOWN).read_text()
    for row, values in rows.items():
        assert f"| {row} | {values['psnr_wide']:.2f} | {values['ssim_wide']:.3f} |" in readme
    assert card["provenance"]["git_commit"] in readme and card["vae"]["sha256"] in readme

    # Aggregates only: no sample key, patient, study or series hash of the shards appears in either file.
    identifiers = {entry["series_id"] for entry in manifest["skipped"]}
    for split in ("train", "val"):
        for sample in iter_samples(manifest_shards(trained["shards"], split)):
            identifiers |= {sample["__key__"], *(sample["meta"][k] for k in ("case_id", "series_id", "study_id"))}
    assert len(identifiers) >= 9
    for path in (export / CARD_MARKDOWN, export / CARD_JSON, export / "ctld.json"):
        text = path.read_text()
        assert not [ident for ident in identifiers if ident in text], path
        assert SHARDS_SALT not in text


def test_the_vae_export_has_a_card_too(trained):
    card = read_card(trained["vae"])
    assert card["model"]["stage"] == "vae" and list(card["validation"]["rows"]) == ["vae_thin", "vae_thick"]
    assert card["vae"]["sha256"] == vae_hash(trained["vae"])


def test_ctld_eval_records_its_scores_in_the_card(trained, tmp_path, capsys):
    from ctld.evaluate import main as eval_main

    thin = tmp_path / "thin.nii.gz"
    write_nifti(Volume(synthetic_ct(40, 32, seed=12), (1.0, 0.7, 0.7), (0.0, 0.0, 0.0), np.eye(3)), thin)
    assert eval_main([str(thin), "--checkpoint", str(trained["export"]), "--out", str(tmp_path / "report"),
                      "--modes", "regression", "--no_progress", "--add_to_card", "synthetic check"]) == 0
    assert "mode=diffusion (export)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    entry = read_card(trained["export"])["evaluations"]["synthetic check"]
    assert entry["mean"] == metrics["mean"] and entry["cases"] == 1 and entry["thick_source"] == {"simulated": 1}
    readme = (trained["export"] / CARD_MARKDOWN).read_text()
    assert "### synthetic check" in readme
    row = metrics["mean"]["ctld_regression"]
    assert f"| ctld_regression | {row['psnr_wide']:.2f} | {row['ssim_wide']:.3f} |" in readme


def test_an_input_outside_the_training_domain_is_refused_or_warned_about(trained, tmp_path, capsys, caplog):
    thick = simulate_thick(synthetic_ct(30, 32, seed=11), 5)
    raw = tmp_path / "raw.nii.gz"  # stored values without the rescale to HU: air at 0 instead of -1000
    write_nifti(Volume((thick.astype(np.int32) + 1024).astype(np.int16), (5.0, 0.7, 0.7), (0.0, 0.0, 0.0),
                       np.eye(3)), raw)
    args = [str(raw), "--checkpoint", str(trained["export"]), "--no_progress"]
    assert infer_main([*args, "--out", str(tmp_path / "refused.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "1st HU percentile" in err and "--allow_out_of_distribution" in err
    assert not (tmp_path / "refused.nii.gz").exists()
    with caplog.at_level("WARNING"):
        assert infer_main([*args, "--out", str(tmp_path / "allowed.nii.gz"), "--allow_out_of_distribution",
                                  "--mode", "regression"]) == 0
    assert "1st HU percentile" in caplog.text and "overridden" in caplog.text
    assert (tmp_path / "allowed.nii.gz").is_file()
