"""Losses kept for API compatibility: PEFT-aware and quantization-safe cross entropy.

kiln's own task losses live in :mod:`kiln.engine.loss`; these two are the extra
strategies the older API names. Both are registered there by name (``"peft"``,
``"quantization_safe"``), so ``TrainingConfig(loss="quantization_safe")`` works.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.engine.loss import LossInputs, check_cross_entropy_any, cross_entropy_any
from kiln.errors import ConfigError

__all__ = ["PEFTAwareLoss", "QuantizationSafeLoss"]


class PEFTAwareLoss:
    """Loss for parameter-efficient fine-tuning (LoRA, adapters).

    What it does, exactly:

    * ``compute_loss`` is cross entropy: classification for ``[B, C]`` logits,
      shifted next-token LM loss for ``[B, T, V]`` logits; multiplied by
      ``adapter_scale``. With a frozen base, gradients only reach the adapter
      parameters, so ``adapter_scale`` acts as a learning-rate multiplier for them.
    * ``regularization(model)`` returns ``l2_weight * sum(p**2)`` over the
      trainable parameters (``requires_grad=True``) or a zero tensor when
      ``l2_weight`` is 0; the loop adds it to the loss when it wants it.
    * ``check_model(model)``: when ``base_model_frozen`` is true, raises
      ValueError unless the model has both frozen and trainable parameters, which
      catches the common mistake of fine-tuning a "PEFT" model with nothing frozen.

    Freezing itself is the model's job (``kiln.llm``); this loss does not change
    which parameters train.
    """

    def __init__(
        self, base_model_frozen: bool = True, adapter_scale: float = 1.0, l2_weight: float = 0.0
    ) -> None:
        if adapter_scale <= 0:
            raise ConfigError(f"adapter_scale must be > 0; got {adapter_scale!r}")
        if l2_weight < 0:
            raise ConfigError(f"l2_weight must be >= 0; got {l2_weight!r}")
        self.base_model_frozen = bool(base_model_frozen)
        self.adapter_scale = float(adapter_scale)
        self.l2_weight = float(l2_weight)

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        check_cross_entropy_any("PEFTAwareLoss", logits, labels)

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        return cross_entropy_any("PEFTAwareLoss", logits, labels, inputs) * self.adapter_scale

    def regularization(self, model: torch.nn.Module) -> torch.Tensor:
        """L2 penalty over trainable parameters (zero when ``l2_weight`` is 0)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.l2_weight == 0.0 or not params:
            device = params[0].device if params else None
            return torch.zeros((), device=device)
        return self.l2_weight * torch.stack([p.pow(2).sum() for p in params]).sum()

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError when ``base_model_frozen`` but nothing (or everything) is frozen."""
        if not self.base_model_frozen:
            return
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        if trainable == 0 or frozen == 0:
            raise ValueError(
                "PEFTAwareLoss(base_model_frozen=True) expects a frozen base and trainable "
                f"adapters; the model has {trainable} trainable and {frozen} frozen parameters"
            )


class QuantizationSafeLoss:
    """Cross entropy that is stable for quantized (int8/int4) models.

    Forward: cast logits to float32; replace ``+/-inf`` by the clamp bounds; clamp to
    the range of a ``bits``-bit quantizer whose scale comes from the largest finite
    logit of each row (symmetric: ``[-max|x|, max|x|]`` on ``2**(bits-1)-1`` levels
    per side; asymmetric: ``[min x, max x]`` on ``2**bits - 1`` steps); and, with
    ``fake_quantize=True`` (default), round the logits onto that grid with a
    straight-through estimator, so the loss value is the loss of the quantized
    logits. NaN logits stay NaN (they are a bug to surface, not to hide). For
    ``[B, T, V]`` logits the shifted LM loss is used.

    Backward: the gradient reaching the logits is clipped element-wise so that no
    row (sample, or token) pushes any logit by more than ``grad_clip`` (cross
    entropy's own bound is 1: a confidently wrong row). This keeps a few outliers from
    moving the weights by more than a quantization step would resolve. NaN gradients
    become 0. The clip follows any scaling applied to the loss afterwards (gradient
    accumulation, AMP's GradScaler), so it means the same with and without them.
    ``grad_clip=None`` turns it off.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        fake_quantize: bool = True,
        grad_clip: float | None = 0.5,
    ) -> None:
        errors = []
        if not isinstance(bits, int) or not 2 <= bits <= 16:
            errors.append(f"bits must be an int in [2, 16]; got {bits!r}")
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
            errors.append(f"grad_clip must be a number > 0 or None; got {grad_clip!r}")
        if errors:
            raise ConfigError(errors)
        self.bits = bits
        self.symmetric = bool(symmetric)
        self.fake_quantize = bool(fake_quantize)
        self.grad_clip = None if grad_clip is None else float(grad_clip)

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        check_cross_entropy_any("QuantizationSafeLoss", logits, labels)

    def quantize(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 logits clamped (and, if enabled, rounded) onto the quantizer's grid."""
        x = logits.float()
        finite = torch.isfinite(x)
        if self.symmetric:
            high = torch.where(finite, x.abs(), torch.zeros_like(x)).amax(-1, keepdim=True)
            low = -high
            levels = 2 ** (self.bits - 1) - 1
            scale = (high / levels).clamp_min(1e-12).detach()
            zero = torch.zeros_like(scale)
        else:
            big = torch.finfo(torch.float32).max
            high = torch.where(finite, x, torch.full_like(x, -big)).amax(-1, keepdim=True)
            low = torch.where(finite, x, torch.full_like(x, big)).amin(-1, keepdim=True)
            scale = ((high - low) / (2**self.bits - 1)).clamp_min(1e-12).detach()
            zero = low.detach()
        low, high = low.detach(), high.detach()
        x = torch.where(torch.isposinf(x), high.expand_as(x), x)
        x = torch.where(torch.isneginf(x), low.expand_as(x), x)
        x = torch.clamp(x, min=low, max=high)  # at the bounds the gradient passes whole
        if self.fake_quantize:
            q = torch.round((x - zero) / scale) * scale + zero
            x = x + (q - x).detach()
        return x

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        self.validate_inputs(logits, labels)
        if self.grad_clip is None or not logits.requires_grad:
            return cross_entropy_any("QuantizationSafeLoss", self.quantize(logits), labels, inputs)
        rows = max(1, logits.numel() // max(1, logits.shape[-1]))
        scale = _LossScale()
        clipped = _ClipGradient.apply(logits, self.grad_clip / rows, scale)
        loss = cross_entropy_any("QuantizationSafeLoss", self.quantize(clipped), labels, inputs)
        return _RecordLossScale.apply(loss, scale)


class _LossScale:
    """The gradient that reached the loss (1, or a scaler's factor), shared by two nodes."""

    value: torch.Tensor | float = 1.0


class _RecordLossScale(torch.autograd.Function):
    """Identity on the loss; its backward runs first and records the incoming scale."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, scale: _LossScale) -> torch.Tensor:
        ctx.scale = scale
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.scale.value = grad.detach().abs()
        return grad, None


class _ClipGradient(torch.autograd.Function):
    """Identity on the logits; backward clamps their gradient to ``+/- limit * scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, limit: float, scale: _LossScale) -> torch.Tensor:
        ctx.limit, ctx.scale = limit, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        bound = ctx.limit * ctx.scale.value
        if isinstance(bound, torch.Tensor):
            bound = bound.to(grad.dtype)
            clipped = torch.clamp(torch.nan_to_num(grad, nan=0.0), -bound, bound)
        else:
            clipped = torch.nan_to_num(grad, nan=0.0).clamp(-bound, bound)
        return clipped, None, None
