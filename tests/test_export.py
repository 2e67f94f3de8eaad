"""safetensors exports: round trips give identical outputs; incomplete exports fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from ctld.config import DiffusionConfig
from ctld.diffusion import build_train_scheduler
from ctld.export import EXPORT_VERSION, Export, load_export, load_model, save_export, save_model, vae_hash
from ctld.models.unet import UNet3D
from ctld.models.vae import AutoencoderKL3D

META = {"factor": 3, "hu_min": -1024.0, "hu_max": 2048.0, "depth_thick": 2, "patch_size": 8, "step": 12}


def _models():
    torch.manual_seed(0)
    vae = AutoencoderKL3D(channels=(4, 4), latent_channels=2, norm_num_groups=4, mid_attention=True,
                          scaling_factor=0.7).eval()
    unet = UNet3D(latent_channels=2, factor=3, channels=(8, 16), num_res_blocks=1, depth_downsample=(False,),
                  attention_levels=(False, True), norm_num_groups=4, attention_head_dim=8).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)  # a non-zero output, so the round trip is checked
    return vae, unet


def _outputs(vae, unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 2, 8, 8, generator=g)
    noisy, cond = torch.randn(1, 2, 6, 4, 4, generator=g), torch.randn(1, 2, 6, 4, 4, generator=g)
    with torch.no_grad():
        return vae(x, sample_posterior=False)[0], unet(noisy, torch.tensor([10]), cond)


def test_save_load_model_round_trip(tmp_path):
    vae, unet = _models()
    save_model(vae, tmp_path, "vae")
    save_model(unet, tmp_path, "unet")
    assert json.loads((tmp_path / "vae.json").read_text())["class"] == "AutoencoderKL3D"
    with safe_open(str(tmp_path / "unet.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(unet.state_dict())
    vae2, unet2 = load_model(tmp_path, "vae"), load_model(tmp_path, "unet")
    assert vae2.config == vae.config and unet2.config == unet.config
    assert vae2.scaling_factor == 0.7
    for a, b in zip(_outputs(vae, unet), _outputs(vae2, unet2), strict=True):
        assert torch.equal(a, b)


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}  # diffusers' private bookkeeping keys differ


def test_export_round_trip(tmp_path):
    vae, unet = _models()
    scheduler = build_train_scheduler(DiffusionConfig())
    out = tmp_path / "run" / "export"
    save_export(out, vae=vae, unet=unet, scheduler=scheduler, meta=META)
    assert sorted(p.name for p in out.iterdir()) == [  # no model card without one given
        "ctld.json", "scheduler_config.json", "unet.json", "unet.safetensors", "vae.json", "vae.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["export"]  # no temp folders left behind
    loaded = load_export(out)
    assert isinstance(loaded, Export)
    assert loaded.meta["factor"] == 3 and loaded.meta["step"] == 12
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert _public(loaded.scheduler.config) == _public(scheduler.config)
    assert torch.equal(loaded.scheduler.alphas_cumprod, scheduler.alphas_cumprod)
    for a, b in zip(_outputs(vae, unet), _outputs(loaded.vae, loaded.unet), strict=True):
        assert torch.equal(a, b)

    # Re-exporting replaces the folder; a VAE-only export has no unet/scheduler.
    save_export(out, vae=vae, meta=META)
    loaded = load_export(out)
    assert loaded.unet is None and loaded.scheduler is None
    assert [p.name for p in out.parent.iterdir()] == ["export"]


@pytest.mark.parametrize("missing", ["vae.safetensors", "vae.json", "ctld.json", "unet.json", "unet.safetensors"])
def test_incomplete_export_names_folder_and_file(tmp_path, missing):
    vae, unet = _models()
    save_export(tmp_path / "export", vae=vae, unet=unet, meta=META)
    (tmp_path / "export" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"export {tmp_path / 'export'} is incomplete: {missing} is missing"):
        load_export(tmp_path / "export")


def test_bad_exports_raise(tmp_path):
    vae, unet = _models()
    with pytest.raises(ValueError, match="meta lacks \\['patch_size'\\]"):
        save_export(tmp_path / "a", vae=vae, meta={k: v for k, v in META.items() if k != "patch_size"})
    with pytest.raises(ValueError, match="unet.factor=3 differs from meta factor=5"):
        save_export(tmp_path / "b", vae=vae, unet=unet, meta={**META, "factor": 5})
    assert not any(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_export(tmp_path / "nowhere")
    # Weights that do not fit the stored architecture.
    save_model(vae, tmp_path / "c", "vae")
    spec = json.loads((tmp_path / "c" / "vae.json").read_text())
    spec["kwargs"]["channels"] = [8, 8]
    (tmp_path / "c" / "vae.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="does not match the architecture"):
        load_model(tmp_path / "c", "vae")
    with pytest.raises(ValueError, match="not an exportable model"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "d", "linear")


@pytest.mark.parametrize(("version", "hint"), [(2, "re-export it with this ctld"), (None, "re-export it"),
                                               (EXPORT_VERSION + 1, "upgrade ctld")])
def test_an_export_of_another_format_version_is_refused_in_one_line(tmp_path, capsys, version, hint):
    from ctld.inference import main as infer_main

    vae, unet = _models()
    out = save_export(tmp_path / "export", vae=vae, unet=unet, meta=META)
    meta = json.loads((out / "ctld.json").read_text())
    meta["format_version"] = version
    (out / "ctld.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=hint):
        load_export(out)
    assert infer_main(["thick.nii.gz", "--checkpoint", str(out), "--out", str(tmp_path / "thin.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(out / "ctld.json") in err and hint in err
    if version == 2:  # a diffusion run may still start from an older VAE export: its weights did not change
        assert load_export(out, min_version=1).vae is not None


def test_loading_an_export_runs_no_pickle(tmp_path, monkeypatch):
    """Weights are safetensors and the rest JSON: loading works with every unpickler disabled."""
    import pickle

    vae, unet = _models()
    out = save_export(tmp_path / "export", vae=vae, unet=unet, scheduler=build_train_scheduler(DiffusionConfig()),
                      meta=META)

    def refuse(*args, **kwargs):
        raise AssertionError("an export load unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    loaded = load_export(out)
    assert loaded.unet is not None and loaded.scheduler is not None


def test_the_same_weights_save_to_the_same_bytes(tmp_path):
    """vae_hash identifies a VAE by its files, so saving identical weights twice must give identical files."""
    vae, _ = _models()
    first = save_export(tmp_path / "a", vae=vae, meta=META)
    second = save_export(tmp_path / "b", vae=load_export(first).vae, meta=META)
    assert vae_hash(first) == vae_hash(second) == json.loads((second / "ctld.json").read_text())["vae_sha256"]


# Issue 24: a damaged or partial export fails in one line naming the file, exit code 2, wherever it is loaded.
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_json(path):
    path.write_text(path.read_text()[:-7])


def _other_shapes(path):
    spec = json.loads(path.read_text())
    spec["kwargs"]["channels"] = [c * 2 for c in spec["kwargs"]["channels"]]
    path.write_text(json.dumps(spec))


DAMAGES = {  # name: (file, damage, what the message says, loaders that read the file)
    "unet_truncated": ("unet.safetensors", _truncate, "is damaged", ("infer", "eval")),
    "unet_header_cut": ("unet.safetensors", lambda p: p.write_bytes(p.read_bytes()[:5]), "is damaged",
                        ("infer", "eval")),
    "vae_truncated": ("vae.safetensors", _truncate, "is damaged", ("infer", "eval", "encode", "train")),
    "vae_missing": ("vae.safetensors", lambda p: p.unlink(), "vae.safetensors is missing",
                    ("infer", "eval", "encode", "train")),
    "vae_json_bad": ("vae.json", _bad_json, "not valid JSON", ("infer", "eval", "encode", "train")),
    "ctld_json_bad": ("ctld.json", _bad_json, "not valid JSON", ("infer", "eval", "encode", "train")),
    "unet_other_shapes": ("unet.json", _other_shapes, "does not match the architecture", ("infer", "eval")),
    "scheduler_bad": ("scheduler_config.json", _bad_json, "not valid JSON", ("infer", "eval")),
    "vae_export_as_diffusion": ("unet.json", lambda p: [p.unlink(), p.with_suffix(".safetensors").unlink()],
                                "is a VAE-only export", ("infer", "eval")),
}


@pytest.fixture(scope="module")
def thick_nifti(tmp_path_factory):
    import numpy as np

    from ctld.data.nifti import write_nifti
    from ctld.data.volume import Volume

    hu = np.random.default_rng(0).integers(-1000, 500, size=(6, 16, 16)).astype(np.int16)
    return write_nifti(Volume(hu, (7.5, 1.5, 1.5), (0, 0, 0), np.eye(3)), tmp_path_factory.mktemp("thick") / "t.nii")


def _load_with(loader: str, export, tmp_path, thick_nifti, built_shards, repo_root) -> int:
    if loader == "infer":
        from ctld.inference import main

        return main([str(thick_nifti), "--checkpoint", str(export), "--out", str(tmp_path / "o.nii"), "--no_progress"])
    if loader == "eval":
        from ctld.evaluate import main

        return main([str(built_shards), "--checkpoint", str(export), "--out", str(tmp_path / "report"),
                     "--max_cases=1", "--modes=regression", "--no_progress"])
    if loader == "encode":
        from ctld.data.build_shards import main

        return main(["encode", str(built_shards), "--vae", str(export), "--out", str(tmp_path / "latents"),
                     "--config", str(repo_root / "configs/tiny.yaml"), "--log_level=ERROR"])
    from ctld.train import main

    with pytest.raises(SystemExit) as stopped:
        main([str(repo_root / "configs/tiny.yaml"), "--train.stage=diffusion", f"--train.vae_export={export}",
              f"--train.output_dir={tmp_path / 'runs'}", f"--data.shards_dir={built_shards}"])
    return stopped.value.code


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_export_fails_in_one_line_naming_the_file_wherever_it_is_loaded(
        damage, tmp_path, infer_tiny_export, thick_nifti, built_shards, repo_root, capsys):
    import shutil

    name, change, message, loaders = DAMAGES[damage]
    export = shutil.copytree(infer_tiny_export, tmp_path / "export")
    change(export / name)
    for loader in loaders:
        code = _load_with(loader, export, tmp_path, thick_nifti, built_shards, repo_root)
        err = capsys.readouterr().err.strip()
        assert code == 2, (loader, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (loader, err)
        assert message in err and (str(export) in err), (loader, err)
