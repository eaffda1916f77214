"""`kiln serve` as a user runs it: nothing it starts outlives it, however it ends.

Each server is a real `python -m kiln.cli serve` with its own local Ray. The server
runs in an OS session of its own (see ``kiln.serve._lifetime``); what is left of
a server is read from /proc as the live processes of that session.

`ray stop --force` is not run here: it kills every Ray on the machine, including
the test session's shared Ray and other users' clusters. What it does to one
cluster is reproduced instead: SIGKILL to exactly the Ray processes (gcs_server,
raylet, agents, ``ray::`` workers, Ray's Python daemons) of that server's session.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from drill_record import record
from listeners import assert_loopback_only, serve_listeners
from torch import nn

from kiln.export import create_export_bundle
from kiln.serve import Predictor
from kiln.serve._ports import free_port, listening_inodes

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROWS = [[0.1, -0.2, 0.3, 0.4]]
# Command-line marks of the processes `ray stop --force` kills (ray/scripts/scripts.py).
RAY_MARKS = ("ray::", "raylet", "gcs_server", "/ray/dashboard/", "log_monitor.py", "monitor.py")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _session(sid: int) -> dict[int, str]:
    """Live members of session ``sid``: pid -> command line."""
    out = {}
    for entry in Path("/proc").iterdir():
        st = _stat(int(entry.name)) if entry.name.isdigit() else None
        if st and st[0] not in "ZX" and int(st[3]) == sid:
            try:
                cmd = entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            out[int(entry.name)] = cmd.strip()
    return out


def _wait_empty(sid: int, timeout: float = 60) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _kill_session(sid: int) -> None:
    for pid in _session(sid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _ray_stop_force(sid: int) -> list[int]:
    """What `ray stop --force` does to this one cluster: SIGKILL its Ray processes."""
    killed = []
    for pid, cmd in _session(sid).items():
        if any(mark in cmd for mark in RAY_MARKS) or "runtime_env/agent" in cmd:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


class Server:
    """One `kiln serve` command (the supervisor) and the session of its server."""

    def __init__(self, bundle: Path, tmp: Path, port: int, *extra: str) -> None:
        self.port, self.tmp = port, tmp
        self.out, self.err = tmp / f"out-{port}.log", tmp / f"err-{port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_HAPROXY")}
        env.pop("RAY_ADDRESS", None)
        env["KILN_HOME"] = str(tmp / "home")
        argv = ["serve", str(bundle), "--port", str(port), "--num-cpus", "0.25", *extra]
        with self.out.open("wb") as o, self.err.open("wb") as e:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kiln.cli", *argv], stdout=o, stderr=e, env=env
            )
        self.sid: int | None = None

    def log(self) -> str:
        text = self.out.read_text(errors="replace") if self.out.exists() else ""
        err = self.err.read_text(errors="replace") if self.err.exists() else ""
        return f"{text[-2000:]}\n--- stderr ---\n{err[-4000:]}"

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"kiln serve exited ({self.proc.returncode}):\n{self.log()}")
            if self.sid is None:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                kids = children.read_text().split() if children.exists() else []
                self.sid = int(kids[0]) if kids else None
            if "Ctrl-C" in self.out.read_text(errors="replace"):
                try:
                    if httpx.get(url, timeout=5).status_code == 200:
                        assert self.sid is not None
                        assert int(_stat(self.sid)[3]) == self.sid  # the server leads a session
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        pytest.fail(f"kiln serve not ready in {timeout} s:\n{self.log()}")

    def predict(self) -> dict:
        r = httpx.post(f"http://127.0.0.1:{self.port}/predict", json={"inputs": ROWS}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self, signum: int, timeout: float = 120) -> int:
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"kiln serve did not exit {timeout} s after signal {signum}:\n{self.log()}")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.sid is not None:
            _kill_session(self.sid)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    task = {"task_type": "classification", "input_shape": [4], "class_names": ["a", "b", "c"]}
    root = tmp_path_factory.mktemp("lifetime_bundles")
    return create_export_bundle(model, None, task, None, root, bundle_name="m")


def _own_ports(server: Server) -> set[int]:
    """The HTTP port and the HAProxy stats/metrics ports the server printed."""
    line = next(x for x in server.out.read_text().splitlines() if "HAProxy stats" in x)
    return {server.port} | {int(p) for p in re.findall(r":(\d+)", line)}


def test_servers_side_by_side_and_nothing_outlives_sigkill_ray_stop_or_sigterm(bundle, tmp_path):
    """Three `kiln serve` lifetimes, two of them at once (one module, one test: each
    server start costs a local Ray).

    1. Server A (explicit stats/metrics ports) and B (automatic ones) both start and
       answer as the bundle does in-process; kiln's listeners (HTTP, stats, metrics,
       and the replica ports HAProxy forwards to) are on 127.0.0.1 only.
    2. A third on A's HTTP port exits 2 with one line naming the port and the pid.
    3. Ray killed under B (what `ray stop` does) ends B (status 1) and its session.
    4. SIGKILL A's command, then `ray stop --force` (emulated, see module doc):
       nothing of A's session is left.
    5. C starts on A's very ports (a leftover HAProxy would stop it) and ends on
       SIGTERM as cleanly as on Ctrl-C: status 0, no DashboardAgent or
       RuntimeEnvAgent left.
    """
    port, stats, metrics = free_port(), free_port(), free_port()
    ports = ("--stats-port", str(stats), "--metrics-port", str(metrics))
    a = Server(bundle, tmp_path, port, *ports)
    b = Server(bundle, tmp_path, free_port())
    c = None
    try:
        a.wait_ready()
        b.wait_ready()
        answer, want = a.predict(), Predictor(bundle).predict(ROWS)
        assert answer["predictions"] == want["predictions"] and answer == b.predict()
        np.testing.assert_allclose(answer["probabilities"], want["probabilities"], atol=1e-6)
        assert _own_ports(a) == {port, stats, metrics}
        listeners = listening_inodes()
        for server in (a, b):
            own = _own_ports(server)
            assert len(own) == 3
            bound = {(addr, p) for addr, p in listeners.values() if p in own}
            assert bound == {("127.0.0.1", p) for p in own}, bound
        # ... and the replica ports HAProxy forwards to (read from A's HAProxy config)
        assert_loopback_only(serve_listeners(port), {port, stats, metrics})

        taken = Server(bundle, tmp_path, port)
        assert taken.proc.wait(timeout=120) == 2, taken.log()
        err = taken.err.read_text()
        assert err.count("\n") == 1 and f"port {port} (HTTP) on 127.0.0.1" in err, err
        holder = int(err.split("held by pid ", 1)[1].split()[0])
        assert holder in _session(a.sid) and "haproxy" in err, err

        assert _ray_stop_force(b.sid)
        assert b.proc.wait(timeout=120) == 1, b.log()
        assert "exited under the server" in b.out.read_text()
        left = _wait_empty(b.sid, timeout=30)
        assert not left, f"left after Ray was killed under the server: {left}"
        record(
            "serve_side_by_side",
            {
                "servers up at once": 2,
                "taken port named with its pid": True,
                "exit status after Ray was killed under it": 1,
                "processes left": 0,
            },
        )

        t0 = time.monotonic()
        a.proc.kill()
        a.proc.wait(timeout=30)
        killed = _ray_stop_force(a.sid)
        left = _wait_empty(a.sid)
        assert not left, f"left from the killed server: {left}"
        gone_s = time.monotonic() - t0

        t0 = time.monotonic()
        c = Server(bundle, tmp_path, port, *ports)
        c.wait_ready()
        c.predict()
        ready_s = time.monotonic() - t0
        record(
            "serve_sigkill_ray_stop",
            {
                "Ray processes still there for the emulated ray stop": len(killed),
                "s until nothing of it was left": round(gone_s, 1),
                "s until a server on the same 3 ports answered": round(ready_s, 1),
            },
        )
        t0 = time.monotonic()
        assert c.stop(signal.SIGTERM) == 0, c.log()
        assert "shutting down" in c.out.read_text()
        left = _wait_empty(c.sid, timeout=30)
        assert not left, f"left after SIGTERM: {left}"
        record(
            "serve_sigterm",
            {"exit status": 0, "s until nothing was left": round(time.monotonic() - t0, 1)},
        )
    finally:
        for server in (a, b, c):
            if server is not None:
                server.cleanup()
