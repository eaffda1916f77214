"""The evaluation and export job handlers, run in-process on a tiny registered model."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.errors import DatasetError
from kiln.models import build_model
from kiln.paths import RunPaths
from kiln.queue.handlers import HANDLERS, load_arrays
from kiln.queue.jobs import JobType
from kiln.tracking import ModelRegistry


@pytest.fixture()
def registered(tmp_path):
    paths = RunPaths.resolve(tmp_path / "home")
    spec = {"name": "mlp", "hidden": [8]}
    torch.manual_seed(0)
    model = build_model(spec, input_shape=(64,), num_outputs=10)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "model.pt")
    meta = {"model_config": spec, "input_shape": [64], "num_outputs": 10,
            "task_spec": {"name": "digits", "task_type": "classification", "num_classes": 10}}  # fmt: skip
    (ckpt / "metadata.json").write_text(json.dumps(meta))
    registry = ModelRegistry(paths.db, paths.artifacts)
    registry.register_model("digits", ckpt, tags=["production"])
    return paths, model


def test_evaluation_measures_the_registered_model(registered):
    paths, model = registered
    result, details = HANDLERS[JobType.EVALUATION](
        {"model": "digits@production", "dataset": "digits"}, paths, 1
    )
    x, y = load_arrays("digits", paths)
    with torch.no_grad():
        logits = model(torch.as_tensor(x))
    expected = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)).item()
    metrics = details["metrics"]
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(
        (logits.argmax(-1) == torch.as_tensor(y)).float().mean().item()
    )
    assert metrics["rows"] == len(x) == 1797
    assert {"precision_macro", "recall_macro", "f1_macro"} <= set(metrics)  # as `kiln eval`
    assert result.startswith("digits:1.0.0 on digits: loss=")


def test_export_writes_a_bundle_of_the_registered_model(registered, tmp_path):
    paths, _ = registered
    out = tmp_path / "bundles" / "digits-prod"
    result, details = HANDLERS[JobType.EXPORT](
        {"model": "digits@production", "formats": "pytorch", "output": str(out)}, paths, 7
    )
    assert result == str(out) and (out / "manifest.json").is_file()
    assert details == {"model": "digits:1.0.0", "model_id": 1}


def test_load_arrays_reads_globs_and_refuses_empty_ones(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = RunPaths.resolve(tmp_path / "home")
    for i in range(2):
        pq.write_table(
            pa.table({"x": [[0.0, 1.0]] * 3, "label": [i] * 3}), tmp_path / f"b{i}.parquet"
        )
    x, y = load_arrays(str(tmp_path / "b*.parquet"), paths)
    assert x.shape == (6, 2) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DatasetError, match="matches no file"):
        load_arrays(str(tmp_path / "none*.parquet"), paths)


def test_retraining_without_new_data_is_a_recorded_skip(registered, tmp_path):
    from kiln.queue import retrain_decisions

    paths, _ = registered
    config = {"model": "digits@production", "data": str(tmp_path / "new" / "*.parquet"),
              "holdout": str(tmp_path / "holdout.parquet")}  # fmt: skip
    result, details = HANDLERS[JobType.RETRAINING](config, paths, 3)
    assert result.startswith("skipped: no new data") and details["action"] == "skipped"
    decisions = retrain_decisions(paths=paths)
    assert list(decisions["action"]) == ["skipped"] and decisions.loc[0, "job_id"] == 3
