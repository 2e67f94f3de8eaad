"""Checkpoints that survive preemption: complete folders only, the last N kept, SIGTERM turned into a save.

Layout (docs/DESIGN.md, Runs and checkpoints):

    run_dir/checkpoints/checkpoint-<step>/        accelerate `save_state` (model, optimizer, LR scheduler, RNG)
                                       ema.safetensors + ema.json    the U-Net EMA (diffusion stage)
                                       trainer_state.json            step and counters; written last
    run_dir/checkpoints/checkpoint-<step>.tmp/    a save in progress; never read, removed on the next save

Every rank calls `save_checkpoint`: under DeepSpeed each rank writes its own optimizer shards, and a save
called on rank 0 only hangs (diffusers issue #2606). The folder is renamed from its temporary name only after
every rank has finished writing, so a folder named `checkpoint-<step>` is always complete, even when the job
is killed half-way through a save. The run directory must be on a filesystem all ranks share (a PVC on k8s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from ctld import faults

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first; temporary folders are left out."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """`train.resume` -> the checkpoint folder to load, or None to start fresh.

    "" starts fresh; "latest" takes the newest complete checkpoint of this run, or starts fresh when there is
    none yet (so the same command serves the first launch and every restart after preemption); anything
    else is a checkpoint folder that must exist.
    """
    if resume == "":
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(
            f"train.resume={resume!r} is not a complete ctld checkpoint (no {TRAINER_STATE} inside); pass a "
            f"folder such as {checkpoints_dir(run_dir)}/{CHECKPOINT_PREFIX}<step>, or 'latest'"
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: str | Path,
    step: int,
    trainer_state: dict,
    *,
    ema: EMAModel | None = None,
    keep_last: int = 3,
    timeout_s: float = 0.0,
) -> Path:
    """Save the full training state as `checkpoint-<step>`. Must be called on EVERY rank.

    Args:
        accelerator: the run's Accelerator; its prepared model, optimizer and scheduler are saved.
        run_dir: the run folder (checkpoints go to run_dir/checkpoints).
        step: optimizer steps done; names the folder.
        trainer_state: JSON-serialisable counters restored by `load_checkpoint` (must hold "step").
        ema: the U-Net EMA, written as safetensors (no pickle) by the main process.
        keep_last: complete checkpoints to keep; older ones are deleted after this one is complete.
        timeout_s: a save not finished on this rank by then ends the process (`SaveWatchdog`); 0 = no limit.
    """
    with SaveWatchdog(timeout_s, run_dir, step):
        return _save_checkpoint(accelerator, run_dir, step, trainer_state, ema=ema, keep_last=keep_last)


def _save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int, trainer_state: dict, *,
                     ema: EMAModel | None, keep_last: int) -> Path:
    root = checkpoints_dir(run_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{step}.tmp"
    error = None
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a save that was killed
                shutil.rmtree(tmp)
    except Exception as exn:  # noqa: BLE001 - reported to every rank below
        error = exn
    _all_ranks_ok(accelerator, error, f"preparing {tmp}", run_dir)

    try:
        faults.plant_kill_inside_save(accelerator, step)
        accelerator.save_state(str(tmp))
        faults.kill_if_planted("checkpoint", step, accelerator.process_index)
        if accelerator.is_main_process:
            if ema is not None:
                _save_ema(ema, tmp)
            # Written last: its presence marks the folder as complete (list_checkpoints checks it).
            _write_json(tmp / TRAINER_STATE, trainer_state)
    except Exception as exn:  # noqa: BLE001 - e.g. a full disk on one rank: every rank must learn it
        error = exn
    _all_ranks_ok(accelerator, error, f"writing {tmp}", run_dir)  # every rank's files are on disk

    if accelerator.is_main_process:
        if final.exists():  # e.g. a SIGTERM save at the step of a periodic one
            shutil.rmtree(final)
        tmp.rename(final)
        for _old_step, old_path in list_checkpoints(run_dir)[: -max(keep_last, 1)]:
            logger.info(f"removing old checkpoint {old_path.name} (checkpoints_total_limit={keep_last})")
            shutil.rmtree(old_path, ignore_errors=True)
        for stale in root.glob(f"{CHECKPOINT_PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info(f"saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


# Exit code of a rank whose checkpoint save ran past train.checkpoint_timeout_s: 128 + SIGALRM, in the range the
# PyTorchJob restarts (k8s/README.md), since a rank lost mid-save is a fault a restart from the last checkpoint fixes.
CHECKPOINT_TIMEOUT_EXIT_CODE = 128 + signal.SIGALRM


class SaveWatchdog:
    """Ends this process when a checkpoint save has not finished within `timeout_s` (0 = never).

    Every rank takes part in a save's collectives (DeepSpeed's tag check and barriers, our `_all_ranks_ok`); when a
    rank dies inside one, the others wait for it. NCCL and gloo give up only after the process group's timeout
    (30 minutes by default), DeepSpeed's CPU shared-memory collectives never, and on another node no launcher
    notices. A blocked collective cannot be interrupted from Python, so a timer thread prints the reason and calls
    os._exit: the launcher then ends the other ranks. The last complete checkpoint is intact because a save only
    renames its folder into place after every rank finished writing."""

    def __init__(self, timeout_s: float, run_dir: str | Path, step: int):
        self.timeout_s, self.run_dir, self.step = float(timeout_s), run_dir, step
        self._timer: threading.Timer | None = None

    def __enter__(self) -> SaveWatchdog:
        if self.timeout_s > 0:
            self._timer = threading.Timer(self.timeout_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        found = list_checkpoints(self.run_dir)
        last = f"{found[-1][1]} is the last complete one" if found else "there is no complete checkpoint yet"
        # print, not the logger: accelerate's logger is main-process-only and this may be any rank.
        print(f"ctld train: error: saving {CHECKPOINT_PREFIX}{self.step} did not finish within "
              f"train.checkpoint_timeout_s={self.timeout_s:g} s on this rank (a rank died or hung inside the "
              f"collective save); {last}. Exiting with code {CHECKPOINT_TIMEOUT_EXIT_CODE}; rerun with "
              "--train.resume=latest (raise train.checkpoint_timeout_s if saves to this storage are this slow)",
              file=sys.stderr, flush=True)
        os._exit(CHECKPOINT_TIMEOUT_EXIT_CODE)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written on some rank; every rank raises it, none waits at a barrier."""


def _all_ranks_ok(accelerator: Accelerator, error: Exception | None, what: str, run_dir) -> None:
    """A collective in place of a bare barrier: every rank learns whether any rank failed, so a full disk on one
    rank stops all of them now instead of leaving the others blocked until the collective timeout."""
    failed = accelerator.reduce(torch.tensor([0.0 if error is None else 1.0], device=accelerator.device), "sum")
    if float(failed.item()) == 0:
        return
    found = list_checkpoints(run_dir)
    last = f"{found[-1][1].name} is the last complete one" if found else "there is no complete checkpoint yet"
    cause = f"{type(error).__name__}: {error}" if error is not None else "see the log of the rank that failed"
    raise CheckpointError(
        f"{what} failed on {int(failed.item())} rank(s) ({cause}); {last}. Free disk space or fix the storage, "
        "then rerun with --train.resume=latest"
    ) from error


class ResumeError(ValueError):
    """The checkpoint given to `train.resume` cannot be loaded (damaged, or of another model); the message names
    the file and what to do, and `ctld/train.py` ends with it in one line, exit code 2."""


def check_resumed_architecture(run_dir: str | Path, stage: str, norm_type: str) -> None:
    """ResumeError when the run being resumed trained its model with another `norm_type`: GroupNorm and the per-voxel
    LayerNorm have weights of the same names and shapes, so its checkpoint would load into the other one without a
    word. A run's config.yaml from before the option names none: those models used GroupNorm."""
    import yaml

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return
    section = "vae" if stage == "vae" else "unet"
    recorded = ((yaml.safe_load(saved.read_text()) or {}).get(section) or {}).get("norm_type", "group")
    if recorded != norm_type:
        raise ResumeError(f"{saved} trained its {section} with norm_type={recorded} and this config says "
                          f"{norm_type}: resume (or re-export) with --{section}.norm_type={recorded}, or start a "
                          "new run (another train.run_name)")


def check_checkpoint(path: str | Path) -> None:
    """ResumeError naming the first damaged file of a checkpoint folder (truncated safetensors or torch.save
    archive, bad JSON), with what to do; cheap (headers and archive directories only, no tensor is read). Called
    before `load_checkpoint` so a damaged resume ends in one line instead of a stack trace on every rank."""
    import zipfile

    from ctld.export import read_json_file

    path = Path(path)
    match = _CHECKPOINT_RE.match(path.name)
    step = int(match.group(1)) if match else None
    older = [p for saved, p in list_checkpoints(path.parent.parent) if step is not None and saved < step]
    hint = (f"delete {path} or pass --train.resume=<an older checkpoint>"
            + (f" (e.g. {older[-1]})" if older else "") + "; it was damaged after it was written (disk, copy)")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix == ".json":
            try:
                read_json_file(file, hint)
            except ValueError as error:
                raise ResumeError(str(error)) from error
        elif file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt") as handle:  # checks the header against the file size
                    handle.keys()
            except Exception as error:  # noqa: BLE001 - SafetensorError and OSError alike
                raise ResumeError(f"{file} is damaged (truncated or not a safetensors file: {error}); "
                                  f"{hint}") from error
        elif file.suffix in (".bin", ".pt", ".pkl", ".pth"):
            # torch.save writes a zip archive: a truncated one has no central directory.
            try:
                with zipfile.ZipFile(file) as archive:
                    archive.infolist()
            except (zipfile.BadZipFile, OSError) as error:
                raise ResumeError(f"{file} is damaged (not a complete torch.save archive: {error}); {hint}") from error


def load_checkpoint(accelerator: Accelerator, path: str | Path, *, ema: EMAModel | None = None) -> dict:
    """Restore what `save_checkpoint` wrote (call on every rank, after `accelerator.prepare`).

    Returns:
        The trainer state dict saved with the checkpoint (holds "step").
    """
    path = Path(path)  # its files were checked before any rank started (`check_checkpoint`, ctld/train.py main)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, ValueError, KeyError) as error:  # e.g. tensors of another shape: another config's run
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ResumeError(f"{path} does not fit this run ({type(error).__name__}: {first}); resume a checkpoint "
                          "written with the same model and optimizer settings, or start without "
                          "train.resume") from error
    if ema is not None:
        _load_ema(ema, path)
    with open(path / TRAINER_STATE) as f:
        return json.load(f)


def _save_ema(ema: EMAModel, folder: Path) -> None:
    state = ema.state_dict()
    tensors = {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(state.pop("shadow_params"))}
    save_file(tensors, str(folder / "ema.safetensors"))
    _write_json(folder / "ema.json", state)


def _load_ema(ema: EMAModel, folder: Path) -> None:
    if not (folder / "ema.safetensors").is_file():
        raise ValueError(
            f"checkpoint {folder} has no ema.safetensors: it was written by a run without an EMA (the VAE stage?); "
            "resume a diffusion-stage checkpoint or start without train.resume"
        )
    tensors = load_file(str(folder / "ema.safetensors"))
    with open(folder / "ema.json") as f:
        state = json.load(f)
    if len(tensors) != len(ema.shadow_params):
        raise ValueError(
            f"{folder}/ema.safetensors holds {len(tensors)} tensors but the U-Net has {len(ema.shadow_params)} "
            "parameters: the checkpoint comes from a different unet config"
        )
    device = ema.shadow_params[0].device if ema.shadow_params else torch.device("cpu")
    state["shadow_params"] = [tensors[f"shadow.{i}"].to(device) for i in range(len(tensors))]
    ema.load_state_dict(state)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    tmp.replace(path)


# Exit code of a run stopped by SIGTERM/SIGINT after its checkpoint: 128 + SIGTERM, what a process killed by SIGTERM
# reports. "Preempted, resume me": the PyTorchJob's `restartPolicy: ExitCode` restarts 128-255 and treats 1-127 as
# permanent; 0 is finished (k8s/README.md). launch/multinode.sh names a file in $CTLD_PREEMPTED_FILE, since torchrun
# itself exits 1 whatever its workers' codes were.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def exit_preempted() -> None:
    """End a run that saved its stop checkpoint: note it for launch/multinode.sh, exit PREEMPTED_EXIT_CODE."""
    marker = os.environ.get("CTLD_PREEMPTED_FILE")
    if marker:
        Path(marker).touch()
    raise SystemExit(PREEMPTED_EXIT_CODE)


class StopRequest:
    """Turns SIGTERM (Kubernetes preemption, `kubectl delete`) and SIGINT into a flag the loop polls.

    The handler only sets a flag; the loop reduces it over ranks each step (`should_stop`), so every rank
    stops at the same step, saves a checkpoint together and exits PREEMPTED_EXIT_CODE (`exit_preempted`).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, accelerator: Accelerator) -> bool:
        """True on every rank when any rank got a signal. A collective: call it on every rank each step."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)  # note: a CPU-GPU sync point

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
