"""The labelled rows an evaluation scores: dataset ids, files, arrays, Ray datasets, splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.config import TaskSpec
from kiln.errors import ConfigError, DatasetError

__all__ = ["resolve_data", "to_ray"]


def resolve_data(
    data: Any, split: str, meta: dict[str, Any], data_dir: Path
) -> tuple[Any, Any, str, str, list[str]]:
    """``(x, y, label, split, notes)``; ``y`` is None when ``x`` is a ``ray.data.Dataset``."""
    from kiln import data as kdata
    from kiln.engine.data_plan import _dir_for, _is_pair, _is_ray_dataset

    notes: list[str] = []
    label = _describe(data)
    if isinstance(data, (str, Path)):
        where = _dir_for(data_dir, str(data))
        if split == "test":
            test = _test_split(str(data), where)
            if test is not None:
                return (*_arrays(test), label, "test", notes)
        data = kdata.get_dataset(str(data), data_dir=where)
    if _is_pair(data):
        if split != "all":
            raise ConfigError(
                f"split={split!r} needs a dataset id or path; (X, y) arrays are scored whole"
            )
        x, y = (np.asarray(a) if not isinstance(a, torch.Tensor) else a for a in data)
        return x, y, label, "all", notes
    if _is_ray_dataset(data):
        if split != "all":
            raise ConfigError(f"split={split!r} needs a dataset id or path, not a ray.data.Dataset")
        return data, None, label, "all", notes
    if not isinstance(data, kdata.KilnDataset):
        raise DatasetError(
            f"data of type {type(data).__name__} cannot be evaluated; pass a dataset id, a "
            "parquet/csv/jsonl path, a kiln.data dataset, a ray.data.Dataset or an (X, y) pair"
        )
    if split in ("train", "val", "test"):
        data, split = _run_split(data, split, meta, notes)
    return (*_arrays(data), label, split, notes)


def _run_split(data: Any, split: str, meta: dict[str, Any], notes: list[str]) -> tuple[Any, str]:
    """The rows the run held out (or trained on), split as the run split them."""
    from kiln.config import TrainingConfig
    from kiln.engine.data_plan import split_for_run

    saved = meta.get("training_config") or {}
    cfg = TrainingConfig(
        validation_split=float(saved.get("validation_split", 0.0)),
        test_split=saved.get("test_split"),
        random_seed=int(saved.get("random_seed", 0)),
    )
    train, val, test = split_for_run(data, cfg)
    if split == "test" and test is None:
        notes.append(
            f"{_describe(data)!r} has no test split for this run: scored the validation rows"
        )
        split = "val"
    chosen = {"train": train, "val": val, "test": test}[split]
    if chosen is None:
        raise ConfigError(
            f"split={split!r}, but the run trained with validation_split="
            f"{cfg.validation_split} and held nothing out; use split='all' or another dataset"
        )
    return chosen, split


def _arrays(dataset: Any) -> tuple[Any, Any]:
    from kiln import data as kdata

    if isinstance(dataset, kdata.ArrayDataset):
        return dataset.x, dataset.y
    if hasattr(dataset, "local_arrays"):
        return dataset.local_arrays()
    from kiln._ray import ensure_ray

    ensure_ray()
    return dataset.to_ray(), None


def _test_split(dataset_id: str, data_dir: Path | None) -> Any:
    """The dataset's own test split, or None when its loader has none."""
    from kiln import data as kdata

    try:
        return kdata.get_dataset(dataset_id, data_dir=data_dir, split="test")
    except (DatasetError, TypeError):
        return None


def _describe(data: Any) -> str:
    if isinstance(data, (str, Path)):
        return str(data)
    info = getattr(data, "info", None)
    if info is not None and getattr(info, "id", None):
        return str(info.id)
    if isinstance(data, (tuple, list)):
        return f"arrays ({len(data[0])} rows)"
    return type(data).__name__


def to_ray(x: Any, y: Any, task: TaskSpec, blocks: int = 8) -> Any:
    """An in-memory pair as a ``ray.data.Dataset`` with the task's two columns."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    x, y = np.asarray(x), np.asarray(y)

    def column(a: np.ndarray) -> Any:
        return a if a.ndim == 1 else ArrowTensorArray.from_numpy(np.ascontiguousarray(a))

    parts = np.array_split(np.arange(len(x)), max(1, min(blocks, len(x))))
    tables = [
        pa.table(
            {
                task.input_column: column(x[p[0] : p[-1] + 1]),
                task.label_column: column(y[p[0] : p[-1] + 1]),
            }
        )
        for p in parts
    ]
    return ray.data.from_arrow(tables)
