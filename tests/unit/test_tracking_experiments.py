"""ExperimentDB: runs, params, metrics, artifacts, best run, comparison, groups."""

from __future__ import annotations

import math

import pytest

from kiln.errors import RunNotFoundError
from kiln.tracking import ExperimentDB, RunStatus, collect_environment


@pytest.fixture()
def db(tmp_path):
    return ExperimentDB(tmp_path / "kiln.db")


def _run(db, name, losses, group=None):
    run_id = db.log_run(name, {"lr": 0.1, "name": name}, notes="n", group=group)
    for epoch, loss in enumerate(losses):
        db.log_metrics(run_id, {"train_loss": loss + 0.1, "val_loss": loss}, epoch=epoch)
    db.finish_run(run_id, "completed")
    return run_id


def test_run_record_round_trip(db):
    run_id = db.log_run("baseline", {"lr": 0.01, "layers": [4, 2]}, notes="first")
    db.log_params(run_id, {"seed": 7, "torch_version": "2.x"})
    db.log_metric(run_id, "val/loss", 0.5, epoch=0)
    db.log_metric(run_id, "val/loss", 0.4, epoch=1, step=10)
    db.log_artifact(run_id, "checkpoint", "/ckpt/epoch_1")
    db.set_profile(run_id, {"features": {}})
    run = db.get_run(run_id)
    assert run["status"] == "running" and run["ended_at"] is None
    db.finish_run(run_id, "failed", error="RuntimeError: boom")

    run = db.get_run("baseline")
    assert run["run_id"] == run_id
    assert run["config"] == {"lr": 0.01, "layers": [4, 2]}
    assert run["params"] == {"seed": 7, "torch_version": "2.x"}
    assert run["status"] == "failed" and run["error"] == "RuntimeError: boom"
    assert run["duration_s"] >= 0
    assert run["artifacts"][0]["path"] == "/ckpt/epoch_1"
    assert run["metrics"] == {"val/loss": 0.4}
    assert db.get_profile(run_id) == {"features": {}}

    m = db.get_metrics(run_id)
    assert list(m.columns) == ["run_id", "name", "value", "epoch", "step", "timestamp"]
    assert list(m["value"]) == [0.5, 0.4]
    assert list(m["epoch"]) == [0, 1]
    assert m["step"].isna().tolist() == [True, False]


def test_run_ids_are_ints_and_unnamed_runs_get_a_name(db):
    first, second = db.log_run(), db.log_run()
    assert isinstance(first, int) and second == first + 1
    assert db.get_run(second)["run_name"] == f"run-{second}"


def test_log_metrics_writes_all_values_of_one_epoch(db):
    run_id = db.log_run("r")
    db.log_metrics(run_id, {"a": 1.0, "b": float("nan"), "c": 3}, epoch=2)
    m = db.get_metrics(run_id)
    assert set(m["name"]) == {"a", "b", "c"} and set(m["epoch"]) == {2}
    assert math.isnan(m.set_index("name").loc["b", "value"])


def test_unknown_runs_raise_a_keyerror_naming_what_exists(db):
    _run(db, "exists", [0.5])
    for call in (
        lambda: db.get_run(999),
        lambda: db.get_run("nope"),
        lambda: db.log_metric(999, "x", 1.0),
        lambda: db.finish_run(999, "completed"),
    ):
        with pytest.raises(KeyError) as info:
            call()
        assert isinstance(info.value, RunNotFoundError)
        assert "exists" in str(info.value)


def test_bad_status_is_rejected_with_the_allowed_ones(db):
    run_id = db.log_run("r")
    with pytest.raises(ValueError, match="completed, failed, stopped"):
        db.finish_run(run_id, "done")
    assert RunStatus.COMPLETED.is_terminal and not RunStatus.RUNNING.is_terminal


def test_best_run_and_comparison(db):
    a = _run(db, "a", [0.9, 0.5, 0.6])
    b = _run(db, "b", [0.8, 0.3, 0.4])
    best = db.get_best_run("val_loss", mode="min")
    assert best == {"run_name": "b", "run_id": b, "best_value": 0.3, "epoch": 1, "step": None}
    assert db.get_best_run("val_loss", mode="max")["run_id"] == a
    with pytest.raises(RunNotFoundError, match="val_loss"):
        db.get_best_run("accuracy")
    with pytest.raises(ValueError, match="mode"):
        db.get_best_run("val_loss", mode="best")

    df = db.compare_runs([a, "b"], metrics=["val_loss", "missing"])
    assert list(df["run_id"]) == [a, b]
    assert list(df["val_loss"]) == [0.6, 0.4]
    assert df["missing"].isna().all()
    assert list(db.compare_runs([a, b], agg="min")["val_loss"]) == [0.5, 0.3]


def test_list_runs_filters_by_group_and_status(db):
    t1 = _run(db, "trial-1", [0.5], group="search-1")
    t2 = _run(db, "trial-2", [0.4], group="search-1")
    other = db.log_run("other")
    df = db.list_runs()
    assert list(df["run_id"]) == [other, t2, t1]  # newest first
    assert {"run_id", "run_name", "group", "status", "duration_s"} <= set(df.columns)
    assert list(db.list_runs(group="search-1")["run_id"]) == [t2, t1]
    assert list(db.list_runs(status="running")["run_id"]) == [other]
    assert db.get_best_run("val_loss", group="search-1")["run_id"] == t2
    assert len(db.list_runs(limit=1)) == 1


def test_collect_environment_has_versions_and_git_commit(tmp_path):
    import subprocess

    env = collect_environment(tmp_path)
    assert env["kiln_version"] and env["torch_version"] and env["ray_version"]
    assert env["python_version"] and env["hostname"]
    assert env["git_commit"] is None  # not a repository
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
         "-m", "x"], cwd=tmp_path, check=True,
    )  # fmt: skip
    assert len(collect_environment(tmp_path)["git_commit"]) == 40
