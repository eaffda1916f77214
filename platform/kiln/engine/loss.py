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
``sequence_to_sequence``  ``[B, T, V]``          ``[B, T]`` ids (not shifted)
``vision``                ``[B, C]``/``[B,C,H,W]`` ``[B]``/``[B,H,W]``
``segmentation``          ``[B, C, H, W]``       ``[B, H, W]``
``regression``            ``[B, K]``             ``[B, K]`` (or ``[B]`` when K=1)
``peft``                  ``[B, C]``/``[B,T,V]``  as above
``quantization_safe``     ``[B, C]``/``[B,T,V]``  as above
========================  =====================  ================

``peft`` and ``quantization_safe`` live in :mod:`kiln.compat.losses` (they exist for
the API kiln keeps compatible); the registry builds them by name like the others.
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
    "SequenceToSequenceLoss",
    "VisionLoss",
    "RegressionLoss",
    "LossStrategyRegistry",
    "LOSSES",
    "get_loss_strategy",
    "loss_for_task",
    "register_loss",
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


def cross_entropy_any(
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


def check_cross_entropy_any(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """The shape checks :func:`cross_entropy_any` makes, without computing the loss."""
    if logits.dim() == 3:
        _check_lm(name, logits, labels)
    else:
        _check_class_labels(name, logits, labels)


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


class SequenceToSequenceLoss:
    """Token cross entropy for encoder-decoder outputs: ``logits[:, t]`` predicts ``labels[:, t]``.

    Unlike :class:`LanguageModelingLoss` nothing is shifted (the decoder's inputs are
    already the targets shifted right). Targets equal to ``-100`` (the padding the
    ``sequence_to_sequence`` collator writes) or to ``pad_token_id`` are left out.

    Args:
        pad_token_id: target id to leave out besides ``-100``; ``inputs["pad_token_id"]``
            overrides it.
        label_smoothing: in ``[0, 1)``.
    """

    def __init__(self, pad_token_id: int | None = None, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
        self.pad_token_id = pad_token_id
        self.label_smoothing = float(label_smoothing)

    def validate_inputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.dim() != 3 or labels.dim() != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
            raise ValueError(
                "SequenceToSequenceLoss expects logits [batch, target_len, vocab] and labels "
                f"[batch, target_len]; got {_shapes(logits, labels)}"
            )

    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: LossInputs | None = None
    ) -> torch.Tensor:
        self.validate_inputs(logits, labels)
        pad = (inputs or {}).get("pad_token_id", self.pad_token_id)
        targets = labels
        if pad is not None:
            targets = labels.masked_fill(labels == pad, IGNORE_INDEX)
        if not bool((targets != IGNORE_INDEX).any()):
            return logits.sum() * 0.0  # nothing to learn from: keep the graph connected
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
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


def _segmentation(**kwargs: Any) -> VisionLoss:
    return VisionLoss(task="segmentation", **kwargs)


def _compat_loss(name: str) -> Callable[..., Any]:
    """A factory for a loss kept in :mod:`kiln.compat.losses`, imported when first built."""

    def build(**kwargs: Any) -> Any:
        from kiln.compat import losses

        return getattr(losses, name)(**kwargs)

    build.__name__ = build.__qualname__ = name
    return build


_BUILTINS: dict[str, Callable[..., Any]] = {
    "language_modeling": LanguageModelingLoss,
    "classification": ClassificationLoss,
    "peft": _compat_loss("PEFTAwareLoss"),
    "quantization_safe": _compat_loss("QuantizationSafeLoss"),
    "vision": VisionLoss,
    "segmentation": _segmentation,
    "sequence_to_sequence": SequenceToSequenceLoss,
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

    def user_entries(self) -> dict[str, Any]:
        """The entries registered on top of the built-ins (they travel to worker actors)."""
        return {k: v for k, v in self._entries.items() if _BUILTINS.get(k) is not v}

    def __contains__(self, name: object) -> bool:
        return name in self._entries


#: The registry ``TrainingConfig.loss`` names are looked up in (built-ins plus yours).
LOSSES = LossStrategyRegistry()


def register_loss(name: str, strategy: Any, *, overwrite: bool = False) -> None:
    """Make ``strategy`` (class, factory or instance) selectable as ``TrainingConfig(loss=name)``.

    A run ships the losses registered here to its Ray worker actors, so the strategy
    must pickle (a module-level class or function does).
    """
    LOSSES.register(name, strategy, overwrite=overwrite)


def get_loss_strategy(name: str, **kwargs: Any) -> LossStrategy:
    """Build a strategy by name, e.g. ``get_loss_strategy("regression", kind="l1")``."""
    return LOSSES.get(name, **kwargs)


def loss_for_task(task_type: str) -> str:
    """Default loss name for a ``TaskSpec.task_type``."""
    from kiln.config.task import TASK_TYPES, TaskType

    try:
        return TaskType(task_type).default_loss
    except ValueError:
        raise ConfigError(
            f"task_type {task_type!r} has no default loss; known task types are: "
            f"{', '.join(sorted(TASK_TYPES))}"
        ) from None
