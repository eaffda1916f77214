"""Four processes registering models and logging metrics into one kiln.db at once.

No Ray: plain spawned processes, the way several drivers (Tune trials, cron jobs, a
CLI user) share ``$KILN_HOME/kiln.db``. Nothing may be lost, ids must be unique, and
"database is locked" must never surface.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback

import pytest

PROCS = 4
REGS_PER_PROC = 50  # 200 registrations in all
ROWS_PER_PROC = 520  # 2,080 metric rows in all


def _worker(index: int, db_path: str, artifacts: str, ckpt_dir: str, barrier) -> dict:
    from pathlib import Path

    from kiln.tracking import ExperimentDB, ModelRegistry

    try:
        db = ExperimentDB(db_path)
        reg = ModelRegistry(db_path, artifacts)
        run_id = db.log_run(f"proc-{index}", {"index": index}, group="concurrency")
        barrier.wait(timeout=120)
        model_ids, promotions = [], 0
        rows_per_reg = ROWS_PER_PROC // REGS_PER_PROC
        for i in range(REGS_PER_PROC):
            for j in range(rows_per_reg):
                step = i * rows_per_reg + j
                db.log_metric(run_id, "loss", float(step), epoch=i, step=step)
            ckpt = Path(ckpt_dir) / f"p{index}-{i}.pt"
            # every 5th checkpoint has the same bytes in all processes: races on one address
            ckpt.write_bytes(b"shared" if i % 5 == 0 else f"weights {index} {i}".encode())
            name = "shared" if i % 2 == 0 else f"proc-{index}"
            model_ids.append(reg.register_model(name, ckpt, training_run_id=run_id))
            if name == "shared" and i % 10 == 0:
                reg.promote_model(model_ids[-1], "production")
                promotions += 1
        remaining = ROWS_PER_PROC - REGS_PER_PROC * rows_per_reg
        db.log_metrics(run_id, {f"extra_{k}": float(k) for k in range(remaining)}, epoch=0)
        db.finish_run(run_id, "completed")
        return {"run_id": run_id, "model_ids": model_ids, "promotions": promotions}
    except BaseException:  # report the whole traceback to the parent
        barrier.abort()  # release the others instead of leaving them waiting
        return {"error": traceback.format_exc()}


@pytest.mark.timeout(240)
def test_four_processes_lose_nothing_and_never_see_a_lock(tmp_path):
    from kiln.tracking import ExperimentDB, ModelRegistry

    db_path, artifacts = tmp_path / "kiln.db", tmp_path / "artifacts"
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(PROCS) as pool:
        barrier = manager.Barrier(PROCS)
        args = [(i, str(db_path), str(artifacts), str(ckpts), barrier) for i in range(PROCS)]
        results = pool.starmap(_worker, args)

    errors = [r["error"] for r in results if "error" in r]
    assert not errors, "\n".join(errors)

    db = ExperimentDB(db_path)
    runs = db.list_runs(group="concurrency")
    assert sorted(runs["run_id"]) == sorted(r["run_id"] for r in results)
    assert set(runs["status"]) == {"completed"}
    for r in results:
        metrics = db.get_metrics(r["run_id"])
        assert len(metrics) == ROWS_PER_PROC
        loss = metrics[metrics["name"] == "loss"]
        assert sorted(loss["step"]) == list(range(len(loss)))

    reg = ModelRegistry(db_path, artifacts)
    all_ids = [m for r in results for m in r["model_ids"]]
    assert len(all_ids) == PROCS * REGS_PER_PROC == len(set(all_ids))
    models = reg.list_models()
    assert sorted(models["model_id"]) == sorted(all_ids)
    shared = models[models["name"] == "shared"]
    count = PROCS * REGS_PER_PROC // 2
    assert sorted(shared["version"], key=lambda v: int(v.split(".")[1])) == [
        f"1.{k}.0" for k in range(count)
    ]
    for entry_id in all_ids[::7]:
        reg.load_checkpoint_path(entry_id)  # every stored copy is whole
    holder = reg.get_model(name="shared", tag="production")
    assert holder.model_id in all_ids
    history = reg.tag_history("shared", tag="production")
    assert 1 <= len(history) <= sum(r["promotions"] for r in results)
