"""Experiment tracking, model registry and metrics: the record of every run and model.

- :class:`ExperimentDB`: runs, params, metrics, artifacts and data profiles.
- :class:`ModelRegistry`: content-addressed model versions, tags and lineage.
- :class:`MetricsEngine` / :class:`MetricsTracker`: epoch metrics, drift, alerts.
- :func:`model_drift`: new data against the training data of a registered model.

All stores share one SQLite file (``kiln_home()/kiln.db``) opened through
``kiln._store`` (apsw, WAL, busy timeout, ``BEGIN IMMEDIATE``, migrations).
"""

from kiln._store import StoreError, check_sqlite_version
from kiln.tracking._artifacts import ArtifactPathError
from kiln.tracking.drift import DriftMetrics, compare_profiles, compute_profile, js_divergence
from kiln.tracking.experiments import ExperimentDB, RunStatus, collect_environment
from kiln.tracking.metrics import AlertConfig, MetricsEngine, confidence_metrics
from kiln.tracking.monitoring import model_drift, reference_profile
from kiln.tracking.registry import (
    ModelRegistry,
    ModelRegistryEntry,
    ModelStatus,
    RegistryError,
    config_hash,
)
from kiln.tracking.tracker import MetricsSummary, MetricsTracker

__all__ = [
    "AlertConfig",
    "ArtifactPathError",
    "DriftMetrics",
    "ExperimentDB",
    "MetricsEngine",
    "MetricsSummary",
    "MetricsTracker",
    "ModelRegistry",
    "ModelRegistryEntry",
    "ModelStatus",
    "RegistryError",
    "RunStatus",
    "StoreError",
    "check_sqlite_version",
    "collect_environment",
    "compare_profiles",
    "compute_profile",
    "config_hash",
    "confidence_metrics",
    "js_divergence",
    "model_drift",
    "reference_profile",
]
