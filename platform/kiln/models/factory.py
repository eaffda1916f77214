"""Model configs (dicts from YAML, the CLI or Python) -> ``torch.nn.Module``.

Two forms: a seed-style layer list ``{"layers": [...]}``, or a named architecture
``{"name": "mlp", "hidden": [128, 64], ...}`` (``model_name`` is accepted for
``name``). The data's ``input_shape`` and ``num_outputs`` fill in the sizes.
Architectures live in a plain dict; ``register_architecture`` adds one.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.errors import ModelConfigError
from kiln.models import architectures
from kiln.models.layers import build_layer_list, layer_list_problems

__all__ = [
    "build_model",
    "validate_model_config",
    "list_architectures",
    "register_architecture",
    "ModelFactory",
    "count_parameters",
]

Builder = Callable[..., nn.Module]
_NAME_KEYS = ("name", "model_name")


@dataclass(frozen=True)
class _Architecture:
    builder: Builder
    keys: tuple[str, ...] | None  # None: the builder takes any keyword


def _keys_of(builder: Builder) -> tuple[str, ...] | None:
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.name not in ("input_shape", "num_outputs"))


_ARCHITECTURES: dict[str, _Architecture] = {
    "mlp": _Architecture(architectures.build_mlp, _keys_of(architectures.build_mlp)),
    "cnn": _Architecture(architectures.build_cnn, _keys_of(architectures.build_cnn)),
    "tiny_transformer": _Architecture(
        architectures.build_tiny_transformer, _keys_of(architectures.build_tiny_transformer)
    ),
}


def register_architecture(name: str, builder: Builder, *, overwrite: bool = False) -> None:
    """Make ``{"name": name, **kwargs}`` build ``builder(input_shape=..., num_outputs=..., **kwargs)``.

    The builder's keyword parameters are the keys the config may use (any key when
    it takes ``**kwargs``).
    """
    if not isinstance(name, str) or not name:
        raise ModelConfigError(f"architecture name={name!r}; expected a non-empty string")
    if name in _ARCHITECTURES and not overwrite:
        raise ModelConfigError(
            f"architecture {name!r} is already registered; pass overwrite=True to replace it"
        )
    _ARCHITECTURES[name] = _Architecture(builder, _keys_of(builder))


def list_architectures() -> list[str]:
    """Names usable as ``model_cfg["name"]``, sorted."""
    return sorted(_ARCHITECTURES)


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ModelConfigError(problems[0])
    raise ModelConfigError(
        f"{len(problems)} problems in the model config:\n" + "\n".join(f"  - {p}" for p in problems)
    )


def _named(model_cfg: dict) -> tuple[str | None, dict[str, Any], list[str]]:
    """(architecture name, its keyword arguments, problems) for a named config.

    Keys whose value is None are dropped (flat seed configs carry unset fields).
    """
    names = [model_cfg[k] for k in _NAME_KEYS if model_cfg.get(k) is not None]
    known = ", ".join(list_architectures())
    if not names:
        return (
            None,
            {},
            [
                f"model config needs 'layers' (a layer list) or 'name' (one of: {known}); got keys {sorted(model_cfg)}"
            ],
        )
    name = names[0]
    if len(set(names)) > 1:
        return (
            None,
            {},
            [f"model config has name={names[0]!r} and model_name={names[1]!r}; give one"],
        )
    if name not in _ARCHITECTURES:
        return (
            None,
            {},
            [f"unknown architecture name={name!r}; known: {known} (or give a 'layers' list)"],
        )
    kwargs = {k: v for k, v in model_cfg.items() if k not in _NAME_KEYS and v is not None}
    keys = _ARCHITECTURES[name].keys
    unknown = sorted(set(kwargs) - set(keys)) if keys is not None else []
    if keys is not None and unknown:
        allowed = ", ".join(["name", *keys])
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{name} does not take {key!r}{hint} (allowed keys: {allowed})")
        return name, kwargs, problems
    return name, kwargs, []


def validate_model_config(
    model_cfg: dict,
    input_shape: tuple[int, ...] | None = None,
    num_outputs: int | None = None,
    *,
    dataset_id: str | None = None,
) -> list[str]:
    """Every problem with ``model_cfg`` for this data, one line each; empty when it builds.

    Named architectures are test-built on the ``meta`` device (no memory, no time).
    """
    if not isinstance(model_cfg, dict):
        return [f"model config is {model_cfg!r}; expected a dict"]
    input_shape = tuple(input_shape) if input_shape is not None else None
    if "layers" in model_cfg:
        extra = sorted(set(model_cfg) - {"layers", *_NAME_KEYS})
        problems = [f"a layer-list config takes only 'layers'; remove {extra}"] if extra else []
        return problems + layer_list_problems(
            model_cfg["layers"], input_shape, num_outputs, dataset_id
        )
    name, kwargs, problems = _named(model_cfg)
    if problems or name is None:
        return problems
    try:
        with torch.device("meta"):
            _ARCHITECTURES[name].builder(input_shape=input_shape, num_outputs=num_outputs, **kwargs)
    except ModelConfigError as exc:
        return [str(exc)]
    except (TypeError, ValueError, RuntimeError) as exc:
        return [f"{name} cannot be built from {kwargs}: {exc}"]
    return []


def build_model(
    model_cfg: dict,
    *,
    input_shape: tuple[int, ...] | None = None,
    num_outputs: int | None = None,
    dataset_id: str | None = None,
) -> nn.Module:
    """Build the module ``model_cfg`` describes, sized for the data.

    Args:
        model_cfg: ``{"layers": [...]}`` or ``{"name": <architecture>, **params}``.
        input_shape: Shape of one input row (from ``DatasetInfo.input_shape``).
        num_outputs: Classes, regression targets or vocabulary size.
        dataset_id: Only used to name the dataset in error messages.

    Raises:
        ModelConfigError: Listing every problem found.
    """
    problems = validate_model_config(model_cfg, input_shape, num_outputs, dataset_id=dataset_id)
    if problems:
        _raise(problems)
    if "layers" in model_cfg:
        return build_layer_list(model_cfg["layers"])
    name, kwargs, _ = _named(model_cfg)
    input_shape = tuple(input_shape) if input_shape is not None else None
    return _ARCHITECTURES[name].builder(input_shape=input_shape, num_outputs=num_outputs, **kwargs)  # type: ignore[index]


class ModelFactory:
    """Seed-style facade: ``ModelFactory().create(model_cfg, input_shape=..., num_outputs=...)``."""

    def create(
        self,
        model_cfg: dict,
        *,
        input_shape: tuple[int, ...] | None = None,
        num_outputs: int | None = None,
        dataset_id: str | None = None,
    ) -> nn.Module:
        """Same as ``build_model``."""
        return build_model(
            model_cfg, input_shape=input_shape, num_outputs=num_outputs, dataset_id=dataset_id
        )

    def validate(
        self,
        model_cfg: dict,
        *,
        input_shape: tuple[int, ...] | None = None,
        num_outputs: int | None = None,
    ) -> list[str]:
        """Same as ``validate_model_config``."""
        return validate_model_config(model_cfg, input_shape, num_outputs)

    @staticmethod
    def architectures() -> list[str]:
        """Same as ``list_architectures``."""
        return list_architectures()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
