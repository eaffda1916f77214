"""Loss strategies: one small object per task that turns logits and labels into a scalar loss.

The worker loop picks a strategy by name (``TrainingConfig.loss``, or
:func:`loss_for_task` from the ``TaskSpec``) through :func:`get_loss_strategy`,
then calls ``strategy.compute_loss(logits, labels, inputs)`` once per batch.
Strategies are plain objects holding plain values (floats, ints, tensors) so they
pickle and can be shipped to Ray Train workers.

Shapes (``B`` batch, ``T`` sequence, ``V`` vocabulary, ``C`` classes):

========================  =====================  ================
strategy                  logits                 labels
========================  =====================  ================
``language_modeling``     ``[B, T, V]``          ``[B, T]`` ids
``classification``        ``[B, C]``             ``[B]`` class ids
``peft``                  ``[B, C]``/``[B,T,V]``  as above
``quantization_safe``     ``[B, C]``/``[B,T,V]``  as above
``vision``                ``[B, C]``/``[B,C,H,W]`` ``[B]``/``[B,H,W]``
``regression``            ``[B, K]``             ``[B, K]`` (or ``[B]`` when K=1)
========================  =====================  ================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict, runtime_checkable

import torch
import torch.nn.functional as F

from kiln.errors import ConfigError

__all__ = [
    "LossInputs",
    "ModelOutput",
    "LossStrategy",
    "LanguageModelingLoss",
    "ClassificationLoss",
    "PEFTAwareLoss",
    "QuantizationSafeLoss",
    "VisionLoss",
    "RegressionLoss",
    "LossStrategyRegistry",
    "get_loss_strategy",
    "loss_for_task",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100
"""Label value that every cross-entropy strategy here leaves out of the loss."""


class LossInputs(TypedDict, total=False):
    """Optional extra inputs for a strategy; every key may be left out."""

    logits: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    pad_token_id: int | None
    pixel_values: torch.Tensor | None
    class_weights: torch.Tensor | None


@dataclass
class ModelOutput:
    """The logits of a model's forward output, whatever container they came in."""

    logits: torch.Tensor
    raw: Any = None

    @classmethod
    def from_raw(cls, raw: Any) -> ModelOutput:
        """Find the logits in a tensor, a tuple/list (first item), a dict or an object.

        Raises:
            TypeError: when no logits tensor can be found.
        """
        found: Any = raw
        if isinstance(raw, (tuple, list)):
            found = raw[0] if raw else None
        elif isinstance(raw, dict):
            found = raw.get("logits")
        elif not isinstance(raw, torch.Tensor) and hasattr(raw, "logits"):
            found = raw.logits
        if not isinstance(found, torch.Tensor):
            raise TypeError(
                f"cannot find logits in model output of type {type(raw).__name__}; expected a "
                "tensor, a tuple/list whose first item is a tensor, a dict with key 'logits', "
                "or an object with a .logits attribute"
            )
        return cls(logits=found, raw=raw)


@runtime_checkable
class LossStrategy(Protocol):
    """Computes a scalar loss from logits and labels."""

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        """Return a scalar loss tensor (differentiable with respect to ``logits``)."""
        ...

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Raise ValueError naming the shapes when logits and labels do not fit."""
        ...


def _shapes(logits: torch.Tensor, labels: torch.Tensor) -> str:
    return f"logits shape {tuple(logits.shape)}, labels shape {tuple(labels.shape)}"


def _check_class_labels(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name} expects logits [batch, num_classes] and labels [batch]; got "
            f"{_shapes(logits, labels)}"
        )
    if labels.is_floating_point():
        raise ValueError(f"{name} expects integer class ids as labels; got dtype {labels.dtype}")


def _check_lm(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"{name} expects logits [batch, seq, vocab] and labels [batch, seq]; got "
            f"{_shapes(logits, labels)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(
            f"{name} needs sequences of at least 2 tokens to predict the next one; got "
            f"{_shapes(logits, labels)}"
        )


def _lm_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pad_token_id: int | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Next-token cross entropy, mean over the kept (non-pad, unmasked) target tokens."""
    shift_logits = logits[:, :-1, :]
    targets = labels[:, 1:].clone()
    if pad_token_id is not None:
        targets[targets == pad_token_id] = IGNORE_INDEX
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = IGNORE_INDEX
    if not bool((targets != IGNORE_INDEX).any()):
        # Nothing to learn from in this batch: a zero that keeps the graph connected.
        return shift_logits.sum() * 0.0
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


class LanguageModelingLoss:
    """Causal LM loss: logits at position t predict the label at t+1.

    Compares ``logits[:, :-1]`` with ``labels[:, 1:]``, leaves out targets equal to
    ``pad_token_id``, targets whose ``attention_mask`` is 0, and ``-100``, and
    averages over the kept tokens.

    Args:
        pad_token_id: default pad id; ``inputs["pad_token_id"]`` overrides it.
    """

    def __init__(self, pad_token_id: int | None = None) -> None:
        self.pad_token_id = pad_token_id

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        _check_lm("LanguageModelingLoss", logits, labels)

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        self.validate_inputs(logits, labels)
        inputs = inputs or {}
        pad = inputs.get("pad_token_id", self.pad_token_id)
        return _lm_cross_entropy(logits, labels, pad, inputs.get("attention_mask"))


class ClassificationLoss:
    """Single-label cross entropy with optional class weights and label smoothing.

    Args:
        class_weights: per-class weights ``[C]``; ``inputs["class_weights"]`` overrides them.
        label_smoothing: in ``[0, 1)``.
    """

    def __init__(
        self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
        self.class_weights = (
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        )
        self.label_smoothing = float(label_smoothing)

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        _check_class_labels("ClassificationLoss", logits, labels)

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        self.validate_inputs(logits, labels)
        weights = (inputs or {}).get("class_weights", self.class_weights)
        if weights is not None:
            if weights.numel() != logits.shape[1]:
                raise ValueError(
                    f"class_weights has {weights.numel()} entries but logits have "
                    f"{logits.shape[1]} classes (logits shape {tuple(logits.shape)})"
                )
            weights = weights.to(device=logits.device, dtype=logits.dtype)
        return F.cross_entropy(
            logits,
            labels,
            weight=weights,
            label_smoothing=self.label_smoothing,
            ignore_index=IGNORE_INDEX,
        )


def _ce_any(
    name: str, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None
) -> torch.Tensor:
    """Cross entropy for ``[B, C]`` (classification) or ``[B, T, V]`` (shifted LM) logits."""
    inputs = inputs or {}
    if logits.dim() == 3:
        _check_lm(name, logits, labels)
        return _lm_cross_entropy(
            logits, labels, inputs.get("pad_token_id"), inputs.get("attention_mask")
        )
    _check_class_labels(name, logits, labels)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def _validate_ce_any(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() == 3:
        _check_lm(name, logits, labels)
    else:
        _check_class_labels(name, logits, labels)


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
            raise ValueError(f"adapter_scale must be > 0; got {adapter_scale!r}")
        if l2_weight < 0:
            raise ValueError(f"l2_weight must be >= 0; got {l2_weight!r}")
        self.base_model_frozen = bool(base_model_frozen)
        self.adapter_scale = float(adapter_scale)
        self.l2_weight = float(l2_weight)

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        _validate_ce_any("PEFTAwareLoss", logits, labels)

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        return _ce_any("PEFTAwareLoss", logits, labels, inputs) * self.adapter_scale

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

    Steps: cast logits to float32; replace ``+/-inf`` by the clamp bounds; clamp to
    the range of a ``bits``-bit quantizer whose scale comes from the largest finite
    logit of each row (symmetric: ``[-max|x|, max|x|]`` on ``2**(bits-1)-1`` levels
    per side; asymmetric: ``[min x, max x]`` on ``2**bits - 1`` steps); and, with
    ``fake_quantize=True`` (default), round the logits onto that grid with a
    straight-through estimator, so the loss value is the loss of the quantized
    logits while the gradient passes through unchanged. NaN logits stay NaN
    (they are a bug to surface, not to hide). For ``[B, T, V]`` logits the
    shifted LM loss is used.
    """

    def __init__(self, bits: int = 8, symmetric: bool = True, fake_quantize: bool = True) -> None:
        if not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"bits must be an int in [2, 16]; got {bits!r}")
        self.bits = bits
        self.symmetric = bool(symmetric)
        self.fake_quantize = bool(fake_quantize)

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        _validate_ce_any("QuantizationSafeLoss", logits, labels)

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
        x = torch.maximum(torch.minimum(x, high), low)
        if self.fake_quantize:
            q = torch.round((x - zero) / scale) * scale + zero
            x = x + (q - x).detach()
        return x

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        self.validate_inputs(logits, labels)
        return _ce_any("QuantizationSafeLoss", self.quantize(logits), labels, inputs)


class VisionLoss:
    """Cross entropy for image classification ``[B, C]`` or segmentation ``[B, C, H, W]``.

    ``pixel_values`` in ``inputs`` is accepted and not used by the loss.
    """

    TASKS = ("classification", "segmentation")

    def __init__(self, task: str = "classification", label_smoothing: float = 0.0) -> None:
        if task not in self.TASKS:
            raise ValueError(f"VisionLoss task must be one of {list(self.TASKS)}; got {task!r}")
        self.task = task
        self.label_smoothing = float(label_smoothing)

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.task == "classification":
            _check_class_labels("VisionLoss(task='classification')", logits, labels)
            return
        if (
            logits.dim() != 4
            or labels.dim() != 3
            or logits.shape[0] != labels.shape[0]
            or tuple(logits.shape[2:]) != tuple(labels.shape[1:])
        ):
            raise ValueError(
                "VisionLoss(task='segmentation') expects logits [batch, classes, H, W] and "
                f"labels [batch, H, W]; got {_shapes(logits, labels)}"
            )

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        self.validate_inputs(logits, labels)
        weights = (inputs or {}).get("class_weights")
        if weights is not None:
            weights = weights.to(device=logits.device, dtype=logits.dtype)
        return F.cross_entropy(
            logits,
            labels,
            weight=weights,
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )


class RegressionLoss:
    """Mean squared error, Huber (``delta``) or L1 between outputs and float targets."""

    KINDS = ("mse", "huber", "l1")

    def __init__(self, kind: str = "mse", delta: float = 1.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"RegressionLoss kind must be one of {list(self.KINDS)}; got {kind!r}")
        if delta <= 0:
            raise ValueError(f"delta must be > 0; got {delta!r}")
        self.kind = kind
        self.delta = float(delta)

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.shape == labels.shape:
            return
        if logits.dim() == 2 and logits.shape[1] == 1 and tuple(labels.shape) == logits.shape[:1]:
            return
        raise ValueError(
            "RegressionLoss expects outputs and targets of the same shape (or outputs [batch, 1] "
            f"with targets [batch]); got {_shapes(logits, labels)}"
        )

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        self.validate_inputs(logits, labels)
        target = labels.to(dtype=logits.dtype).reshape(logits.shape)
        if self.kind == "mse":
            return F.mse_loss(logits, target)
        if self.kind == "huber":
            return F.huber_loss(logits, target, delta=self.delta)
        return F.l1_loss(logits, target)


_BUILTINS: dict[str, Callable[..., Any]] = {
    "language_modeling": LanguageModelingLoss,
    "classification": ClassificationLoss,
    "peft": PEFTAwareLoss,
    "quantization_safe": QuantizationSafeLoss,
    "vision": VisionLoss,
    "regression": RegressionLoss,
}


class LossStrategyRegistry:
    """Loss strategies by name: a plain dict, filled with the built-ins on construction.

    ``register`` takes either a class/factory (called with the keyword arguments
    given to ``get``) or a ready instance.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Any] = dict(_BUILTINS)

    def register(self, name: str, strategy: Any, *, overwrite: bool = False) -> None:
        """Add ``strategy`` (class, factory or instance) under ``name``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"loss name must be a non-empty string; got {name!r}")
        if name in self._entries and not overwrite:
            raise ConfigError(
                f"loss {name!r} is already registered; pass overwrite=True to replace it"
            )
        if not callable(strategy) and not hasattr(strategy, "compute_loss"):
            raise ConfigError(
                f"loss {name!r} must be a class, a factory or an object with compute_loss(); "
                f"got {type(strategy).__name__}"
            )
        self._entries[name] = strategy

    def get(self, name: str, **kwargs: Any) -> LossStrategy:
        """Return a strategy; unknown names raise ConfigError listing the known ones."""
        if name not in self._entries:
            raise ConfigError(
                f"unknown loss {name!r}; known losses are: {', '.join(sorted(self._entries))}"
            )
        entry = self._entries[name]
        if hasattr(entry, "compute_loss") and not isinstance(entry, type):
            if kwargs:
                raise ConfigError(
                    f"loss {name!r} is a registered instance and takes no arguments; "
                    f"got {sorted(kwargs)}"
                )
            return entry
        try:
            return entry(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"loss {name!r} cannot be built with {kwargs!r}: {exc}") from exc

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def get_loss_strategy(name: str, **kwargs: Any) -> LossStrategy:
    """Build a built-in strategy by name, e.g. ``get_loss_strategy("regression", kind="l1")``."""
    return LossStrategyRegistry().get(name, **kwargs)


_TASK_LOSS = {
    "classification": "classification",
    "image_classification": "classification",
    "regression": "regression",
    "language_modeling": "language_modeling",
}


def loss_for_task(task_type: str) -> str:
    """Default loss name for a ``TaskSpec.task_type``."""
    try:
        return _TASK_LOSS[task_type]
    except KeyError:
        raise ConfigError(
            f"task_type {task_type!r} has no default loss; known task types are: "
            f"{', '.join(sorted(_TASK_LOSS))}"
        ) from None
