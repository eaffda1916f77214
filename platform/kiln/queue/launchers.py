"""How an executor starts a job's process: a child process, or a Ray job on a cluster.

Both run the same command (``python -m kiln.queue.run_job ...``) and give back a
:class:`Run` with four methods, so the executor's loop does not care which:
``poll()`` (None while running, else the exit status), ``stop()``, ``logs()``
(the text so far, also kept in the job's log file) and ``ray_job_id``.

- :class:`ProcessLauncher`: ``subprocess.Popen`` in its own process group (``stop``
  sends SIGTERM to the group, then SIGKILL after a grace period); output goes
  straight to the log file.
- :class:`RayJobLauncher`: ``ray.job_submission.JobSubmissionClient`` against the
  cluster's dashboard address: ``submit_job``, ``get_job_status``, ``stop_job``,
  ``get_job_logs`` (copied into the log file). The job shows in the dashboard's Jobs
  view as ``kiln-job-<id>-<attempt>-<hex>``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Protocol

import kiln

__all__ = ["ProcessLauncher", "RayJobLauncher", "Run", "job_environment", "ray_job_client"]

STOP_GRACE_S = 10.0


class Run(Protocol):
    """A started job process."""

    ray_job_id: str | None

    def poll(self) -> int | None: ...

    def stop(self) -> None: ...

    def logs(self) -> str: ...


def job_environment() -> dict[str, str]:
    """Variables a job process needs: this kiln importable (its source root first)."""
    root = str(Path(kiln.__file__).resolve().parent.parent)
    current = os.environ.get("PYTHONPATH", "")
    parts = [root, *[p for p in current.split(os.pathsep) if p and p != root]]
    return {"PYTHONPATH": os.pathsep.join(parts)}


class ProcessRun:
    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.ray_job_id = None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **job_environment()},
                start_new_session=True,  # its own group: stop() reaches its children too
                preexec_fn=_die_with_parent,
            )

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the executor dies (Linux), so a job whose
    executor was killed is not still running when its lease expires and it is reclaimed."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError):  # prctl(PR_SET_PDEATHSIG, SIGKILL)
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))


class ProcessLauncher:
    """Runs each job as a child process of the executor."""

    def start(self, argv: list[str], log_path: Path, job_id: int, attempt: int) -> ProcessRun:
        return ProcessRun(argv, log_path)


class RayJobRun:
    _EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": -int(signal.SIGTERM)}

    def __init__(self, client, submission_id: str, log_path: Path) -> None:
        self.client, self.ray_job_id, self.log_path = client, submission_id, log_path
        self._last_status: str | None = None

    def poll(self) -> int | None:
        status = str(getattr(self.client.get_job_status(self.ray_job_id), "value", ""))
        self._last_status = status
        return self._EXIT.get(status)

    def stop(self) -> None:
        self.client.stop_job(self.ray_job_id)
        deadline = time.monotonic() + STOP_GRACE_S * 3
        while time.monotonic() < deadline and self.poll() is None:
            time.sleep(0.5)

    def logs(self) -> str:
        text = self.client.get_job_logs(self.ray_job_id)
        _write_text_atomic(self.log_path, text)
        return text


class RayJobLauncher:
    """Submits each job to a Ray cluster through its Job Submission API.

    Args:
        address: The dashboard's address (``http://127.0.0.1:8265``) or ``"auto"``.
        queue: Names the queue (its database path) in each Ray job's metadata.
    """

    def __init__(self, address: str, queue: str = "") -> None:
        self.address, self.queue = address, queue
        self.client = ray_job_client(address)

    def start(self, argv: list[str], log_path: Path, job_id: int, attempt: int) -> RayJobRun:
        import shlex

        self._stop_earlier_attempts(job_id)
        submission_id = f"kiln-job-{job_id}-{attempt}-{uuid.uuid4().hex[:6]}"
        self.client.submit_job(
            entrypoint=shlex.join(argv),
            submission_id=submission_id,
            runtime_env={"env_vars": job_environment()},
            metadata={
                "kiln_job_id": str(job_id),
                "kiln_attempt": str(attempt),
                "kiln_queue": self.queue,
            },
        )
        log_path.parent.mkdir(parents=True, exist_ok=True)
        return RayJobRun(self.client, submission_id, log_path)

    def _stop_earlier_attempts(self, job_id: int) -> None:
        """An attempt whose executor died may still run on the cluster: stop it first, so
        the reclaimed job never runs twice at once."""
        for info in self.client.list_jobs():
            meta = info.metadata or {}
            status = str(getattr(info.status, "value", info.status))
            mine = meta.get("kiln_job_id") == str(job_id) and meta.get("kiln_queue") == self.queue
            if mine and status in ("PENDING", "RUNNING"):
                self.client.stop_job(info.submission_id)


def ray_job_client(address: str):
    """A ``JobSubmissionClient`` for ``address``. A cluster with token authentication (the
    default for clusters Ray 2.5x+ starts) gets this machine's Ray token (``~/.ray/auth_token``
    or ``$RAY_AUTH_TOKEN``) even when ``RAY_AUTH_MODE`` is not set here."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

        headers = AuthenticationTokenLoader.instance().get_token_for_http_header(
            ignore_auth_mode=True
        )
        if not headers:
            raise
        return JobSubmissionClient(address, headers=headers)


def job_command(job_id: int, paths_json: str) -> list[str]:
    """The command that runs one job (same interpreter as the executor)."""
    return [sys.executable, "-m", "kiln.queue.run_job", str(job_id), "--paths", paths_json]


def _write_text_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename: a reader sees the old log or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
