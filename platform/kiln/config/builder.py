"""TrainingConfigBuilder: presets plus a thin ``with_*`` chain over ``dataclasses.replace``.

The builder never restates a field, its default or its help: each ``with_*`` method
accepts exactly the TrainingConfig fields of its group and validates on ``build()``.

    config = (TrainingConfigBuilder.baseline()
              .with_training(epochs=30, batch_size=8)
              .with_optimizer(gradient_accumulation_steps=4)
              .build())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from kiln.config.training import TrainingConfig, fields_in_group
from kiln.errors import ConfigError


def quick_prototype() -> TrainingConfig:
    """3 epochs at a high learning rate for debugging; small transformer dims (~12M params)."""
    return TrainingConfig(
        epochs=3,
        batch_size=32,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        keep_best_k=1,
        keep_last_n=1,
        d_model=256,
        num_layers=4,
        num_heads=4,
        d_ff=1024,
        max_seq_len=128,
    )


def baseline() -> TrainingConfig:
    """10 epochs, cosine schedule with warmup; GPT-2-small transformer dims (~125M params)."""
    return TrainingConfig(
        epochs=10,
        batch_size=32,
        learning_rate=3e-4,
        warmup_ratio=0.1,
        lr_scheduler="cosine",
        weight_decay=0.01,
        d_model=768,
        num_layers=12,
        num_heads=12,
        d_ff=3072,
        max_seq_len=512,
    )


def production() -> TrainingConfig:
    """20 epochs, mixed precision, early stopping, retention and an export bundle at the end."""
    return dataclasses.replace(
        baseline(),
        epochs=20,
        use_amp=True,
        early_stopping_patience=5,
        keep_best_k=3,
        keep_last_n=3,
        export_formats=["onnx", "pytorch"],
        max_failures=2,
    )


def distributed() -> TrainingConfig:
    """DDP over 4 GPU workers (nccl); set ``use_gpu=False`` for CPU workers (gloo)."""
    return dataclasses.replace(
        baseline(), num_workers=4, use_gpu=True, use_amp=True, max_failures=3
    )


def low_memory() -> TrainingConfig:
    """Batch 2 with 8x gradient accumulation (effective batch 16) and mixed precision."""
    return dataclasses.replace(
        baseline(),
        batch_size=2,
        gradient_accumulation_steps=8,
        use_amp=True,
        keep_best_k=1,
        keep_last_n=1,
    )


PRESETS: dict[str, Callable[[], TrainingConfig]] = {
    "quick_prototype": quick_prototype,
    "baseline": baseline,
    "production": production,
    "distributed": distributed,
    "low_memory": low_memory,
}

# Seed-style spellings accepted by with_hardware, mapped onto real fields.
_PRECISIONS: dict[str, dict[str, Any]] = {
    "32": {"use_amp": False},
    "32-true": {"use_amp": False},
    "bf16-mixed": {"use_amp": True, "amp_dtype": "bf16"},
    "16-mixed": {"use_amp": True, "amp_dtype": "fp16"},
}


def get_preset(name: str) -> TrainingConfig:
    """The preset called ``name``; unknown names list the known ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(
            f"preset={name!r} is not a preset; known presets: {', '.join(PRESETS)}"
        ) from None


class TrainingConfigBuilder:
    """Fluent, immutable-style builder; every ``with_*`` returns the builder."""

    def __init__(self, config: TrainingConfig | None = None) -> None:
        self._config = config if config is not None else TrainingConfig()

    # presets -------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> TrainingConfigBuilder:
        return cls(get_preset(name))

    @classmethod
    def quick_prototype(cls) -> TrainingConfigBuilder:
        return cls(quick_prototype())

    @classmethod
    def baseline(cls) -> TrainingConfigBuilder:
        return cls(baseline())

    @classmethod
    def production(cls) -> TrainingConfigBuilder:
        return cls(production())

    @classmethod
    def distributed(cls) -> TrainingConfigBuilder:
        return cls(distributed())

    @classmethod
    def low_memory(cls) -> TrainingConfigBuilder:
        return cls(low_memory())

    # groups --------------------------------------------------------------
    def with_training(self, **kwargs: Any) -> TrainingConfigBuilder:
        return self._with("training", kwargs)

    def with_optimizer(self, **kwargs: Any) -> TrainingConfigBuilder:
        return self._with("optimizer", kwargs)

    def with_hardware(self, **kwargs: Any) -> TrainingConfigBuilder:
        if "devices" in kwargs:  # seed spelling: number of training processes
            devices = kwargs.pop("devices")
            kwargs.setdefault("num_workers", 0 if devices == 1 else devices)
        if "precision" in kwargs:
            precision = kwargs.pop("precision")
            if precision not in _PRECISIONS:
                raise ConfigError(f"precision={precision!r} is not one of {', '.join(_PRECISIONS)}")
            for key, value in _PRECISIONS[precision].items():
                kwargs.setdefault(key, value)
        return self._with("hardware", kwargs)

    def with_logging(self, **kwargs: Any) -> TrainingConfigBuilder:
        return self._with("logging", kwargs)

    def with_checkpointing(self, **kwargs: Any) -> TrainingConfigBuilder:
        return self._with("checkpoint", kwargs)

    def with_data(self, **kwargs: Any) -> TrainingConfigBuilder:
        return self._with("data", kwargs)

    def with_model(self, **kwargs: Any) -> TrainingConfigBuilder:
        """Set architecture fields; keys that are not fields go into ``config.model``."""
        known = set(fields_in_group("model"))
        flat = {k: v for k, v in kwargs.items() if k in known}
        extra = {k: v for k, v in kwargs.items() if k not in known}
        if extra:
            flat["model"] = {**self._config.model, **flat.get("model", {}), **extra}
        self._config = dataclasses.replace(self._config, **flat)
        return self

    def build(self) -> TrainingConfig:
        """Return the validated config (raises ConfigError listing every bad field)."""
        return dataclasses.replace(self._config).validate()

    def _with(self, group: str, kwargs: dict[str, Any]) -> TrainingConfigBuilder:
        allowed = fields_in_group(group)
        errors = []
        for key in kwargs:
            if key not in allowed:
                owner = _owner_of(key)
                where = f"; it is set by with_{owner}()" if owner else ""
                errors.append(
                    f"with_{group}() got {key!r}{where}. with_{group}() accepts: {', '.join(allowed)}"
                )
        if errors:
            raise ConfigError(errors)
        self._config = dataclasses.replace(self._config, **kwargs)
        return self


def _owner_of(name: str) -> str | None:
    for f in dataclasses.fields(TrainingConfig):
        if f.name == name:
            return {"checkpoint": "checkpointing"}.get(f.metadata["group"], f.metadata["group"])
    return None
