"""Fault injection for the fault-campaign tests (tests/test_train.py); inert unless these variables are set.

    CTLD_FAULT_NONFINITE="3,5:1"         the loss of micro-batch 3 (every rank) and 5 (rank 1 only) becomes NaN
    CTLD_FAULT_KILL="step:4:1"           rank 1 SIGKILLs itself in the middle of optimizer step 4 (after forward)
    CTLD_FAULT_KILL="checkpoint:2:0"     rank 0 SIGKILLs itself inside the save of checkpoint-2, after its files
    CTLD_FAULT_KILL="save_state:2:1"     rank 1 SIGKILLs itself inside accelerate's save_state of checkpoint-2: under
                                         DeepSpeed while it writes its ZeRO shard, after the save's first collectives
                                         and before its closing barrier; otherwise as save_state starts
    CTLD_FAULT_SIGNAL="SIGSTOP"          ... freezes itself instead (save_state only): a rank on a lost node, whose
                                         sockets stay open and whose launcher sees nothing die

A SIGKILL cannot be caught, so it is the honest stand-in for a node lost to the OOM killer or a hardware fault.
"""

from __future__ import annotations

import functools
import os
import signal


def _parse(variable: str) -> frozenset[tuple[str, int, int]]:
    """{(where, index, rank)}; rank -1 = every rank. Called every micro-step: parsed once per value."""
    return _parse_text(os.environ.get(variable, ""))


@functools.lru_cache(maxsize=8)
def _parse_text(text: str) -> frozenset[tuple[str, int, int]]:
    planted = set()
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        where = parts.pop(0) if not parts[0].isdigit() else ""
        index = int(parts[0])
        rank = int(parts[1]) if len(parts) > 1 else -1
        planted.add((where, index, rank))
    return frozenset(planted)


def nonfinite_planted(micro_step: int, rank: int) -> bool:
    planted = _parse("CTLD_FAULT_NONFINITE")
    return ("", micro_step, rank) in planted or ("", micro_step, -1) in planted


def kill_if_planted(where: str, index: int, rank: int) -> None:
    planted = _parse("CTLD_FAULT_KILL")
    if (where, index, rank) in planted or (where, index, -1) in planted:
        os.kill(os.getpid(), signal.SIGKILL)


def plant_kill_inside_save(accelerator, step: int) -> None:
    """Arm the "save_state" fault of this step and rank: wrap each DeepSpeed engine's `_save_zero_checkpoint` (called
    between the save's tag-check collective and its closing barrier) to SIGKILL, or kill now without DeepSpeed."""
    planted = _parse("CTLD_FAULT_KILL")
    rank = accelerator.process_index
    if ("save_state", step, rank) not in planted and ("save_state", step, -1) not in planted:
        return
    sig = signal.Signals[os.environ.get("CTLD_FAULT_SIGNAL", "SIGKILL")]
    engines = [model for model in getattr(accelerator, "_models", []) if hasattr(model, "_save_zero_checkpoint")]
    if not engines:
        os.kill(os.getpid(), sig)
    for engine in engines:
        engine._save_zero_checkpoint = lambda *args, **kwargs: os.kill(os.getpid(), sig)
