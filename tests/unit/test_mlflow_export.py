"""kiln runs to MLflow: params, per-epoch metrics, tags and the best checkpoint, read back
from a local MLflow file store."""

from __future__ import annotations

import sys

import pytest

from kiln.cli import main
from kiln.errors import ConfigError
from kiln.tracking.mlflow_export import export_recorded_run, log_run_to_mlflow
from kiln.tracking.recorder import RunRecorder

pytest.importorskip("mlflow")

HISTORY = [
    {"epoch": 1, "train_loss": 1.0, "val_loss": 1.5, "val_f1": 0.5, "timestamp": 1_700_000_000.0,
     "global_step": 3, "steps": [{"step": 3, "loss": 0.875, "lr": 0.1}]},
    {"epoch": 2, "train_loss": 0.5, "val_loss": 1.25, "val_f1": 0.75, "timestamp": 1_700_000_009.0,
     "global_step": 6},
]  # fmt: skip
CONFIG = {"learning_rate": 0.01, "model": {"name": "mlp", "hidden": [16, 8]}, "notes": None}


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A local MLflow file store (MLflow 3 asks for this opt-in to use one)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file://{tmp_path / 'mlruns'}"


@pytest.fixture()
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoints" / "epoch_0002"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "metadata.json").write_text('{"epoch": 2}')
    return folder


def _read(store: str, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    artifacts = [a.path for a in client.list_artifacts(run_id, "best_checkpoint")]
    experiment = client.get_experiment(run.info.experiment_id).name
    return run, history, artifacts, experiment


def _active(store: str, experiment: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    found = client.get_experiment_by_name(experiment)
    return [r.info.run_id for r in client.search_runs([found.experiment_id])]


def _lifecycle(store: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store).get_run(run_id).info.lifecycle_stage


def test_a_finished_run_lands_in_mlflow_with_params_metrics_tags_and_checkpoint(store, checkpoint):
    run_id = log_run_to_mlflow(
        "digits-1",
        config=CONFIG,
        history=HISTORY,
        params={"custom_metrics": {"f1": "MulticlassF1Score"}},
        tags={"kiln.run_id": 7, "empty": None},
        checkpoint=str(checkpoint),
        tracking_uri=store,
    )
    run, history, artifacts, experiment = _read(store, run_id)
    assert experiment == "kiln" and run.info.run_name == "digits-1"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["learning_rate"] == "0.01" and params["model.hidden"] == "[16, 8]"
    assert params["model.name"] == "mlp" and params["custom_metrics.f1"] == "MulticlassF1Score"
    assert "notes" not in params  # None is left out
    assert history["val_f1"] == [(1, 0.5), (2, 0.75)]
    assert history["train_loss"] == [(1, 1.0), (2, 0.5)]
    assert history["step_loss"] == [(3, 0.875)] and history["step_lr"] == [(3, 0.1)]
    assert "global_step" not in history and "timestamp" not in history
    tags = run.data.tags
    assert tags["kiln.run_id"] == "7" and tags["kiln.run_name"] == "digits-1"
    assert tags["kiln.source"] == "kiln" and "empty" not in tags
    assert sorted(artifacts) == ["best_checkpoint/metadata.json", "best_checkpoint/model.pt"]


def test_kiln_runs_export_sends_a_recorded_run(store, checkpoint, tmp_path, capsys):
    db = tmp_path / "kiln.db"
    recorder = RunRecorder(db, tmp_path / "artifacts")
    run = recorder.start("iris-run", CONFIG, {"dataset": "iris"}, notes="first try")
    recorder.complete(run, "stopped", HISTORY, [str(checkpoint)], final_metrics={"test_loss": 0.25})
    code = main(["--db", str(db), "runs", "export", "iris-run", "--to", "mlflow",
                 "--tracking-uri", store, "--experiment", "exported"])  # fmt: skip
    assert code == 0
    mlflow_id = capsys.readouterr().out.split("MLflow run ")[1].split()[0]
    found, history, artifacts, experiment = _read(store, mlflow_id)
    assert experiment == "exported" and found.info.status == "FINISHED"  # early stop
    assert history["val_f1"] == [(1, 0.5), (2, 0.75)]
    assert history["step_loss"] == [(3, 0.875)]
    assert history["test_loss"] == [(0, 0.25)]  # scored once, after the epochs
    assert found.data.params["dataset"] == "iris" and found.data.params["model.name"] == "mlp"
    tags = found.data.tags
    assert tags["kiln.run_id"] == str(run) and tags["kiln.status"] == "stopped"
    assert tags["mlflow.note.content"] == "first try"
    assert "best_checkpoint/model.pt" in artifacts
    assert tags["kiln.run_key"].startswith("iris-run@")
    # the function form, as the CLI calls it; another experiment keeps its own copy
    elsewhere = export_recorded_run(db, run, tracking_uri=store)
    assert elsewhere != mlflow_id and _active(store, "kiln") == [elsewhere]
    # Sent again to the same experiment: the new export replaces the earlier one ...
    again = export_recorded_run(db, run, tracking_uri=store, experiment="exported")
    assert _active(store, "exported") == [again] and again != mlflow_id
    assert _lifecycle(store, mlflow_id) == "deleted"
    # ... but another kiln run of the same name is another MLflow run.
    twin = recorder.start("iris-run", CONFIG, {"dataset": "iris"})
    recorder.complete(twin, "completed", HISTORY, [str(checkpoint)])
    other = export_recorded_run(db, twin, tracking_uri=store, experiment="exported")
    assert sorted(_active(store, "exported")) == sorted([again, other])
    # an unknown run is kiln's not-found error
    assert main(["--db", str(db), "runs", "export", "nope", "--to", "mlflow",
                 "--tracking-uri", store]) != 0  # fmt: skip


def test_without_mlflow_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if absent
    with pytest.raises(ConfigError, match=r"pip install 'kiln\[mlflow\]'"):
        log_run_to_mlflow("r", config={}, history=HISTORY, tracking_uri=f"file://{tmp_path}")


def test_a_failing_tracker_is_a_warning_and_the_run_keeps_its_results(tmp_path, monkeypatch):
    from kiln.config import TrainingConfig
    from kiln.engine.trainer import _report_elsewhere
    from kiln.tracking.tensorboard import LiveTensorBoard

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://anywhere")  # no such tracking store
    results = {"history": HISTORY, "task": {"task_type": "classification"}}
    cfg = TrainingConfig(report_to=["mlflow"])
    live = LiveTensorBoard(tmp_path / "run" / "tensorboard")
    _report_elsewhere(cfg, "r", results, 5, {}, live)
    assert "nosuchstore://anywhere" in results["report_errors"]["mlflow"]
    assert "mlflow_run_id" not in results
    assert (tmp_path / "run" / "tensorboard").is_dir()  # the other writer still ran
