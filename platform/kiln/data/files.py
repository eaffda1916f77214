"""Datasets read from local parquet, csv or json-lines files through Ray Data.

``FileDataset`` works out its ``DatasetInfo`` in the driver with pyarrow (schema,
plus one pass over the label column), and reads the rows with ``ray.data.read_*``
only when training asks for ``to_ray()``. Feature columns are packed into ``"x"``
and the label into ``"y"`` by ``PackRows`` inside ``map_batches``.

``split`` hashes each packed row with the seed, so a row lands on the same side
whatever the block order or parallelism; identical rows land together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.data.base import (
    TABULAR_TASK_TYPES,
    DatasetInfo,
    KilnDataset,
    check_validation_split,
)
from kiln.errors import DatasetError

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

__all__ = ["FileDataset", "PackRows", "SplitFilter", "row_hash_fraction", "FILE_FORMATS"]

FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
LABEL_CANDIDATES = ("label", "y", "target")


def _detect_format(path: Path) -> tuple[str, list[Path]]:
    if path.is_file():
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DatasetError(
                f"{path}: unsupported file type {path.suffix!r}; use {', '.join(FILE_FORMATS)}"
            )
        return fmt, [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_FORMATS
        )
        formats = {FILE_FORMATS[p.suffix.lower()] for p in files}
        if len(formats) != 1:
            found = ", ".join(sorted(formats)) or "none"
            raise DatasetError(
                f"{path}: expected files of one type among {', '.join(FILE_FORMATS)}; found {found}"
            )
        return formats.pop(), files
    raise DatasetError(f"{path} does not exist")


def _read_local_table(fmt: str, files: list[Path], columns: list[str] | None = None) -> pa.Table:
    """Read ``columns`` (None: all) of local files with pyarrow, in the driver."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        if fmt == "parquet":
            tables.append(pq.read_table(f, columns=columns))
        elif fmt == "csv":
            opts = pacsv.ConvertOptions(include_columns=columns) if columns else None
            tables.append(pacsv.read_csv(f, convert_options=opts))
        else:
            table = pajson.read_json(f)
            tables.append(table.select(columns) if columns else table)
    return pa.concat_tables(tables)


def _schema(fmt: str, files: list[Path]) -> pa.Schema:
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return pq.read_schema(files[0])
    if fmt == "csv":
        import pyarrow.csv as pacsv

        with pacsv.open_csv(files[0]) as reader:
            return reader.schema
    return _read_local_table(fmt, files[:1]).schema


@dataclass(frozen=True)
class PackRows:
    """``map_batches`` function: feature columns -> ``"x"``, label column -> ``"y"``.

    Attributes:
        features: Feature column names, in order. One list/tensor column is stacked
            as is; several scalar columns become ``[N, len(features)]``.
        label: Label column name.
        task_type: Decides the label dtype (int64 class ids or float32).
        class_names: For string labels: the names whose index is the class id.
    """

    features: tuple[str, ...]
    label: str
    task_type: str
    class_names: tuple[str, ...] | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(self.features) == 1 and batch[self.features[0]].dtype == object:
            x = np.stack([np.asarray(v) for v in batch[self.features[0]]])
        elif len(self.features) == 1 and batch[self.features[0]].ndim > 1:
            x = batch[self.features[0]]
        else:
            x = np.stack([np.asarray(batch[f]) for f in self.features], axis=1)
        labels = np.asarray(batch[self.label])
        if self.task_type == "language_modeling":
            return {"x": x.astype(np.int64), "y": x.astype(np.int64)}
        if self.class_names is not None:
            lookup = {name: i for i, name in enumerate(self.class_names)}
            y = np.array([lookup[str(v)] for v in labels], dtype=np.int64)
        elif self.task_type == "classification":
            y = labels.astype(np.int64)
        else:
            y = labels.astype(np.float32)
        return {"x": x.astype(np.float32), "y": y}


def row_hash_fraction(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per row, from the row's bytes and ``seed`` (FNV-1a + splitmix64)."""
    n = len(x)
    words = np.concatenate(
        [
            _as_words(np.ascontiguousarray(x).reshape(n, -1)),
            _as_words(np.asarray(y).reshape(n, -1)),
        ],
        axis=1,
    )
    with np.errstate(over="ignore"):
        h = np.full(
            n, np.uint64(0xCBF29CE484222325) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64
        )
        for j in range(words.shape[1]):
            h = (h ^ words[:, j]) * np.uint64(0x100000001B3)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _as_words(values: np.ndarray) -> np.ndarray:
    if values.dtype.itemsize == 8:
        return values.view(np.uint64)
    if values.dtype.itemsize == 4:
        return values.view(np.uint32).astype(np.uint64)
    return values.astype(np.float64).view(np.uint64)


@dataclass(frozen=True)
class SplitFilter:
    """``map_batches`` function keeping the train (or validation) side of a hashed split."""

    fraction: float
    seed: int
    validation: bool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        in_val = row_hash_fraction(batch["x"], batch["y"], self.seed) < self.fraction
        keep = in_val if self.validation else ~in_val
        return {k: v[keep] for k, v in batch.items()}


class FileDataset(KilnDataset):
    """Rows from a local parquet/csv/jsonl file or a folder of them.

    Args:
        path: A file or a folder of files of one type.
        features: Feature columns (default: every column but the label).
        label: Label column (default: the first of ``label``, ``y``, ``target`` present).
        task_type: Overrides the task inferred from the label type (int or string:
            classification, float: regression).

    Raises:
        DatasetError: Missing path, unknown columns, or no label column.
    """

    def __init__(
        self,
        path: str | Path,
        features: list[str] | tuple[str, ...] | None = None,
        label: str | None = None,
        task_type: str | None = None,
        *,
        _split: SplitFilter | None = None,
        _info: DatasetInfo | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.format, self._files = _detect_format(self.path)
        self._split = _split
        if _info is not None:
            self.features, self.label, self._info = tuple(features or ()), str(label), _info
            return
        if task_type is not None and task_type not in TABULAR_TASK_TYPES:
            raise DatasetError(
                f"task_type={task_type!r}; allowed for files: {', '.join(TABULAR_TASK_TYPES)}"
            )
        schema = _schema(self.format, self._files)
        columns = list(schema.names)
        self.label = self._pick_label(label, columns)
        self.features = (
            tuple(features) if features else tuple(c for c in columns if c != self.label)
        )
        unknown = [f for f in self.features if f not in columns]
        if unknown or not self.features:
            raise DatasetError(
                f"{self.path}: feature columns {unknown or '(none)'} not usable; columns are {columns}"
            )
        self._info = self._compute_info(schema, task_type)

    def _pick_label(self, label: str | None, columns: list[str]) -> str:
        if label is not None:
            if label not in columns:
                raise DatasetError(
                    f"{self.path}: label column {label!r} not found; columns are {columns}"
                )
            return label
        for candidate in LABEL_CANDIDATES:
            if candidate in columns:
                return candidate
        raise DatasetError(
            f"{self.path}: no label column; looked for {', '.join(LABEL_CANDIDATES)} among columns "
            f"{columns}; pass label= one of them"
        )

    def _compute_info(self, schema: pa.Schema, task_type: str | None) -> DatasetInfo:
        import pyarrow as pa
        import pyarrow.compute as pc

        labels = _read_local_table(self.format, self._files, [self.label]).column(self.label)
        label_type = labels.type
        class_names = num_classes = num_outputs = None
        if task_type is None:
            if (
                pa.types.is_integer(label_type)
                or pa.types.is_string(label_type)
                or pa.types.is_boolean(label_type)
            ):
                task_type = "classification"
            elif pa.types.is_floating(label_type):
                task_type = "regression"
            else:
                raise DatasetError(
                    f"{self.path}: cannot infer task from label type {label_type}; pass task_type="
                )
        if task_type == "classification":
            if pa.types.is_string(label_type) or pa.types.is_large_string(label_type):
                class_names = tuple(sorted(str(v) for v in pc.unique(labels).to_pylist()))
                num_classes = len(class_names)
            else:
                num_classes = int(pc.max(labels).as_py()) + 1
        elif task_type == "regression":
            num_outputs = 1
        input_shape = self._input_shape(schema)
        if task_type == "language_modeling":
            num_classes = int(pc.max(pc.list_flatten(labels)).as_py()) + 1
        return DatasetInfo(
            id=str(self.path),
            description=f"{self.format} data from {self.path}",
            task_type=task_type,
            input_shape=input_shape,
            num_classes=num_classes,
            class_names=class_names,
            num_outputs=num_outputs,
            num_rows=len(labels),
            source="file",
            feature_names=self.features
            if len(input_shape) == 1 and len(self.features) > 1
            else None,
        )

    def _input_shape(self, schema: pa.Schema) -> tuple[int, ...]:
        import pyarrow as pa

        if len(self.features) > 1:
            return (len(self.features),)
        field_type = schema.field(self.features[0]).type
        if not (
            pa.types.is_list(field_type)
            or pa.types.is_fixed_size_list(field_type)
            or isinstance(field_type, pa.ExtensionType)
        ):
            return (1,)
        first = _read_local_table(self.format, self._files[:1], [self.features[0]]).column(0)
        return tuple(np.asarray(first[0].as_py()).shape)

    @property
    def info(self) -> DatasetInfo:
        return self._info

    def __len__(self) -> int:
        if self._info.num_rows is None:  # one side of a split: count it once, locally
            self._info = self._info.replace(num_rows=len(self.local_arrays()[1]))
        return self._info.num_rows  # type: ignore[return-value]

    def _pack(self) -> PackRows:
        return PackRows(self.features, self.label, self._info.task_type, self._info.class_names)

    def to_ray(self) -> ray.data.Dataset:
        import ray.data

        paths = [str(f) for f in self._files]
        if self.format == "parquet":
            ds = ray.data.read_parquet(paths)
        elif self.format == "csv":
            ds = ray.data.read_csv(paths)
        else:
            ds = ray.data.read_json(paths, lines=all(p.endswith(".jsonl") for p in paths))
        ds = ds.map_batches(self._pack(), batch_format="numpy")
        if self._split is not None:
            ds = ds.map_batches(self._split, batch_format="numpy")
        return ds

    def local_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Read every row in the driver with pyarrow (no Ray): packed ``(x, y)``."""
        table = _read_local_table(self.format, self._files, [*self.features, self.label])
        batch = {name: _column_numpy(table.column(name)) for name in table.column_names}
        packed = self._pack()(batch)
        if self._split is not None:
            packed = self._split(packed)
        return packed["x"], packed["y"]

    def split(self, validation_split: float, seed: int) -> tuple[FileDataset, FileDataset | None]:
        fraction = check_validation_split(validation_split)
        if fraction == 0.0:
            return self, None
        if self._split is not None:
            raise DatasetError(
                "this FileDataset is already one side of a split; split the original"
            )
        info = self._info.replace(num_rows=None)
        return tuple(  # type: ignore[return-value]
            FileDataset(
                self.path,
                self.features,
                self.label,
                _split=SplitFilter(fraction, seed, side),
                _info=info,
            )
            for side in (False, True)
        )


def _column_numpy(column: Any) -> np.ndarray:
    import pyarrow as pa

    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        return np.array([np.asarray(v) for v in column.to_pylist()] + [None], dtype=object)[:-1]
    return column.to_numpy(zero_copy_only=False)
