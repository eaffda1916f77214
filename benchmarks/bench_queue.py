"""Job queue: claim+complete throughput vs raw apsw, queued training overhead, fire latency.

    python benchmarks/bench_queue.py [--jobs 4000] [--repeats 3] [--train-reps 2] [--fires 1]

1. Throughput: ``--jobs`` pending jobs are claimed and completed by 1 and 4 spawned
   processes, through ``JobManager.claim_job`` / ``complete_job`` and through the same
   SQL in raw apsw transactions (same file settings: WAL, synchronous=NORMAL, busy
   timeout, ``BEGIN IMMEDIATE``), alternating. Checks none was lost or done twice.
2. Overhead: the same small ``kiln train`` run directly (a new process) and as a queued
   job picked up by an idle ``kiln worker`` (child-process executor, polling at 1 s):
   wall time from the command / the submit to the finished run, alternating; and that
   wall minus the run's own recorded duration (the part the queue can add to), which
   keeps the training's own noise on a shared machine out of the comparison.
3. Scheduler: an every-minute schedule and an idle ``kiln worker --with-scheduler``
   polling at 1 s: seconds from each fire's due time to its job starting.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT / "platform") + os.pathsep + os.environ.get("PYTHONPATH", ""),
}

RAW_CLAIM = (
    "SELECT job_id FROM jobs AS j WHERE status = 'pending' "
    "AND (not_before IS NULL OR not_before <= ?) AND NOT EXISTS ("
    " SELECT 1 FROM job_dependencies d JOIN jobs p ON p.job_id = d.depends_on"
    " WHERE d.job_id = j.job_id AND p.status != 'completed') "
    "ORDER BY priority DESC, job_id LIMIT 1"
)


def _work_kiln(db: str, home: str, barrier) -> tuple[float, int]:
    from kiln.paths import RunPaths
    from kiln.queue.manager import JobManager

    m = JobManager(db, paths=RunPaths.resolve(home))
    done = 0
    barrier.wait()
    while (job := m.claim_job("bench")) is not None:
        m.complete_job(job.job_id, job.attempt, "ok")
        done += 1
    return time.perf_counter(), done


def _work_raw(db: str, home: str, barrier) -> tuple[float, int]:
    import apsw

    conn = apsw.Connection(db)
    conn.setbusytimeout(30_000)
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    done = 0
    barrier.wait()
    while True:
        moment = datetime.now(timezone.utc)
        now = moment.isoformat(timespec="microseconds")
        lease = (moment + timedelta(seconds=60)).isoformat(timespec="microseconds")
        cur.execute("BEGIN IMMEDIATE")
        cur.execute(
            "UPDATE jobs SET status = 'pending' WHERE status = 'running' AND lease_expires_at < ?",
            (now,),
        )
        rows = list(cur.execute(RAW_CLAIM, (now,)))
        if not rows:
            cur.execute("COMMIT")
            break
        job_id = rows[0][0]
        cur.execute(
            "UPDATE jobs SET status = 'running', worker_id = 'raw', started_at = ?, "
            "lease_expires_at = ?, attempt = attempt + 1 WHERE job_id = ?",
            (now, lease, job_id),
        )
        attempt = list(cur.execute("SELECT attempt FROM jobs WHERE job_id = ?", (job_id,)))[0][0]
        cur.execute("COMMIT")
        cur.execute("BEGIN IMMEDIATE")
        cur.execute(
            "UPDATE jobs SET status = 'completed', completed_at = ?, result = 'ok' "
            "WHERE job_id = ? AND attempt = ? AND status = 'running'",
            (now, job_id, attempt),
        )
        done += conn.changes()
        cur.execute("COMMIT")
    return time.perf_counter(), done


def _fill(home: str, jobs: int) -> str:
    from kiln.paths import RunPaths
    from kiln.queue.manager import JobManager

    m = JobManager(paths=RunPaths.resolve(home))
    for i in range(jobs):
        m.submit_job("noop", {}, priority=1 + i % 10)
    return str(m.paths.db)


def _throughput(worker, procs: int, jobs: int) -> float:
    from kiln.queue.manager import JobManager

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-q-") as home:
        db = _fill(home, jobs)
        with ctx.Manager() as manager, ctx.Pool(procs) as pool:
            barrier = manager.Barrier(procs + 1)
            pending = pool.starmap_async(worker, [(db, home, barrier)] * procs)
            barrier.wait()
            start = time.perf_counter()
            results = pending.get()
        m = JobManager(db)
        counts = m.counts()
        attempts = m.store.query("SELECT MAX(attempt), MIN(attempt) FROM jobs")[0]
        assert sum(n for _, n in results) == jobs == counts["completed"], (results, counts)
        assert attempts == (1, 1), f"a job was claimed twice: attempts {attempts}"
        return jobs / (max(end for end, _ in results) - start)


def throughput_table(jobs: int, repeats: int) -> None:
    print(f"Claim+complete throughput ({jobs} jobs, median of {repeats}; none lost or doubled)\n")
    print("| processes | kiln JobManager (jobs/s) | raw apsw, same SQL (jobs/s) | kiln / raw |")
    print("|---:|---:|---:|---:|")
    for procs in (1, 4):
        kiln, raw = [], []
        for _ in range(repeats):
            kiln.append(_throughput(_work_kiln, procs, jobs))
            raw.append(_throughput(_work_raw, procs, jobs))
        k, r = statistics.median(kiln), statistics.median(raw)
        print(f"| {procs} | {k:.0f} | {r:.0f} | {k / r:.2f}x |", flush=True)


TRAIN_YAML = """dataset: digits
run_name: bench-queue
epochs: 3
batch_size: 64
learning_rate: 0.01
model: {name: mlp, hidden: [32]}
task: {task_type: classification}
"""


def _kiln(home: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "--home", home, *args],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
    )  # fmt: skip


def _wait_line(proc: subprocess.Popen, text: str, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            raise RuntimeError(f"process ended before printing {text!r}")
    raise TimeoutError(text)


def _run_seconds(db: Path) -> float:
    """The newest run's own duration (start to end of the Trainer), from the runs table."""
    from kiln.tracking import ExperimentDB

    return float(ExperimentDB(db).list_runs(limit=1)["duration_s"].iloc[0])


def overhead_table(reps: int) -> None:
    from kiln.paths import RunPaths
    from kiln.queue.manager import JobManager

    with tempfile.TemporaryDirectory(prefix="kiln-bench-q-") as home:
        cfg = Path(home) / "run.yaml"
        cfg.write_text(TRAIN_YAML)
        manager = JobManager(paths=RunPaths.resolve(home))
        worker = _kiln(home, "worker", "--poll", "1.0")
        _wait_line(worker, "running jobs as")
        time.sleep(2.0)  # idle, polling
        direct, queued = [], []  # (wall, wall minus the run's own duration)
        try:
            for _ in range(reps):
                start = time.perf_counter()
                proc = _kiln(home, "train", str(cfg), "--quiet")
                proc.communicate(timeout=600)
                assert proc.returncode == 0
                wall = time.perf_counter() - start
                direct.append((wall, wall - _run_seconds(manager.paths.db)))
                start = time.perf_counter()
                job_id = manager.submit_job("training", str(cfg))
                while not manager.get_job(job_id).status.is_terminal:
                    time.sleep(0.02)
                assert manager.get_job(job_id).status == "completed"
                wall = time.perf_counter() - start
                queued.append((wall, wall - _run_seconds(manager.paths.db)))
        finally:
            worker.terminate()
            worker.communicate(timeout=60)
    (dw, dx), (qw, qx) = (
        tuple(statistics.median(v[i] for v in side) for i in (0, 1)) for side in (direct, queued)
    )
    print(f"\nQueued training job vs `kiln train` (digits MLP, 3 epochs; median of {reps})\n")
    print("| path | wall (s) | wall outside the run (s) | overhead vs direct (s) |")
    print("|---|---:|---:|---:|")
    print(f"| `kiln train run.yaml` | {dw:.2f} | {dx:.2f} | - |")
    print(
        f"| `submit_job` -> idle `kiln worker` (poll 1 s) -> completed | {qw:.2f} | {qx:.2f} "
        f"| {qx - dx:+.2f} |"
    )


def fire_table(fires: int) -> None:
    from kiln.paths import RunPaths
    from kiln.queue._schema import parse_time
    from kiln.queue.manager import JobManager
    from kiln.queue.scheduler import TrainingScheduler

    with tempfile.TemporaryDirectory(prefix="kiln-bench-q-") as home:
        paths = RunPaths.resolve(home)
        TrainingScheduler(paths=paths).create_schedule(
            "m", "noop", {}, "* * * * *", catch_up="none"
        )
        manager = JobManager(paths=paths)
        worker = _kiln(home, "worker", "--poll", "1.0", "--with-scheduler")
        lags = []
        try:
            deadline = time.monotonic() + 70 * fires + 30
            while len(lags) < fires and time.monotonic() < deadline:
                time.sleep(0.5)
                rows = manager.store.query(
                    "SELECT f.fire_key, j.started_at FROM schedule_fires f "
                    "JOIN jobs j ON j.job_id = f.job_id WHERE j.started_at IS NOT NULL"
                )
                lags = [(parse_time(s) - parse_time(due)).total_seconds() for due, s in rows]
        finally:
            worker.terminate()
            worker.communicate(timeout=60)
    print(f"\nScheduler: due time -> job running (idle worker polling at 1 s; {len(lags)} fires)\n")
    print("| fires | median lag (s) | max lag (s) |")
    print("|---:|---:|---:|")
    print(f"| {len(lags)} | {statistics.median(lags):.2f} | {max(lags):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-reps", type=int, default=2)
    parser.add_argument("--fires", type=int, default=1)
    args = parser.parse_args()
    import apsw

    print(
        f"(SQLite {apsw.sqlite_lib_version()} via apsw, WAL; {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.machine()})\n"
    )
    throughput_table(args.jobs, args.repeats)
    overhead_table(args.train_reps)
    if args.fires:
        fire_table(args.fires)


if __name__ == "__main__":
    main()
