"""Is a registered model still good? Drift of new data against its training data.

Every Trainer run stores a profile of its training inputs (and of the model's
predictions) with the run; a registered model points at that run. This module
compares a new batch of inputs with that profile.

    from kiln.tracking import ExperimentDB, ModelRegistry, model_drift
    drift = model_drift(ModelRegistry(db, artifacts), ExperimentDB(db), "digits@production", x)
    print(drift.status, drift.affected_features)
"""

from __future__ import annotations

from typing import Any

from kiln.errors import NotFoundError
from kiln.tracking.drift import DriftMetrics, compare_profiles
from kiln.tracking.experiments import ExperimentDB
from kiln.tracking.registry import ModelRegistry


def reference_profile(registry: ModelRegistry, db: ExperimentDB, ref: str) -> dict[str, Any]:
    """The training-data profile of the run that produced ``ref`` (NAME, NAME:VER, NAME@TAG)."""
    entry = registry.resolve(ref)
    if entry.training_run_id is None:
        raise NotFoundError(
            f"{entry.ref} was registered without a training run, so it has no data profile; "
            "models registered by Trainer(register_as=...) have one"
        )
    profile = db.get_profile(entry.training_run_id)
    if not profile:
        raise NotFoundError(
            f"run {entry.training_run_id} (which trained {entry.ref}) has no stored data profile"
        )
    return profile


def model_drift(
    registry: ModelRegistry,
    db: ExperimentDB,
    ref: str,
    x: Any,
    *,
    warning: float = 0.1,
    critical: float = 0.2,
) -> DriftMetrics:
    """Jensen-Shannon drift of inputs ``x`` [N, ...] against the training data of ``ref``."""
    return compare_profiles(
        reference_profile(registry, db, ref), x, warning=warning, critical=critical
    )
