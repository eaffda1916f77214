"""Collators: a list of samples -> one ``{"x": tensor, "y": tensor}`` batch.

For plain torch DataLoaders (Ray Data batches are already collated). A sample is a
dict with ``"x"``/``"y"`` (or ``"input_ids"``/``"labels"``) or an ``(x, y)`` tuple.
``CollatorRegistry`` maps the names used in configs to these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kiln.errors import NotFoundError

__all__ = [
    "CollatorRegistry",
    "Collator",
    "collate_classification",
    "collate_language_modeling",
    "collate_vision",
    "collate_seq2seq",
    "IGNORE_INDEX",
]

Collator = Callable[[Sequence[Any]], dict[str, torch.Tensor]]
IGNORE_INDEX = -100  # label value that cross-entropy skips (torch's default ignore_index)


def _xy(sample: Any) -> tuple[Any, Any]:
    if isinstance(sample, dict):
        x = sample["x"] if "x" in sample else sample["input_ids"]
        y = sample.get("y", sample.get("labels"))
        return x, y
    x, y = sample
    return x, y


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def _pad(seqs: list[torch.Tensor], value: int | float, length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length, *seqs[0].shape[1:]), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : min(len(s), length)] = s[:length]
    return out


def collate_classification(batch: Sequence[Any], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack features (right-padding 1-D sequences of unequal length) and int64 labels."""
    xs, ys = zip(*(_xy(s) for s in batch), strict=True)
    tensors = [_tensor(x) for x in xs]
    if len({t.shape for t in tensors}) > 1:
        x = _pad(tensors, pad_token_id)
        mask = _pad([torch.ones(len(t), dtype=torch.long) for t in tensors], 0)
        return {"x": x, "y": _tensor(ys).long(), "attention_mask": mask}
    x = torch.stack(tensors)
    return {"x": x if not x.is_floating_point() else x.float(), "y": _tensor(ys).long()}


def collate_language_modeling(
    batch: Sequence[Any], pad_token_id: int = 0, seq_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad token ids to ``seq_len`` (or the longest); padded label positions are IGNORE_INDEX."""
    xs, ys = zip(*(_xy(s) for s in batch), strict=True)
    x_list = [_tensor(x).long() for x in xs]
    y_list = [_tensor(y if y is not None else x).long() for x, y in zip(xs, ys, strict=True)]
    return {"x": _pad(x_list, pad_token_id, seq_len), "y": _pad(y_list, IGNORE_INDEX, seq_len)}


def collate_vision(
    batch: Sequence[Any], mean: float | None = None, std: float | None = None
) -> dict[str, torch.Tensor]:
    """Stack images as float32 ``[B, C, H, W]`` (uint8 scaled to [0, 1]); optional normalisation."""
    xs, ys = zip(*(_xy(s) for s in batch), strict=True)
    images = []
    for x in xs:
        t = _tensor(x)
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        images.append(t.unsqueeze(0) if t.ndim == 2 else t)
    if len({t.shape for t in images}) > 1:
        h = max(t.shape[-2] for t in images)
        w = max(t.shape[-1] for t in images)
        images = [
            torch.nn.functional.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in images
        ]
    x = torch.stack(images)
    if mean is not None and std is not None:
        x = (x - mean) / std
    return {"x": x, "y": _tensor(ys).long()}


def collate_seq2seq(batch: Sequence[Any], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad source and target token ids independently; padded targets are IGNORE_INDEX."""
    xs, ys = zip(*(_xy(s) for s in batch), strict=True)
    x_list = [_tensor(x).long() for x in xs]
    y_list = [_tensor(y).long() for y in ys]
    mask = _pad([torch.ones(len(t), dtype=torch.long) for t in x_list], 0)
    return {
        "x": _pad(x_list, pad_token_id),
        "y": _pad(y_list, IGNORE_INDEX),
        "attention_mask": mask,
    }


_BUILTIN_COLLATORS: dict[str, Collator] = {
    "classification": collate_classification,
    "language_modeling": collate_language_modeling,
    "vision": collate_vision,
    "sequence_to_sequence": collate_seq2seq,
}


class CollatorRegistry:
    """Names -> collate functions; each instance starts with the four built-ins."""

    def __init__(self) -> None:
        self._collators: dict[str, Collator] = dict(_BUILTIN_COLLATORS)

    def get(self, name: str) -> Collator:
        """The collator registered as ``name``."""
        try:
            return self._collators[name]
        except KeyError:
            raise NotFoundError(
                f"unknown collator {name!r}; known: {', '.join(sorted(self._collators))}"
            ) from None

    def register(self, name: str, fn: Collator, *, overwrite: bool = False) -> None:
        """Add ``fn`` as ``name`` (``overwrite=True`` replaces an existing one)."""
        if not callable(fn):
            raise TypeError(f"collator {name!r} must be callable; got {fn!r}")
        if name in self._collators and not overwrite:
            raise ValueError(
                f"collator {name!r} already registered; pass overwrite=True to replace it"
            )
        self._collators[name] = fn

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._collators)

    def __contains__(self, name: object) -> bool:
        return name in self._collators
