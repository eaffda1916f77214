"""A queued training job runs as a real Ray job (JobSubmissionClient) and its run is recorded.

The cluster is a local Ray with its dashboard, started in a child process on free
ports (never ``ray start``, which would make other local ``ray.init()`` calls join it)
and shut down when the test ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kiln.cli import main as kiln_main
from kiln.paths import RunPaths
from kiln.queue import JobExecutor, JobManager, JobStatus
from kiln.queue.launchers import ray_job_client
from kiln.serve._ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")

HEAD = textwrap.dedent(
    """
    import sys
    import ray._private.parameter as parameter

    dashboard_port, agent_port = int(sys.argv[1]), int(sys.argv[2])
    original = parameter.RayParams.__init__

    def with_agent_port(self, *args, **kwargs):  # ray.init has no argument for it
        kwargs.setdefault("dashboard_agent_listen_port", agent_port)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = with_agent_port
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, logging_level="WARNING")
    print("READY", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    ray.shutdown()
    """
)


@pytest.fixture()
def ray_dashboard():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": PLATFORM + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD, str(port), str(free_port())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert head.stdout.readline().strip() == "READY"
        address = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:  # the jobs API answers once the dashboard and its agent are up
            try:
                ray_job_client(address).list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, "the Ray dashboard did not come up"
                time.sleep(0.5)
        yield address
    finally:
        head.stdin.close()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def test_a_queued_training_job_runs_as_a_ray_job(tmp_path, ray_dashboard, capsys):
    paths = RunPaths.resolve(tmp_path / "home")
    manager = JobManager(paths=paths)
    config = {
        "dataset": "digits", "epochs": 1, "batch_size": 64, "run_name": "queued-digits",
        "model": {"name": "mlp", "hidden": [16]}, "task": {"task_type": "classification"},
    }  # fmt: skip
    job_id = manager.submit_job("training", config)
    counts = JobExecutor(manager, address=ray_dashboard).run_worker(max_jobs=1, poll_s=0.2)
    job = manager.get_job(job_id)
    log = Path(job.log_path).read_text() if job.log_path else ""
    assert counts["completed"] == 1, (job.error_message, log[-3000:])
    assert job.status is JobStatus.COMPLETED and job.ray_job_id.startswith(f"kiln-job-{job_id}-")
    assert job.result.startswith("queued-digits-") and job.details["run_id"] is not None
    assert "epoch   1/1" in log  # the Ray job's logs were fetched into the job's log file

    info = ray_job_client(ray_dashboard).get_job_info(job.ray_job_id)
    assert str(info.status.value) == "SUCCEEDED" and info.metadata["kiln_job_id"] == str(job_id)

    assert kiln_main(["--home", str(paths.home), "runs", "list"]) == 0
    assert job.result in capsys.readouterr().out

    # A Ray job past its timeout is stopped on the cluster and the job fails with the reason.
    slow = manager.submit_job("noop", {"seconds": 120})
    executor = JobExecutor(manager, address=ray_dashboard)
    assert executor.run_worker(max_jobs=1, timeout_minutes=4 / 60, poll_s=0.2)["failed"] == 1
    stopped = manager.get_job(slow)
    assert stopped.error_message.startswith("timed out after") and stopped.ray_job_id
    status = ray_job_client(ray_dashboard).get_job_status(stopped.ray_job_id)
    assert str(status.value) in ("STOPPED", "FAILED")
