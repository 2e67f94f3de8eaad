"""The trainer (ctld/train.py) end to end: real `accelerate launch` runs on shards built by `ctld-shards build`.

Every multi-process test reads back the world size the run really got (config.yaml `_run`): a launch that
silently starts one process (`accelerate launch --cpu --num_processes 2` does) must fail here, not pass.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ctld.checkpointing import (
    CHECKPOINT_PREFIX,
    PREEMPTED_EXIT_CODE,
    TRAINER_STATE,
    list_checkpoints,
    resolve_resume,
)
from ctld.panels import LABEL_HEIGHT_PX, render_panel

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / "configs" / "tiny.yaml")
LAUNCH_TIMEOUT_S = 600
# train.checkpoint_timeout_s of the save-fault test; the launch must end well within the bound below (a DeepSpeed
# launch takes ~20 s, its first one also ~70 s to JIT-build the CPU comm op).
SAVE_TIMEOUT_S = int(os.environ.get('CTLD_TEST_SAVE_TIMEOUT_S', '20'))
SAVE_FAULT_BOUND_S = 180

# What every TensorBoard log must hold (names documented in README / ctld/train.py).
TRAIN_SCALARS = {"train/loss", "lr", "train/grad_norm", "train/samples_per_s", "train/data_wait_fraction"}
VAE_VAL_SCALARS = {f"val/{kind}_{metric}_{window}" for kind in ("thin", "thick") for metric in ("psnr", "ssim")
                   for window in ("soft_tissue", "wide")}
DIFFUSION_VAL_SCALARS = {f"val/{kind}_{metric}_{window}"
                         for kind in ("regression", "diffusion", "nearest", "linear", "cubic", "slab")
                         for metric in ("psnr", "ssim") for window in ("soft_tissue", "wide")}
PANELS = {"panels/soft_tissue", "panels/wide"}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # DeepSpeed JIT-builds its CPU comm op (~70 s) on first use; keep it between runs (the Makefile sets this).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))
    for key in ("ACCELERATE_USE_CPU", "DS_ACCELERATOR"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=LAUNCH_TIMEOUT_S)
    if result.returncode != 0:
        tail = log.read_text()[-6000:]
        pytest.fail(f"command failed with exit code {result.returncode}: {' '.join(cmd)}\n--- log tail ---\n{tail}")
    return result


def _train_single(overrides: list[str], log: Path) -> subprocess.CompletedProcess:
    """One process, no launcher: what `accelerate launch --num_processes 1` runs, without its start-up cost."""
    return _run([sys.executable, "ctld/train.py", TINY, *overrides], _env(), log)


def _ddp_command(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_ddp.yaml",
           "ctld/train.py", TINY, *overrides]
    return cmd, _env(ACCELERATE_USE_CPU="1")


def _zero2_command(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_zero2.yaml",
           "ctld/train.py", TINY, *overrides]
    return cmd, _env(DS_ACCELERATOR="cpu")


def _run_info(run_dir: Path) -> dict:
    with open(run_dir / "config.yaml") as f:
        return yaml.safe_load(f)["_run"]


def _tensorboard(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def data_overrides(built_shards: Path) -> list[str]:
    """Explicit shard lists of the session's synthetic shard set. The synthetic set is too small to promise a
    val split, so validation falls back to a training shard: this checks the machinery, not generalisation."""
    train = sorted(str(p) for p in built_shards.glob("train-*.tar"))
    val = sorted(str(p) for p in built_shards.glob("val-*.tar")) or train[:1]
    assert train, f"no training shards in {built_shards}"
    return [f"--data.train_urls={'::'.join(train)}", f"--data.val_urls={'::'.join(val)}"]


@pytest.fixture(scope="module")
def shards_dir_overrides(built_shards: Path) -> list[str]:
    """The user's path: `--data.shards_dir` -> manifest.json -> train and val shards."""
    assert sorted(built_shards.glob("val-*.tar")), f"the synthetic shard set {built_shards} has no val split"
    return [f"--data.shards_dir={built_shards}"]


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory, data_overrides) -> Path:
    """One tiny VAE export, shared by every diffusion-stage test of this module."""
    out = tmp_path_factory.mktemp("vae_run")
    _train_single([*data_overrides, f"--train.output_dir={out}", "--train.run_name=vae", "--train.max_steps=2",
                   "--train.scale_batches=2"], out / "log.txt")
    export = out / "vae" / "export"
    assert (export / "vae.safetensors").is_file() and (export / "ctld.json").is_file()
    # A redirected log holds log lines only: no carriage-return progress-bar updates.
    assert "\r" not in (out / "log.txt").read_text() and "vae steps" not in (out / "log.txt").read_text()
    return export


def _stage_overrides(stage: str, vae_export: Path | None) -> list[str]:
    if stage == "vae":
        return ["--train.stage=vae", "--train.scale_batches=2"]
    return ["--train.stage=diffusion", f"--train.vae_export={vae_export}"]


def _check_finished_run(run_dir: Path, stage: str, steps: int) -> None:
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, steps]
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "a temporary checkpoint folder was left behind"
    export = run_dir / "export"
    expected = {"vae.safetensors", "vae.json", "ctld.json"}
    if stage == "diffusion":
        expected |= {"unet.safetensors", "unet.json", "scheduler_config.json"}
        assert (list_checkpoints(run_dir)[-1][1] / "ema.safetensors").is_file()
    assert expected <= {p.name for p in export.iterdir()}
    from ctld.export import load_export

    loaded = load_export(export)
    assert loaded.meta["factor"] == 5 and loaded.meta["depth_thick"] == 2 and loaded.meta["patch_size"] == 16
    assert (loaded.unet is not None) == (stage == "diffusion")
    if stage == "diffusion":  # the residual model and the slab filter fitted on the training split travel with it
        from ctld.diffusion import ResidualSpec

        spec = ResidualSpec.from_meta(loaded.meta)
        assert spec.residual_scale > 0 and spec.slab_filter is not None and spec.slab_filter.factor == 5
        assert np.allclose(spec.slab_filter.weights.sum(axis=1), 1.0)
    for name, tensor in loaded.vae.state_dict().items():
        assert torch.isfinite(tensor).all(), f"exported VAE tensor {name} is not finite"


# `make test` keeps one launch of each kind (DDP diffusion, DeepSpeed ZeRO-3 with accumulation, SIGTERM, resume);
# the other variants are `slow` and run in CI after it (`make test-slow`).
@pytest.mark.parametrize("stage", [pytest.param("vae", marks=pytest.mark.slow), "diffusion"])
def test_ddp_two_processes(stage, tmp_path, shards_dir_overrides, request):
    """2-process DDP over gloo, data from --data.shards_dir; also reads the TensorBoard scalars and image panels
    back."""
    vae = request.getfixturevalue("vae_export") if stage == "diffusion" else None
    cmd, env = _ddp_command([*shards_dir_overrides, *_stage_overrides(stage, vae), f"--train.output_dir={tmp_path}",
                             "--train.run_name=run", "--train.max_steps=4"])
    _run(cmd, env, tmp_path / "log.txt")
    run_dir = tmp_path / "run"
    info = _run_info(run_dir)
    assert info["world_size"] == 2 and info["distributed_type"] == "MULTI_CPU"
    assert info["effective_batch"] == 2 * 2 and info["total_steps"] == 4
    assert info["packages"]["torch"] and info["git_commit"]
    _check_finished_run(run_dir, stage, 4)
    if stage == "vae":  # ctld-infer checks thick inputs against factor x the thin spacing trained on
        manifest = json.loads((Path(shards_dir_overrides[0].split("=", 1)[1]) / "manifest.json").read_text())
        meta = json.loads((run_dir / "export" / "ctld.json").read_text())
        assert meta["thin_spacing_mm"] == pytest.approx(manifest["geometry"]["thin_spacing_z_mm"]["median"])
    last_checkpoint = list_checkpoints(run_dir)[-1][1]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in last_checkpoint.iterdir()}

    events = _tensorboard(run_dir)
    val_scalars = VAE_VAL_SCALARS if stage == "vae" else DIFFUSION_VAL_SCALARS
    missing = (TRAIN_SCALARS | val_scalars) - set(events.Tags()["scalars"])
    assert not missing, f"TensorBoard lacks {missing}"
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert all(np.isfinite(e.value) for e in events.Scalars("train/loss"))
    assert PANELS <= set(events.Tags()["images"])
    panel = events.Images("panels/soft_tissue")[-1]
    columns = 4 if stage == "vae" else 5  # thick | regression | diffusion | cubic | target for the U-Net
    # One 16-pixel tile per column; rows: axial (16x16), coronal (2 thick slices x 5 = 10 thin rows), each labelled.
    assert panel.step == 4 and panel.width == columns * 16 and panel.height == 2 * LABEL_HEIGHT_PX + 16 + 2 * 5
    if stage == "diffusion":
        psnr_cubic = events.Scalars("val/cubic_psnr_soft_tissue")[-1].value
        assert 5.0 < psnr_cubic < 100.0  # cubic of the synthetic phantom: a real number, not a cap or a NaN


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "diffusion"])
def test_deepspeed_zero2_two_processes(stage, tmp_path, data_overrides, request):
    vae = request.getfixturevalue("vae_export") if stage == "diffusion" else None
    cmd, env = _zero2_command([*data_overrides, *_stage_overrides(stage, vae), f"--train.output_dir={tmp_path}",
                               "--train.run_name=run", "--train.max_steps=4"])
    _run(cmd, env, tmp_path / "log.txt")
    run_dir = tmp_path / "run"
    info = _run_info(run_dir)
    assert info["world_size"] == 2 and info["distributed_type"] == "DEEPSPEED" and info["zero_stage"] == 2
    _check_finished_run(run_dir, stage, 4)
    # DeepSpeed writes its own (sharded) model/optimizer folder; every rank took part in the save.
    assert (list_checkpoints(run_dir)[-1][1] / "pytorch_model").is_dir()


def test_deepspeed_zero3_bf16_diffusion_with_gradient_accumulation(tmp_path, data_overrides, vae_export):
    """The GPU recipe on CPU: ZeRO-3 partitions the U-Net and DeepSpeed bf16 casts it (inputs are cast to match);
    the frozen VAE stays outside DeepSpeed (in bf16), the fp32 EMA gathers the partitions, validation swaps EMA
    weights in and out of the partitioned parameters, and the export is complete (fp32)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "bf16", "--gradient_accumulation_steps",
           "2", "--main_process_port", "0", "ctld/train.py", TINY, *data_overrides,
           *_stage_overrides("diffusion", vae_export), "--train.gradient_accumulation_steps=2",
           "--train.mixed_precision=bf16",
           f"--train.output_dir={tmp_path}", "--train.run_name=run", "--train.max_steps=4"]
    _run(cmd, _env(DS_ACCELERATOR="cpu"), tmp_path / "log.txt")
    run_dir = tmp_path / "run"
    info = _run_info(run_dir)
    assert info["world_size"] == 2 and info["distributed_type"] == "DEEPSPEED" and info["zero_stage"] == 3
    assert info["mixed_precision"] == "bf16" and info["effective_batch"] == 2 * 2 * 2
    _check_finished_run(run_dir, "diffusion", 4)
    events = _tensorboard(run_dir)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert all(np.isfinite(e.value) for e in events.Scalars("train/loss"))
    assert DIFFUSION_VAL_SCALARS <= set(events.Tags()["scalars"])
    unet = load_file(str(run_dir / "export" / "unet.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in unet.values())
    lrs = [e.value for e in events.Scalars("lr")]
    assert lrs[0] > lrs[1] > lrs[2] > 0  # cosine decay, stepped once per optimizer step (not per micro-batch)


def test_resume_is_equivalent_to_an_uninterrupted_run(tmp_path, data_overrides, vae_export):
    """6 steps straight == 3 steps, stop, resume, 3 steps: same U-Net weights, EMA and optimizer state.

    Tolerance: exact equality (fp32 on CPU, same ops in the same order); asserted with atol=1e-6, rtol=0.
    """
    common = [*data_overrides, *_stage_overrides("diffusion", vae_export), f"--train.output_dir={tmp_path}",
              "--train.max_steps=6", "--train.checkpoint_every=3", "--train.val_every=2", "--train.image_every=100",
              "--train.lr_warmup_steps=2", "--train.lr=1e-3"]
    _train_single([*common, "--train.run_name=straight"], tmp_path / "straight.txt")
    _train_single([*common, "--train.run_name=split", "--train.steps_per_launch=3"], tmp_path / "split1.txt")
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [3]
    assert not (tmp_path / "split" / "export").exists(), "a run stopped by steps_per_launch must not export"
    _train_single([*common, "--train.run_name=split", "--train.resume=latest"], tmp_path / "split2.txt")
    assert _run_info(tmp_path / "split")["start_step"] == 3

    straight = tmp_path / "straight" / "checkpoints" / f"{CHECKPOINT_PREFIX}6"
    resumed = tmp_path / "split" / "checkpoints" / f"{CHECKPOINT_PREFIX}6"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{name}:{key} differs after resume")
    # The weights moved (so equality is not trivially the initial weights) and the EMA lags behind them.
    first = load_file(str(tmp_path / "straight" / "checkpoints" / f"{CHECKPOINT_PREFIX}3" / "model.safetensors"))
    final = load_file(str(straight / "model.safetensors"))
    assert any(not torch.equal(first[k], final[k]) for k in final)
    straight_ema = load_file(str(straight / "ema.safetensors"))
    assert any(not torch.equal(v, final_v) for v, final_v in zip(straight_ema.values(), final.values()))
    # Same validation numbers at step 6 from both runs: validation saw the same weights and patches.
    a = _tensorboard(tmp_path / "straight").Scalars("val/regression_psnr_soft_tissue")[-1]
    b = _tensorboard(tmp_path / "split").Scalars("val/regression_psnr_soft_tissue")[-1]
    assert a.step == b.step == 6 and a.value == pytest.approx(b.value, abs=1e-6)


def test_step_phase_timing_and_channels_last(tmp_path, data_overrides, vae_export):
    """train.time_phases splits the step into the phases bench_train.py reports; channels_last weights train the
    same model (fp32 on CPU: the same loss as the default layout within float tolerance)."""
    common = [*data_overrides, *_stage_overrides("diffusion", vae_export), f"--train.output_dir={tmp_path}",
              "--train.max_steps=3", "--train.val_every=100", "--train.image_every=100",
              "--train.checkpoint_every=100"]
    _train_single([*common, "--train.run_name=timed", "--train.time_phases=true", "--train.channels_last=true"],
                  tmp_path / "timed.txt")
    _train_single([*common, "--train.run_name=plain"], tmp_path / "plain.txt")
    timed, plain = _tensorboard(tmp_path / "timed"), _tensorboard(tmp_path / "plain")
    phases = {"time/data_ms", "time/vae_encode_ms", "time/forward_ms", "time/backward_ms", "time/optimizer_ms",
              "time/ema_ms"}
    assert phases <= set(timed.Tags()["scalars"]) and not phases & set(plain.Tags()["scalars"])
    assert all(timed.Scalars(tag)[-1].value > 0 for tag in phases)
    np.testing.assert_allclose([e.value for e in timed.Scalars("train/loss")],
                               [e.value for e in plain.Scalars("train/loss")], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "diffusion"])
def test_a_compiled_model_trains_and_exports_plain_weights(tmp_path, data_overrides, vae_export, stage):
    """train.compile=true (inductor, in place; minutes of compilation on CPU): checkpoints and the export hold the
    module's own parameter names (the VAE stage exports the trained weights themselves), so a run resumes or
    exports the same with compile on or off."""
    _train_single([*data_overrides, *_stage_overrides(stage, vae_export), f"--train.output_dir={tmp_path}",
                   "--train.run_name=compiled", "--train.compile=true", "--train.max_steps=2",
                   "--train.val_every=100", "--train.image_every=100"], tmp_path / "compiled.txt")
    checkpoint = load_file(str(list_checkpoints(tmp_path / "compiled")[-1][1] / "model.safetensors"))
    assert checkpoint and not any(key.startswith("_orig_mod") for key in checkpoint)
    from ctld.export import load_export

    export = load_export(tmp_path / "compiled" / "export")
    if stage == "vae":  # the VAE export holds the trained weights themselves (a diffusion export, the EMA's)
        for key, value in export.vae.state_dict().items():
            torch.testing.assert_close(value, checkpoint[key], msg=f"exported {key} differs from the checkpoint's")
    else:
        assert export.unet is not None


def test_sigterm_on_one_rank_stops_all_ranks_with_a_checkpoint(tmp_path, data_overrides):
    """SIGTERM to ONE of two DDP ranks: both stop at the same step, save a complete checkpoint together and exit
    143 ("preempted"); launch/multinode.sh, what every PyTorchJob pod runs, exits 143 too (torchrun alone exits 1),
    so the job's ExitCode restart policy restarts it. The run then resumes from it (here with one process)."""
    import socket

    overrides = [*data_overrides, f"--train.output_dir={tmp_path}", "--train.run_name=run", "--train.max_steps=100000",
                 "--train.checkpoint_every=100000", "--train.val_every=100000", "--train.image_every=100000",
                 "--train.scale_batches=0"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = ["bash", "launch/multinode.sh", "launch/cpu_ddp.yaml", "ctld/train.py", TINY, *overrides]
    env = _env(PYTHON=sys.executable, CTLD_CPU="1", GPUS_PER_NODE="2", PET_NNODES="1", PET_NODE_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while "step 3/" not in log.read_text():
            assert launcher.poll() is None, f"training exited early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "training did not reach step 3"
            time.sleep(0.5)
        workers = _training_processes(launcher.pid)
        assert len(workers) == 2, f"expected 2 training processes, found {[p.cmdline() for p in workers]}"
        os.kill(workers[-1].pid, signal.SIGTERM)
        returncode = launcher.wait(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    assert returncode == PREEMPTED_EXIT_CODE == 143, f"launcher exited {returncode}:\n{text[-4000:]}"
    found = list_checkpoints(tmp_path / "run")
    assert len(found) == 1, found
    step, path = found[0]
    assert step >= 3 and f"stopping at step {step}" in text
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", TRAINER_STATE} <= {
        p.name for p in path.iterdir()}
    assert not (tmp_path / "run" / "export").exists()

    _train_single([*overrides, "--train.resume=latest", f"--train.max_steps={step + 2}"], tmp_path / "resume.txt")
    assert _run_info(tmp_path / "run")["start_step"] == step
    assert list_checkpoints(tmp_path / "run")[-1][0] == step + 2
    assert (tmp_path / "run" / "export" / "vae.safetensors").is_file()


def _accumulating_vae_run(tmp_path: Path, data_overrides: list[str], name: str) -> list[str]:
    return [*data_overrides, "--train.stage=vae", "--train.scale_batches=0", "--train.max_steps=3",
            "--train.gradient_accumulation_steps=2", "--train.checkpoint_every=1", "--train.log_every=1",
            "--train.val_every=100", "--train.image_every=100", f"--train.output_dir={tmp_path}",
            f"--train.run_name={name}"]


def test_a_nonfinite_micro_batch_skips_its_whole_window_exactly(tmp_path, data_overrides):
    """2-process DDP with gradient accumulation 2. A NaN planted in the second window, on one rank at its first
    micro-batch or on every rank at its last, skips that optimizer step on both ranks: the two runs end with
    bit-identical weights (no gradient of the dropped window leaks into the next, and no partial update
    happens), one skipped step each, and the learning rate of a clean run (the schedule counts optimizer steps)."""
    for name, plant in (("middle", "2:1"), ("end", "3"), ("clean", "")):
        cmd, env = _ddp_command(_accumulating_vae_run(tmp_path, data_overrides, name))
        env["CTLD_FAULT_NONFINITE"] = plant
        _run(cmd, env, tmp_path / f"{name}.txt")
    final = {name: tmp_path / name / "checkpoints" / f"{CHECKPOINT_PREFIX}3" for name in ("middle", "end", "clean")}
    states = {name: json.loads((path / TRAINER_STATE).read_text()) for name, path in final.items()}
    assert [states[n]["skipped_steps"] for n in ("middle", "end", "clean")] == [1, 1, 0], states
    assert "optimizer step skipped (1 in a row)" in (tmp_path / "middle.txt").read_text()
    weights = {name: load_file(str(path / "model.safetensors")) for name, path in final.items()}
    for key, value in weights["middle"].items():
        assert torch.equal(value, weights["end"][key]), f"{key}: the skipped window left a trace"
    assert any(not torch.equal(v, weights["clean"][k]) for k, v in weights["middle"].items())
    lrs = {name: [(e.step, e.value) for e in _tensorboard(tmp_path / name).Scalars("lr")] for name in final}
    assert lrs["middle"] == lrs["end"] == lrs["clean"] and [s for s, _ in lrs["clean"]] == [1, 2, 3]


def test_deepspeed_with_accumulation_stops_on_a_nonfinite_loss(tmp_path, data_overrides):
    """Under DeepSpeed the optimizer steps inside `backward`, so a window with a NaN cannot be skipped exactly:
    training stops with a one-line reason on every rank, and the last checkpoint stays complete for a resume."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--gradient_accumulation_steps",
           "2", "--main_process_port", "0", "ctld/train.py", TINY, *_accumulating_vae_run(tmp_path, data_overrides,
                                                                                         "run")]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(DS_ACCELERATOR="cpu", CTLD_FAULT_NONFINITE="2"),
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode != 0
    assert "DeepSpeed cannot skip an accumulation window exactly" in result.stdout + result.stderr
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [1]
    assert not (tmp_path / "run" / "export").exists()


# ---------------------------------------------------------------------------------------------- fault campaign
# 2-process DDP runs of the VAE stage, 4 steps with a checkpoint at every step. A fault (a rank SIGKILLed in the
# middle of a step or of a checkpoint save, a full disk during a save) must end the launch without a hang, leave the
# last complete checkpoint intact, and `--train.resume=latest` must reach the weights of an uninterrupted run.


def _fault_run(tmp_path: Path, data_overrides: list[str], name: str, *extra: str) -> list[str]:
    return [*data_overrides, "--train.stage=vae", "--train.scale_batches=0", "--train.max_steps=4",
            "--train.checkpoint_every=1", "--train.val_every=100", "--train.image_every=100",
            f"--train.output_dir={tmp_path}", f"--train.run_name={name}", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_overrides) -> dict[str, torch.Tensor]:
    """The final weights of the fault runs' configuration, trained without a fault."""
    out = tmp_path_factory.mktemp("uninterrupted")
    cmd, env = _ddp_command(_fault_run(out, data_overrides, "run"))
    _run(cmd, env, out / "log.txt")
    return load_file(str(out / "run" / "checkpoints" / f"{CHECKPOINT_PREFIX}4" / "model.safetensors"))


def _launch_with_fault(tmp_path: Path, overrides: list[str], log: Path, **fault_env: str) -> int:
    cmd, env = _ddp_command(overrides)
    env.update(fault_env, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5")
    with open(log, "w") as out:  # a hang fails here (timeout), well before the 30-minute collective timeout
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=180).returncode


def _resume_matches(tmp_path: Path, overrides: list[str], expected: dict[str, torch.Tensor]) -> None:
    cmd, env = _ddp_command([*overrides, "--train.resume=latest"])
    _run(cmd, env, tmp_path / "resume.txt")
    final = load_file(str(_run_dir_of(overrides) / "checkpoints" / f"{CHECKPOINT_PREFIX}4" / "model.safetensors"))
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=f"{key} differs after the fault")


def _run_dir_of(overrides: list[str]) -> Path:
    values = dict(item.split("=", 1) for item in overrides if item.startswith("--train."))
    return Path(values["--train.output_dir"]) / values["--train.run_name"]


@pytest.mark.parametrize("where, complete", [pytest.param("step:3:1", [1, 2], marks=pytest.mark.slow),
                                             ("checkpoint:2:0", [1])], ids=["mid_step", "mid_checkpoint"])
def test_a_rank_killed_mid_step_or_mid_checkpoint_loses_nothing(tmp_path, data_overrides, uninterrupted, where,
                                                                 complete):
    overrides = _fault_run(tmp_path, data_overrides, "run")
    returncode = _launch_with_fault(tmp_path, overrides, tmp_path / "fault.txt", CTLD_FAULT_KILL=where)
    assert returncode != 0, (tmp_path / "fault.txt").read_text()[-3000:]
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == complete
    _resume_matches(tmp_path, overrides, uninterrupted)


def test_a_full_disk_during_a_checkpoint_stops_every_rank_and_loses_nothing(tmp_path, data_overrides, uninterrupted):
    """The run folder on a 384 KiB tmpfs: checkpoint-1 (about 230 KiB) fits, checkpoint-2 does not. Every rank
    stops with the reason (no rank waits at a barrier); the copy of the folder on a roomier disk resumes."""
    disk = tmp_path / "small_disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        overrides = _fault_run(disk, data_overrides, "run")
        returncode = _launch_with_fault(tmp_path, overrides, tmp_path / "fault.txt")
        text = (tmp_path / "fault.txt").read_text()
        # torch.save reports a full disk as a failed zip write ("unexpected pos"); the reason reaches every rank.
        assert returncode != 0 and "CheckpointError: writing" in text, text[-3000:]
        assert "failed on 1 rank(s)" in text and "checkpoint-1 is the last complete one" in text
        assert [step for step, _ in list_checkpoints(disk / "run")] == [1]
        shutil.copytree(disk / "run", tmp_path / "run")
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    _resume_matches(tmp_path, _fault_run(tmp_path, data_overrides, "run"), uninterrupted)


@pytest.mark.slow
def test_a_rank_lost_inside_deepspeeds_save_ends_the_launch_in_bounded_time(tmp_path, data_overrides):
    """Issue 24: rank 1 is lost inside DeepSpeed's collective save_state of checkpoint-2 (ZeRO-2, 2 processes). It is
    frozen (SIGSTOP), as a rank on a node that dropped off the network looks to the others: its sockets stay open, so
    gloo waits its 30-minute timeout and the launcher sees nothing die. (A SIGKILLed rank resets its sockets and the
    survivor fails at once.) The save watchdog (train.checkpoint_timeout_s) ends rank 0, the launcher ends the rest;
    checkpoint-1 is the last complete checkpoint and the run resumes from it."""
    overrides = _fault_run(tmp_path, data_overrides, "run", f"--train.checkpoint_timeout_s={SAVE_TIMEOUT_S}")
    cmd, env = _zero2_command(overrides)
    env.update(CTLD_FAULT_KILL="save_state:2:1", CTLD_FAULT_SIGNAL="SIGSTOP", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5")
    log = open(tmp_path / "fault.txt", "w")  # noqa: SIM115 - closed below
    start = time.monotonic()
    launcher = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        returncode = launcher.wait(timeout=SAVE_FAULT_BOUND_S)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        if launcher.poll() is None:  # hung: end it and its workers, so the test fails instead of hanging
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()
            launcher.wait()
        log.close()
    text = (tmp_path / "fault.txt").read_text()
    assert returncode is not None, f"the launch hung for {SAVE_FAULT_BOUND_S} s: {text[-3000:]}"
    assert returncode != 0 and time.monotonic() - start < SAVE_FAULT_BOUND_S
    assert "did not finish within" in text and "checkpoint-1 is the last complete one" in text, text[-3000:]
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [1]
    cmd, env = _zero2_command([*overrides, "--train.resume=latest"])
    _run(cmd, env, tmp_path / "resume.txt")
    assert [step for step, _ in list_checkpoints(tmp_path / "run")][-1] == 4


def test_a_damaged_checkpoint_is_refused_in_one_line_before_any_rank_loads_it(tmp_path, data_overrides, capsys):
    """Issue 24: --train.resume on a checkpoint with a truncated model.safetensors, optimizer.bin or trainer state:
    exit 2 and one line naming the file (checked in main, before the process group and the models exist)."""
    from ctld.train import main

    overrides = _fault_run(tmp_path, data_overrides, "run")
    overrides = [o.replace("--train.max_steps=4", "--train.max_steps=1") for o in overrides]
    _train_single(overrides, tmp_path / "log.txt")
    good = tmp_path / "run" / "checkpoints" / f"{CHECKPOINT_PREFIX}1"
    names = sorted(p.name for p in good.iterdir())
    assert {"model.safetensors", "optimizer.bin", TRAINER_STATE} <= set(names), names
    for name in ("model.safetensors", "optimizer.bin", TRAINER_STATE):
        damaged = tmp_path / "damaged" / name / f"{CHECKPOINT_PREFIX}1"
        shutil.copytree(good, damaged)
        (damaged / name).write_bytes((damaged / name).read_bytes()[: (damaged / name).stat().st_size // 2])
        with pytest.raises(SystemExit) as stopped:
            main([TINY, *overrides, f"--train.resume={damaged}"])
        err = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"{damaged / name} is damaged" in err, err
    # Intact files of another model (other VAE channels): found when the state is loaded, the same one line.
    with pytest.raises(SystemExit) as stopped:
        main([TINY, *overrides, "--vae.channels=[8,8]", f"--train.resume={good}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and err[-1].startswith("ctld train: error:") and "does not fit this run" in err[-1]
    # Another norm (issue 23): GroupNorm and the per-voxel LayerNorm have the same weight names and shapes, so only the
    # run's config.yaml tells them apart; a run from before the option (no norm_type in it) used GroupNorm.
    with pytest.raises(SystemExit) as stopped:
        main([TINY, *overrides, "--vae.norm_type=group", f"--train.resume={good}"])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1 and "norm_type=layer" in err, err
    saved = tmp_path / "run" / "config.yaml"
    doc = yaml.safe_load(saved.read_text())
    del doc["vae"]["norm_type"]
    saved.write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit) as stopped:
        main([TINY, *overrides, f"--train.resume={good}"])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and "--vae.norm_type=group" in err, err


def _training_processes(launcher_pid: int) -> list[psutil.Process]:
    """The `ctld/train.py` worker processes torchrun started under the launcher."""
    found = []
    for process in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmdline = " ".join(process.cmdline())
        except psutil.Error:  # exited meanwhile
            continue
        if "ctld/train.py" in cmdline and "accelerate" not in cmdline:
            found.append(process)
    return found


def test_nonfinite_losses_stop_training_with_a_clear_error(tmp_path, data_overrides):
    # An absurd learning rate blows the weights up after the first step; every later loss is NaN/Inf.
    cmd = [sys.executable, "ctld/train.py", TINY, *data_overrides, f"--train.output_dir={tmp_path}",
           "--train.run_name=run", "--train.max_steps=20", "--train.lr=1e30", "--train.max_grad_norm=1e30",
           "--train.max_nonfinite_steps=2", "--train.checkpoint_every=100", "--train.val_every=100",
           "--train.image_every=100"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode != 0
    assert "optimizer steps in a row had a non-finite loss" in result.stderr
    assert "optimizer step skipped (1 in a row)" in result.stderr


@pytest.mark.parametrize("bad", ["--train.lr=fast", "--train.stage=diffusion", "--data.patch_szie=64"])
def test_a_config_error_is_one_line_with_exit_code_2(tmp_path, bad):
    """A wrong type, a missing setting and a misspelt key: one line naming it, exit 2, no traceback; in a
    2-process launch the line is printed once (by rank 0), not once per rank."""
    result = subprocess.run([sys.executable, "ctld/train.py", TINY, bad, f"--train.output_dir={tmp_path}"],
                            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctld train: error:") and bad.split("=")[0][2:] in lines[0]
    if bad == "--train.lr=fast":
        cmd, env = _ddp_command([bad, f"--train.output_dir={tmp_path}"])
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
        assert result.returncode != 0 and (result.stdout + result.stderr).count("ctld train: error:") == 1


def test_list_checkpoints_skips_incomplete_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("checkpoint-10", True), ("checkpoint-2", True), ("checkpoint-30", False),
                           ("checkpoint-40.tmp", True), ("notes", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / TRAINER_STATE).write_text('{"step": 0}')
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 10]
    assert resolve_resume(tmp_path, "latest") == root / "checkpoint-10"
    assert resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path / "elsewhere", "latest") is None  # first launch of a preemptible job
    with pytest.raises(ValueError, match="not a complete ctld checkpoint"):
        resolve_resume(tmp_path, str(root / "checkpoint-30"))


def test_render_panel_rows_columns_orientation_and_error():
    """Rows are (window, view), columns the images plus the error; coronal cuts put the superior end on top."""
    factor = 5
    thick = np.full((2, 16, 16), 40.0)
    thick[1] = 240.0  # the second (more superior, LPS +z) thick slice: white in the soft-tissue window
    thin = np.full((10, 16, 16), -1000.0)  # black
    columns = [("thick", np.repeat(thick, factor, axis=0)), ("thin", thin)]
    panel = render_panel(columns, spacing_mm=(1.0, 1.0, 1.0), views=("axial", "coronal"), windows=("soft_tissue",),
                         error_of="thick", reference="thin", tile=16)
    assert panel.shape == (2 * LABEL_HEIGHT_PX + 16 + 10, 3 * 16, 3) and panel.dtype == np.uint8
    coronal = panel[2 * LABEL_HEIGHT_PX + 16 :, :, 0].astype(float) / 255
    assert np.allclose(coronal[:5, :16], 1.0, atol=0.01) and np.allclose(coronal[5:, :16], 0.5, atol=0.01)
    assert np.allclose(coronal[:, 16:32], 0.0)  # thin: -1000 HU is black
    assert coronal[:, 32:].min() > 0.9  # |error| >= 1040 HU: saturated in the hot colour map (red channel)
    with pytest.raises(ValueError, match="expected one"):
        render_panel([("thick", thick), ("thin", thin)], spacing_mm=(1.0, 1.0, 1.0))
