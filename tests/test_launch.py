"""launch/: accelerate configs, DeepSpeed JSON, and launch/multinode.sh (the command every PyTorchJob pod runs).

The launches are real `accelerate launch` runs on CPU; each asserts the world size it got and an all_reduce
result, because accelerate can start processes that never join one process group."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "launch"
MULTINODE = LAUNCH / "multinode.sh"
GPU_CONFIGS = ["single_gpu.yaml", "multi_gpu.yaml", "zero2.yaml", "zero3.yaml"]
CPU_CONFIGS = ["cpu_ddp.yaml", "cpu_zero2.yaml"]
DEEPSPEED_JSONS = {"zero2.json": 2, "zero3.json": 3, "cpu_zero2.json": 2}
# The only DeepSpeed keys accelerate fills from "auto" without a transformers-style model.config.hidden_size.
FILLABLE_AUTO = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer.params.lr", "optimizer.params.weight_decay",
}
OPERATOR_ENV = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}

# Reports world size, process-group type and an all_reduce of (rank + 1): 3 with two joined processes.
ALL_REDUCE_SCRIPT = """
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), reduction="sum")
result = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
          "distributed_type": str(accelerator.distributed_type), "sum": total.item()}
Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
accelerator.end_training()
"""

# One ZeRO step with the optimizer from the JSON (DummyOptim, as ctld/train.py does), after setting the two
# values ctld/train.py writes into the JSON's "auto" slots; reports what the DeepSpeed engine really uses.
DEEPSPEED_SCRIPT = """
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs
from diffusers.optimization import get_scheduler

accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
ds_config["train_micro_batch_size_per_gpu"] = 2
ds_config["gradient_clipping"] = 0.5
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = DummyOptim(model.parameters(), lr=3e-3, weight_decay=0.01)
lr_scheduler = DummyScheduler(optimizer, lr_scheduler_callable=lambda opt: get_scheduler("constant", opt))
model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
loss = model(torch.randn(2, 4) + accelerator.process_index).pow(2).mean()
accelerator.backward(loss)
optimizer.step()
lr_scheduler.step()
optimizer.zero_grad()
total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), reduction="sum")
Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps({
    "rank": accelerator.process_index, "world_size": accelerator.num_processes,
    "distributed_type": str(accelerator.distributed_type), "sum": total.item(),
    "zero_stage": model.zero_optimization_stage(), "gradient_clipping": model.gradient_clipping(),
    "micro_batch": model.train_micro_batch_size_per_gpu(), "lr": model.get_lr()[0],
    "weight_decay": model.optimizer.param_groups[0]["weight_decay"],
}))
accelerator.end_training()
"""


def _env(**extra: str) -> dict[str, str]:
    """A clean environment: no operator variables or CPU switches leaking in from the caller."""
    env = {k: v for k, v in os.environ.items()
           if k not in OPERATOR_ENV and k not in ("GPUS_PER_NODE", "CTLD_CPU", "ACCELERATE_USE_CPU", "DS_ACCELERATOR")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    # DeepSpeed JIT-builds its CPU comm op once (~70 s); keep it in the venv as `make test` does.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _results(folder: Path) -> list[dict]:
    """What each rank of ALL_REDUCE_SCRIPT / DEEPSPEED_SCRIPT wrote, by rank."""
    return sorted((json.loads(path.read_text()) for path in folder.glob("rank*.json")), key=lambda r: r["rank"])


def _run_multinode(config: str, script: list[str], env: dict[str, str], timeout: int = 60):
    return subprocess.run(["bash", str(MULTINODE), config, *script], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- config files


@pytest.mark.parametrize("name", GPU_CONFIGS + CPU_CONFIGS)
def test_accelerate_config_parses(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = LAUNCH / name
    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.DEEPSPEED)
    if name == "single_gpu.yaml":
        assert cfg.distributed_type == DistributedType.NO and cfg.num_processes == 1
    else:
        assert cfg.num_processes >= 2
        assert raw["rdzv_backend"] == "static" and raw["same_network"] is True
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        ds = raw["deepspeed_config"]
        assert ds["deepspeed_multinode_launcher"] == "standard"
        assert (REPO_ROOT / ds["deepspeed_config_file"]).is_file()
        # accelerate refuses these beside a deepspeed_config_file ("will be ignored"); they belong in the JSON.
        assert "mixed_precision" not in raw
        assert not {"gradient_accumulation_steps", "gradient_clipping", "zero_stage"} & set(ds)
    elif name in GPU_CONFIGS:
        assert cfg.mixed_precision == "bf16"
    if name in CPU_CONFIGS:
        assert raw["use_cpu"] is True and cfg.mixed_precision in (None, "no")


def _walk(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", sorted(DEEPSPEED_JSONS))
def test_deepspeed_json_uses_auto_for_batch_lr_and_clipping(name, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    config = json.loads((LAUNCH / name).read_text())
    flat = dict(_walk(config))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer.params.lr", "optimizer.params.weight_decay"):
        assert flat.get(key) == "auto", f"{name}: {key} should be 'auto' (filled from ctld's config)"
    unfillable = sorted(key for key, value in flat.items() if value == "auto" and key not in FILLABLE_AUTO)
    assert not unfillable, f"{name}: accelerate cannot fill 'auto' for {unfillable} with ctld's models"
    assert flat["zero_optimization.stage"] == DEEPSPEED_JSONS[name]
    assert flat["bf16.enabled"] is (not name.startswith("cpu_")), "bf16 on GPUs, fp32 on CPU"
    assert "scheduler" not in config, "ctld/train.py builds the LR schedule itself and refuses a JSON scheduler"
    if DEEPSPEED_JSONS[name] == 3:
        # The export gathers full weights from the ZeRO-3 shards.
        assert flat["zero_optimization.stage3_gather_16bit_weights_on_model_save"] is True
    # accelerate's own checks on the file (e.g. a zero_optimization block is required).
    monkeypatch.delenv("ACCELERATE_CONFIG_DS_FIELDS", raising=False)
    plugin = DeepSpeedPlugin(hf_ds_config=str(LAUNCH / name))
    assert plugin.zero_stage == DEEPSPEED_JSONS[name]


def test_every_deepspeed_yaml_names_its_json():
    named = {yaml.safe_load((LAUNCH / n).read_text())["deepspeed_config"]["deepspeed_config_file"]
             for n in GPU_CONFIGS + CPU_CONFIGS if "zero" in n}
    assert named == {f"launch/{name}" for name in DEEPSPEED_JSONS}


# ------------------------------------------------------------------------------------- real CPU launches


def test_cpu_ddp_config_starts_two_joined_processes(tmp_path):
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu_ddp.yaml"),
         str(script), str(tmp_path)],
        cwd=REPO_ROOT, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(tmp_path)
    assert [r["rank"] for r in results] == [0, 1], result.stdout[-3000:]
    for r in results:
        assert r["world_size"] == 2 and r["sum"] == 3.0
        assert r["distributed_type"] == "DistributedType.MULTI_CPU"


@pytest.mark.slow
def test_cpu_zero2_config_runs_deepspeed_with_auto_values_filled(tmp_path):
    script = tmp_path / "zero_step.py"
    script.write_text(DEEPSPEED_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_zero2.yaml", str(script),
         str(tmp_path)],
        cwd=REPO_ROOT, env=_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(tmp_path)
    assert [r["rank"] for r in results] == [0, 1], result.stdout[-3000:]
    for r in results:
        assert r["world_size"] == 2 and r["sum"] == 3.0
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["zero_stage"] == 2
        # "auto" slots: lr and weight decay from the training script's optimizer, clipping and micro batch
        # from what it wrote into the config (ctld/train.py: train.max_grad_norm, data.batch_size).
        assert r["lr"] == pytest.approx(3e-3) and r["weight_decay"] == pytest.approx(0.01)
        assert r["gradient_clipping"] == 0.5 and r["micro_batch"] == 2


# ---------------------------------------------------------------------------------------- multinode.sh


@pytest.mark.parametrize("missing", sorted(OPERATOR_ENV))
def test_multinode_fails_clearly_on_missing_variable(missing):
    env = _env(CTLD_CPU="1", **{k: v for k, v in OPERATOR_ENV.items() if k != missing})
    result = _run_multinode("launch/cpu_ddp.yaml", ["does_not_matter.py"], env, timeout=30)
    assert result.returncode == 2
    assert f"{missing} is not set" in result.stderr
    assert "accelerate" not in result.stdout and "node 1/2" not in result.stderr  # nothing was launched


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"PET_NNODES": "1:4"}, "PET_NNODES='1:4' is not a whole number"),
        ({"PET_NODE_RANK": "2"}, "PET_NODE_RANK=2 must be below PET_NNODES=2"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not a whole number"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
        ({"MASTER_ADDR": ""}, "MASTER_ADDR is not set"),
        ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0 must be >= 1"),
    ],
)
def test_multinode_rejects_malformed_variables(overrides, message):
    env = _env(CTLD_CPU="1", **{**OPERATOR_ENV, **overrides})
    result = _run_multinode("launch/cpu_ddp.yaml", ["does_not_matter.py"], env, timeout=30)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_multinode_rejects_wrong_config_and_gpu_mode_without_gpus():
    env = _env(**OPERATOR_ENV)
    missing = _run_multinode("launch/nope.yaml", ["x.py"], env, timeout=30)
    assert missing.returncode == 2 and "accelerate config 'launch/nope.yaml' not found" in missing.stderr
    single = _run_multinode("launch/single_gpu.yaml", ["x.py"], env, timeout=30)
    assert single.returncode == 2 and "multi-node needs MULTI_GPU or DEEPSPEED" in single.stderr
    # GPU config, no CPU mode, no GPU in this pod: refuse rather than start CPU processes on a GPU cluster.
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    no_gpu = _run_multinode("launch/multi_gpu.yaml", ["x.py"], {**env, "PATH": f"{Path(sys.executable).parent}:/bin"},
                            timeout=60)
    assert no_gpu.returncode == 2 and "no GPU visible" in no_gpu.stderr


# A python for launch/multinode.sh whose `-m accelerate.commands.launch` only acts out an ending ($FAKE_LAUNCH);
# everything else (the config read) runs the real interpreter.
FAKE_PYTHON = """#!/bin/bash
if [[ $1 == -m ]]; then
    case $FAKE_LAUNCH in
        finish) exit 0 ;;
        fail) exit 1 ;;
        preempted) touch "$CTLD_PREEMPTED_FILE"; exit 1 ;;  # ctld/train.py's stop; torchrun then exits 1
        wait)
            trap 'echo TERM > "$FAKE_DIR/got"; exit 1' TERM
            touch "$FAKE_DIR/started"
            while true; do sleep 0.1; done ;;
    esac
fi
exec {python} "$@"
"""


def _fake_launch(tmp_path: Path, mode: str) -> subprocess.Popen:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    env = _env(CTLD_CPU="1", GPUS_PER_NODE="2", PET_NNODES="1", PET_NODE_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29500", PYTHON=str(fake), FAKE_LAUNCH=mode, FAKE_DIR=str(tmp_path))
    return subprocess.Popen(["bash", str(MULTINODE), "launch/cpu_ddp.yaml", "ctld/train.py"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("mode", "code"), [("finish", 0), ("fail", 1), ("preempted", 143)])
def test_multinode_exit_code_tells_finished_failed_and_preempted_apart(tmp_path, mode, code):
    """Issue 15: the PyTorchJob's restartPolicy ExitCode restarts 128-255 only; torchrun exits 1 for any failure of
    its workers, so multinode.sh turns "stopped with a SIGTERM checkpoint" into 143."""
    launch = _fake_launch(tmp_path, mode)
    _out, err = launch.communicate(timeout=60)
    assert launch.returncode == code, err
    assert ("preempted" in err) == (code == 143)


def test_multinode_forwards_the_pods_sigterm_and_exits_preempted(tmp_path):
    import signal
    import time

    launch = _fake_launch(tmp_path, "wait")
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert launch.poll() is None and time.monotonic() < deadline, launch.communicate()[1]
        time.sleep(0.05)
    launch.send_signal(signal.SIGTERM)
    _out, err = launch.communicate(timeout=60)
    assert (tmp_path / "got").read_text().strip() == "TERM"  # accelerate got the signal to forward to the ranks
    assert launch.returncode == 143, err


def test_multinode_two_nodes_on_one_machine_join_one_process_group(tmp_path):
    """Two "nodes" (two multinode.sh processes, ranks 0 and 1) rendezvous at MASTER_ADDR:MASTER_PORT."""
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE_SCRIPT)
    port = str(_free_port())
    nodes = [
        subprocess.Popen(["bash", str(MULTINODE), "launch/cpu_ddp.yaml", str(script), str(tmp_path)], cwd=REPO_ROOT,
                         env=_env(CTLD_CPU="1", PET_NNODES="2", PET_NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=120) for node in nodes]
    for node, (_out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    results = _results(tmp_path)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world_size"] == 2 and r["sum"] == 3.0 and r["distributed_type"] == "DistributedType.MULTI_CPU"
    assert "node 1/2, 1 process(es) per node, 2 in all" in outputs[1][1]


# ------------------------------------------------------------------------- real multi-node training run


def _train_cmd(shards: Path, out: Path, run_name: str) -> list[str]:
    return ["ctld/train.py", "configs/tiny.yaml", "--train.stage=vae", "--train.max_steps=3",
            f"--data.shards_dir={shards}", f"--train.output_dir={out}", f"--train.run_name={run_name}",
            "--train.resume=latest"]


def _export_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((run_dir / "export").glob("*.safetensors"))
    assert files, f"no exported weights in {run_dir / 'export'}"
    return {f"{path.name}:{key}": tensor for path in files for key, tensor in load_file(path).items()}


@pytest.mark.slow
def test_two_node_training_matches_two_process_training(tmp_path, built_shards):
    """The issue's multi-node test: two "nodes" of launch/multinode.sh train configs/tiny.yaml for 3 steps.

    Only rank 0 writes the export, so "both nodes end with identical weights" is checked through a reference:
    under DDP every rank holds the same weights, and the 2-node run must equal a 2-process run on one machine
    (same seeds, same data split). Two nodes that never joined one process group would each train alone on
    half the data with unsynchronised gradients and could not match it."""
    if not (REPO_ROOT / "ctld" / "train.py").is_file():
        pytest.skip("ctld/train.py is not written yet")
    port = str(_free_port())
    nodes = [
        subprocess.Popen(["bash", str(MULTINODE), "launch/cpu_ddp.yaml", *_train_cmd(built_shards, tmp_path, "nodes")],
                         cwd=REPO_ROOT,
                         env=_env(CTLD_CPU="1", PET_NNODES="2", PET_NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{err[-4000:]}"
    reference = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_ddp.yaml",
         *_train_cmd(built_shards, tmp_path, "one_machine")],
        cwd=REPO_ROOT, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-4000:]

    for run_name in ("nodes", "one_machine"):
        run = yaml.safe_load((tmp_path / run_name / "config.yaml").read_text())["_run"]
        assert run["world_size"] == 2, f"{run_name}: world size {run['world_size']}"
    weights, expected = _export_weights(tmp_path / "nodes"), _export_weights(tmp_path / "one_machine")
    assert weights.keys() == expected.keys()
    import torch

    for key, tensor in expected.items():
        torch.testing.assert_close(weights[key], tensor, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
