"""The closed loop on digits: a drifted batch retrains and promotes; a clean one is skipped.

The incumbent is trained in-process; the retraining jobs run through a JobExecutor
(child processes), exactly as ``kiln worker`` runs them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.config import TrainingConfig
from kiln.data import get_dataset
from kiln.engine.trainer import Trainer
from kiln.paths import RunPaths
from kiln.queue import JobExecutor, JobManager, JobStatus, retrain_decisions
from kiln.tracking import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _write(path, x, y):
    pq.write_table(pa.table({"x": list(x.astype("float32")), "label": y.astype("int64")}), path)
    return str(path)


def test_closed_loop_retrains_on_drift_and_skips_clean_data(tmp_path):
    paths = RunPaths.resolve(tmp_path / "home")
    cfg = TrainingConfig(
        dataset="digits", epochs=2, batch_size=64, learning_rate=0.01, lr_scheduler="constant",
        warmup_ratio=0.0, validation_split=0.2, model={"name": "mlp", "hidden": [32]},
        register_as="digits", run_name="digits-incumbent",
    )  # fmt: skip
    results = Trainer(training_config=cfg, paths=paths).train()
    registry = ModelRegistry(paths.db, paths.artifacts)
    registry.promote_model(results["model_id"], "production")
    incumbent = registry.resolve("digits@production")

    data = get_dataset("digits")
    order = np.random.default_rng(0).permutation(len(data.x))
    new, hold = order[:1200], order[1200:]
    _write(tmp_path / "new-inverted.parquet", 1.0 - data.x[new], data.y[new])
    holdout = _write(tmp_path / "holdout.parquet", 1.0 - data.x[hold], data.y[hold])
    clean = _write(tmp_path / "clean.parquet", data.x[new[:600]], data.y[new[:600]])

    manager = JobManager(paths=paths)
    trigger = {"degradation_threshold": 1.0, "min_days_between_retrains": 0, "drift_threshold": 0.3}
    job = {"model": "digits@production", "holdout": holdout, "trigger": trigger, "margin": 0.05,
           "epochs": 2}  # fmt: skip
    skipped = manager.submit_job("retraining", {**job, "data": clean}, priority=9)
    drifted = {**job, "data": str(tmp_path / "new-*.parquet"), "warm_start": True}
    retrained = manager.submit_job("retraining", drifted)
    counts = JobExecutor(manager).run_worker(max_jobs=2, poll_s=0.1)
    assert counts["completed"] == 2, [
        manager.get_job(i).error_message for i in (skipped, retrained)
    ]

    # Clean data: nothing trained, the decision and its reasons recorded.
    first = manager.get_job(skipped)
    assert first.status is JobStatus.COMPLETED and first.result.startswith("skipped")
    assert first.details["action"] == "skipped"
    assert any(
        r.startswith("drift ") and "< threshold 0.300" in r for r in first.details["reasons"]
    )
    assert "candidate" not in first.details and "holdout" not in first.details["numbers"]

    # Inverted digits: drift fires, a candidate trains, beats the incumbent on the holdout,
    # takes the tag, and points back at the incumbent.
    second = manager.get_job(retrained)
    assert second.status is JobStatus.COMPLETED, second.error_message
    details = second.details
    assert details["action"] == "promoted" and "drift" in details["trigger"]["fired"]
    assert details["numbers"]["drift"]["status"] == "critical"
    hold_scores = details["numbers"]["holdout"]
    assert hold_scores["candidate"]["loss"] < 0.95 * hold_scores["incumbent"]["loss"]
    champion = registry.resolve("digits@production")
    assert champion.model_id == details["candidate_id"] != incumbent.model_id
    assert champion.parent_model_id == incumbent.model_id
    assert champion.description.endswith("(warm start)")
    from kiln.tracking import ExperimentDB

    run = ExperimentDB(paths.db).get_run(champion.training_run_id)
    assert (
        run["params"]["resumed_from"]
        == registry.load_checkpoint_path(incumbent.model_id).as_posix()
    )
    assert [e.model_id for e in registry.lineage(champion.model_id)] == [
        champion.model_id, incumbent.model_id,
    ]  # fmt: skip
    assert second.result == f"{champion.ref} promoted to production"
    assert len(registry.list_models()) == 2  # the clean batch trained nothing

    decisions = retrain_decisions(paths=paths, model="digits")
    assert list(decisions["action"]) == ["promoted", "skipped"]
    assert list(decisions["job_id"]) == [retrained, skipped]
    assert decisions.loc[0, "candidate_id"] == champion.model_id
    assert any("holdout loss: candidate" in r for r in decisions.loc[0, "reasons"])
