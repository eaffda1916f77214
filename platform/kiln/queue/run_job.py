"""Run one queued job in this process: the command a :class:`JobExecutor` launches.

    python -m kiln.queue.run_job --paths '{"home": ..., "db": ...}' JOB_ID

It reads the job's config from the queue (read only: the executor owns the job's
row), runs the handler of its type, and prints one last line that the executor
parses from the log, whether it ran as a child process or as a Ray job::

    KILN_JOB_RESULT {"ok": true, "result": "...", "details": {...}}
    KILN_JOB_RESULT {"ok": false, "error": "ConfigError: ..."}

The exit status is 0 on success and 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from kiln.paths import RunPaths

__all__ = ["MARKER", "main", "parse_outcome"]

MARKER = "KILN_JOB_RESULT "


def paths_to_json(paths: RunPaths) -> str:
    return json.dumps({k: str(v) for k, v in vars(paths).items()})


def paths_from_json(text: str) -> RunPaths:
    return RunPaths(**{k: Path(v) for k, v in json.loads(text).items()})


def parse_outcome(log_text: str) -> dict[str, Any] | None:
    """The last result line in a job's log, or None when the job printed none."""
    for line in reversed(log_text.splitlines()):
        start = line.find(MARKER)
        if start >= 0:
            try:
                return json.loads(line[start + len(MARKER) :])
            except json.JSONDecodeError:
                return None
    return None


def run(job_id: int, paths: RunPaths) -> dict[str, Any]:
    """Run the job's handler; return the outcome dict that :data:`MARKER` introduces."""
    from kiln.queue.handlers import HANDLERS
    from kiln.queue.manager import JobManager

    manager = JobManager(paths=paths)
    try:
        job = manager.get_job(job_id)
    finally:
        manager.close()
    print(f"kiln: job {job_id} ({job.job_type.value}), attempt {job.attempt}", flush=True)
    result, details = HANDLERS[job.job_type](job.config, paths, job_id)
    return {"ok": True, "result": result, "details": details}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.queue.run_job")
    parser.add_argument("job_id", type=int)
    parser.add_argument("--paths", required=True, help="RunPaths as JSON (from the executor)")
    args = parser.parse_args(argv)
    # The executor stops a job with SIGTERM (timeout, cancel, shutdown): raise
    # KeyboardInterrupt so a Trainer records its run as stopped before the process ends.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        outcome = run(args.job_id, paths_from_json(args.paths))
    except BaseException as exc:  # reported to the executor, then the exit status says it
        traceback.print_exc()
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    print(MARKER + json.dumps(outcome, default=str), flush=True)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
