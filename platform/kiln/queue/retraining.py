"""The closed loop: measure a served model on new data, retrain if needed, promote if better.

A ``retraining`` job, for ``{"model": "digits@production", "data": "new/*.parquet",
"holdout": "holdout.parquet", "trigger": {...}, "margin": 0.0}``:

1. evaluates the incumbent (the model holding the tag) on the new data, and scores the
   drift of the new inputs against its training data (:func:`kiln.tracking.model_drift`);
2. asks the :class:`RetrainingTrigger` (degradation of ``monitor_metric`` against the
   incumbent's registered metrics, drift, days since the last retrain);
3. if it fires, trains a candidate with the incumbent's recorded config and task on the
   new data (``warm_start``: continuing from the incumbent's checkpoint), registers it
   with the incumbent as its parent;
4. evaluates candidate and incumbent on the same holdout and moves the tag to the
   candidate only if it beats the incumbent's ``monitor_metric`` by more than
   ``margin`` (relative). ``kiln serve NAME@TAG --reload-on-promote`` then serves it.

Every decision (``skipped``, ``rejected``: trained but not promoted, ``promoted``) is
recorded with its reasons and numbers; :func:`retrain_decisions` lists them.
"""

from __future__ import annotations

import glob
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from kiln._store import Store
from kiln.errors import KilnError
from kiln.paths import RunPaths
from kiln.queue._schema import COMPONENT, MIGRATIONS, iso
from kiln.queue.triggers import RetrainingTrigger, TriggerDecision

__all__ = ["retrain", "retrain_decisions"]


def retrain(config: dict[str, Any], paths: RunPaths, job_id: int | None = None) -> tuple[str, dict]:
    """Run the loop for one registered model; return ``(result, decision details)``."""
    from kiln.queue.handlers import evaluate_arrays, load_arrays, load_registered
    from kiln.tracking import ExperimentDB, ModelRegistry, model_drift

    ref = config["model"]
    tag = config.get("tag") or ref.rsplit("@", 1)[1]
    trigger = RetrainingTrigger(**config.get("trigger", {}))
    store = _store(paths)
    registry, db = ModelRegistry(paths.db, paths.artifacts), ExperimentDB(paths.db)
    try:
        model, meta, incumbent = load_registered(ref, paths)
        record = dict(job_id=job_id, name=incumbent.name, incumbent=incumbent.model_id)
        if not _has_data(config["data"]):  # a schedule fired before new data arrived
            reasons = [f"no new data: data={config['data']!r} matches no file"]
            _record(store, **record, action="skipped", reasons=reasons, numbers={"rows": 0})
            return f"skipped: {reasons[0]}", {"action": "skipped", "reasons": reasons}
        x_new, y_new = load_arrays(config["data"], paths)
        current = _as_val(evaluate_arrays(model, meta, x_new, y_new))
        numbers: dict[str, Any] = {"rows": len(x_new), "current": current}
        numbers["reference"] = {k: incumbent.metrics.get(k) for k in current}
        drift_score, drift_note = None, None
        try:
            drift = model_drift(
                registry, db, incumbent.ref, x_new, critical=trigger.drift_threshold
            )
            drift_score = drift.js_divergence
            numbers["drift"] = {
                "score": drift.js_divergence,
                "status": drift.status,
                "affected_features": drift.affected_features[:10],
            }
        except KilnError as exc:
            drift_note = f"no drift score: {exc}"
        decision = trigger.decide(
            current, incumbent.metrics, drift_score, _last_retrain(store, incumbent.name)
        )
        reasons = [*decision.reasons, *([drift_note] if drift_note else [])]
        if not decision.retrain:
            _record(store, **record, action="skipped", reasons=reasons, numbers=numbers)
            return f"skipped: {'; '.join(reasons)}", _details("skipped", reasons, numbers, decision)
        candidate_id = _train_candidate(config, paths, incumbent, meta, x_new, y_new, job_id)
        numbers["candidate_run_id"] = registry.get_model(model_id=candidate_id).training_run_id
        x_hold, y_hold = load_arrays(config["holdout"], paths)
        cand_model, cand_meta, candidate = load_registered(
            registry.get_model(model_id=candidate_id).ref, paths
        )
        numbers["holdout"] = {
            "incumbent": evaluate_arrays(model, meta, x_hold, y_hold),
            "candidate": evaluate_arrays(cand_model, cand_meta, x_hold, y_hold),
        }
        better, why = _gate(trigger, numbers["holdout"], float(config.get("margin", 0.0)))
        reasons.append(why)
        action = "promoted" if better else "rejected"
        if better:
            registry.promote_model(candidate_id, tag)
            reasons.append(f"{candidate.ref} now holds {tag!r} (was {incumbent.ref})")
        _record(store, **record, candidate=candidate_id, action=action, reasons=reasons,
                numbers=numbers)  # fmt: skip
        details = _details(action, reasons, numbers, decision)
        details |= {"candidate": candidate.ref, "candidate_id": candidate_id}
        verb = f"promoted to {tag}" if better else "trained, not promoted"
        return f"{candidate.ref} {verb}", details
    finally:
        registry.close()
        db.close()
        store.close()


def retrain_decisions(
    db_path: str | os.PathLike[str] | None = None,
    model: str | None = None,
    *,
    paths: RunPaths | None = None,
) -> pd.DataFrame:
    """Recorded retraining decisions, newest first (optionally of one model name)."""
    where = (paths or RunPaths.resolve()).with_overrides(db=db_path)
    store = _store(where)
    try:
        sql = "SELECT * FROM retrain_decisions"
        args: tuple = ()
        if model is not None:
            sql, args = sql + " WHERE model_name = ?", (model.split("@")[0].split(":")[0],)
        rows = store.query_dicts(sql + " ORDER BY decision_id DESC", args)
    finally:
        store.close()
    for row in rows:
        row["reasons"], row["numbers"] = json.loads(row["reasons"]), json.loads(row["numbers"])
    columns = ["decision_id", "job_id", "model_name", "incumbent_id", "candidate_id", "action",
               "reasons", "numbers", "at"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


# -- pieces ------------------------------------------------------------------------------


def _train_candidate(config, paths, incumbent, meta, x, y, job_id) -> int:
    from kiln.config import TaskSpec, TrainingConfig
    from kiln.engine.trainer import Trainer
    from kiln.queue.handlers import _scalars
    from kiln.tracking import ModelRegistry

    recorded = dict(incumbent.config or meta.get("training_config") or {})
    cfg = TrainingConfig.from_dict(recorded).replace(
        dataset=None,
        run_name=f"{incumbent.name}-retrain" + (f"-job{job_id}" if job_id else ""),
        register_as=None,  # registered below, with the incumbent as parent
        tracking=True,
        tracking_db=None,
        checkpoint_dir=None,
        export_formats=[],
        notes=f"retraining of {incumbent.ref}" + (f" (job {job_id})" if job_id else ""),
        **({"epochs": int(config["epochs"])} if "epochs" in config else {}),
    )
    task = TaskSpec.from_dict(meta["task_spec"]) if meta.get("task_spec") else None
    registry = ModelRegistry(paths.db, paths.artifacts)
    resume = None
    if config.get("warm_start"):  # continue from the incumbent's weights and optimizer state
        resume = str(registry.load_checkpoint_path(incumbent))
        done = int(meta.get("epoch") or 0)
        cfg = cfg.replace(epochs=done + int(config.get("epochs", cfg.epochs)))
    results = Trainer(training_config=cfg, task_spec=task, paths=paths).train(
        (x, y), resume_from=resume
    )
    try:
        return registry.register_model(
            incumbent.name,
            results["checkpoint_path"],
            config={**cfg.to_dict(), "dataset": config["data"]},
            metrics={
                k: v
                for k, v in _scalars(results["final_metrics"]).items()
                if k not in ("epoch", "timestamp", "global_step")
            },
            task_type=incumbent.task_type,
            training_run_id=results.get("run_id"),
            parent_model_id=incumbent.model_id,
            description=f"retrained from {incumbent.ref} on {config['data']}"
            + (" (warm start)" if resume else ""),
        )
    finally:
        registry.close()


def _gate(trigger: RetrainingTrigger, holdout: dict[str, dict], margin: float) -> tuple[bool, str]:
    key = trigger.monitor_metric.removeprefix("val_")
    inc, cand = holdout["incumbent"], holdout["candidate"]
    mode = trigger.mode
    if key not in inc or key not in cand:
        key, mode = "loss", "min"
    a, b = inc[key], cand[key]
    gain = (a - b if mode == "min" else b - a) / (abs(a) or 1.0)
    verdict = "better" if gain > margin else "not better"
    return gain > margin, (
        f"holdout {key}: candidate {b:.4f} vs incumbent {a:.4f} ({gain * 100:+.1f}%, "
        f"margin {margin * 100:.1f}%): {verdict}"
    )


def _has_data(source: str) -> bool:
    if any(c in source for c in "*?["):
        return bool(glob.glob(str(Path(source).expanduser())))
    return True  # a dataset id or a path: loading it reports what is wrong


def _as_val(metrics: dict[str, float]) -> dict[str, float]:
    """Evaluation metrics named like the registered ones (``loss`` -> ``val_loss``)."""
    return {f"val_{k}": v for k, v in metrics.items() if k != "rows"}


def _details(action, reasons, numbers, decision: TriggerDecision) -> dict[str, Any]:
    return {"action": action, "reasons": reasons, "numbers": numbers, "trigger": decision.to_dict()}


def _store(paths: RunPaths) -> Store:
    store = Store(paths.db)
    store.migrate(COMPONENT, MIGRATIONS)
    return store


def _last_retrain(store: Store, name: str) -> str | None:
    rows = store.query(
        "SELECT at FROM retrain_decisions WHERE model_name = ? AND action != 'skipped' "
        "ORDER BY decision_id DESC LIMIT 1",
        (name,),
    )
    return rows[0][0] if rows else None


def _record(store: Store, *, job_id, name, incumbent, action, reasons, numbers, candidate=None):
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO retrain_decisions(job_id, model_name, incumbent_id, candidate_id, "
            "action, reasons, numbers, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, name, incumbent, candidate, action, json.dumps(reasons),
             json.dumps(numbers, default=float), iso(_now())),
        )  # fmt: skip


def _now() -> datetime:
    return datetime.now(timezone.utc)
