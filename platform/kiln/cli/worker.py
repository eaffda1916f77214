"""`kiln worker` and `kiln scheduler`: work the job queue; fire cron schedules.

    kiln worker [--address http://127.0.0.1:8265] [--max-jobs N] [--with-scheduler]
                [--timeout-minutes 60] [--poll 1.0] [--idle-exit SECONDS]
    kiln scheduler [--poll 1.0]

``kiln worker`` claims jobs and runs each as a child process, or as a Ray job on the
cluster at ``--address`` (the dashboard's address; ``$RAY_ADDRESS`` when it is an
http URL). SIGTERM or Ctrl-C: the current job finishes within a grace period or is
handed back to the queue. ``--with-scheduler`` also fires due schedules.
``kiln scheduler`` only fires schedules (run one per host, or several: each fire is
enqueued once).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from kiln.cli.runs import handles_errors, run_paths

__all__ = ["register"]


def _address(args: argparse.Namespace) -> str | None:
    if args.address:
        return args.address
    env = os.environ.get("RAY_ADDRESS", "")  # read here, at the entry point
    return env if env.startswith(("http://", "https://")) else None


@handles_errors
def cmd_worker(args: argparse.Namespace) -> int:
    from kiln.queue.executor import JobExecutor
    from kiln.queue.manager import JobManager
    from kiln.queue.scheduler import TrainingScheduler

    paths = run_paths(args)
    manager = JobManager(paths=paths)
    tick = TrainingScheduler(paths=paths).tick if args.with_scheduler else None
    address = _address(args)
    executor = JobExecutor(manager, worker_id=args.worker_id, address=address)
    where = f"Ray jobs on {address}" if address else "child processes"
    print(f"kiln worker {executor.worker_id}: running jobs as {where}", flush=True)
    counts = executor.run_worker(
        max_jobs=args.max_jobs,
        timeout_minutes=args.timeout_minutes,
        poll_s=args.poll,
        idle_exit_s=args.idle_exit,
        tick=tick,
    )
    print("kiln worker stopped: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return 0


@handles_errors
def cmd_scheduler(args: argparse.Namespace) -> int:
    from kiln.queue.scheduler import TrainingScheduler

    scheduler = TrainingScheduler(paths=run_paths(args))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"kiln scheduler: ticking every {args.poll:g} s (Ctrl-C stops)", flush=True)
    scheduler.run(poll_s=args.poll, stop=stop)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``kiln worker`` and ``kiln scheduler``."""
    p = subparsers.add_parser(
        "worker", help="run queued jobs", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--address", help="Ray dashboard address: run jobs as Ray jobs there")
    p.add_argument("--max-jobs", type=int, help="stop after this many jobs")
    p.add_argument("--with-scheduler", action="store_true", help="also fire due schedules")
    p.add_argument("--timeout-minutes", type=float, default=60, help="per job (default 60)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between claims when idle")
    p.add_argument("--idle-exit", type=float, help="stop after this many seconds without jobs")
    p.add_argument("--worker-id", help="name shown on the jobs it runs")
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser("scheduler", help="fire cron schedules until stopped")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between ticks (default 1)")
    p.set_defaults(func=cmd_scheduler)
