"""kill -9 the driver (`kiln train`) mid-run, then resume it.

The killed run's row is closed as ``interrupted`` by the next kiln that looks
(`kiln runs list`), with its last checkpoint's time; `kiln train ... --resume latest`
continues from that checkpoint and completes. In-process training (``--workers 0``)
starts no Ray, so the SIGKILL leaves nothing else behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from drill_record import record

from kiln.engine.checkpoint import read_metadata, resolve_checkpoint
from kiln.tracking.experiments import ExperimentDB

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 60  # iris in batches of 4: 10-20 ms an epoch, so the kill lands mid-run
RUN_FILE = (
    f"dataset: iris\nepochs: {EPOCHS}\nrun_name: drill\nkeep_last_n: 2\nbatch_size: 4\n"
    "task:\n  task_type: classification\n"
)


def _kiln(home: Path, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, KILN_HOME=str(home))
    return subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _wait_for_checkpoint(home: Path, proc: subprocess.Popen, epoch: int) -> Path:
    deadline = time.monotonic() + 180
    name = f"epoch_{epoch:04d}"
    while time.monotonic() < deadline:
        # epoch_0002 or any later one: retention may have pruned it already
        found = [
            p
            for p in home.glob("runs/drill-*/checkpoints/epoch_*/metadata.json")
            if p.parent.name >= name
        ]
        if found:
            return found[0].parent.parent
        assert proc.poll() is None, f"kiln train ended early: {proc.communicate()[0][-3000:]}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {name} within 180 s")


def test_kill_driver_then_resume(tmp_path):
    home = tmp_path / "home"
    run_file = tmp_path / "run.yaml"
    run_file.write_text(RUN_FILE)
    proc = _kiln(home, "train", str(run_file), "--workers", "0")
    checkpoints = _wait_for_checkpoint(home, proc, 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    latest = resolve_checkpoint("latest", checkpoints)
    killed_at = int(read_metadata(latest)["epoch"])
    assert 2 <= killed_at < EPOCHS
    db = ExperimentDB(home / "kiln.db")
    assert db.get_run(1)["status"] == "running"  # nobody has looked yet
    db.close()

    listing = _kiln(home, "runs", "list", "--format", "json")
    out, _ = listing.communicate(timeout=120)
    assert listing.returncode == 0, out
    rows = {r["run_id"]: r for r in json.loads(out)}
    assert rows[1]["status"] == "interrupted"
    latest = resolve_checkpoint("latest", checkpoints)  # the driver may have saved once more
    assert rows[1]["ended_at"] == read_metadata(latest)["timestamp"]
    db = ExperimentDB(home / "kiln.db")
    run = db.get_run(1)
    assert str(latest) in run["error"] and "--resume latest" in run["error"]
    db.close()

    started = time.monotonic()
    resumed = _kiln(home, "train", str(run_file), "--workers", "0", "--resume", "latest")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    resume_s = time.monotonic() - started
    db = ExperimentDB(home / "kiln.db")
    run = db.get_run(2)
    assert run["status"] == "completed"
    assert run["params"]["resumed_from"] == str(latest)
    epochs = sorted(db.get_metrics(2, "train_loss")["epoch"].astype(int))
    assert epochs == list(range(1, EPOCHS + 1)), epochs  # restored history + the rest, once each
    assert db.get_run(1)["status"] == "interrupted"
    db.close()
    last = int(
        read_metadata(resolve_checkpoint("latest", home / "runs" / run["run_name"]))["epoch"]
    )
    assert last == EPOCHS
    record(
        "faults_driver_kill",
        {
            "killed_after_epoch": int(read_metadata(latest)["epoch"]),
            "epochs": EPOCHS,
            "resume_s": round(resume_s, 1),
        },
    )
