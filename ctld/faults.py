"""Fault injection for the fault-campaign tests (tests/test_train.py); inert unless these variables are set.

    CTLD_FAULT_NONFINITE="3,5:1"         the loss of micro-batch 3 (every rank) and 5 (rank 1 only) becomes NaN
    CTLD_FAULT_KILL="step:4:1"           rank 1 SIGKILLs itself in the middle of optimizer step 4 (after forward)
    CTLD_FAULT_KILL="checkpoint:2:0"     rank 0 SIGKILLs itself inside the save of checkpoint-2, after its files

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
