"""In-memory datasets from numpy arrays, torch tensors or lists.

``ArrayDataset`` validates its arrays once, infers the task from the label dtype
(integers: classification, floats: regression) and hands Ray a few Arrow blocks
with a tensor column ``"x"`` when training starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.data.base import TASK_TYPES, DatasetInfo, KilnDataset, check_validation_split
from kiln.errors import DatasetError

if TYPE_CHECKING:
    import ray.data

__all__ = ["ArrayDataset", "from_arrays"]

_ROWS_PER_BLOCK_TARGET_BYTES = 16 * 1024 * 1024
_MAX_BLOCKS = 16


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{name} cannot be turned into a numpy array: {exc}") from None


def _infer_task_type(y: np.ndarray) -> str:
    if y.dtype.kind in "iub":
        return "classification"
    if y.dtype.kind == "f":
        return "regression"
    raise DatasetError(
        f"cannot infer task_type from labels of dtype {y.dtype}; pass task_type= one of "
        f"{', '.join(TASK_TYPES)} (string labels must be mapped to int class ids first)"
    )


class ArrayDataset(KilnDataset):
    """Features and labels held in memory.

    Args:
        x: Features ``[N, *input_shape]`` (token ids ``[N, seq_len]`` for language modeling
            and sequence to sequence; images ``[N, C, H, W]`` or ``[N, H, W]`` for
            segmentation).
        y: Labels ``[N]`` (int class ids) or ``[N]``/``[N, k]`` floats for regression;
            target token ids ``[N, target_len]`` (sequence to sequence) or a class per
            pixel ``[N, H, W]`` (segmentation), where -100 marks what the loss skips.
            For language modeling ``y`` may be None (it defaults to ``x``).
        info: Description to use instead of the inferred one (``num_rows`` is reset).
        task_type: Overrides the task inferred from the label dtype.

    Raises:
        DatasetError: Empty data, different lengths, labels of the wrong shape or value.
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        info: DatasetInfo | None = None,
        task_type: str | None = None,
    ) -> None:
        x_arr = _as_numpy(x, "x")
        task = task_type or (info.task_type if info is not None else None)
        if y is None and task == "language_modeling":
            y = x_arr
        if y is None:
            raise DatasetError(
                "y is None; labels are required unless task_type='language_modeling'"
            )
        y_arr = _as_numpy(y, "y")
        if task is None:
            task = _infer_task_type(y_arr)
        if task not in TASK_TYPES:
            raise DatasetError(f"task_type={task!r}; allowed: {', '.join(TASK_TYPES)}")
        self._x, self._y = _validate(x_arr, y_arr, task)
        self._info = self._make_info(info, task)

    def _make_info(self, info: DatasetInfo | None, task: str) -> DatasetInfo:
        n = len(self._x)
        if info is not None:
            return info.replace(num_rows=n, task_type=task)
        num_classes = num_outputs = None
        if task in ("classification", "segmentation"):
            num_classes = max(2, int(self._y.max()) + 1)
        elif task in ("language_modeling", "sequence_to_sequence"):
            num_classes = int(max(self._x.max(), self._y.max())) + 1
        else:
            num_outputs = 1 if self._y.ndim == 1 else int(np.prod(self._y.shape[1:]))
        return DatasetInfo(
            id="arrays",
            description=f"in-memory arrays x{tuple(self._x.shape)} y{tuple(self._y.shape)}",
            task_type=task,
            input_shape=tuple(self._x.shape[1:]),
            num_classes=num_classes,
            num_outputs=num_outputs,
            num_rows=n,
            source="arrays",
        )

    @property
    def info(self) -> DatasetInfo:
        return self._info

    @property
    def x(self) -> np.ndarray:
        """Features: float32 (int64 token ids for language modeling)."""
        return self._x

    @property
    def y(self) -> np.ndarray:
        """Labels: int64 class ids / token ids, or float32 regression targets."""
        return self._y

    def __len__(self) -> int:
        return len(self._x)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Rows at ``indices``, keeping this dataset's info (classes, names)."""
        return ArrayDataset(self._x[indices], self._y[indices], info=self._info)

    def split(self, validation_split: float, seed: int) -> tuple[ArrayDataset, ArrayDataset | None]:
        fraction = check_validation_split(validation_split)
        if fraction == 0.0:
            return self, None
        n = len(self)
        if n < 2:
            raise DatasetError(f"cannot split {n} row(s) into train and validation")
        n_val = min(max(1, round(n * fraction)), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        return self.subset(train_idx), self.subset(val_idx)

    def to_ray(self) -> ray.data.Dataset:
        import pyarrow as pa
        import ray.data
        from ray.data.extensions import ArrowTensorArray

        n = len(self)
        row_bytes = max(1, self._x[:1].nbytes + self._y[:1].nbytes)
        num_blocks = int(min(_MAX_BLOCKS, n, max(1, n * row_bytes // _ROWS_PER_BLOCK_TARGET_BYTES)))
        num_blocks = max(num_blocks, min(n, 2))
        tables = []
        for idx in np.array_split(np.arange(n), num_blocks):
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            tables.append(
                pa.table(
                    {
                        "x": _tensor_column(self._x[lo:hi], ArrowTensorArray),
                        "y": _tensor_column(self._y[lo:hi], ArrowTensorArray),
                    }
                )
            )
        return ray.data.from_arrow(tables)


def _tensor_column(values: np.ndarray, tensor_array: Any) -> Any:
    if values.ndim == 1:
        return values
    return tensor_array.from_numpy(np.ascontiguousarray(values))


def _validate(x: np.ndarray, y: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    shapes = f"x.shape={tuple(x.shape)}, y.shape={tuple(y.shape)}"
    if x.ndim == 0 or len(x) == 0:
        raise DatasetError(f"x is empty ({shapes}); a dataset needs at least one row")
    if y.ndim == 0 or len(y) != len(x):
        raise DatasetError(f"x and y have different numbers of rows ({shapes}); they must match")
    if x.dtype.kind not in "iufb":
        raise DatasetError(f"x has dtype {x.dtype} ({shapes}); expected numbers")
    if task == "sequence_to_sequence":
        return _validate_seq2seq(x, y, shapes)
    if task == "segmentation":
        return _validate_segmentation(x, y, shapes)
    if task == "language_modeling":
        if x.ndim != 2 or x.dtype.kind not in "iu":
            raise DatasetError(
                f"language modeling needs x as int token ids [N, seq_len]; got dtype {x.dtype} ({shapes})"
            )
        if x.min() < 0:
            raise DatasetError(f"token ids must be >= 0; found {int(x.min())} ({shapes})")
        return x.astype(np.int64, copy=False), y.astype(np.int64, copy=False)
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DatasetError(f"x contains NaN or infinite values ({shapes})")
    if task == "classification":
        if y.ndim != 1:
            raise DatasetError(
                f"classification labels must be 1-D class ids; got {shapes} (use y.reshape(-1) or argmax of one-hot)"
            )
        if y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0):
            raise DatasetError(
                f"classification labels must be integers; got float values ({shapes})"
            )
        if y.dtype.kind not in "iufb":
            raise DatasetError(
                f"classification labels have dtype {y.dtype}; map them to int class ids"
            )
        y = y.astype(np.int64)
        if y.min() < 0:
            raise DatasetError(f"class ids must be >= 0; found {int(y.min())} ({shapes})")
        return x, y
    if y.dtype.kind not in "iufb":
        raise DatasetError(f"regression targets have dtype {y.dtype}; expected numbers ({shapes})")
    y = y.astype(np.float32)
    if not np.isfinite(y).all():
        raise DatasetError(f"y contains NaN or infinite values ({shapes})")
    return x, y


def _validate_seq2seq(x: np.ndarray, y: np.ndarray, shapes: str) -> tuple[np.ndarray, np.ndarray]:
    """Source ids ``[N, S]`` >= 0; target ids ``[N, T]`` >= 0 or -100 (left out of the loss)."""
    if x.ndim != 2 or x.dtype.kind not in "iu" or y.ndim != 2 or y.dtype.kind not in "iu":
        raise DatasetError(
            "sequence to sequence needs int token ids: x [N, source_len] and y "
            f"[N, target_len]; got x dtype {x.dtype}, y dtype {y.dtype} ({shapes})"
        )
    if x.min() < 0 or ((y < 0) & (y != _IGNORE)).any():
        raise DatasetError(
            f"token ids must be >= 0 (targets may also be {_IGNORE} for padding) ({shapes})"
        )
    return x.astype(np.int64, copy=False), y.astype(np.int64, copy=False)


def _validate_segmentation(
    x: np.ndarray, y: np.ndarray, shapes: str
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, C, H, W]`` (``[N, H, W]`` gains C=1); masks ``[N, H, W]`` of class ids."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 3 or tuple(x.shape[2:]) != tuple(y.shape[1:]):
        raise DatasetError(
            "segmentation needs images x [N, C, H, W] (or [N, H, W]) and masks y [N, H, W] "
            f"of the same height and width ({shapes})"
        )
    if y.dtype.kind not in "iu" or ((y < 0) & (y != _IGNORE)).any():
        raise DatasetError(
            f"segmentation masks must be int class ids >= 0 (or {_IGNORE} for pixels the loss "
            f"skips); got dtype {y.dtype} ({shapes})"
        )
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DatasetError(f"x contains NaN or infinite values ({shapes})")
    return x, y.astype(np.int64, copy=False)


_IGNORE = -100  # the label value cross-entropy skips


def from_arrays(
    x: Any,
    y: Any = None,
    *,
    task_type: str | None = None,
    id: str = "arrays",
    description: str = "",
    class_names: list[str] | tuple[str, ...] | None = None,
    feature_names: list[str] | tuple[str, ...] | None = None,
) -> ArrayDataset:
    """Build an ``ArrayDataset``, optionally naming it and its classes/features."""
    ds = ArrayDataset(x, y, task_type=task_type)
    info = ds.info
    changes: dict[str, Any] = {"id": id}
    if description:
        changes["description"] = description
    if class_names is not None:
        if info.num_classes is not None and len(class_names) < info.num_classes:
            raise DatasetError(
                f"class_names has {len(class_names)} names but labels go up to {info.num_classes - 1}"
            )
        changes.update(class_names=tuple(class_names), num_classes=len(class_names))
    if feature_names is not None:
        if len(feature_names) != info.num_features:
            raise DatasetError(
                f"feature_names has {len(feature_names)} names but rows have {info.num_features} features"
            )
        changes["feature_names"] = tuple(feature_names)
    return ArrayDataset(ds.x, ds.y, info=info.replace(**changes))
