"""The demo's stages: each timed, fingerprinted and reused on a rerun; training launched with `accelerate launch`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def format_seconds(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{rest}s"


class Stages:
    """Runs stages in order; a stage whose fingerprint matches its done-marker (and whose outputs exist) is
    reused. A stage started with the same fingerprint but never finished keeps its outputs (training resumes
    from them); with another fingerprint they are removed first."""

    def __init__(self, out: Path, label: str = "ctld-demo"):
        self.label = label  # the prefix of every progress line
        self.dir = out / ".stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.times: dict[str, dict] = {}
        self.fingerprints: dict[str, str] = {}  # of the stages run or reused, for the stages that depend on them

    def run(self, name: str, fingerprint: str, outputs: list[Path], fn) -> None:
        self.fingerprints[name] = fingerprint
        done = self.dir / f"{name}.json"
        if done.is_file() and all(path.exists() for path in outputs):
            record = json.loads(done.read_text())
            if record.get("fingerprint") == fingerprint:
                self.times[name] = {"seconds": record["seconds"], "reused": True}
                print(
                    f"[{self.label}] {name}: reusing the finished stage ({format_seconds(record['seconds'])} "
                    f"when it ran); --fresh reruns it",
                    flush=True,
                )
                return
        started = self.dir / f"{name}.started"
        if not (started.is_file() and started.read_text() == fingerprint):
            for path in outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        done.unlink(missing_ok=True)
        started.write_text(fingerprint)
        print(f"[{self.label}] {name}: running", flush=True)
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        tmp = done.with_name(done.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "seconds": seconds}))
        tmp.replace(done)
        started.unlink(missing_ok=True)
        self.times[name] = {"seconds": seconds, "reused": False}
        print(f"[{self.label}] {name}: done in {format_seconds(seconds)}", flush=True)


def launch_command(num_processes: int) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` prefix and environment: DDP over gloo on CPU, one process per GPU otherwise."""
    import torch

    if not (REPO_ROOT / "launch" / "cpu_ddp.yaml").is_file():
        raise FileNotFoundError(
            f"{REPO_ROOT / 'launch'} not found: ctld-demo launches training with the accelerate configs of a "
            f"source checkout; run it from a clone (pip install -e .)"
        )
    env = dict(os.environ)
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        if gpus == 1:
            return [*launch, "--config_file", str(REPO_ROOT / "launch" / "single_gpu.yaml")], env
        return [
            *launch,
            "--config_file",
            str(REPO_ROOT / "launch" / "multi_gpu.yaml"),
            "--num_processes",
            str(gpus),
            "--main_process_port",
            "0",
        ], env
    # `accelerate launch --cpu --num_processes 2` silently starts one process; launch/cpu_ddp.yaml (MULTI_GPU
    # type + ACCELERATE_USE_CPU=1) starts real ranks over gloo.
    env["ACCELERATE_USE_CPU"] = "1"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // num_processes)))  # no oversubscription
    command = [
        *launch,
        "--config_file",
        str(REPO_ROOT / "launch" / "cpu_ddp.yaml"),
        "--num_processes",
        str(num_processes),
    ]
    return command, env


def train_stage(stage: str, config_path: Path, out: Path, shards_dir: Path, steps: int, num_processes: int) -> None:
    command, env = launch_command(num_processes)
    command += [
        str(REPO_ROOT / "ctld" / "train.py"),
        str(config_path),
        f"--train.stage={stage}",
        f"--train.output_dir={out / 'runs'}",
        f"--train.run_name={stage}",
        f"--train.max_steps={steps}",
        f"--data.shards_dir={shards_dir}",
        "--train.resume=latest",  # an interrupted demo continues from the newest checkpoint
    ]
    if stage == "diffusion":
        command.append(f"--train.vae_export={out / 'runs' / 'vae' / 'export'}")
    print("[ctld-demo] $ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(
            f"the {stage} training launch failed (exit {result.returncode}); its log is above. Rerun `ctld-demo` "
            f"to resume from the last checkpoint in {out / 'runs' / stage / 'checkpoints'}"
        )
