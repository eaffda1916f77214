"""Collators and the DataLoaderFactory: a list of samples -> one batch dict.

For plain torch DataLoaders (Ray Data batches are already collated). A sample is a
dict with ``"x"``/``"y"`` (or ``"input_ids"``/``"labels"``) or an ``(x, y)`` tuple.
One module-level table maps the collator names that configs use to these functions
(``get_collator`` / ``register_collator``; ``CollatorRegistry`` is a view of it), and
``DataLoaderFactory`` picks a task's collator from it by name: the TaskSpec's
``preprocessing_config["collator"]``, else :attr:`kiln.config.TaskType.collator`, the
one table of task type -> collator name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kiln.errors import ConfigError, NotFoundError

__all__ = [
    "CollatorRegistry",
    "DataLoaderConfig",
    "DataLoaderFactory",
    "get_collator",
    "register_collator",
    "task_collator",
    "Collator",
    "collate_classification",
    "collate_language_modeling",
    "collate_vision",
    "collate_seq2seq",
    "collate_regression",
    "collate_segmentation",
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
    batch: Sequence[Any],
    pad_token_id: int = 0,
    seq_len: int | None = None,
    *,
    input_key: str = "x",
    label_key: str = "y",
) -> dict[str, torch.Tensor]:
    """Right-pad token ids to ``seq_len`` (or the longest); padding is excluded from the loss.

    Padded label positions are IGNORE_INDEX and ``attention_mask`` is 0 there. A sample
    without labels is its own target. ``input_key="input_ids", label_key="labels"``
    gives the batch Hugging Face models take as keyword arguments.
    """
    xs, ys = zip(*(_xy(s) for s in batch), strict=True)
    x_list = [_tensor(x).long() for x in xs]
    y_list = [_tensor(y if y is not None else x).long() for x, y in zip(xs, ys, strict=True)]
    mask = [torch.ones(len(t), dtype=torch.long) for t in x_list]
    return {
        input_key: _pad(x_list, pad_token_id, seq_len),
        label_key: _pad(y_list, IGNORE_INDEX, seq_len),
        "attention_mask": _pad(mask, 0, seq_len),
    }


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


def collate_regression(batch: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Stack float32 features and float32 targets (``[B]`` or ``[B, K]``)."""
    xs, ys = zip(*(_xy(s) for s in batch), strict=True)
    x = torch.stack([_tensor(x) for x in xs]).float()
    return {"x": x, "y": torch.stack([_tensor(y) for y in ys]).float()}


def collate_segmentation(batch: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Images as float32 ``[B, C, H, W]`` (uint8 scaled to [0, 1]), masks as int64 ``[B, H, W]``.

    Images of unequal size are zero-padded at the bottom/right to the largest, and their
    masks padded with IGNORE_INDEX, so padding is left out of the loss and the metrics.
    A mask given as ``[1, H, W]`` is squeezed.
    """
    xs, ys = zip(*(_xy(s) for s in batch), strict=True)
    images, masks = [], []
    for x, y in zip(xs, ys, strict=True):
        t = _tensor(x)
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        images.append(t.unsqueeze(0) if t.ndim == 2 else t)
        m = _tensor(y).long()
        masks.append(m.squeeze(0) if m.ndim == 3 and m.shape[0] == 1 else m)
    h = max(t.shape[-2] for t in images)
    w = max(t.shape[-1] for t in images)
    x = torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in images])
    y = torch.stack(
        [F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2]), value=IGNORE_INDEX) for m in masks]
    )
    return {"x": x, "y": y}


_BUILTIN_COLLATORS: dict[str, Collator] = {
    "classification": collate_classification,
    "language_modeling": collate_language_modeling,
    "vision": collate_vision,
    "sequence_to_sequence": collate_seq2seq,
    "regression": collate_regression,
    "segmentation": collate_segmentation,
}


def get_collator(name: str) -> Collator:
    """The collator registered as ``name`` (raises NotFoundError listing the known names)."""
    try:
        return _COLLATORS[name]
    except KeyError:
        raise NotFoundError(
            f"unknown collator {name!r}; known: {', '.join(sorted(_COLLATORS))}"
        ) from None


def register_collator(name: str, fn: Collator, *, overwrite: bool = False) -> None:
    """Add ``fn`` under ``name`` for every config and loader (``overwrite=True`` replaces)."""
    if not callable(fn):
        raise ConfigError(f"collator {name!r} must be callable; got {fn!r}")
    if name in _COLLATORS and not overwrite:
        raise ConfigError(
            f"collator {name!r} is already registered; pass overwrite=True to replace it"
        )
    _COLLATORS[name] = fn


_COLLATORS: dict[str, Collator] = dict(_BUILTIN_COLLATORS)


class CollatorRegistry:
    """Names -> collate functions: a view of the module-level table configs look up."""

    def get(self, name: str) -> Collator:
        """The collator registered as ``name``."""
        return get_collator(name)

    def register(self, name: str, fn: Collator, *, overwrite: bool = False) -> None:
        """Add ``fn`` as ``name`` (``overwrite=True`` replaces an existing one)."""
        register_collator(name, fn, overwrite=overwrite)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(_COLLATORS)

    def __contains__(self, name: object) -> bool:
        return name in _COLLATORS


def task_collator(task_type: str) -> str:
    """The collator name for ``task_type``, from :attr:`kiln.config.TaskType.collator`."""
    from kiln.config.task import TASK_TYPES, TaskType

    try:
        return TaskType(task_type).collator
    except ValueError:
        raise ConfigError(
            f"task_type={task_type!r} has no collator; known task types: {', '.join(TASK_TYPES)}"
        ) from None


@dataclass(frozen=True)
class DataLoaderConfig:
    """Batching of one loader: ``batch_size``, ``shuffle``, ``drop_last``."""

    batch_size: int = 32
    shuffle: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ConfigError(f"batch_size={self.batch_size!r} must be an integer >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} must be an integer >= 1")


class DataLoaderFactory:
    """Builds torch DataLoaders whose collation and order follow a task and a seed.

    The collator is looked up by name: ``task_spec.preprocessing_config["collator"]``
    when set, else the one for ``task_spec.task_type``. Language-modeling batches pad
    with ``task_spec.pad_token_id`` and use the task's column names, so a task with
    ``input_column="input_ids", label_column="labels"`` yields Hugging Face batches.
    Shuffled order depends only on ``seed``: two factories with one seed give the same
    batches.
    """

    def __init__(
        self, task_spec: Any, seed: int = 42, pin_memory: bool = False, num_workers: int = 0
    ) -> None:
        self.task_spec, self.seed = task_spec, int(seed)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.num_workers = int(num_workers)

    def collator(self) -> Collator:
        """The task's collator, with its padding id and column names bound."""
        task = self.task_spec
        name = (task.preprocessing_config or {}).get("collator") or task_collator(task.task_type)
        fn = get_collator(name)
        pad = task.pad_token_id if task.pad_token_id is not None else 0
        if fn is collate_language_modeling:
            return functools.partial(
                fn, pad_token_id=pad, input_key=task.input_column, label_key=task.label_column
            )
        if fn is collate_seq2seq:
            return functools.partial(fn, pad_token_id=pad)
        return fn

    def create_loader(
        self, dataset: Any, config: DataLoaderConfig | None = None, is_eval: bool = False
    ) -> torch.utils.data.DataLoader:
        """A DataLoader over ``dataset``; ``is_eval`` never shuffles nor drops batches."""
        config = config or DataLoaderConfig()
        shuffle = config.shuffle and not is_eval
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=shuffle,
            drop_last=config.drop_last and not is_eval,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )
