"""The accelerate / DeepSpeed set-up of a training run: process group, precision, ZeRO stage, optimizer and LR
schedule, and one collective statistic. Kept apart from the loop so ctld/train.py reads top to bottom.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs
from diffusers.optimization import get_scheduler

from ctld.config import Config


def optimizer_and_lr_scheduler(accelerator: Accelerator, model: torch.nn.Module, cfg: Config):
    """AdamW + `train.lr_scheduler` (warmup, then e.g. cosine) from diffusers.optimization.get_scheduler."""
    ds_config = {}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if "scheduler" in ds_config:
        raise ValueError(
            "the DeepSpeed JSON has a 'scheduler' block; remove it: ctld's LR schedule comes from train.lr_scheduler, "
            "train.lr_warmup_steps and train.max_steps"
        )

    def build_lr_scheduler(optimizer, steps_per_update: int):
        return get_scheduler(
            cfg.train.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.train.lr_warmup_steps * steps_per_update,
            num_training_steps=cfg.train.max_steps * steps_per_update,
        )

    if "optimizer" in ds_config:
        # DeepSpeed builds the optimizer from its JSON ("lr": "auto" is filled from train.lr) and steps the
        # LR scheduler itself, once per optimizer step.
        optimizer = DummyOptim(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        return optimizer, DummyScheduler(optimizer, lr_scheduler_callable=lambda opt: build_lr_scheduler(opt, 1))
    # Fused AdamW on the GPU: one kernel for all parameters instead of a loop of small ones.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=accelerator.device.type == "cuda" or None)
    # accelerate's AcceleratedScheduler steps the scheduler once per process per optimizer step, hence the
    # factor num_processes (as in diffusers' training examples).
    return optimizer, build_lr_scheduler(optimizer, accelerator.num_processes)


def process_group_kwargs() -> list:
    # gloo on CPU: without it DeepSpeed on CPU sees every rank as rank 0 of 1. Only for multi-process
    # launches (torchrun underneath `accelerate launch`): a single process has no process group to configure.
    if torch.cuda.is_available() or not torch.distributed.is_torchelastic_launched():
        return []
    return [InitProcessGroupKwargs(backend="gloo")]


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    # bf16 Conv3d on CPU is 35-200x slower than fp32: fp32 there.
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def zero_stage(accelerator: Accelerator) -> int:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def configure_deepspeed(accelerator: Accelerator, cfg: Config) -> None:
    """Fill the DeepSpeed JSON's "auto" batch size and clipping from the ctld config (no dataloader is
    prepared, so accelerate cannot infer them)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = cfg.train.max_grad_norm
    if zero_stage(accelerator) == 3:
        # The VAE export gathers the partitioned weights (accelerator.get_state_dict), which needs this.
        ds_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    ds_accumulation = ds_config.get("gradient_accumulation_steps", "auto")
    if ds_accumulation != "auto" and int(ds_accumulation) != cfg.train.gradient_accumulation_steps:
        raise ValueError(
            f"DeepSpeed gradient_accumulation_steps={ds_accumulation} differs from train.gradient_accumulation_steps="
            f"{cfg.train.gradient_accumulation_steps}; make them equal (accelerate launch "
            "--gradient_accumulation_steps) or set it to \"auto\" in the DeepSpeed JSON"
        )


def std_over_ranks(accelerator: Accelerator, tensors) -> tuple[float, int]:
    """Standard deviation of all values of `tensors` on every rank (one all-reduce of count, sum, sum of squares)."""
    moments = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for t in tensors:
        t = t.double()
        moments += torch.stack([torch.tensor(t.numel(), device=t.device, dtype=torch.float64), t.sum(), t.pow(2).sum()])
    count, total, squares = accelerator.reduce(moments, reduction="sum").tolist()
    return math.sqrt(max(squares / count - (total / count) ** 2, 1e-12)), int(count)
