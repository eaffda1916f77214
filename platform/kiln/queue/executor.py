"""JobExecutor: claims queued jobs and runs each in its own process until told to stop.

    executor = JobExecutor(JobManager(), worker_id="worker-1")          # child processes
    executor = JobExecutor(manager, address="http://127.0.0.1:8265")    # Ray jobs
    executor.run_worker(max_jobs=10, timeout_minutes=60, idle_exit_s=30)

The loop, per job::

    job = manager.claim_job(worker_id)          # lease + attempt (fencing token)
    run = launcher.start(run_job command)       # child process or Ray job; log file
    while run.poll() is None:
        every lease/3: renew_lease -> False (cancelled, reclaimed): stop run, drop it
        past timeout_minutes: stop run, fail_job(retry=False, "timed out ...")
        SIGTERM/SIGINT: let it finish for stop_grace_s, else stop it and release_job
    outcome = last KILN_JOB_RESULT line of the log
    complete_job(result) | fail_job(error)      # refused if the lease was lost

Several executors may serve one queue (on the host that holds the SQLite file);
each claim is one transaction, so no job runs twice at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw

from kiln.errors import LeaseLostError
from kiln.queue.jobs import Job
from kiln.queue.launchers import ProcessLauncher, RayJobLauncher, Run, job_command
from kiln.queue.manager import JobManager
from kiln.queue.run_job import parse_outcome, paths_to_json

__all__ = ["JobExecutor"]

logger = logging.getLogger(__name__)

#: How often a running child is polled; a Ray job's status is an HTTP call, so slower.
CHILD_POLL_S = 0.05
RAY_POLL_S = 0.5


class JobExecutor:
    """Work the queue of ``manager``.

    Args:
        manager: The queue.
        worker_id: Shown on the jobs it runs; default ``<host>-<pid>-<hex>``.
        address: A Ray cluster's dashboard address: jobs run as Ray jobs there.
            None: each job runs as a child process of this one.
        launcher: Overrides how jobs start (anything with ``start(argv, log, id, attempt)``).
        stop_grace_s: After SIGTERM, how long the current job may still finish before
            it is stopped and handed back to the queue.
    """

    def __init__(
        self,
        manager: JobManager,
        worker_id: str | None = None,
        address: str | None = None,
        *,
        launcher: Any = None,
        stop_grace_s: float = 10.0,
    ) -> None:
        self.manager = manager
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.address = address
        if launcher is None:
            launcher = (
                RayJobLauncher(address, str(manager.paths.db)) if address else ProcessLauncher()
            )
        self.launcher = launcher
        self.stop_grace_s = float(stop_grace_s)
        self._stop = threading.Event()
        self._check_s = RAY_POLL_S if address else CHILD_POLL_S

    def stop(self) -> None:
        """Ask the loop to end (what SIGTERM does): the current job finishes or goes back."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_worker(
        self,
        max_jobs: int | None = None,
        timeout_minutes: float = 60,
        poll_s: float = 1.0,
        idle_exit_s: float | None = None,
        *,
        tick: Callable[[], Any] | None = None,
    ) -> dict[str, int]:
        """Claim and run jobs until ``max_jobs`` ran, the queue stayed empty for
        ``idle_exit_s``, or :meth:`stop` / SIGTERM. Returns counts by outcome.

        ``tick`` runs every ``poll_s`` in a background thread, also while a job runs
        (``kiln worker --with-scheduler`` passes the scheduler's tick, so due fires are
        queued on time and picked up by this loop).
        """
        counts = {"completed": 0, "failed": 0, "requeued": 0, "lost": 0}
        done, idle_since = 0, time.monotonic()
        with self._signals(), self._ticking(tick, poll_s):
            while not self.stopping and (max_jobs is None or done < max_jobs):
                try:
                    job = self.manager.claim_job(self.worker_id)
                except apsw.BusyError:  # the file stayed locked past the busy timeout
                    logger.warning("queue busy; trying again in %.1f s", poll_s, exc_info=True)
                    job = None
                if job is None:
                    if idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                        break
                    self._stop.wait(poll_s)
                    continue
                outcome = self.run_job(job, timeout_minutes * 60.0)
                counts[outcome] = counts.get(outcome, 0) + 1
                done += 1
                idle_since = time.monotonic()
        return counts

    def run_job(self, job: Job, timeout_s: float) -> str:
        """Run one claimed job to its end; returns completed | failed | requeued | lost."""
        m = self.manager
        log_path = m.paths.logs / f"job-{job.job_id}-attempt-{job.attempt}.log"
        argv = job_command(job.job_id, paths_to_json(m.paths))
        try:
            m.note_run(job.job_id, job.attempt, log_path=str(log_path))
            run = self.launcher.start(argv, log_path, job.job_id, job.attempt)
        except LeaseLostError:
            return "lost"
        except Exception as exc:  # could not start: a failed attempt like any other
            logger.exception("job %s: could not start", job.job_id)
            return self._report(job, 1, {"ok": False, "error": f"could not start: {exc}"})
        if run.ray_job_id:
            self._guard(m.note_run, job.job_id, job.attempt, ray_job_id=run.ray_job_id)
        ended = self._watch(job, run, timeout_s)
        if ended != "exited":
            return ended
        code = run.poll()
        outcome = parse_outcome(_safe_logs(run)) or {
            "ok": False,
            "error": f"the job process exited with status {code} without a result; "
            f"see its log {log_path}",
        }
        return self._report(job, code or 0, outcome)

    # -- pieces -------------------------------------------------------------------------

    def _watch(self, job: Job, run: Run, timeout_s: float) -> str:
        m = self.manager
        started = time.monotonic()
        renew_every = min(m.lease_s / 3.0, 5.0)
        next_renew = started + renew_every
        stop_at = None
        while run.poll() is None:
            now = time.monotonic()
            if self.stopping and stop_at is None:
                stop_at = now + self.stop_grace_s
            if stop_at is not None and now >= stop_at:
                run.stop()
                _safe_logs(run)
                self._guard(m.release_job, job.job_id, job.attempt, "worker stopped")
                logger.warning("job %s handed back to the queue (worker stopping)", job.job_id)
                return "requeued"
            if now - started > timeout_s:
                run.stop()
                _safe_logs(run)
                minutes = timeout_s / 60.0
                reason = (
                    f"timed out after {minutes:g} minutes (timeout_minutes={minutes:g}); "
                    "the run was stopped"
                )
                ok = self._guard(m.fail_job, job.job_id, job.attempt, reason, retry=False)
                return "failed" if ok else "lost"
            if now >= next_renew:
                next_renew = now + renew_every
                try:
                    held = m.renew_lease(job.job_id, job.attempt)
                except apsw.BusyError:  # try again at the next renewal; the lease has slack
                    logger.warning("job %s: lease renewal delayed (busy)", job.job_id)
                    held = True
                if not held:
                    run.stop()  # cancelled, or reclaimed after a lost lease
                    _safe_logs(run)
                    logger.warning("job %s: lease lost or job cancelled; run stopped", job.job_id)
                    return "lost"
            time.sleep(self._check_s)
        return "exited"

    def _report(self, job: Job, code: int, outcome: dict[str, Any]) -> str:
        m = self.manager
        if code == 0 and outcome.get("ok"):
            ok = self._guard(
                m.complete_job,
                job.job_id,
                job.attempt,
                outcome.get("result"),
                outcome.get("details"),
            )
            return "completed" if ok else "lost"
        error = outcome.get("error") or f"exit status {code}"
        ok = self._guard(m.fail_job, job.job_id, job.attempt, error)
        return "failed" if ok else "lost"

    def _guard(self, report: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Run a report; a refused one (stale attempt) is logged and changes nothing."""
        try:
            report(*args, **kwargs)
        except LeaseLostError as exc:
            logger.warning("%s", exc)
            return False
        return True

    @contextmanager
    def _ticking(self, tick: Callable[[], Any] | None, every_s: float):
        if tick is None:
            yield
            return
        done = threading.Event()

        def loop() -> None:
            while not done.is_set():
                try:
                    tick()
                except Exception:  # a bad tick must not stop the worker
                    logger.exception("scheduler tick failed")
                done.wait(every_s)

        thread = threading.Thread(target=loop, name="kiln-scheduler-tick", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(30)

    @contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            logger.warning("signal %s: finishing or handing back the current job", signum)
            self._stop.set()

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _safe_logs(run: Run) -> str:
    try:
        return run.logs()
    except Exception:  # logs are a convenience; the outcome decides
        logger.warning("could not read the job's logs", exc_info=True)
        return ""


def log_tail(path: str | os.PathLike[str] | None, lines: int = 20) -> str:
    """The last ``lines`` lines of a job's log (empty when it has none)."""
    if not path or not Path(path).is_file():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
