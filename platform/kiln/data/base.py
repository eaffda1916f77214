"""What every kiln dataset is: a description (``DatasetInfo``) and a small ABC.

A ``KilnDataset`` knows its shape and labels without Ray, and turns itself into a
``ray.data.Dataset`` with the columns ``"x"`` (features) and ``"y"`` (labels) when
training starts. ``split`` is deterministic for a seed.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.errors import DatasetError

if TYPE_CHECKING:
    import ray.data

__all__ = ["DatasetInfo", "KilnDataset", "TASK_TYPES", "TABULAR_TASK_TYPES", "SOURCES"]

TASK_TYPES = (
    "classification",
    "regression",
    "language_modeling",
    "sequence_to_sequence",
    "segmentation",
)
# What a table of feature columns (a parquet/CSV/JSONL file) can hold.
TABULAR_TASK_TYPES = ("classification", "regression", "language_modeling")
SOURCES = ("bundled", "synthetic", "mnist", "file", "arrays")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: what the rows look like and what the labels mean.

    Attributes:
        id: Registry id or file path the dataset came from.
        description: One line for humans.
        task_type: One of ``TASK_TYPES``.
        input_shape: Shape of one row of ``"x"`` (``(seq_len,)`` for token ids).
        num_classes: Number of classes (classification, segmentation), vocabulary size
            (language modeling, sequence to sequence), else None.
        class_names: Names of the classes, index = class id, or None.
        num_outputs: Width of the regression target, else None.
        num_rows: Number of rows, or None where unknown without a scan.
        source: One of ``SOURCES``.
        feature_names: Names of the features, or None.
    """

    id: str
    description: str
    task_type: str
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    num_outputs: int | None = None
    num_rows: int | None = None
    source: str = "arrays"
    feature_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if self.feature_names is not None:
            object.__setattr__(self, "feature_names", tuple(str(f) for f in self.feature_names))
        problems = []
        if self.task_type not in TASK_TYPES:
            problems.append(f"task_type={self.task_type!r}; allowed: {', '.join(TASK_TYPES)}")
        if self.source not in SOURCES:
            problems.append(f"source={self.source!r}; allowed: {', '.join(SOURCES)}")
        if not self.input_shape or any(d <= 0 for d in self.input_shape):
            problems.append(f"input_shape={self.input_shape!r}; expected positive dimensions")
        for name in ("num_classes", "num_outputs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name}={value!r}; expected a positive int or None")
        if self.num_rows is not None and self.num_rows < 0:
            problems.append(f"num_rows={self.num_rows!r}; expected >= 0 or None")
        if problems:
            raise DatasetError(f"invalid DatasetInfo for {self.id!r}: " + "; ".join(problems))

    @property
    def num_features(self) -> int:
        """Number of values in one row of ``"x"`` (product of ``input_shape``)."""
        n = 1
        for d in self.input_shape:
            n *= d
        return n

    def replace(self, **changes: Any) -> DatasetInfo:
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


class KilnDataset(abc.ABC):
    """A dataset kiln can train on: ``info``, ``len``, ``to_ray`` and ``split``."""

    @property
    @abc.abstractmethod
    def info(self) -> DatasetInfo:
        """Static description of the rows."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of rows (may need a scan for file subsets)."""

    @abc.abstractmethod
    def to_ray(self) -> ray.data.Dataset:
        """A Ray Dataset with columns ``"x"`` and ``"y"`` (see ``kiln.data`` docs)."""

    @abc.abstractmethod
    def split(self, validation_split: float, seed: int) -> tuple[KilnDataset, KilnDataset | None]:
        """Split into (train, validation); validation is None when the fraction is 0.

        The same seed gives the same rows; the two parts are disjoint and together
        hold every row.
        """

    def __repr__(self) -> str:
        i = self.info
        return f"{type(self).__name__}(id={i.id!r}, task_type={i.task_type!r}, input_shape={i.input_shape}, num_rows={i.num_rows})"


def check_validation_split(validation_split: float) -> float:
    """Return ``validation_split`` as float, or raise DatasetError if not in [0, 1)."""
    try:
        value = float(validation_split)
    except (TypeError, ValueError):
        raise DatasetError(
            f"validation_split={validation_split!r}; expected a number in [0, 1)"
        ) from None
    if not 0.0 <= value < 1.0:
        raise DatasetError(f"validation_split={validation_split!r}; expected a number in [0, 1)")
    return value
