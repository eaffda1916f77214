"""Models described as a list of layers (the seed's ``{"layers": [...]}`` form).

    {"layers": [
        {"type": "input",  "neurons": 4,  "activation": None,   "position": 0},
        {"type": "hidden", "neurons": 32, "activation": "relu", "position": 1,
         "dropout": 0.1, "batch_norm": True},
        {"type": "output", "neurons": 3,  "activation": None,   "position": 2},
    ]}

``layer_list_problems`` finds every problem (with the layer's position, field,
value and what would be valid) before ``build_layer_list`` builds anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from kiln.errors import ModelConfigError

__all__ = ["ACTIVATIONS", "activation", "layer_list_problems", "build_layer_list", "LAYER_KEYS"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}
_NO_ACTIVATION = (None, "none", "linear", "identity")
LAYER_TYPES = ("input", "hidden", "output")
LAYER_KEYS = ("type", "neurons", "activation", "position", "dropout", "batch_norm")


def activation_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable activation name, or None when it is."""
    if value in _NO_ACTIVATION or value in ACTIVATIONS:
        return None
    allowed = ", ".join([*ACTIVATIONS, "None"])
    if isinstance(value, str) and value.lower() in ("softmax", "log_softmax"):
        return (
            f"activation={value!r}, but models must return raw logits (the loss applies "
            f"softmax); allowed: {allowed}"
        )
    return f"unknown activation={value!r}; allowed: {allowed}"


def activation(name: str | None) -> nn.Module:
    """The activation module for ``name`` (``nn.Identity`` for None)."""
    problem = activation_problem(name)
    if problem:
        raise ModelConfigError(problem)
    return nn.Identity() if name in _NO_ACTIVATION else ACTIVATIONS[name]()  # type: ignore[index]


def _sorted_layers(layers: list[Any]) -> tuple[list[tuple[Any, dict]], list[str]]:
    """(position, layer) pairs sorted by position, and problems with the list itself."""
    problems: list[str] = []
    pairs: list[tuple[Any, dict]] = []
    for index, layer in enumerate(layers):
        if not isinstance(layer, dict):
            problems.append(
                f"layers[{index}] is {layer!r}; expected a dict with keys {', '.join(LAYER_KEYS)}"
            )
            continue
        position = layer.get("position", index)
        if not isinstance(position, int) or isinstance(position, bool):
            problems.append(f"layers[{index}] has position={position!r}; expected an int")
            position = index
        pairs.append((position, layer))
    seen: dict[int, int] = {}
    for position, _ in pairs:
        seen[position] = seen.get(position, 0) + 1
    for position, count in sorted(seen.items()):
        if count > 1:
            problems.append(
                f"position {position} is used by {count} layers; positions must be unique"
            )
    pairs.sort(key=lambda p: p[0])
    return pairs, problems


def layer_list_problems(
    layers: Any,
    input_shape: tuple[int, ...] | None = None,
    num_outputs: int | None = None,
    dataset_id: str | None = None,
) -> list[str]:
    """Every problem with a layer list, one line each (empty when it can be built)."""
    if not isinstance(layers, list) or not layers:
        return [f"'layers' is {layers!r}; expected a non-empty list of layer dicts"]
    pairs, problems = _sorted_layers(layers)
    data = f"dataset {dataset_id!r}" if dataset_id else "the data"
    for order, (position, layer) in enumerate(pairs):
        kind = layer.get("type")
        where = f"layer {position} ({kind})" if kind in LAYER_TYPES else f"layer {position}"
        unknown = sorted(set(layer) - set(LAYER_KEYS))
        if unknown:
            problems.append(
                f"{where} has unknown keys {unknown}; allowed keys: {', '.join(LAYER_KEYS)}"
            )
        if kind not in LAYER_TYPES:
            problems.append(f"{where} has type={kind!r}; allowed: {', '.join(LAYER_TYPES)}")
        neurons = layer.get("neurons")
        if not isinstance(neurons, int) or isinstance(neurons, bool) or neurons <= 0:
            problems.append(f"{where} has neurons={neurons!r}; expected a positive int")
        act = layer.get("activation")
        if kind == "input" and act not in _NO_ACTIVATION:
            problems.append(
                f"{where} has activation={act!r}; the input layer applies none, set it to None"
            )
        elif (why := activation_problem(act)) is not None:
            problems.append(f"{where} has {why}")
        dropout = layer.get("dropout", 0.0)
        if (
            not isinstance(dropout, (int, float))
            or isinstance(dropout, bool)
            or not 0.0 <= dropout < 1.0
        ):
            problems.append(f"{where} has dropout={dropout!r}; expected a number in [0, 1)")
        elif dropout and kind != "hidden":
            problems.append(
                f"{where} has dropout={dropout!r}; dropout applies to hidden layers only"
            )
        batch_norm = layer.get("batch_norm", False)
        if not isinstance(batch_norm, bool):
            problems.append(f"{where} has batch_norm={batch_norm!r}; expected true or false")
        elif batch_norm and kind != "hidden":
            problems.append(
                f"{where} has batch_norm=True; batch_norm applies to hidden layers only"
            )
        if kind == "input" and order != 0:
            problems.append(f"{where}: the input layer must come first (lowest position)")
        if kind == "output" and order != len(pairs) - 1:
            problems.append(f"{where}: the output layer must come last (highest position)")
        if kind == "input" and input_shape is not None and isinstance(neurons, int):
            features = math.prod(input_shape)
            if neurons != features:
                problems.append(
                    f"{where} has neurons={neurons} but {data} has {features} features "
                    f"(input_shape {tuple(input_shape)}); set neurons to {features}"
                )
        if (
            kind == "output"
            and num_outputs is not None
            and isinstance(neurons, int)
            and neurons != num_outputs
        ):
            problems.append(
                f"{where} has neurons={neurons} but {data} needs {num_outputs} outputs "
                f"(classes or regression targets); set neurons to {num_outputs}"
            )
    kinds = [layer.get("type") for _, layer in pairs]
    for kind in ("input", "output"):
        if kinds.count(kind) != 1:
            problems.append(
                f"the layer list has {kinds.count(kind)} {kind!r} layers; expected exactly one"
            )
    return problems


def build_layer_list(layers: list[dict]) -> nn.Sequential:
    """Build a validated layer list: Flatten, then Linear [+ BatchNorm] + activation [+ Dropout]."""
    pairs, _ = _sorted_layers(layers)
    modules: list[nn.Module] = [nn.Flatten()]
    previous = pairs[0][1]["neurons"]
    for _, layer in pairs[1:]:
        modules.append(nn.Linear(previous, layer["neurons"]))
        if layer.get("batch_norm"):
            modules.append(nn.BatchNorm1d(layer["neurons"]))
        if layer.get("activation") not in _NO_ACTIVATION:
            modules.append(activation(layer["activation"]))
        if layer.get("dropout"):
            modules.append(nn.Dropout(layer["dropout"]))
        previous = layer["neurons"]
    return nn.Sequential(*modules)
