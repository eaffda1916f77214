"""Batch prediction on a real local Ray (Ray Data actors with onnxruntime), and evaluation
on two Ray Train workers (torchmetrics synchronised over gloo)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln import ConfigError, Trainer, TrainingConfig
from kiln.cli import main
from kiln.data import get_dataset
from kiln.engine.data_plan import split_for_run
from kiln.export import export_checkpoint
from kiln.paths import RunPaths
from kiln.predict import evaluate, predict
from kiln.serve.predictor import Predictor

pytestmark = pytest.mark.integration

N = 240
# Two actors on the tests' 2-CPU Ray: kiln gives each half a CPU, leaving one for reads.
FAST = dict(batch_size=64, concurrency=2, progress=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A digits MLP trained in-process, registered as digits-batch, and its ONNX bundle."""
    home = tmp_path_factory.mktemp("home")
    paths = RunPaths.resolve(home)
    cfg = TrainingConfig(
        dataset="digits",
        model={"name": "mlp", "hidden": [32]},
        epochs=2,
        batch_size=64,
        learning_rate=1e-2,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        validation_split=0.2,
        random_seed=0,  # the validation rows are get_dataset("digits").split(0.2, 0)[1]
        register_as="digits-batch",
    )
    results = Trainer(training_config=cfg, paths=paths).train()
    bundle = export_checkpoint(
        results["checkpoint_path"], home / "exports", "onnx", bundle_name="b"
    )
    return paths, bundle, results["checkpoint_path"]


def _digits(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    data = get_dataset("digits")
    return data.x[:n], data.y[:n]


def _expected(bundle, x: np.ndarray) -> dict:
    return Predictor(str(bundle)).predict(x.tolist())


def test_csv_columns_with_bad_rows_to_one_parquet_file(ray_local, model, tmp_path):
    paths, bundle, _ = model
    x, y = _digits()
    frame = pd.DataFrame({f"f{i}": x[:, i].astype(object) for i in range(64)})
    frame.insert(0, "id", np.arange(N) + 1000)
    frame.insert(1, "customer", [f"c{i}" for i in range(N)])
    frame["label"] = y  # a label column is neither a feature nor kept
    frame.loc[5, "f3"] = "abc"
    frame.loc[17, "f10"] = None
    frame.loc[100, "f0"] = "inf"
    frame.to_csv(tmp_path / "rows.csv", index=False)

    out = tmp_path / "scored.parquet"
    summary = predict(
        bundle, tmp_path / "rows.csv", out, keep=["id", "customer"], paths=paths, **FAST
    )

    assert (summary.rows_scored, summary.rows_rejected) == (N - 3, 3)
    table = pq.read_table(out).to_pandas().sort_values("id").reset_index(drop=True)
    assert list(table.columns[:3]) == ["id", "customer", "prediction"]
    assert [c for c in table.columns if c.startswith("prob_")] == [f"prob_{k}" for k in range(10)]
    good = np.setdiff1d(np.arange(N), [5, 17, 100])
    assert table["id"].tolist() == (good + 1000).tolist()
    assert table["customer"].tolist() == [f"c{i}" for i in good]
    want = _expected(bundle, x[good])
    assert table["prediction"].astype(str).tolist() == [str(p) for p in want["predictions"]]
    probs = table[[f"prob_{k}" for k in range(10)]].to_numpy()
    np.testing.assert_allclose(probs, np.asarray(want["probabilities"]), atol=1e-5)

    rejects = [json.loads(line) for line in Path(summary.rejects).read_text().splitlines()]
    by_id = {r["id"]: r for r in rejects}
    assert sorted(by_id) == [1005, 1017, 1100]
    assert by_id[1005]["reason"] == "column 'f3' is not a number: 'abc'"
    assert by_id[1017]["reason"] == "column 'f10' is empty or NaN"
    assert by_id[1100]["reason"] == "column 'f0' is infinite"
    assert by_id[1005]["row"]["customer"] == "c5" and by_id[1005]["row"]["f3"] == "abc"
    assert summary.rejects == str(tmp_path / "scored.rejects.jsonl")
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing left over


def test_jsonl_uri_list_column_with_wrong_widths_to_a_folder_via_the_registry(
    ray_local, model, tmp_path
):
    paths, _, _ = model
    x, _ = _digits(60)
    rows = [{"id": i, "x": x[i].tolist()} for i in range(60)]
    rows[7]["x"] = rows[7]["x"][:10]
    rows[8]["x"] = rows[8]["x"] + [0.0]
    (tmp_path / "in").mkdir()
    for part, chunk in enumerate((rows[:30], rows[30:])):
        text = "".join(json.dumps(r) + "\n" for r in chunk)
        (tmp_path / "in" / f"part{part}.jsonl").write_text(text)

    source = f"file://{tmp_path / 'in'}"  # a URI: read through pyarrow's filesystem
    summary = predict("digits-batch:1.0.0", source, tmp_path / "out", keep=["id"],
                      output_format="csv", paths=paths, **FAST)  # fmt: skip
    assert (summary.rows_scored, summary.rows_rejected) == (58, 2)
    parts = sorted((tmp_path / "out").glob("*.csv"))
    assert parts, "a folder of csv part files"
    table = pd.concat([pd.read_csv(p) for p in parts]).sort_values("id")
    good = [i for i in range(60) if i not in (7, 8)]
    assert table["id"].tolist() == good
    want = _expected(summary.bundle, x[good])
    assert table["prediction"].astype(str).tolist() == want["predictions"]  # names "0".."9"
    lines = Path(summary.rejects).read_text().splitlines()
    reasons = {r["id"]: r["reason"] for r in map(json.loads, lines)}
    assert reasons == {
        7: "'x' has 10 values; the model takes 64",
        8: "'x' has 65 values; the model takes 64",
    }


def test_cli_predict_and_input_problems(ray_local, model, tmp_path, capsys):
    paths, bundle, _ = model
    x, _ = _digits(40)
    table = pa.table({"id": np.arange(40), **{f"f{i}": x[:, i] for i in range(64)}})
    pq.write_table(table, tmp_path / "rows.parquet")
    out = tmp_path / "scored.jsonl"
    args = ["--home", str(paths.home), "predict", str(bundle), str(tmp_path / "rows.parquet"),
            "-o", str(out), "--keep", "id", "--batch-size", "16", "--concurrency", "1",
            "--num-cpus", "0.5", "--no-progress", "--json"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["rows_scored"] == 40
        and summary["rows_rejected"] == 0
        and summary["rejects"] is None
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == list(range(40))

    assert main(args) == 2  # the output exists: nothing is overwritten without --overwrite
    assert "already exists" in capsys.readouterr().err

    with pytest.raises(ConfigError) as info:
        predict(bundle, tmp_path / "rows.parquet", tmp_path / "o2", keep=["id", "nope"],
                features=["f0", "f1"], paths=paths, **FAST)  # fmt: skip
    text = str(info.value)
    assert "keep: column 'nope' is not in the input" in text and "takes 64 features" in text


def _top1(outputs, targets):
    return (outputs.argmax(1) == targets).float().mean()


@pytest.mark.slow
def test_two_workers_and_a_ray_dataset_give_the_in_process_metrics(ray_local, model):
    import ray.cloudpickle
    from torchmetrics.classification import MulticlassF1Score

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _top1, in the workers
    paths, _, checkpoint = model
    # your own metrics too: a torchmetrics object (states gathered) and a callable (averaged)
    mine = {"f1": MulticlassF1Score(num_classes=10, average="macro"), "top1": _top1}
    options = dict(split="val", paths=paths, record=False, metrics=mine)
    alone = evaluate(checkpoint, "digits", **options)
    pair = evaluate(checkpoint, "digits", num_workers=2, **options)
    assert pair.world_size == 2
    assert alone.metrics["f1"] == pytest.approx(alone.metrics["f1_macro"], rel=1e-5)
    assert alone.metrics["top1"] == pytest.approx(alone.metrics["accuracy"], rel=1e-6)
    # the run's validation rows (after its 10 % test split)
    assert pair.metrics["num_rows"] == alone.metrics["num_rows"] == 323
    assert pair.confusion_matrix == alone.confusion_matrix
    for key, value in alone.metrics.items():
        assert pair.metrics[key] == pytest.approx(value, rel=1e-5), key
    # The same rows handed over as a ray.data.Dataset, scored in this process.
    _, val, _ = split_for_run(
        get_dataset("digits"), TrainingConfig(validation_split=0.2, random_seed=0)
    )
    streamed = evaluate(checkpoint, val.to_ray(), paths=paths, record=False)
    assert streamed.confusion_matrix == alone.confusion_matrix
    assert streamed.metrics["loss"] == pytest.approx(alone.metrics["loss"], rel=1e-5)
