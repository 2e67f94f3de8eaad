from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FACTOR, SYNTH_PATIENTS, THICK_OFFSET, synthetic_ct
from PIL import Image

from ctld.baselines import interpolate_z
from ctld.data.nifti import write_nifti
from ctld.data.volume import Volume
from ctld.evaluate import main
from ctld.metrics import PSNR_CAP_DB, all_metrics

NO_WINDOW_FLAGS = ["--factor", "5", "--depth_thick", "8", "--patch_size", "16", "--no_progress"]


@pytest.fixture(scope="module")
def thin_nifti(tmp_path_factory):
    """A synthetic thin NIfTI (1 mm, 43 slices of 34x30: odd sizes, a trailing partial slab)."""
    path = tmp_path_factory.mktemp("eval_data") / "thin.nii.gz"
    hu = synthetic_ct(43, 34, seed=3)[:, :, 2:32]
    write_nifti(Volume(hu, (1.0, 0.7, 0.7), (-10.0, -12.0, 5.0), np.eye(3)), path)
    return path


def _run(args: list[str], out) -> dict:
    assert main([*args, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_target_as_the_model_gives_capped_psnr_and_ssim_one(tmp_path, thin_nifti):
    doc = _run([str(thin_nifti), "--method", "target", *NO_WINDOW_FLAGS], tmp_path)
    metrics = doc["mean"]["target"]
    assert metrics["psnr_wide"] == PSNR_CAP_DB and metrics["psnr_soft_tissue"] == PSNR_CAP_DB
    assert metrics["ssim_wide"] == pytest.approx(1.0) and metrics["ssim_soft_tissue"] == pytest.approx(1.0)
    assert metrics["mae_hu"] == 0.0
    assert doc["mean"]["cubic"]["psnr_soft_tissue"] < PSNR_CAP_DB  # the baselines are scored, not copied
    assert doc["cases"][0]["scored_thin_slices"] == 40  # 8 thick slices x 5; the 3 trailing thin slices left out


def test_windowed_cubic_reproduces_the_cubic_baseline(tmp_path, thin_nifti):
    doc = _run([str(thin_nifti), "--method", "cubic", *NO_WINDOW_FLAGS], tmp_path)
    windowed, cubic = doc["mean"]["windowed_cubic"], doc["mean"]["cubic"]
    for key, value in cubic.items():
        assert windowed[key] == pytest.approx(value, rel=1e-5, abs=1e-4), key
    assert cubic["psnr_wide"] > doc["mean"]["nearest"]["psnr_wide"]  # cubic beats nearest on smooth anatomy
    # The protocol is spelled out; the report has the table and the panel.
    assert doc["protocol"]["windows_hu"] == {"wide": [-1024.0, 2048.0], "soft_tissue": [-160.0, 240.0]}
    report = (tmp_path / "report.md").read_text()
    assert "| windowed_cubic |" in report and f"]({doc['cases'][0]['panel']})" in report
    with Image.open(tmp_path / doc["cases"][0]["panel"]) as panel:
        assert panel.width == 5 * 256  # thick | cubic | model | target | |error| (no export: no slab filter)


def test_real_pair_is_aligned_and_no_identifiers_leak(tmp_path, synthetic_dicom):
    """--pair THICK THIN of the synthetic DICOM study: thick k covers thin [2 + 5k, 7 + 5k)."""
    study = synthetic_dicom["studies"]["pair"]
    doc = _run(["--pair", str(study["dirs"]["thick"]), str(study["dirs"]["thin"]), "--method", "cubic",
                *NO_WINDOW_FLAGS], tmp_path)
    case = doc["cases"][0]
    assert case["thick_source"] == "real" and case["scored_thin_slices"] == 45
    from ctld.data.transforms import simulate_thick

    thin_hu = study["thin_hu"]
    thick_hu = simulate_thick(thin_hu[THICK_OFFSET:], FACTOR)
    expected = all_metrics(interpolate_z(thick_hu, FACTOR, "cubic"), thin_hu[THICK_OFFSET : THICK_OFFSET + 45])
    for key, value in expected.items():
        assert case["metrics"]["cubic"][key] == pytest.approx(value, rel=1e-6), key
    text = (tmp_path / "metrics.json").read_text() + (tmp_path / "report.md").read_text()
    for name, patient_id, _ in SYNTH_PATIENTS.values():
        assert name not in text and patient_id not in text


def test_shards_test_split(tmp_path, make_shards):
    shards = make_shards("--shards.val_fraction=0.0", "--shards.test_fraction=1.0")
    doc = _run([str(shards), "--method", "target", *NO_WINDOW_FLAGS], tmp_path)
    sources = sorted(case["thick_source"] for case in doc["cases"])
    assert sources == ["real", "simulated", "simulated", "simulated"]  # "broken" is skipped by the builder
    assert doc["mean"]["target"]["psnr_wide"] == PSNR_CAP_DB


def test_bad_invocations_fail_clearly(tmp_path, thin_nifti, capsys):
    assert main([str(thin_nifti), "--out", str(tmp_path)]) == 2
    assert "--method ctld needs --checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.nii.gz"), "--method", "cubic", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tiling_check_reports_the_shifted_grid(tmp_path, thin_nifti):
    """--tiling_check reruns the first model with its window grid moved by half a window: windowed cubic interpolation
    is exact whatever the grid, so both windows report the PSNR cap; metrics.json and report.md carry the check."""
    doc = _run([str(thin_nifti), "--method", "cubic", "--tiling_check", *NO_WINDOW_FLAGS], tmp_path)
    check = doc["cases"][0]["tiling_check"]
    assert check["model"] == "windowed_cubic" and check["grid_shift"] == [4, 8, 8] and check["window"] == [8, 16, 16]
    assert check["psnr_wide"] == PSNR_CAP_DB and check["psnr_soft_tissue"] == PSNR_CAP_DB
    assert check["max_abs_difference_hu"] < 0.01
    assert doc["tiling_check_mean"] == {"psnr_wide": PSNR_CAP_DB, "psnr_soft_tissue": PSNR_CAP_DB}
    assert "Tiling check (windowed_cubic" in (tmp_path / "report.md").read_text()


def test_ctld_and_vae_ceiling_on_real_chest_ct(tmp_path, chest_ct_crop, infer_tiny_export):
    """A tiny random model on the real chest CT: both ctld modes, the three interpolations and the export's slab
    filter are scored in both protocols, panels are written; --vae reports the encode->decode ceiling on thin and
    thick inputs."""
    write_nifti(chest_ct_crop, tmp_path / "chest.nii.gz")
    doc = _run([str(tmp_path / "chest.nii.gz"), "--checkpoint", str(infer_tiny_export), "--steps", "2",
                "--batch_size", "8", "--no_progress"], tmp_path / "ctld")
    assert set(doc["mean"]) == {"nearest", "linear", "cubic", "slab_filter", "ctld_regression", "ctld_diffusion"}
    assert {"rplhr_psnr", "rplhr_ssim", "psnr_wide"} <= set(doc["mean"]["slab_filter"])
    assert "| slab_filter |" in (tmp_path / "ctld" / "report.md").read_text()
    assert doc["settings"]["num_inference_steps"] == 2 and doc["settings"]["factor"] == 5
    for values in doc["mean"].values():
        assert all(np.isfinite(v) for v in values.values())
    assert (tmp_path / "ctld" / doc["cases"][0]["panel"]).is_file()

    vae_doc = _run([str(tmp_path / "chest.nii.gz"), "--vae", str(infer_tiny_export), "--no_progress"], tmp_path / "vae")
    assert vae_doc["mode"] == "vae" and set(vae_doc["mean"]) == {"vae_thin", "vae_thick"}
    assert 0 < vae_doc["mean"]["vae_thin"]["ssim_wide"] < 1  # random weights: far from a perfect reconstruction
