"""benchmarks/bench_real.py and `ctld-demo --data` on patients of mixed thin spacings, at a tiny size."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import synthetic_ct

from ctld.data.nifti import write_nifti
from ctld.data.volume import Volume
from ctld.demo import cli as demo

pytestmark = pytest.mark.slow  # four training launches

TINY = ["--data.patch_size=32", "--data.num_workers=0", "--data.patches_per_volume=2", "--train.log_every=1",
        "--train.checkpoint_every=2", "--train.val_every=2", "--train.scale_batches=1",
        "--infer.num_inference_steps=2", "--infer.batch_size=4", "--infer.num_samples=1"]
THIN_SPACINGS_MM = (1.0, 1.25, 1.6)  # an archive's mix: one model for all, none resampled along z


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed_spacings")
    paths = {}
    for index, dz in enumerate(THIN_SPACINGS_MM):
        hu = synthetic_ct(60, 40, seed=index)
        paths[f"p{index}"] = write_nifti(Volume(hu, (dz, 0.7, 0.7), (0.0, 0.0, 0.0), np.eye(3)),
                                         folder / f"patient{index}.nii.gz")
    return paths


def _bench_real(repo_root):
    spec = importlib.util.spec_from_file_location("bench_real", repo_root / "benchmarks" / "bench_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_leave_one_patient_out_trains_without_the_held_out_patient_and_scores_it(patients, repo_root, tmp_path):
    bench = _bench_real(repo_root)
    args = [f"--patient={name}={path}" for name, path in patients.items()]
    out = tmp_path / "lopo"
    assert bench.main(["--out", str(out), "--folds", "p2", "--diffusion_steps", "2", "--modes", "regression",
                       "--phantoms", "1", *args, *TINY]) == 0
    result = json.loads((out / "partial.json").read_text())
    fold = result["folds"]["p2"]
    assert fold["trained_on"] == ["p0", "p1"]  # the held-out patient's shards never reach training
    config = (out / "folds" / "p2" / "config.yaml").read_text()
    assert "patient2" not in config and str(out / "shards" / "p2") not in config
    assert "phantom_shards/train-" in config  # the phantoms: data.extra_train_urls
    assert set(fold["rows"]) == {"nearest", "linear", "cubic", "slab_filter", "ctld_regression"}
    assert all(np.isfinite(v) for row in fold["rows"].values() for v in row.values())
    gain = fold["gains_db"]["ctld_regression_minus_cubic"]["psnr_wide"]
    assert gain == pytest.approx(fold["rows"]["ctld_regression"]["psnr_wide"] - fold["rows"]["cubic"]["psnr_wide"],
                                 abs=1e-3)
    assert result["training_budget"]["diffusion_steps"] == 2 and fold["train_seconds"] > 0
    # The 1.6 mm patient's 8 mm thick series was scored by a model trained on 1.0 and 1.25 mm thin series: the
    # export's domain comes from the training patients' manifests (and the phantoms are not in it).
    meta = json.loads((out / "folds" / "p2" / "runs" / "diffusion" / "export" / "ctld.json").read_text())
    trained = meta["domain"]["thin_spacing_mm"]
    assert (trained["min"], trained["max"]) == (pytest.approx(1.0), pytest.approx(1.25))


def test_demo_on_mixed_thin_spacings_finishes_with_its_table(patients, tmp_path, monkeypatch):
    """Whichever patient the salt holds out, the model trained on the other two spacings takes its thick series."""
    monkeypatch.setenv("CTLD_SALT", "mixed-spacing-test")
    out = tmp_path / "demo_data"
    code = demo.main(["--out", str(out), "--data", *map(str, patients.values()), "--vae_steps", "1", "--n_studies",
                      "1", "--num_slices", "40", "--size", "48",
                      "--diffusion_steps", "2", "--skip_coronal", "--shards.val_fraction=0", *TINY])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"cubic", "slab_filter", "ctld_regression"} <= set(summary["mean"])
    meta = json.loads((out / "runs" / "diffusion" / "export" / "ctld.json").read_text())
    assert meta["slice_spacing_policy"].startswith("slices:")
    assert "phantom_shards" in (out / "demo_config.yaml").read_text()  # trained beside the data, never held out
    trained = meta["domain"]["thin_spacing_mm"]
    held_mm = json.loads((out / "shards" / "manifest.json").read_text())["splits"]["test"]["thin_spacing_z_mm"]
    assert held_mm["min"] == held_mm["max"]  # one held-out patient
    expected = sorted(set(THIN_SPACINGS_MM) - {round(held_mm["min"], 3)})  # the two training patients' spacings
    assert [round(trained["min"], 3), round(trained["max"], 3)] == expected
