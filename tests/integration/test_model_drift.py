"""Drift of new data against a registered model's training data (issue 3, item 3)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kiln import Trainer, TrainingConfig
from kiln.data import get_dataset
from kiln.errors import NotFoundError
from kiln.tracking import ExperimentDB, ModelRegistry, model_drift


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    home = tmp_path_factory.mktemp("drift_home")
    cfg = TrainingConfig(
        dataset="iris",
        epochs=2,
        batch_size=16,
        learning_rate=1e-2,
        register_as="iris-drift",
        model={"name": "mlp", "hidden": [16]},
    )
    Trainer(
        training_config=cfg,
        storage_path=home / "runs",
        db_path=home / "kiln.db",
        artifacts_dir=home / "artifacts",
    ).train()
    registry = ModelRegistry(home / "kiln.db", home / "artifacts")
    registry.promote_model(registry.resolve("iris-drift").model_id, "production")
    return home, registry, ExperimentDB(home / "kiln.db")


def test_same_data_is_healthy_and_shifted_data_is_critical(registered):
    _, registry, db = registered
    x = get_dataset("iris").x
    assert model_drift(registry, db, "iris-drift@production", x).status == "healthy"
    shifted = model_drift(registry, db, "iris-drift@production", x + 5.0)
    assert shifted.status == "critical"
    assert len(shifted.affected_features) == x.shape[1]


def test_model_without_run_has_no_profile(registered, tmp_path):
    _, registry, db = registered
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights")
    registry.register_model("orphan", ckpt)
    with pytest.raises(NotFoundError, match="without a training run"):
        model_drift(registry, db, "orphan", np.zeros((4, 4)))


def test_cli_drift_reports_status_and_fails_on_critical(registered, tmp_path):
    home, _, _ = registered
    data = tmp_path / "batch.npy"
    np.save(data, get_dataset("iris").x + 5.0)
    base = [
        sys.executable,
        "-m",
        "kiln.cli",
        "--db",
        str(home / "kiln.db"),
        "models",
        "drift",
        "iris-drift@production",
    ]
    ok = subprocess.run(base + ["iris"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "status: healthy" in ok.stdout
    bad = subprocess.run(
        base + [str(data), "--fail-on-critical"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 3, bad.stderr
    assert "status: critical" in bad.stdout
