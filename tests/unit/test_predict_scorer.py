"""BundleScorer (the batch-prediction actor's code) called directly, without Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from kiln.export import create_export_bundle, load_bundle
from kiln.predict.scorer import BundleScorer, ScorerSpec


def _scorer(tmp_path, model, task, features, keep=("id",)) -> BundleScorer:
    bundle = create_export_bundle(model, None, task, None, tmp_path / "b", "onnx", bundle_name="m")
    (tmp_path / "rejects").mkdir()
    spec = ScorerSpec.of(load_bundle(bundle))
    return BundleScorer(spec, features, list(keep), str(tmp_path / "rejects"))


def _rejects(tmp_path) -> list[dict]:
    return [
        json.loads(line)
        for part in sorted((tmp_path / "rejects").iterdir())
        for line in part.read_text().splitlines()
    ]


def test_regression_with_two_outputs_keeps_columns(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    task = {"task_type": "regression", "num_outputs": 2, "input_shape": [3]}
    scorer = _scorer(tmp_path, model, task, ["a", "b", "c"])
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    out = scorer({"id": np.arange(5), "a": x[:, 0], "b": x[:, 1], "c": x[:, 2].astype(np.float64)})
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    assert sorted(out) == ["id", "prediction_0", "prediction_1"]
    np.testing.assert_allclose(out["prediction_0"], want[:, 0], atol=1e-5)
    np.testing.assert_allclose(out["prediction_1"], want[:, 1], atol=1e-5)
    assert out["id"].tolist() == [0, 1, 2, 3, 4]
    assert not list((tmp_path / "rejects").iterdir())
    empty = scorer({"id": np.arange(1), "a": np.array(["?"], dtype=object), "b": x[:1, 1],
                    "c": x[:1, 2]})  # fmt: skip
    assert {k: (len(v), v.dtype) for k, v in empty.items()} == {
        k: (0, v.dtype) for k, v in out.items()
    }  # same columns and types as a batch with rows


def test_classifier_normalises_names_classes_and_rejects_bad_rows(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    mean, std = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 4.0, 4.0]
    task = {
        "task_type": "classification",
        "num_classes": 3,
        "class_names": ["cat", "dog", "owl"],
        "input_shape": [4],
        "preprocessing_config": {"normalize": {"mean": mean, "std": std}},
    }
    scorer = _scorer(tmp_path, model, task, "x")
    rng = np.random.default_rng(1)
    rows = [rng.normal(size=4).astype(np.float32) for _ in range(6)]
    values = [*rows[:2], rows[2][:3], None, np.array([1, np.nan, 0, 0]), *rows[5:]]
    column = np.empty(len(values), dtype=object)  # a ragged list column, as Ray hands it over
    column[:] = values
    out = scorer({"id": np.arange(10, 16), "x": column})

    good = [0, 1, 5]
    x = np.stack([rows[i] for i in good])
    with torch.inference_mode():
        scaled = ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)
        probs = model(torch.from_numpy(scaled)).softmax(1)
    assert out["id"].tolist() == [10, 11, 15]
    np.testing.assert_allclose(
        np.stack([out[f"prob_{n}"] for n in ("cat", "dog", "owl")], axis=1),
        probs.numpy(),
        atol=1e-5,
    )
    assert out["prediction"].tolist() == [["cat", "dog", "owl"][i] for i in probs.argmax(1)]

    reasons = {r["id"]: r["reason"] for r in _rejects(tmp_path)}
    assert reasons == {
        12: "'x' has 3 values; the model takes 4",
        13: "'x' is empty",
        14: "'x' holds NaN or infinite values",
    }


def test_a_batch_with_no_good_rows_returns_empty_columns(tmp_path):
    model = nn.Linear(2, 2)
    task = {"task_type": "classification", "num_classes": 2, "input_shape": [2]}
    scorer = _scorer(tmp_path, model, task, ["a", "b"])
    out = scorer({"id": np.array([1, 2]), "a": np.array(["x", None], dtype=object),
                  "b": np.array([0.0, 1.0])})  # fmt: skip
    assert {k: len(v) for k, v in out.items()} == {
        "id": 0,
        "prediction": 0,
        "prob_0": 0,
        "prob_1": 0,
    }
    assert [r["reason"] for r in _rejects(tmp_path)] == [
        "column 'a' is not a number: 'x'",
        "column 'a' is empty",
    ]


def test_a_changed_onnx_file_is_refused(tmp_path):
    model = nn.Linear(2, 2)
    task = {"task_type": "classification", "num_classes": 2, "input_shape": [2]}
    bundle = create_export_bundle(model, None, task, None, tmp_path, "onnx", bundle_name="m")
    spec = ScorerSpec.of(load_bundle(bundle))
    with open(spec.onnx_path, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(Exception, match="no longer matches the sha256"):
        BundleScorer(spec, ["a", "b"], [], str(tmp_path))
