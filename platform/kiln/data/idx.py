"""The IDX file format (MNIST's) and the MNIST loader.

IDX: 2 zero bytes, a type code, the number of dimensions, one big-endian uint32 per
dimension, then the values in big-endian C order. Files may be gzipped (``.gz``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from kiln.data.arrays import ArrayDataset
from kiln.data.base import DatasetInfo
from kiln.errors import DatasetError

__all__ = ["read_idx", "write_idx", "load_mnist", "MNIST_FILES", "MNIST_INFO"]

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("=").str: code for code, dt in _IDX_TYPES.items()}

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

MNIST_INFO = DatasetInfo(
    id="mnist",
    description="MNIST handwritten digits, 28x28 grey images in [0, 1] (local IDX files)",
    task_type="classification",
    input_shape=(1, 28, 28),
    num_classes=10,
    class_names=tuple(str(i) for i in range(10)),
    num_rows=None,
    source="mnist",
)


def _open(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a native-endian numpy array.

    Raises:
        DatasetError: Bad magic number, unknown type code or truncated data.
    """
    path = Path(path)
    data = _open(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(
            f"{path} is not an IDX file: magic bytes {data[:4]!r} (expected 00 00 TT ND)"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_TYPES:
        raise DatasetError(
            f"{path}: unknown IDX type code 0x{type_code:02x}; known: "
            + ", ".join(f"0x{c:02x}" for c in _IDX_TYPES)
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            f"{path}: IDX body has {len(data) - header} bytes but dims {dims} of {dtype} need {expected}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends with ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=").str
    if key not in _CODES:
        raise DatasetError(
            f"IDX cannot store dtype {array.dtype}; use uint8, int8, int16, int32, float32 or float64"
        )
    code = _CODES[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).tobytes()
    data = header + body
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def load_mnist(data_dir: str | Path | None = None, split: str = "train") -> ArrayDataset:
    """Load MNIST from local IDX files as x float32 [N, 1, 28, 28] in [0, 1], y int64.

    Args:
        data_dir: Folder holding the IDX files (plain or ``.gz``).
        split: ``"train"`` (60k), ``"test"`` (10k) or ``"all"`` (both).

    Raises:
        DatasetError: ``data_dir`` is None, or files are missing or malformed.
    """
    splits = {"train": ["train"], "test": ["test"], "all": ["train", "test"]}
    if split not in splits:
        raise DatasetError(f"mnist split={split!r}; allowed: {', '.join(splits)}")
    needed = [name for part in splits[split] for name in MNIST_FILES[part]]
    how = (
        "download them from https://yann.lecun.com/exdb/mnist/ (or a mirror) and put "
        + ", ".join(f"{n}[.gz]" for n in needed)
    )
    if data_dir is None:
        raise DatasetError(
            f"mnist needs data_dir= a folder with its IDX files; {how} in that folder"
        )
    data_dir = Path(data_dir).expanduser()
    missing = [n for n in needed if _find(data_dir, n) is None]
    if missing:
        raise DatasetError(
            f"mnist files missing in {data_dir}: {', '.join(missing)}; {how} in {data_dir}"
        )
    xs, ys = [], []
    for part in splits[split]:
        images_name, labels_name = MNIST_FILES[part]
        images = read_idx(_find(data_dir, images_name))  # type: ignore[arg-type]
        labels = read_idx(_find(data_dir, labels_name))  # type: ignore[arg-type]
        if images.ndim != 3 or len(images) != len(labels):
            raise DatasetError(
                f"mnist {part}: images {images.shape} and labels {labels.shape} do not match "
                "(expected [N, 28, 28] and [N])"
            )
        xs.append(images.astype(np.float32)[:, None] / 255.0)
        ys.append(labels.astype(np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    info = MNIST_INFO.replace(input_shape=tuple(x.shape[1:]), num_rows=len(x))
    return ArrayDataset(x, y, info=info)
