"""Optimizer, learning-rate schedule (linear warmup then constant/linear/cosine) and AMP."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from kiln.config import TrainingConfig


def build_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer``; biases and norms get no weight decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    lr = config.learning_rate
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio * total_steps``, then the configured decay."""
    total_steps = max(1, total_steps)
    warmup = int(config.warmup_ratio * total_steps)
    kind = config.lr_scheduler

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Precision:
    """Autocast settings: bf16 on CPU; fp16 with a GradScaler (or bf16) on CUDA."""

    enabled: bool
    device_type: str
    dtype: torch.dtype | None = None

    @classmethod
    def from_config(cls, config: TrainingConfig, device: torch.device) -> Precision:
        if not config.use_amp:
            return cls(False, device.type)
        if config.amp_dtype == "fp16" or (config.amp_dtype == "auto" and device.type == "cuda"):
            return cls(True, device.type, torch.float16)
        return cls(True, device.type, torch.bfloat16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 on CUDA; None where it is not needed."""
        if self.enabled and self.dtype == torch.float16 and self.device_type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None
