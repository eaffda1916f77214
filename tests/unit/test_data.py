"""kiln.data without Ray: registry, bundled and synthetic sets, arrays, IDX, files, collators."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

import kiln.data as kd
from kiln.data import (
    ArrayDataset,
    CollatorRegistry,
    DatasetInfo,
    FileDataset,
    from_arrays,
    get_dataset,
    list_datasets,
    load_mnist,
    read_idx,
    register_dataset,
    unregister_dataset,
    write_idx,
)
from kiln.data.files import PackRows, SplitFilter
from kiln.errors import DatasetError, DatasetNotFoundError, NotFoundError

# --- registry ---------------------------------------------------------------


def test_exported_names_are_pinned():
    assert sorted(kd.__all__) == sorted(
        [
            "ArrayDataset",
            "CollatorRegistry",
            "DataLoaderConfig",
            "DataLoaderFactory",
            "DatasetInfo",
            "FileDataset",
            "KilnDataset",
            "dataset_ids",
            "from_arrays",
            "get_dataset",
            "list_datasets",
            "load_mnist",
            "read_idx",
            "register_dataset",
            "synthetic_classification",
            "synthetic_regression",
            "tiny_tokens",
            "UniversalDataModule",
            "unregister_dataset",
            "write_idx",
        ]
    )


def test_list_datasets_has_builtins_without_loading_mnist():
    infos = {i.id: i for i in list_datasets()}
    assert {
        "iris",
        "digits",
        "mnist",
        "synthetic_classification",
        "synthetic_regression",
        "tiny_tokens",
    } <= set(infos)
    assert infos["mnist"].input_shape == (1, 28, 28)
    assert infos["tiny_tokens"].task_type == "language_modeling"
    assert infos["synthetic_regression"].num_outputs == 1


def test_unknown_id_names_id_known_ids_and_paths():
    with pytest.raises(DatasetNotFoundError) as exc:
        get_dataset("irsi")
    msg = str(exc.value)
    assert "'irsi'" in msg and "iris" in msg and "digits" in msg and "parquet" in msg
    assert isinstance(exc.value, KeyError)
    assert str(pickle.loads(pickle.dumps(exc.value))) == msg


def test_register_dataset_and_overwrite():
    def loader(n=4):
        return from_arrays(np.zeros((n, 2)), np.arange(n) % 2, id="mine")

    register_dataset("mine_test", loader, description="test set")
    try:
        assert len(get_dataset("mine_test", n=6)) == 6
        with pytest.raises(DatasetError, match="already registered"):
            register_dataset("mine_test", loader)
        register_dataset("mine_test", loader, description="test set", overwrite=True)
        assert any(i.id == "mine_test" and i.description == "test set" for i in list_datasets())
        with pytest.raises(DatasetError, match="does not accept"):
            get_dataset("mine_test", bogus=1)
    finally:
        unregister_dataset("mine_test")
    with pytest.raises(DatasetNotFoundError):
        get_dataset("mine_test")


# --- bundled, synthetic -----------------------------------------------------


def test_bundled_iris_and_digits():
    iris = get_dataset("iris")
    assert iris.x.shape == (150, 4) and iris.x.dtype == np.float32
    assert iris.y.dtype == np.int64 and sorted(np.unique(iris.y)) == [0, 1, 2]
    assert iris.info.class_names == ("setosa", "versicolor", "virginica")
    assert iris.info.source == "bundled" and len(iris.info.feature_names) == 4
    digits = get_dataset("digits")
    assert digits.x.shape == (1797, 64) and digits.x.min() >= 0.0 and digits.x.max() <= 1.0
    assert digits.info.num_classes == 10 and len(np.unique(digits.y)) == 10


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("synthetic_classification", {"n_samples": 200, "n_features": 5, "n_classes": 4}),
        ("synthetic_regression", {"n_samples": 200, "n_features": 5, "noise": 0.2}),
        ("tiny_tokens", {"n": 64, "seq_len": 8, "vocab_size": 16}),
    ],
)
def test_synthetic_is_deterministic_per_seed(name, kwargs):
    a, b = get_dataset(name, seed=1, **kwargs), get_dataset(name, seed=1, **kwargs)
    c = get_dataset(name, seed=2, **kwargs)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


def test_synthetic_shapes_and_learnable_structure():
    cls = kd.synthetic_classification(n_samples=300, n_features=6, n_classes=3)
    assert cls.x.shape == (300, 6) and cls.info.num_classes == 3
    # nearest class mean classifies almost all rows: the blobs are separable
    means = np.stack([cls.x[cls.y == k].mean(0) for k in range(3)])
    pred = np.argmin(((cls.x[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == cls.y).mean() > 0.9
    reg = kd.synthetic_regression(n_samples=500, n_features=4, noise=0.05)
    w, *_ = np.linalg.lstsq(np.c_[reg.x, np.ones(500)], reg.y, rcond=None)
    resid = reg.y - np.c_[reg.x, np.ones(500)] @ w
    assert resid.std() < 0.1 and reg.y.dtype == np.float32
    tok = kd.tiny_tokens(n=32, seq_len=10, vocab_size=32)
    assert tok.x.dtype == np.int64 and tok.x.shape == (32, 10)
    np.testing.assert_array_equal(tok.x, tok.y)
    step = (tok.x[:, 1] - tok.x[:, 0]) % 32
    np.testing.assert_array_equal((tok.x[:, 2] - tok.x[:, 1]) % 32, step)


# --- ArrayDataset -----------------------------------------------------------


def test_array_dataset_infers_task_and_accepts_tensors_and_lists():
    ds = ArrayDataset(torch.rand(10, 3), torch.arange(10) % 4)
    assert ds.info.task_type == "classification" and ds.info.num_classes == 4
    assert ds.info.input_shape == (3,) and ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    reg = ArrayDataset([[1, 2], [3, 4]], [0.5, 1.5])
    assert reg.info.task_type == "regression" and reg.info.num_outputs == 1
    assert reg.y.dtype == np.float32
    lm = ArrayDataset(np.arange(12).reshape(3, 4), task_type="language_modeling")
    assert lm.info.num_classes == 12 and lm.x.dtype == np.int64


@pytest.mark.parametrize(
    "x,y,match",
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), r"empty .*x.shape=\(0, 3\)"),
        (np.zeros((4, 3)), np.zeros(5, dtype=int), r"different numbers of rows .*\(4, 3\).*\(5,\)"),
        (np.zeros((4, 3)), np.zeros((4, 2), dtype=int), r"1-D class ids.*y.shape=\(4, 2\)"),
        (np.full((2, 2), np.nan), np.zeros(2, dtype=int), "NaN"),
        (np.zeros((2, 2)), np.array([0, -1]), "class ids must be >= 0"),
    ],
)
def test_array_dataset_validation_errors(x, y, match):
    with pytest.raises(DatasetError, match=match):
        ArrayDataset(x, y)


def test_split_is_deterministic_disjoint_and_complete():
    ds = from_arrays(np.arange(100, dtype=np.float32).reshape(100, 1), np.arange(100) % 3)
    train, val = ds.split(0.2, seed=7)
    train2, val2 = ds.split(0.2, seed=7)
    _, val3 = ds.split(0.2, seed=8)
    assert len(train) == 80 and len(val) == 20
    np.testing.assert_array_equal(val.x, val2.x)
    np.testing.assert_array_equal(train.x, train2.x)
    assert not np.array_equal(val.x, val3.x)
    rows_t, rows_v = set(train.x[:, 0]), set(val.x[:, 0])
    assert not rows_t & rows_v and rows_t | rows_v == set(range(100))
    assert val.info.num_classes == 3 and val.info.num_rows == 20
    same, none = ds.split(0.0, seed=1)
    assert same is ds and none is None
    with pytest.raises(DatasetError, match="validation_split=1.5"):
        ds.split(1.5, seed=0)


def test_dataset_info_validates_and_converts():
    with pytest.raises(DatasetError, match="task_type='clustering'"):
        DatasetInfo(id="a", description="", task_type="clustering", input_shape=(2,))
    info = DatasetInfo(id="a", description="", task_type="regression", input_shape=[2, 3])
    assert info.input_shape == (2, 3) and info.num_features == 6
    assert info.to_dict()["input_shape"] == [2, 3]


# --- IDX / MNIST -------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, suffix, dtype):
    arr = (np.arange(2 * 3 * 4) % 200).astype(dtype).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"a-idx3-ubyte{suffix}", arr)
    raw = path.read_bytes() if not suffix else None
    if raw is not None:  # header is big-endian: 00 00 type ndim, then dims
        assert raw[:4] == bytes([0, 0, {np.uint8: 8, np.int32: 0x0C, np.float32: 0x0D}[dtype], 3])
        assert raw[4:8] == (2).to_bytes(4, "big")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, arr)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DatasetError, match="magic"):
        read_idx(tmp_path / "bad")
    path = write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="body has 7 bytes"):
        read_idx(path)


def test_mnist_missing_files_message(tmp_path):
    with pytest.raises(DatasetError) as exc:
        get_dataset("mnist", data_dir=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path) in msg
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    with pytest.raises(DatasetError, match="needs data_dir"):
        get_dataset("mnist")


def test_mnist_loads_tiny_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(
        tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    )
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 9], np.uint8))
    ds = get_dataset("mnist", data_dir=tmp_path)
    assert ds.x.shape == (5, 1, 28, 28) and ds.x.dtype == np.float32 and ds.x.max() <= 1.0
    assert (
        ds.y.tolist() == [0, 1, 2, 3, 9] and ds.info.num_classes == 10 and ds.info.source == "mnist"
    )
    with pytest.raises(DatasetError, match="t10k-images"):
        load_mnist(tmp_path, split="all")


# --- files (driver side, no Ray) ---------------------------------------------


@pytest.fixture()
def table_files(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {"a": rng.normal(size=50), "b": rng.normal(size=50), "label": rng.integers(0, 3, 50)}
    )
    df.to_parquet(tmp_path / "d.parquet")
    df.to_csv(tmp_path / "d.csv", index=False)
    names = np.array(["cat", "dog", "eel"])[df["label"]]
    df.assign(label=names).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    return tmp_path, df


@pytest.mark.parametrize("name", ["d.parquet", "d.csv", "d.jsonl"])
def test_file_dataset_info_and_local_rows(table_files, name):
    folder, df = table_files
    ds = get_dataset(str(folder / name))
    assert isinstance(ds, FileDataset)
    assert ds.info.input_shape == (2,) and ds.info.num_classes == 3 and len(ds) == 50
    assert ds.info.feature_names == ("a", "b") and ds.info.source == "file"
    x, y = ds.local_arrays()
    np.testing.assert_allclose(x, df[["a", "b"]].to_numpy(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(y, df["label"].to_numpy())  # cat/dog/eel sort as 0/1/2
    if name == "d.jsonl":
        assert ds.info.class_names == ("cat", "dog", "eel")


def test_file_dataset_label_errors(table_files):
    folder, df = table_files
    df.rename(columns={"label": "species"}).to_parquet(folder / "nolabel.parquet")
    with pytest.raises(DatasetError, match=r"no label column.*\['a', 'b', 'species'\]"):
        FileDataset(folder / "nolabel.parquet")
    ds = FileDataset(folder / "nolabel.parquet", label="species", features=["b"])
    assert ds.info.input_shape == (1,)
    with pytest.raises(DatasetError, match="label column 'kind' not found"):
        FileDataset(folder / "d.parquet", label="kind")


def test_file_split_is_deterministic_and_disjoint(table_files):
    folder, _ = table_files
    ds = FileDataset(folder / "d.parquet")
    (t1, v1), (_, v2) = ds.split(0.3, seed=3), ds.split(0.3, seed=3)
    _, v3 = ds.split(0.3, seed=4)
    a = {tuple(r) for r in v1.local_arrays()[0]}
    assert a == {tuple(r) for r in v2.local_arrays()[0]}
    assert a != {tuple(r) for r in v3.local_arrays()[0]}
    t = {tuple(r) for r in t1.local_arrays()[0]}
    assert not a & t and len(a) + len(t) == 50 and len(t1) + len(v1) == 50 and len(v1) > 0


def test_pack_rows_and_split_filter_pickle():
    pack = pickle.loads(pickle.dumps(PackRows(("a", "b"), "label", "regression")))
    out = pack(
        {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 4.0]), "label": np.array([0.5, 1.0])}
    )
    assert out["x"].tolist() == [[1.0, 3.0], [2.0, 4.0]] and out["y"].dtype == np.float32
    f = pickle.loads(pickle.dumps(SplitFilter(0.5, 0, validation=True)))
    batch = {"x": np.arange(200, dtype=np.float32).reshape(100, 2), "y": np.zeros(100, np.int64)}
    kept = f(batch)["x"].shape[0]
    assert 25 < kept < 75


# --- collators ---------------------------------------------------------------


def test_collator_registry_builtins_and_custom():
    reg = CollatorRegistry()
    assert {"classification", "language_modeling", "vision", "sequence_to_sequence"} <= set(
        reg.names()
    )
    batch = reg.get("classification")([{"x": np.ones(3), "y": 1}, (np.zeros(3), 0)])
    assert batch["x"].shape == (2, 3) and batch["y"].tolist() == [1, 0]
    lm = reg.get("language_modeling")([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert lm["x"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert lm["y"].tolist() == [[1, 2, 3], [4, -100, -100]]
    vis = reg.get("vision")([(np.full((4, 4), 255, np.uint8), 3)])
    assert vis["x"].shape == (1, 1, 4, 4) and vis["x"].max() == 1.0
    s2s = reg.get("sequence_to_sequence")([([1, 2], [3]), ([1], [3, 4, 5])])
    assert s2s["x"].shape == (2, 2) and s2s["y"].shape == (2, 3)
    from kiln.data import collate

    reg.register("custom", lambda b: {"x": torch.zeros(1), "y": torch.zeros(1)})
    assert "custom" in reg
    collate._COLLATORS.pop("custom")  # the table is module-wide: leave it as found
    with pytest.raises(NotFoundError, match="unknown collator 'nope'.*classification"):
        reg.get("nope")
