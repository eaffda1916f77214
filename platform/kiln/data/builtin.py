"""kiln's built-in datasets, all offline: bundled iris/digits, synthetic data, tiny tokens.

iris and digits ship as compressed ``.npz`` files in ``_bundled/`` (made once from
scikit-learn's copies; kiln does not import scikit-learn). The synthetic sets are
numpy generators, deterministic per seed, with structure a small model can learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.data.arrays import ArrayDataset
from kiln.data.base import DatasetInfo
from kiln.errors import DatasetError

__all__ = [
    "load_bundled",
    "synthetic_classification",
    "synthetic_regression",
    "tiny_tokens",
    "BUNDLED_INFO",
]

_BUNDLED_DIR = Path(__file__).resolve().parent / "_bundled"

_IRIS_FEATURES = ("sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)")

BUNDLED_INFO = {
    "iris": DatasetInfo(
        id="iris",
        description="Fisher's iris flowers: 4 measurements, 3 species (bundled)",
        task_type="classification",
        input_shape=(4,),
        num_classes=3,
        class_names=("setosa", "versicolor", "virginica"),
        num_rows=150,
        source="bundled",
        feature_names=_IRIS_FEATURES,
    ),
    "digits": DatasetInfo(
        id="digits",
        description="8x8 handwritten digits, 64 pixels in [0, 1], 10 classes (bundled)",
        task_type="classification",
        input_shape=(64,),
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        num_rows=1797,
        source="bundled",
        feature_names=tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8)),
    ),
}


def load_bundled(name: str) -> ArrayDataset:
    """Load the bundled ``iris`` or ``digits`` dataset."""
    if name not in BUNDLED_INFO:
        raise DatasetError(f"no bundled dataset {name!r}; bundled: {', '.join(BUNDLED_INFO)}")
    path = _BUNDLED_DIR / f"{name}.npz"
    if not path.is_file():
        raise DatasetError(f"bundled file {path} is missing; reinstall kiln")
    with np.load(path, allow_pickle=False) as z:
        x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
        info = BUNDLED_INFO[name].replace(
            class_names=tuple(str(c) for c in z["class_names"]),
            feature_names=tuple(str(f) for f in z["feature_names"]),
        )
    return ArrayDataset(x, y, info=info)


def synthetic_classification(
    n_samples: int = 1000,
    n_features: int = 20,
    n_classes: int = 3,
    seed: int = 0,
    class_sep: float = 2.0,
) -> ArrayDataset:
    """Gaussian blobs: one random centre per class, unit noise around it.

    ``class_sep`` scales the distance between centres (larger is easier).
    """
    _check_positive(n_samples=n_samples, n_features=n_features, n_classes=n_classes)
    if n_classes < 2:
        raise DatasetError(f"n_classes={n_classes!r}; need at least 2")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, n_features))
    centres *= class_sep / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-8)
    centres *= np.sqrt(n_features) / 2
    y = rng.permutation(np.arange(n_samples) % n_classes).astype(np.int64)
    x = (centres[y] + rng.normal(size=(n_samples, n_features))).astype(np.float32)
    info = DatasetInfo(
        id="synthetic_classification",
        description=f"Gaussian blobs: {n_classes} classes, {n_features} features, seed {seed}",
        task_type="classification",
        input_shape=(n_features,),
        num_classes=n_classes,
        class_names=tuple(f"class_{i}" for i in range(n_classes)),
        num_rows=n_samples,
        source="synthetic",
        feature_names=tuple(f"f{i}" for i in range(n_features)),
    )
    return ArrayDataset(x, y, info=info)


def synthetic_regression(
    n_samples: int = 1000,
    n_features: int = 10,
    noise: float = 0.1,
    seed: int = 0,
) -> ArrayDataset:
    """Linear target with Gaussian noise: ``y = x @ w + b + noise * eps``, y float32 [N]."""
    _check_positive(n_samples=n_samples, n_features=n_features)
    if noise < 0:
        raise DatasetError(f"noise={noise!r}; expected >= 0")
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n_features) / np.sqrt(n_features)
    x = rng.normal(size=(n_samples, n_features)).astype(np.float32)
    y = (x @ w + 0.5 + noise * rng.normal(size=n_samples)).astype(np.float32)
    info = DatasetInfo(
        id="synthetic_regression",
        description=f"linear target + noise {noise}: {n_features} features, seed {seed}",
        task_type="regression",
        input_shape=(n_features,),
        num_outputs=1,
        num_rows=n_samples,
        source="synthetic",
        feature_names=tuple(f"f{i}" for i in range(n_features)),
    )
    return ArrayDataset(x, y, info=info)


def tiny_tokens(
    n: int = 512, seq_len: int = 16, vocab_size: int = 32, seed: int = 0
) -> ArrayDataset:
    """Arithmetic progressions mod ``vocab_size``: token t+1 = token t + step.

    Each row has a random start and a step in 1..3, so the next token follows from
    the previous two; a small causal LM learns it quickly. ``y`` equals ``x``
    (the loss shifts).
    """
    _check_positive(n=n, seq_len=seq_len, vocab_size=vocab_size)
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab_size, size=(n, 1))
    step = rng.integers(1, 4, size=(n, 1))
    x = ((start + step * np.arange(seq_len)[None, :]) % vocab_size).astype(np.int64)
    info = DatasetInfo(
        id="tiny_tokens",
        description=f"token progressions mod {vocab_size}: {n} x {seq_len}, seed {seed}",
        task_type="language_modeling",
        input_shape=(seq_len,),
        num_classes=vocab_size,
        num_rows=n,
        source="synthetic",
    )
    return ArrayDataset(x, x.copy(), info=info)


def _check_positive(**values: int) -> None:
    bad = [
        f"{k}={v!r}" for k, v in values.items() if not isinstance(v, (int, np.integer)) or v <= 0
    ]
    if bad:
        raise DatasetError(f"expected positive ints: {', '.join(bad)}")
