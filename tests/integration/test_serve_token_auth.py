"""The README's recipe for a token-protected Ray cluster produces one.

Runs the recipe's three commands (``export RAY_AUTH_MODE=token``, ``ray
get-auth-token --generate``, ``ray start --head``) in a temporary HOME, with a
private ``--temp-dir`` and free ports so no other Ray on the machine is touched
or joined. The cluster is stopped by ending the OS session its ``ray start``
was given (exactly its own processes), never with ``ray stop``, which would stop
every Ray on the machine.

Checked: ``/api/jobs/`` (which runs arbitrary code) answers 401 without a token,
403 with a wrong one, 200 with the right one. The dashboard's static ``/`` page
answers 200 even then: it holds no data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from drill_record import record

from kiln.serve._lifetime import end_session
from kiln.serve._ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def test_readme_token_recipe_protects_the_jobs_api(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    temp = tempfile.mkdtemp(prefix="kr", dir="/tmp")  # short: Ray's socket paths are bounded
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 16

    gcs, dash, nm, om, client, agent, agent_grpc, rt_env, metrics = _free_ports(9)
    cmd = [RAY, "start", "--head", "--block", "--temp-dir", temp, "--num-cpus", "1"]
    cmd += ["--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
    cmd += ["--include-dashboard", "true", "--disable-usage-stats"]
    cmd += ["--node-manager-port", str(nm), "--object-manager-port", str(om)]
    cmd += ["--ray-client-server-port", str(client), "--metrics-export-port", str(metrics)]
    cmd += ["--dashboard-agent-listen-port", str(agent)]
    cmd += ["--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rt_env)]
    log = tmp_path / "ray_start.log"
    with log.open("wb") as out:
        head = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no dashboard:\n{log.read_text()[-3000:]}"
            try:
                r = httpx.get(f"{url}/api/jobs/", timeout=5)
                if r.status_code != 503:  # 503 while the dashboard's modules start
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert r.status_code == 401, r.text[:300]
        wrong = {"Authorization": "Bearer " + "0" * len(token)}
        assert httpx.get(f"{url}/api/jobs/", headers=wrong, timeout=10).status_code == 403
        right = {"Authorization": f"Bearer {token}"}
        r = httpx.get(f"{url}/api/jobs/", headers=right, timeout=10)
        assert r.status_code == 200 and r.json() == []
        assert httpx.get(f"{url}/", timeout=10).status_code == 200  # static page, no data
        record(
            "serve_token_recipe",
            {"/api/jobs/ no token": 401, "wrong token": 403, "right token": 200, "/": 200},
        )
    finally:
        end_session(head.pid, grace_s=10)
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
