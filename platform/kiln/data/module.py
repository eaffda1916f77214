"""UniversalDataModule: train/validation DataLoaders from a Hub dataset, a folder or a file.

    module = UniversalDataModule(TaskSpec.classification(num_classes=3), batch_size=32)
    train_loader, val_loader = module.load_from_file("rows.jsonl", validation_split=0.1)
    train_loader, val_loader = module.load_huggingface("data/my_saved_dataset")

Rows are read with ``datasets`` (JSONL/JSON/CSV/parquet files, ``save_to_disk``
folders, folders of data files, Hub names that are cached or reachable) and become
samples keyed by the task's columns (``x``/``y`` by default). A file whose rows lack
the task's input column is a table of feature columns: kiln's
:class:`~kiln.data.FileDataset` packs them into ``x`` (the label is the task's
``label_column`` when present, else a column named like a label). A language-modeling
task given a ``tokenizer`` tokenizes a ``text`` column. Loaders come from
:class:`~kiln.data.collate.DataLoaderFactory`, so collation follows the task and the
order follows the seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kiln.data.collate import DataLoaderConfig, DataLoaderFactory
from kiln.errors import DatasetError

__all__ = ["UniversalDataModule"]

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, samples: list[dict[str, Any]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.samples[i]


class UniversalDataModule:
    """Loads datasets into DataLoaders for a task (see the module docstring)."""

    def __init__(
        self,
        task_spec: Any,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 42,
        *,
        tokenizer: Any = None,
        max_length: int = 512,
    ) -> None:
        self.task_spec, self.batch_size, self.seed = task_spec, batch_size, seed
        self.tokenizer, self.max_length = tokenizer, max_length
        self.factory = DataLoaderFactory(task_spec, seed=seed, num_workers=num_workers)

    # ------------------------------------------------------------------ sources
    def load_huggingface(
        self,
        dataset_name: str,
        dataset_config: str | None = None,
        train_split: str = "train",
        validation_split: str | None = "validation",
        max_samples: int | None = None,
        **load_kwargs: Any,
    ) -> tuple[Any, Any]:
        """(train_loader, val_loader or None) from a ``save_to_disk`` folder, a folder of
        data files (splits named by file, e.g. ``train.parquet``) or a Hub name;
        ``load_kwargs`` (``cache_dir=...``) go to ``datasets.load_dataset``."""
        import datasets

        if _is_saved_dataset(Path(dataset_name)):
            try:
                data = datasets.load_from_disk(dataset_name)
            except Exception as exc:
                raise DatasetError(
                    f"dataset_name={dataset_name!r} is a datasets save_to_disk folder that "
                    f"could not be read: {exc}"
                ) from None
        else:
            data = _load_hub(dataset_name, dataset_config, **load_kwargs)
        if isinstance(data, datasets.Dataset):
            data = datasets.DatasetDict({train_split: data})
        if train_split not in data:
            raise DatasetError(
                f"train_split={train_split!r} is not a split of {dataset_name!r}; "
                f"splits: {sorted(data)}"
            )
        train = _take(data[train_split], max_samples)
        val = None
        if validation_split and validation_split in data:
            val = _take(data[validation_split], max_samples)
        return self._loaders(list(train), list(val) if val is not None else None)

    def load_from_file(
        self, file_path: str | os.PathLike[str], validation_split: float = 0.1
    ) -> tuple[Any, Any]:
        """(train_loader, val_loader or None) from a JSONL/JSON/CSV/parquet file.

        ``validation_split`` of the rows (shuffled by ``seed``) are held out.
        """
        import datasets

        path = Path(file_path)
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if not path.is_file():
            raise DatasetError(f"file_path={str(path)!r} does not exist")
        if builder is None:
            raise DatasetError(
                f"file_path={str(path)!r}: suffix {path.suffix!r} is not one of "
                f"{', '.join(_FILE_BUILDERS)}"
            )
        if not 0 <= validation_split < 1:
            raise DatasetError(f"validation_split={validation_split!r} must be in [0, 1)")
        rows = list(datasets.load_dataset(builder, data_files=str(path), split="train"))
        if rows and self._is_table(rows[0]):
            return self._tabular(path, validation_split, list(rows[0]))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed))
        rows = [rows[i] for i in order.tolist()]
        n_val = int(len(rows) * validation_split)
        return self._loaders(rows[n_val:], rows[:n_val] or None)

    def _is_table(self, row: dict[str, Any]) -> bool:
        """Feature columns rather than an input column (nor text to tokenize)."""
        task = self.task_spec
        if task.input_column in row or task.task_type == "language_modeling":
            return False
        return not ("text" in row and self.tokenizer is not None)

    def _tabular(self, path: Path, validation_split: float, columns: list[str]) -> tuple[Any, Any]:
        """Loaders over a table of feature columns, split by kiln's seeded row hash."""
        from kiln.data.files import FileDataset

        label = self.task_spec.label_column
        table = FileDataset(path, label=label if label in columns else None)
        train, val = table.split(validation_split, self.seed) if validation_split else (table, None)

        def rows(part: FileDataset) -> list[dict[str, Any]]:
            x, y = part.local_arrays()
            return [{"x": xi, "y": yi} for xi, yi in zip(x, y, strict=True)]

        train_rows = rows(train)
        if not train_rows:
            raise DatasetError(f"file_path={str(path)!r}: the training split has no rows")
        config = DataLoaderConfig(self.batch_size, shuffle=True)
        train_loader = self.factory.create_loader(_Rows(train_rows), config)
        val_rows = rows(val) if val is not None else []
        val_loader = None
        if val_rows:
            val_loader = self.factory.create_loader(_Rows(val_rows), config, is_eval=True)
        return train_loader, val_loader

    # ------------------------------------------------------------------ samples
    def _loaders(self, train: list[dict], val: list[dict] | None) -> tuple[Any, Any]:
        if not train:
            raise DatasetError("the training split has no rows")
        config = DataLoaderConfig(self.batch_size, shuffle=True)
        train_loader = self.factory.create_loader(_Rows(self._samples(train)), config)
        val_loader = None
        if val:
            val_loader = self.factory.create_loader(_Rows(self._samples(val)), config, is_eval=True)
        return train_loader, val_loader

    def _samples(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        task = self.task_spec
        x_col, y_col = task.input_column, task.label_column
        lm = task.task_type == "language_modeling"
        out = []
        for i, row in enumerate(rows):
            if lm and x_col not in row and "text" in row and self.tokenizer is not None:
                ids = self.tokenizer(row["text"], truncation=True, max_length=self.max_length)
                out.append({x_col: ids["input_ids"], y_col: list(ids["input_ids"])})
                continue
            if x_col not in row or (not lm and y_col not in row):
                raise DatasetError(
                    f"row {i + 1} has columns {sorted(row)}; the task reads {x_col!r} and "
                    f"{y_col!r}" + (" (or 'text' with a tokenizer)" if lm else "")
                )
            if lm:
                out.append({x_col: row[x_col], y_col: row.get(y_col, row[x_col])})
            else:
                out.append({"x": row[x_col], "y": row[y_col]})
        return out


def _take(split: Any, max_samples: int | None) -> Any:
    if max_samples is not None and len(split) > max_samples:
        return split.select(range(max_samples))
    return split


def _is_saved_dataset(path: Path) -> bool:
    """A ``save_to_disk`` folder (a Dataset's or a DatasetDict's)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_hub(name: str, config: str | None, **kwargs: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, config, **kwargs)
    except Exception as exc:  # offline/unreachable/unknown: several exception types
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        why = "offline mode is on" if offline else f"{type(exc).__name__}: {exc}"
        raise DatasetError(
            f"dataset_name={name!r} could not be loaded from the Hub cache or the network "
            f"({why}); download it first (datasets.load_dataset(...).save_to_disk(DIR)) and "
            "pass that folder"
        ) from None
