"""Turn whatever the user passed as data into what the worker loop reads.

Accepted: a dataset id or local file path, a ``kiln.data`` dataset, a
``ray.data.Dataset``, a torch ``Dataset``/``DataLoader``, or an ``(X, y)`` pair of
arrays or tensors. Dataset ids, arrays and Ray datasets reach the workers through
Ray Data (``get_dataset_shard``); torch datasets and loaders go through
``ray.train.torch.prepare_data_loader``.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.config import TaskSpec, TaskType, TrainingConfig
from kiln.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

PROFILE_SAMPLE_ROWS = 2048


class DataKind(str, enum.Enum):
    """How batches reach the loop: Ray Data shards, in-memory arrays, or torch loaders."""

    RAY = "ray"
    MEMORY = "memory"
    TORCH = "torch"


@dataclass
class DataPlan:
    """Data resolved in the driver: Ray datasets or torch loaders, plus the task."""

    data_kind: DataKind
    task: TaskSpec
    input_shape: tuple[int, ...]
    num_train_rows: int
    datasets: dict[str, Any] | None = None  # kind "ray": ray.data.Dataset per split
    arrays: dict[str, tuple[Any, Any]] | None = None  # kind "memory": (x, y) per split
    loaders: dict[str, Any] | None = None  # kind "torch": DataLoader per split
    cache_shards: bool = True
    dataset_id: str | None = None
    # Up to PROFILE_SAMPLE_ROWS training inputs, taken while planning when the run is
    # recorded: the reference of the run's data profile (drift checks).
    profile_sample: np.ndarray | None = None
    feature_names: tuple[str, ...] | None = None  # the data's own column names, when known
    # Held-out test rows (x, y) no selection sees; the driver scores the best model once.
    test: tuple[np.ndarray, np.ndarray] | None = None


def plan_data(
    train_data: Any,
    val_data: Any,
    task: TaskSpec | None,
    config: TrainingConfig,
    *,
    data_dir: str | Path | None = None,
) -> DataPlan:
    """Resolve train/val data and complete the task spec from the data where it is silent."""
    from kiln import data as kdata

    dataset_id = None
    if train_data is None:
        if config.dataset is None:
            raise ConfigError(
                "no training data: pass train_data to Trainer.train(), or set 'dataset' in the "
                "config to a dataset id (see `kiln datasets`) or a local parquet/csv/jsonl path"
            )
        train_data = config.dataset
    if isinstance(train_data, (str, Path)):
        dataset_id = str(train_data)
        train_data = kdata.get_dataset(dataset_id, data_dir=_dir_for(data_dir, dataset_id))
    elif _is_pair(train_data):
        train_data = kdata.from_arrays(*train_data, task_type=_array_task_type(task))
    if _is_pair(val_data):
        val_data = kdata.from_arrays(*val_data, task_type=_array_task_type(task))
    elif isinstance(val_data, (str, Path)):
        val_data = kdata.get_dataset(str(val_data), data_dir=_dir_for(data_dir, str(val_data)))

    if isinstance(train_data, kdata.KilnDataset):
        plan = _plan_kiln(train_data, val_data, task, config, dataset_id)
    elif _is_ray_dataset(train_data):
        plan = _plan_ray(train_data, val_data, task, config)
    elif isinstance(train_data, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        plan = _plan_torch(train_data, val_data, task, config)
    else:
        raise _unsupported(train_data)
    if config.tracking or config.register_as:
        plan.profile_sample = _profile_sample(plan)
        if isinstance(train_data, kdata.KilnDataset) and train_data.info.feature_names:
            plan.feature_names = tuple(train_data.info.feature_names)
    return plan


def data_profile(plan: DataPlan, model: torch.nn.Module | None = None) -> dict[str, Any] | None:
    """Histograms of the planned training inputs (and ``model``'s predictions on them).

    A plain dict for the run record; None when the run's data was not sampled. A
    profile is a convenience: a failure is logged, never raised.
    """
    x = plan.profile_sample
    if x is None:
        return None
    try:
        from kiln.tracking.drift import compute_profile

        predictions = None
        if model is not None and x.dtype.kind == "f":
            model.eval()
            with torch.no_grad():
                logits = model(torch.as_tensor(x))
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            predictions = (
                logits.argmax(-1).numpy() if plan.task.is_classification else logits.numpy()
            )
        names = plan.feature_names
        fits = names is not None and x.ndim == 2 and x.shape[1] == len(names)
        return compute_profile(x, predictions=predictions, feature_names=names if fits else None)
    except Exception:
        logger.warning("could not compute the data profile", exc_info=True)
        return None


def _profile_sample(plan: DataPlan) -> np.ndarray | None:
    try:
        if plan.arrays:
            return np.asarray(plan.arrays["train"][0][:PROFILE_SAMPLE_ROWS])
        if plan.datasets:
            batch = plan.datasets["train"].take_batch(PROFILE_SAMPLE_ROWS, batch_format="numpy")
            return np.asarray(batch[plan.task.input_column])
    except Exception:
        logger.warning("could not sample the training data for its profile", exc_info=True)
    return None


# Task types whose labels are not told apart by dtype alone: arrays are read as the task says.
_SHAPED_LABELS = (
    TaskType.LANGUAGE_MODELING,
    TaskType.SEQUENCE_TO_SEQUENCE,
    TaskType.SEGMENTATION,
)


def _array_task_type(task: TaskSpec | None) -> str | None:
    """The task type ``(X, y)`` arrays are validated as; None: inferred from y's dtype."""
    if task is not None and TaskType(task.task_type) in _SHAPED_LABELS:
        return task.task_type
    return None


def _unsupported(train_data: Any) -> DatasetError:
    return DatasetError(
        f"train_data of type {type(train_data).__name__} is not supported; pass a dataset id, "
        "a local file path, a ray.data.Dataset, a torch Dataset or DataLoader, or an (X, y) pair"
    )


DEFAULT_TEST_SPLIT = 0.1  # for the bundled datasets, when test_split is None


def split_for_run(dataset: Any, config: TrainingConfig, val: Any = None) -> tuple[Any, Any, Any]:
    """``(train, val, test)`` as a run with ``config`` splits ``dataset``.

    The test rows come off first (``test_split``; None: 0.1 for bundled datasets), then
    the validation rows from the rest (``validation_split``) unless ``val`` is given.
    The same config gives the same rows, so ``kiln datasets export --split val|test``
    writes the rows a run held out.
    """
    from kiln.data import ArrayDataset

    fraction = config.test_split
    if fraction is None:
        fraction = DEFAULT_TEST_SPLIT if dataset.info.source == "bundled" else 0.0
    test = None
    if fraction > 0:
        if not isinstance(dataset, ArrayDataset):
            raise ConfigError(
                f"test_split={fraction!r} needs in-memory data, but {dataset.info.id!r} is read "
                "from files; keep a separate test file (kiln eval) and set test_split: 0"
            )
        dataset, test = dataset.split(fraction, config.random_seed)
    if val is None and config.validation_split > 0:
        dataset, val = dataset.split(config.validation_split, config.random_seed)
    return dataset, val, test


def _plan_kiln(train, val, task, config, dataset_id) -> DataPlan:
    from kiln import data as kdata

    train, val, test = split_for_run(train, config, val)
    info = train.info
    task = complete_task(
        task,
        info.task_type,
        info.input_shape,
        num_classes=info.num_classes,
        class_names=info.class_names,
        num_outputs=info.num_outputs,
        name=dataset_id or info.id,
    )
    splits = {"train": train} if val is None else {"train": train, "val": val}
    if val is not None and not isinstance(val, kdata.KilnDataset):
        raise DatasetError("val_data must be the same kind of data as train_data")
    in_memory = all(isinstance(d, kdata.ArrayDataset) for d in splits.values())
    backend = config.data_backend
    if backend == "auto":
        # Arrays the caller handed over are already in this process: ship them with the
        # plan. Dataset ids go through Ray Data whenever there are worker actors.
        from_ids = dataset_id is not None
        backend = "memory" if in_memory and (config.num_workers == 0 or not from_ids) else "ray"
    if backend == "memory":
        if not in_memory:
            raise ConfigError(
                f"data_backend='memory' needs in-memory data, but {info.id!r} is read from "
                "files; use data_backend='auto' or 'ray'"
            )
        arrays = {k: (d.x, d.y) for k, d in splits.items()}
        return DataPlan(
            DataKind.MEMORY,
            task,
            tuple(info.input_shape),
            len(train),
            arrays=arrays,
            dataset_id=dataset_id,
            test=(test.x, test.y) if test is not None else None,
        )
    from kiln._ray import ensure_ray

    ensure_ray()  # before Ray Data's first call, which would start a Ray of its own
    datasets = {k: d.to_ray() for k, d in splits.items()}
    return DataPlan(
        DataKind.RAY,
        task,
        tuple(info.input_shape),
        len(train),
        datasets=datasets,
        cache_shards=in_memory,
        dataset_id=dataset_id,
        test=(test.x, test.y) if test is not None else None,
    )


def _plan_ray(train, val, task, config) -> DataPlan:
    if val is None and config.validation_split > 0:
        train, val = train.train_test_split(
            test_size=config.validation_split, shuffle=True, seed=config.random_seed
        )
    input_col = task.input_column if task else "x"
    label_col = task.label_column if task else "y"
    first = train.take(1)
    if not first:
        raise DatasetError("train_data is an empty ray.data.Dataset")
    row = first[0]
    missing = [c for c in (input_col, label_col) if c not in row]
    if missing:
        raise DatasetError(
            f"the ray.data.Dataset has columns {sorted(row)}, but the task reads input column "
            f"{input_col!r} and label column {label_col!r}; rename the columns or set "
            "TaskSpec(input_column=..., label_column=...)"
        )
    x, y = np.asarray(row[input_col]), np.asarray(row[label_col])
    task_type = "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
    if (
        np.issubdtype(x.dtype, np.integer)
        and task is not None
        and task.task_type == TaskType.LANGUAGE_MODELING
    ):
        task_type = "language_modeling"
    task = complete_task(task, task_type, tuple(x.shape), num_outputs=int(y.size) or 1)
    if task.is_classification and task.num_classes is None:
        task = task.replace(num_classes=int(train.max(label_col)) + 1)
    _need_segmentation_classes(task, "a ray.data.Dataset")
    datasets = {"train": train} if val is None else {"train": train, "val": val}
    return DataPlan(
        DataKind.RAY, task, tuple(x.shape), train.count(), datasets=datasets, cache_shards=False
    )


_PADDED_BATCHES = (TaskType.SEQUENCE_TO_SEQUENCE, TaskType.SEGMENTATION)


def _plan_torch(train, val, task, config) -> DataPlan:
    loader_kwargs: dict[str, Any] = {"batch_size": config.batch_size}
    if task is not None and TaskType(task.task_type) in _PADDED_BATCHES:
        # Sequences (or images) of unequal size: the task's collator pads them.
        from kiln.data.collate import DataLoaderFactory

        loader_kwargs["collate_fn"] = DataLoaderFactory(task).collator()
    if isinstance(train, torch.utils.data.DataLoader):
        dataset = train.dataset
        train_loader = train
    else:
        dataset = train
        if val is None and config.validation_split > 0:
            n_val = max(1, int(len(dataset) * config.validation_split))
            gen = torch.Generator().manual_seed(config.random_seed)
            train_part, val = torch.utils.data.random_split(
                dataset, [len(dataset) - n_val, n_val], generator=gen
            )
            dataset = train_part
        gen = torch.Generator().manual_seed(config.random_seed)
        train_loader = torch.utils.data.DataLoader(
            dataset, shuffle=True, generator=gen, **loader_kwargs
        )
    loaders = {"train": train_loader}
    if val is not None:
        loaders["val"] = (
            val
            if isinstance(val, torch.utils.data.DataLoader)
            else (torch.utils.data.DataLoader(val, shuffle=False, **loader_kwargs))
        )
    sample = dataset[0]
    if (
        task is not None
        and task.task_type == TaskType.LANGUAGE_MODELING
        and isinstance(sample, dict)
        and task.input_column in sample
    ):  # token sequences of any length (Hugging Face style): nothing to infer
        rows = len(dataset)  # type: ignore[arg-type]  # map-style torch Datasets define __len__
        return DataPlan(DataKind.TORCH, task, (), rows, loaders=loaders)
    x, y = (sample["x"], sample["y"]) if isinstance(sample, dict) else (sample[0], sample[1])
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    task_type = "classification" if not torch.is_floating_point(y) else "regression"
    task = complete_task(task, task_type, tuple(x.shape), num_outputs=max(1, y.numel()))
    if task.is_classification and task.num_classes is None:
        raise ConfigError(
            "task_spec.num_classes is needed with a torch Dataset (kiln does not scan it); "
            "pass TaskSpec.classification(num_classes=...)"
        )
    _need_segmentation_classes(task, "a torch Dataset")
    rows = len(dataset)  # type: ignore[arg-type]  # map-style torch Datasets define __len__
    return DataPlan(DataKind.TORCH, task, tuple(x.shape), rows, loaders=loaders)


def _need_segmentation_classes(task: TaskSpec, what: str) -> None:
    """Segmentation's metrics count pixels per class: the number of classes must be known."""
    if task.task_type == TaskType.SEGMENTATION and task.num_classes is None:
        raise ConfigError(
            f"task_spec.num_classes is needed for segmentation with {what} (kiln does not "
            "scan it); pass TaskSpec.segmentation(num_classes=...)"
        )


def complete_task(
    task: TaskSpec | None,
    task_type: str,
    input_shape: tuple[int, ...],
    *,
    num_classes: int | None = None,
    class_names: Any = None,
    num_outputs: int | None = None,
    name: str = "task",
) -> TaskSpec:
    """Fill the task's unknowns from the data, and check what the user stated against it."""
    if task is None:
        if task_type == "language_modeling":
            task = TaskSpec.language_modeling(name=name)
        elif task_type == "regression":
            task = TaskSpec.regression(name=name, num_outputs=num_outputs or 1)
        elif task_type == "sequence_to_sequence":
            task = TaskSpec.sequence_to_sequence(name=name)
        elif task_type == "segmentation":
            task = TaskSpec.segmentation(name=name)
        else:
            task = TaskSpec.classification(name=name)
    changes: dict[str, Any] = {}
    if task.input_shape is None:
        changes["input_shape"] = tuple(input_shape)
    seq2seq_data = task_type == task.task_type == TaskType.SEQUENCE_TO_SEQUENCE
    if seq2seq_data and task.vocab_size is None and num_classes is not None:
        changes["vocab_size"] = num_classes  # the data's vocabulary
    if task.is_classification or task.task_type == TaskType.SEGMENTATION:
        if task.num_classes is None and num_classes is not None:
            changes["num_classes"] = num_classes
        elif (
            task.num_classes is not None
            and num_classes is not None
            and task.num_classes < num_classes
        ):
            raise DatasetError(
                f"task_spec.num_classes={task.num_classes} but the labels go up to class "
                f"{num_classes - 1}; set num_classes to at least {num_classes}"
            )
        if task.class_names is None and class_names:
            names = list(class_names)
            if len(names) == (changes.get("num_classes") or task.num_classes):
                changes["class_names"] = names
    elif task.task_type == TaskType.REGRESSION and task.num_outputs is None:
        changes["num_outputs"] = num_outputs or 1
    return task.replace(**changes) if changes else task


def _dir_for(root: str | Path | None, dataset_id: str) -> Path | None:
    """``<datasets root>/<id>``: where a dataset id that reads local files looks."""
    return Path(root) / dataset_id if root is not None else None


def _is_pair(obj: Any) -> bool:
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and all(isinstance(a, (np.ndarray, torch.Tensor, list)) for a in obj)
    )


def _is_ray_dataset(obj: Any) -> bool:
    try:
        import ray.data
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, ray.data.Dataset)
