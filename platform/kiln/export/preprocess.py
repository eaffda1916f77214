"""Pre/post-processing shared by export (validation) and the server (per request).

``inference.py`` in a bundle carries its own copy of these few lines, since it
must run with only onnxruntime and numpy installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kiln.errors import ConfigError

__all__ = ["stats_array", "normalisation_from", "softmax"]


def stats_array(values: Any, row_shape: Sequence[int]) -> np.ndarray:
    """Shape normalisation stats so they broadcast over rows of ``row_shape``.

    A scalar applies everywhere; an array matching the trailing dims of a row
    broadcasts as is (features of an MLP); a vector of ``row_shape[0]`` values
    is per channel ([C, H, W] images).

    Raises:
        ValueError: the stats fit none of these.
    """
    arr = np.asarray(values, dtype=np.float32)
    n = len(row_shape)
    if arr.size == 1:
        return arr.reshape(())
    if arr.ndim <= n and tuple(arr.shape) == tuple(row_shape[n - arr.ndim :]):
        return arr
    if arr.ndim == 1 and n > 1 and arr.shape[0] == row_shape[0]:
        return arr.reshape((-1,) + (1,) * (n - 1))
    raise ConfigError(
        f"normalisation stats of shape {list(arr.shape)} do not fit rows of shape "
        f"{list(row_shape)}; give a scalar, one value per channel, or the row's trailing shape"
    )


def normalisation_from(preprocessing: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Pull ``{"mean", "std"}`` out of a TaskSpec's ``preprocessing_config``.

    Accepts ``{"mean": .., "std": ..}`` or ``{"normalize": {"mean": .., "std": ..}}``.
    """
    if not preprocessing:
        return None
    source = preprocessing.get("normalize") or preprocessing.get("normalization") or preprocessing
    if not isinstance(source, Mapping) or "mean" not in source or "std" not in source:
        return None
    return {"mean": _tolist(source["mean"]), "std": _tolist(source["std"])}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _tolist(value: Any) -> Any:
    return np.asarray(value, dtype=np.float64).tolist()
