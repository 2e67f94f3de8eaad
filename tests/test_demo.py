"""`ctld-demo` end to end at a tiny size: every artifact of the chain exists and reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from ctld.data import build_shards
from ctld.data.dicom import read_dicom_series
from ctld.demo import cli as demo
from ctld.demo.results import STAGES, held_out_from_shards
from ctld.export import load_export
from ctld.model_card import read_card

TINY = (
    "--n_studies 3 --num_slices 40 --size 48 --vae_steps 2 --diffusion_steps 2 --data.patch_size=32 "
    "--data.num_workers=0 --data.patches_per_volume=2 --train.val_every=2 --train.image_every=2 "
    "--train.checkpoint_every=2 --train.scale_batches=1 --train.log_every=1 --infer.num_inference_steps=2 "
    "--infer.batch_size=4 --infer.num_samples=1"
).split()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    assert demo.main(["--out", str(out), *TINY]) == 0
    return out


def _scalar_tags(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in tb_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_demo_artifacts_read_back(demo_run):
    out = demo_run
    # Phantoms: 3 training studies + 1 held-out with thin and thick series.
    assert len(list((out / "phantoms" / "train").glob("PHANTOM_*"))) == 3
    held = next((out / "phantoms" / "heldout").glob("PHANTOM_*"))
    assert (held / "thin_1mm").is_dir() and (held / "thick_5mm").is_dir()

    # Shards: a manifest and tars that `ctld-shards verify` accepts.
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["factor"] == 5
    assert list((out / "shards").glob("train-*.tar"))
    assert build_shards.main(["verify", str(out / "shards")]) == 0

    # Both training stages: real 2-process DDP, a checkpoint, TensorBoard scalars, an export.
    for stage in ("vae", "diffusion"):
        run = out / "runs" / stage
        resolved = yaml.safe_load((run / "config.yaml").read_text())
        assert resolved["train"]["stage"] == stage
        assert resolved["_run"]["world_size"] == 2
        checkpoint = run / "checkpoints" / "checkpoint-2"
        assert checkpoint.is_dir() and any(checkpoint.glob("*.safetensors"))
        assert "train/loss" in _scalar_tags(run / "tb")
    export = load_export(out / "runs" / "diffusion" / "export", "cpu")
    assert export.unet is not None and int(export.meta["factor"]) == 5

    # ctld-infer: a thin DICOM series on the held-out study's thin grid (same positions as the real one).
    (predicted,) = read_dicom_series(out / "infer" / "thin_dicom", strict=True)
    (target,) = [v for v in read_dicom_series(held, strict=True) if v.spacing_mm[0] == pytest.approx(1.0)]
    assert predicted.hu.shape == target.hu.shape == (40, 48, 48)
    np.testing.assert_allclose(predicted.slice_positions_mm(), target.slice_positions_mm(), atol=1e-3)

    # ctld-eval: metrics for ctld and the three baselines, a report and panels.
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert {"nearest", "linear", "cubic", "slab_filter", "ctld_regression", "ctld_diffusion"} <= set(metrics["mean"])
    for row in metrics["mean"].values():
        assert np.isfinite(row["psnr_soft_tissue"]) and np.isfinite(row["mae_hu"])
    assert (out / "report" / "report.md").read_text().startswith("# ctld-eval")
    panels = list((out / "report" / "panels").glob("*.png"))
    assert panels
    for png in [*panels, out / "coronal.png"]:
        with Image.open(png) as image:
            image.verify()

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == set(STAGES)
    assert summary["mean"] == metrics["mean"]

    # The export's model card holds the report's scores (ctld-eval --add_to_card), in the demo table's formats, and
    # the inference settings training recorded (TINY's --infer overrides).
    export_dir = out / "runs" / "diffusion" / "export"
    card = read_card(export_dir)
    assert card["evaluations"][demo.CARD_EVALUATION_PHANTOM]["mean"] == metrics["mean"]
    readme = (export_dir / "README.md").read_text()
    for method, row in metrics["mean"].items():
        assert (f"| {method} | {row['psnr_wide']:.2f} | {row['ssim_wide']:.3f} | {row['psnr_soft_tissue']:.2f} | "
                f"{row['ssim_soft_tissue']:.3f} | {row['mae_hu']:.1f} |") in readme
    assert card["inference_settings"]["num_inference_steps"] == 2 and card["inference_settings"]["batch_size"] == 4
    assert card["training"]["world_size"] == 2 and card["training_data"]["splits"]["train"]["patients"] >= 1


def test_demo_rerun_reuses_finished_stages(demo_run, capsys):
    assert demo.main(["--out", str(demo_run), *TINY]) == 0
    summary = json.loads((demo_run / "summary.json").read_text())
    assert all(stage["reused"] for stage in summary["stages"].values())
    assert "reusing the finished stage" in capsys.readouterr().out


def test_demo_rejects_unknown_arguments(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--vae_stepz", "3"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    assert demo.main(["--out", str(tmp_path), "--data", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_data_mode_needs_a_test_split(demo_run, tmp_path):
    # Phantom shards hold no test split (the demo holds out a study of its own); --data mode needs one.
    with pytest.raises(ValueError, match="no test split"):
        held_out_from_shards(demo_run / "shards", tmp_path)


def test_phantom_demo_uses_the_public_salt_and_writes_no_salt(demo_run):
    """Phantoms identify no one, so their demo keys samples with a fixed public salt (the same split and numbers on
    every machine); the salt still never lands in a config written to disk."""
    import yaml

    from ctld.data.dicom import anon_id
    from ctld.demo.cli import PHANTOM_SALT

    assert yaml.safe_load((demo_run / "demo_config.yaml").read_text())["shards"]["salt"] == ""
    keys = [s["key"] for record in (demo_run / "shards" / ".done").glob("*.json")
            for s in json.loads(record.read_text())["sample_info"]]
    patients = {anon_id(f"PH{index:06d}", PHANTOM_SALT, "patient") for index in range(1, 40)}  # phantom_study.py
    assert keys and all(key.split("_")[0] in patients for key in keys)
