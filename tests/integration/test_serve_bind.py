"""`kiln serve` keeps its HTTP listeners on 127.0.0.1, HAProxy's stats/metrics included.

Listening sockets are read from /proc (``/proc/net/tcp*`` and each process's fds).
Checked: every socket of our HAProxy processes (HTTP frontend, stats, metrics) and
the replicas' direct-ingress HTTP ports HAProxy forwards to. Not checked: Ray's own
cluster ports (GCS, raylet, worker and Serve inter-deployment gRPC), which Ray binds
for other nodes whatever Serve's host is.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from kiln.export import create_export_bundle
from kiln.serve import Predictor, build_app
from kiln.serve._ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROWS = [[0.1, -0.2, 0.3, 0.4], [1.0, 2.0, -3.0, 0.5]]


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def _listening() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) for every listening TCP socket."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                addr, port = fields[1].split(":")
                found[int(fields[9])] = (_address(addr), int(port, 16))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _haproxy_serving(port: int) -> tuple[set[int], Path]:
    """Pids of the HAProxy processes that share the config of the one on ``port``."""
    listening = _listening()
    argvs = {
        int(p.name): _cmdline(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()
    }
    procs = {pid: a for pid, a in argvs.items() if a and Path(a[0]).name == "haproxy" and "-f" in a}
    config = None
    for pid, argv in procs.items():
        if any(listening.get(i, ("", 0))[1] == port for i in _socket_inodes(pid)):
            config = argv[argv.index("-f") + 1]
    assert config is not None, f"no HAProxy listens on port {port}"
    pids = {pid for pid, argv in procs.items() if config in argv}
    return pids, Path(config)


def _serve_listeners(port: int) -> dict[str, list[tuple[str, int]]]:
    """Listeners of our HAProxy processes, and of the replica ports they forward to."""
    pids, config = _haproxy_serving(port)
    listening = _listening()
    haproxy = sorted({listening[i] for pid in pids for i in _socket_inodes(pid) if i in listening})
    replica_ports = {
        int(line.split()[2].rsplit(":", 1)[1])
        for line in config.read_text().splitlines()
        if line.strip().startswith("server ")
    }
    replicas = sorted(a for a in listening.values() if a[1] in replica_ports)
    return {"haproxy": haproxy, "replicas": replicas}


def _assert_loopback_only(listeners: dict[str, list[tuple[str, int]]], ports: set[int]) -> None:
    assert listeners["replicas"], f"no replica HTTP listener found: {listeners}"
    every = listeners["haproxy"] + listeners["replicas"]
    exposed = [a for a in every if not ipaddress.ip_address(a[0]).is_loopback]
    assert not exposed, f"listening beyond loopback: {exposed} (all: {listeners})"
    missing = ports - {p for _, p in listeners["haproxy"]}
    assert not missing, f"HAProxy is not listening on {missing}: {listeners}"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    task = {"task_type": "classification", "input_shape": [4], "class_names": ["a", "b", "c"]}
    root = tmp_path_factory.mktemp("bind_bundles")
    return create_export_bundle(model, None, task, None, root, bundle_name="m")


@pytest.fixture()
def held_port():
    """A port this process listens on, so nothing else can bind it."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_default_ingress_listens_on_loopback_only(ray_local, bundle, held_port, monkeypatch):
    """start_serve's default (HAProxy) on the shared Ray: stats and metrics included.

    Its first pick for HAProxy's ports is one another process took after the pick (as a
    second server starting at the same time can): HAProxy cannot bind it, and Serve is
    started again on new picks.
    """
    from ray import serve

    import kiln.serve._ports as ports
    from kiln.serve.runner import METRICS_PORT_ENV, STATS_PORT_ENV, start_serve

    picks = []
    real_free_port = ports.free_port

    def taken_first(host: str = "127.0.0.1") -> int:
        picks.append(held_port if not picks else real_free_port(host))
        return picks[-1]

    monkeypatch.setattr(ports, "free_port", taken_first)
    port = real_free_port()
    env = start_serve(host="127.0.0.1", port=port)
    try:
        stats, metrics = int(env[STATS_PORT_ENV]), int(env[METRICS_PORT_ENV])
        assert held_port not in (stats, metrics) and len(picks) == 4, (picks, env)
        serve.run(
            build_app(bundle, num_cpus=0.25, runtime_env_vars=env), name="bind", route_prefix="/"
        )
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"inputs": ROWS}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == Predictor(bundle).predict(ROWS)["predictions"]
        _assert_loopback_only(_serve_listeners(port), {port, stats, metrics})
    finally:
        serve.shutdown()


def test_chosen_port_taken_is_named_not_replaced(ray_local, held_port):
    """A port the caller chose is never swapped for another: the error names its holder."""
    from kiln.errors import PortInUseError
    from kiln.serve._ports import free_port
    from kiln.serve.runner import start_serve

    with pytest.raises(PortInUseError) as caught:
        start_serve(host="127.0.0.1", port=free_port(), metrics_port=held_port)
    message = str(caught.value)
    assert f"port {held_port} (HAProxy metrics)" in message, message
    assert f"held by pid {os.getpid()}" in message and "--metrics-port" in message, message


def _wait_until(check, deadline: float, proc: subprocess.Popen, what: str, log: Path):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kiln serve exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}:\n{_tail(log)}")


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def test_kiln_serve_subprocess_end_to_end(bundle, tmp_path):
    """`kiln serve BUNDLE --port P` in its own Ray: predict, loopback only, Ctrl-C exits."""
    port, stats, metrics = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        KILN_HOME=str(tmp_path / "home"),
        # Own ports, so a Serve left on this machine cannot collide with this one.
        RAY_SERVE_HAPROXY_STATS_PORT=str(stats),
        RAY_SERVE_HAPROXY_METRICS_PORT=str(metrics),
    )
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "serve", str(bundle), "--port", str(port)],
            stdout=o,
            stderr=e,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        _wait_until(lambda: "serving" in out.read_text(), deadline, proc, "startup", err)
        _wait_until(
            lambda: httpx.get(url + "/healthz", timeout=10).status_code == 200,
            deadline,
            proc,
            "/healthz",
            err,
        )
        assert f"{url}/predict" in out.read_text()
        r = httpx.post(url + "/predict", json={"inputs": ROWS}, timeout=60)
        assert r.status_code == 200, r.text
        want = Predictor(bundle).predict(ROWS)
        assert r.json()["predictions"] == want["predictions"]
        np.testing.assert_allclose(r.json()["probabilities"], want["probabilities"], atol=1e-6)
        _assert_loopback_only(_serve_listeners(port), {port, stats, metrics})

        os.kill(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"kiln serve did not exit within 120 s of SIGINT:\n{_tail(err)}")
        assert rc == 0, _tail(err)
        assert "shutting down" in out.read_text()
        deadline = time.monotonic() + 60
        while any(p == port for _, p in _listening().values()):
            assert time.monotonic() < deadline, f"port {port} still listening after exit"
            time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
