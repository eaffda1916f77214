"""kill -9 inside a registry write and a run record: SQLite's transaction holds.

A child process opens kiln's database and SIGKILLs itself in the middle of one
``BEGIN IMMEDIATE`` transaction, right after the k-th write statement of it ran. The
database must then pass ``PRAGMA integrity_check``, hold none of that transaction's
rows, keep everything committed before it, and take the next write at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kiln._store import Store
from kiln.engine.checkpoint import CheckpointManager
from kiln.tracking.experiments import ExperimentDB
from kiln.tracking.registry import ModelRegistry

pytestmark = pytest.mark.integration

# Runs ``case`` with Store.transaction's cursor replaced by one that SIGKILLs the process
# after ``after`` write statements (executemany runs its rows one by one).
_CHILD = textwrap.dedent(
    """
    import contextlib, os, signal, sys
    from kiln._store import Store

    case, db, artifacts, after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    real_transaction = Store.transaction

    class Dying:
        def __init__(self, cur):
            self.cur, self.writes = cur, 0

        def execute(self, sql, params=()):
            out = self.cur.execute(sql, params)
            if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
                self.writes += 1
                if self.writes >= after:
                    os.kill(os.getpid(), signal.SIGKILL)
            return out

        def executemany(self, sql, rows):
            for row in rows:
                self.execute(sql, row)

    @contextlib.contextmanager
    def transaction(self):
        with real_transaction(self) as cur:
            yield Dying(cur)

    Store.transaction = transaction
    if case in ("register", "promote"):
        from kiln.tracking.registry import ModelRegistry
        reg = ModelRegistry(db, artifacts)
        if case == "register":
            path = os.path.join(os.path.dirname(db), "v2.pt")
            with open(path, "wb") as f:
                f.write(b"weights-2")
            reg.register_model("iris", path, tags=["prod"], metrics={"acc": 0.9})
        else:
            reg.promote_model(2, "prod")
    else:
        from kiln.tracking.experiments import ExperimentDB
        db = ExperimentDB(db)
        if case == "metrics":
            db.log_metrics(1, {f"m{i}": float(i) for i in range(6)}, epoch=2)
        elif case == "new_run":
            db.log_run(None, {"lr": 0.1})  # INSERT, then UPDATE of the generated name
        elif case == "finish":
            db.finish_run(1, "completed")
    os._exit(0)  # the transaction committed: the kill point was never reached
    """
)


def _kill_inside(tmp_path: Path, case: str, after: int) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            case,
            str(tmp_path / "kiln.db"),
            str(tmp_path / "artifacts"),
            str(after),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, f"{case}: exit {proc.returncode}: {proc.stderr[-2000:]}"


def _integrity(tmp_path: Path) -> None:
    store = Store(tmp_path / "kiln.db")
    try:
        assert store.query("PRAGMA integrity_check") == [("ok",)]
        assert store.query("PRAGMA foreign_key_check") == []
    finally:
        store.close()


def _registry(tmp_path: Path) -> ModelRegistry:
    v1 = tmp_path / "v1.pt"
    v1.write_bytes(b"weights-1")
    reg = ModelRegistry(tmp_path / "kiln.db", tmp_path / "artifacts")
    reg.register_model("iris", v1, tags=["prod"])
    return reg


def _registry_state(reg: ModelRegistry) -> tuple:
    q = reg.store.query
    return (
        q("SELECT model_id, name, version FROM models ORDER BY model_id"),
        q("SELECT name, tag, model_id FROM model_tags ORDER BY tag"),
        q("SELECT name, tag, action, model_id FROM tag_history ORDER BY id"),
    )


def test_kill_mid_register(tmp_path):
    reg = _registry(tmp_path)
    before = _registry_state(reg)
    reg.close()
    _kill_inside(tmp_path, "register", after=2)  # model row and tag move done, history not
    _integrity(tmp_path)
    reg = ModelRegistry(tmp_path / "kiln.db", tmp_path / "artifacts")
    assert _registry_state(reg) == before
    assert reg.resolve("iris@prod").version == "1.0.0"
    v2 = tmp_path / "again.pt"
    v2.write_bytes(b"weights-2")
    assert reg.get_model(model_id=reg.register_model("iris", v2)).version == "1.1.0"
    reg.close()


def test_kill_mid_promote(tmp_path):
    reg = _registry(tmp_path)
    v2 = tmp_path / "v2.pt"
    v2.write_bytes(b"weights-2")
    reg.register_model("iris", v2)
    before = _registry_state(reg)
    reg.close()
    _kill_inside(tmp_path, "promote", after=1)  # tag moved, its history row not written
    _integrity(tmp_path)
    reg = ModelRegistry(tmp_path / "kiln.db", tmp_path / "artifacts")
    assert _registry_state(reg) == before
    reg.promote_model(2, "prod")
    assert reg.resolve("iris@prod").model_id == 2
    reg.close()


def _run_db(tmp_path: Path) -> ExperimentDB:
    db = ExperimentDB(tmp_path / "kiln.db")
    run_id = db.log_run("first", {"lr": 0.1})
    db.log_params(run_id, {"seed": 7})
    db.log_metrics(run_id, {"train_loss": 1.0, "val_loss": 1.1}, epoch=1)
    return db


def _run_state(db: ExperimentDB) -> tuple:
    q = db.store.query
    return (
        q("SELECT run_id, run_name, status, ended_at FROM runs ORDER BY run_id"),
        q("SELECT run_id, name, value, epoch FROM metrics ORDER BY id"),
        q("SELECT run_id, key, value FROM params ORDER BY key"),
    )


@pytest.mark.parametrize(
    ("case", "after"),
    [("metrics", 3), ("new_run", 1), ("finish", 1)],
)
def test_kill_mid_run_record(tmp_path, case, after):
    db = _run_db(tmp_path)
    before = _run_state(db)
    db.close()
    _kill_inside(tmp_path, case, after)
    _integrity(tmp_path)
    db = ExperimentDB(tmp_path / "kiln.db")
    assert _run_state(db) == before
    db.log_metrics(1, {"train_loss": 0.5}, epoch=2)  # the lock died with the process
    assert db.get_run(1)["status"] == "running"
    assert db.log_run("next") == 2
    db.close()


def test_runs_of_dead_drivers_are_marked_interrupted(tmp_path):
    """Only runs of this host whose driver pid is gone; live and other hosts' runs stay."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    db = ExperimentDB(tmp_path / "kiln.db")
    ckpt_dir = tmp_path / "ckpt"
    with CheckpointManager(ckpt_dir) as manager:
        saved = manager.save_checkpoint(2, {"val_loss": 0.5}, torch.nn.Linear(2, 1))
    dead, dead_no_ckpt, other_host, alive = (db.log_run(n) for n in "abcd")
    db.log_params(dead, {"checkpoint_dir": str(ckpt_dir)})
    with db.store.transaction() as cur:
        cur.execute("UPDATE runs SET driver_pid = ? WHERE run_id IN (?, ?, ?)",
                    (gone.pid, dead, dead_no_ckpt, other_host))  # fmt: skip
        cur.execute("UPDATE runs SET driver_host = 'elsewhere' WHERE run_id = ?", (other_host,))
        cur.execute("UPDATE runs SET driver_pid = ? WHERE run_id = ?", (os.getppid(), alive))
    assert sorted(db.mark_interrupted_runs()) == [dead, dead_no_ckpt]
    assert db.mark_interrupted_runs() == []  # once
    run = db.get_run(dead)
    assert run["status"] == "interrupted" and run["ended_at"] == saved.timestamp
    assert saved.path in run["error"] and f"driver process {gone.pid}" in run["error"]
    run = db.get_run(dead_no_ckpt)
    assert run["ended_at"] == run["started_at"] and "saved no checkpoint" in run["error"]
    assert db.get_run(other_host)["status"] == "running"
    assert db.get_run(alive)["status"] == "running"
    assert list(db.list_runs(status="interrupted")["run_id"]) == [dead_no_ckpt, dead]
    db.close()
