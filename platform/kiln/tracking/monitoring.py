"""Is a registered model still good? Drift of new data against its training data.

Every Trainer run stores a profile of its training inputs (and of the model's
predictions) with the run; a registered model points at that run. This module
compares a new batch of inputs with that profile.

    from kiln.tracking import ExperimentDB, ModelRegistry, model_drift
    drift = model_drift(ModelRegistry(db, artifacts), ExperimentDB(db), "digits@production", x)
    print(drift.status, drift.affected_features)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kiln.errors import DriftError, NotFoundError
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


def inputs_like_profile(
    profile: Mapping[str, Any], table: Any, label: str | None = None
) -> np.ndarray:
    """The feature matrix of ``table`` (a DataFrame) in the order the profile lists them.

    Columns are matched by name when the profile's features are the data's own column
    names; otherwise every numeric column but ``label`` is taken in order, and their
    count must match the profile's. Raises DriftError saying which columns are missing.
    """
    if label is not None and label not in table.columns:
        raise DriftError(
            f"label={label!r} is not a column of the data; columns: {list(table.columns)}"
        )
    frame = table.drop(columns=[label]) if label is not None else table
    order = list(profile.get("feature_order") or profile.get("features") or [])
    if order and all(name in frame.columns for name in order):
        return frame[order].to_numpy(dtype=np.float32)
    numeric = frame.select_dtypes(include="number")
    dropped = [c for c in frame.columns if c not in numeric.columns]
    if profile.get("reduction", "none") == "none" and numeric.shape[1] != len(order):
        named = not all(str(n).startswith("feature_") for n in order)
        missing = [n for n in order if n not in frame.columns] if named else []
        raise DriftError(
            f"the data has {numeric.shape[1]} numeric feature columns but the model was "
            f"trained on {len(order)}"
            + (f"; missing by name: {missing[:10]}" if missing else "")
            + (f"; non-numeric columns left out: {dropped}" if dropped else "")
            + ("" if label else "; if one column is the label, pass --label COLUMN")
        )
    return numeric.to_numpy(dtype=np.float32)


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
