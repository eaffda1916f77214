"""kiln datasets through a real local Ray: to_ray() columns, dtypes, shapes, file splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kiln.data import FileDataset, from_arrays, get_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _all_batches(ds, batch_size=16):
    xs, ys = [], []
    for batch in ds.to_ray().iter_torch_batches(batch_size=batch_size):
        assert set(batch) == {"x", "y"}
        xs.append(batch["x"])
        ys.append(batch["y"])
    return torch.cat(xs), torch.cat(ys)


def test_array_dataset_to_ray_classification(ray_local):
    ds = get_dataset("iris")
    x, y = _all_batches(ds)
    assert x.dtype == torch.float32 and x.shape == (150, 4)
    assert y.dtype == torch.int64 and y.shape == (150,)
    assert ds.to_ray().num_blocks() >= 2  # several blocks, so workers can share the rows
    order = torch.argsort(torch.from_numpy(ds.x[:, 0] * 1000 + ds.x[:, 1]), stable=True)
    got = torch.argsort(x[:, 0] * 1000 + x[:, 1], stable=True)
    torch.testing.assert_close(x[got], torch.from_numpy(ds.x)[order])


def test_array_dataset_to_ray_images_tokens_regression(ray_local):
    images = from_arrays(np.random.rand(10, 1, 6, 6).astype(np.float32), np.arange(10) % 3)
    x, y = _all_batches(images, batch_size=4)
    assert x.shape == (10, 1, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    tokens = get_dataset("tiny_tokens", n=20, seq_len=8)
    x, y = _all_batches(tokens)
    assert x.shape == (20, 8) and x.dtype == torch.int64 and torch.equal(x, y)
    reg = get_dataset("synthetic_regression", n_samples=30, n_features=3)
    x, y = _all_batches(reg)
    assert x.shape == (30, 3) and y.dtype == torch.float32 and y.shape == (30,)


@pytest.fixture()
def parquet_file(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "f0": rng.normal(size=200),
            "f1": rng.normal(size=200),
            "f2": rng.normal(size=200),
            "label": rng.integers(0, 4, 200),
        }
    )
    path = tmp_path / "train.parquet"
    df.to_parquet(path)
    return path, df


def test_parquet_to_ray(ray_local, parquet_file):
    path, df = parquet_file
    ds = get_dataset(str(path))
    assert isinstance(ds, FileDataset) and ds.info.num_classes == 4
    x, y = _all_batches(ds, batch_size=32)
    assert x.shape == (200, 3) and x.dtype == torch.float32
    assert y.shape == (200,) and y.dtype == torch.int64
    assert sorted(y.tolist()) == sorted(df["label"].tolist())
    expected = df[["f0", "f1", "f2"]].to_numpy(np.float32)
    np.testing.assert_allclose(np.sort(x.numpy(), axis=0), np.sort(expected, axis=0), rtol=1e-6)


def test_csv_string_labels_to_ray(ray_local, tmp_path):
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "species": ["b", "a", "b", "c"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    ds = FileDataset(tmp_path / "d.csv", label="species")
    assert ds.info.class_names == ("a", "b", "c")
    x, y = _all_batches(ds)
    assert dict(zip(x[:, 0].tolist(), y.tolist(), strict=True)) == {1.0: 1, 2.0: 0, 3.0: 1, 4.0: 2}


def test_file_split_through_ray_is_deterministic(ray_local, parquet_file):
    path, _ = parquet_file
    ds = FileDataset(path)

    def rows(part):
        x, _ = _all_batches(part)
        return {tuple(r) for r in x.tolist()}

    train, val = ds.split(0.25, seed=11)
    train2, val2 = ds.split(0.25, seed=11)
    _, val3 = ds.split(0.25, seed=12)
    t, v = rows(train), rows(val)
    assert v == rows(val2) and t == rows(train2)
    assert v != rows(val3)
    assert not t & v and len(t) + len(v) == 200 and 20 < len(v) < 80
    # the Ray path and the local (driver) path agree on the split
    assert v == {tuple(r) for r in val.local_arrays()[0].tolist()}
