"""Experiment tracking, model registry and metrics: the record of every run and model.

- :class:`ExperimentDB`: runs, params, metrics, artifacts and data profiles.
- :class:`ModelRegistry`: content-addressed model versions, tags and lineage.
- :class:`MetricsEngine` / :class:`MetricsTracker`: epoch metrics, drift, alerts.
- :func:`model_drift`: new data against the training data of a registered model.
- :func:`log_run_to_mlflow` / :func:`export_recorded_run`: runs to MLflow (optional extra);
  :func:`read_scalars`: the TensorBoard scalars kiln wrote for a run.

All stores share one SQLite file (``kiln_home()/kiln.db``) opened through
``kiln._store`` (apsw, WAL, busy timeout, ``BEGIN IMMEDIATE``, migrations).
"""

from kiln._store import StoreError, check_sqlite_version
from kiln.tracking._artifacts import ArtifactPathError
from kiln.tracking.drift import DriftMetrics, compare_profiles, compute_profile, js_divergence
from kiln.tracking.experiments import ExperimentDB, RunStatus, collect_environment
from kiln.tracking.metrics import AlertConfig, MetricsEngine, confidence_metrics
from kiln.tracking.mlflow_export import export_recorded_run, log_run_to_mlflow
from kiln.tracking.monitoring import model_drift, reference_profile
from kiln.tracking.registry import (
    ModelRegistry,
    ModelRegistryEntry,
    ModelStatus,
    RegistryError,
    config_hash,
)
from kiln.tracking.tensorboard import read_scalars
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
    "export_recorded_run",
    "js_divergence",
    "log_run_to_mlflow",
    "model_drift",
    "read_scalars",
    "reference_profile",
]
