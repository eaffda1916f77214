"""Data access in the older APIs' shapes, over kiln's datasets and collators.

- :class:`DataModuleProtocol`: what a data module offers kiln (``info``, ``len``,
  ``split``, ``to_ray``). Every :class:`~kiln.data.KilnDataset` satisfies it, and a
  user's module that does can be checked with ``isinstance``.
- :class:`DataManager`: a torch ``DataLoader`` over a torch dataset or over a kiln
  dataset id, for in-process loops such as :class:`~kiln.compat.trainer.ModelTrainer`.
- :class:`DataLoaderFactory` / :class:`DataLoaderConfig`: seeded loaders whose collator
  is the task's (``TaskSpec.collator``, from :class:`kiln.data.CollatorRegistry`).
- :class:`UniversalDataModule` (kiln.data's own): ``(train_loader, val_loader)`` from a
  local file or a Hugging Face dataset, through the factory.

kiln's :class:`~kiln.Trainer` does not need any of these: it takes dataset ids, files,
arrays and loaders directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kiln.data.collate import DataLoaderConfig, DataLoaderFactory
from kiln.data.module import UniversalDataModule
from kiln.errors import DatasetError

__all__ = [
    "DataLoaderConfig",
    "DataLoaderFactory",
    "DataManager",
    "DataModuleProtocol",
    "UniversalDataModule",
]


@runtime_checkable
class DataModuleProtocol(Protocol):
    """A data module kiln can train on (the interface of :class:`kiln.data.KilnDataset`)."""

    @property
    def info(self) -> Any:
        """A :class:`~kiln.data.DatasetInfo`: id, task type, shapes, row count."""
        ...

    def __len__(self) -> int:
        """Number of rows."""
        ...

    def split(self, validation_split: float, seed: int) -> tuple[Any, Any]:
        """``(train, validation)``; validation is None when the fraction is 0."""
        ...

    def to_ray(self) -> Any:
        """A ``ray.data.Dataset`` with columns ``x`` and ``y``."""
        ...


class DataManager:
    """Builds DataLoaders over a dataset given as an object or as a kiln dataset id.

    Args:
        dataset: a torch ``Dataset``, a kiln dataset (in-memory arrays), or a dataset id
            or local file path that :func:`kiln.data.get_dataset` loads.
        batch_size: rows per batch.
        num_workers: DataLoader worker processes.
        data_dir: folder for ids backed by local files (``mnist``).
        **dataset_kwargs: passed to :func:`kiln.data.get_dataset` for ids.
    """

    def __init__(
        self,
        dataset: Dataset | Any | str | Path,
        batch_size: int = 32,
        num_workers: int = 4,
        *,
        data_dir: str | Path | None = None,
        **dataset_kwargs: Any,
    ) -> None:
        errors = []
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            errors.append(f"batch_size={batch_size!r} must be an int >= 1")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            errors.append(f"num_workers={num_workers!r} must be an int >= 0")
        if errors:
            raise DatasetError("; ".join(errors))
        self.dataset_id: str | None = None
        self.info: Any = None
        if isinstance(dataset, (str, Path)):
            from kiln.data import get_dataset

            self.dataset_id = str(dataset)
            dataset = get_dataset(dataset, data_dir=data_dir, **dataset_kwargs)
        if not isinstance(dataset, Dataset):
            self.info = getattr(dataset, "info", None)
            dataset = _as_torch(dataset)
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers

    @classmethod
    def from_id(cls, dataset_id: str, batch_size: int = 32, **kwargs: Any) -> DataManager:
        """The manager of a registered dataset (``kiln datasets`` lists the ids)."""
        return cls(dataset_id, batch_size, **kwargs)

    def get_dataloader(self, shuffle: bool = True) -> DataLoader:
        """A DataLoader; memory is pinned only where a GPU is present."""
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=shuffle,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def get_dataloaders(
        self, validation_split: float = 0.2, seed: int = 0
    ) -> tuple[DataLoader, DataLoader]:
        """Shuffled training and ordered validation loaders over a seeded random split."""
        if not 0.0 < validation_split < 1.0:
            raise DatasetError(f"validation_split={validation_split!r} must be in (0, 1)")
        n = len(self.dataset)  # type: ignore[arg-type]
        n_val = max(1, int(round(n * validation_split)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        parts = (order[n_val:], order[:n_val])
        train, val = (DataManager(torch.utils.data.Subset(self.dataset, p)) for p in parts)
        for part in (train, val):
            part.batch_size, part.num_workers = self.batch_size, self.num_workers
        return train.get_dataloader(shuffle=True), val.get_dataloader(shuffle=False)


def _as_torch(dataset: Any) -> TensorDataset:
    """A TensorDataset over a kiln dataset's rows (in-memory arrays, or a local file's)."""
    x, y = getattr(dataset, "x", None), getattr(dataset, "y", None)
    if (x is None or y is None) and callable(getattr(dataset, "local_arrays", None)):
        x, y = dataset.local_arrays()
    if x is None or y is None:
        name = getattr(getattr(dataset, "info", None), "id", type(dataset).__name__)
        raise DatasetError(
            f"dataset {name!r} is not held in memory (no x/y arrays), so it has no torch "
            "DataLoader here; train on it with kiln.Trainer, which streams it through Ray Data"
        )
    return TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
