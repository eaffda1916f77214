"""`kiln models list` / `kiln runs list`: readable tables at 80 columns, json/csv for scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from kiln.tracking import ExperimentDB, ModelRegistry

LONG_NAME = "customer-churn-gradient-boost1"  # 30 characters


def _kiln(home: Path, *argv: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {"KILN_HOME": str(home), "COLUMNS": str(columns), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _register(home: Path) -> None:
    ckpt = home / "ckpt"
    ckpt.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, ckpt / "model.pt")
    (ckpt / "metadata.json").write_text(json.dumps({"epoch": 1}))
    db = ExperimentDB(home / "kiln.db")
    run_id = db.log_run("churn-run", {"epochs": 1}, "")
    db.close()
    reg = ModelRegistry(home / "kiln.db", home / "artifacts")
    reg.register_model(
        LONG_NAME,
        str(ckpt),
        config={"epochs": 1},
        metrics={"val_loss": 0.123456789, "test_accuracy": 0.987654321},
        task_type="classification",
        training_run_id=run_id,
    )
    reg.close()


def test_models_list_keeps_a_30_character_name_whole_at_80_columns(tmp_path):
    assert len(LONG_NAME) == 30
    _register(tmp_path)
    out = _kiln(tmp_path, "models", "list")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if LONG_NAME in line]
    assert lines, out.stdout  # `kiln models list | grep NAME` finds it
    assert f"{LONG_NAME}:1.0.0" in lines[0]
    assert "0.9877" in lines[0]  # 4 significant digits
    assert max(len(line) for line in out.stdout.splitlines()) <= 80
    assert "--wide shows every column" in out.stdout  # what did not fit is said, not wrapped
    wide = _kiln(tmp_path, "models", "list", "--wide", columns=400).stdout
    assert "0.1235" in wide and "sha256" in wide
    assert "\x1b[" not in out.stdout  # no colour codes when the output is not a terminal


def test_models_and_runs_list_as_json_and_csv(tmp_path):
    _register(tmp_path)
    models = json.loads(_kiln(tmp_path, "models", "list", "--format", "json").stdout)
    assert models[0]["name"] == LONG_NAME and models[0]["version"] == "1.0.0"
    assert models[0]["val_loss"] == 0.123456789  # scripts get full precision
    runs_csv = _kiln(tmp_path, "runs", "list", "--format", "csv").stdout.splitlines()
    assert runs_csv[0].startswith("run_id,run_name") and "churn-run" in runs_csv[1]
