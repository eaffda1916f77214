"""``start_serve`` keeps its HTTP listeners on 127.0.0.1, HAProxy's stats/metrics included
(the `kiln serve` command's are checked in test_serve_lifetime.py, on servers it runs).

Listening sockets are read from /proc (``/proc/net/tcp*`` and each process's fds).
Checked: every socket of our HAProxy processes (HTTP frontend, stats, metrics) and
the replicas' direct-ingress HTTP ports HAProxy forwards to. Not checked: Ray's own
cluster ports (GCS, raylet, worker and Serve inter-deployment gRPC), which Ray binds
for other nodes whatever Serve's host is.
"""

from __future__ import annotations

import os
import socket

import httpx
import pytest
import torch
from listeners import assert_loopback_only, serve_listeners
from torch import nn

from kiln.export import create_export_bundle
from kiln.serve import Predictor, build_app
from kiln.serve._ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROWS = [[0.1, -0.2, 0.3, 0.4], [1.0, 2.0, -3.0, 0.5]]


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
        assert_loopback_only(serve_listeners(port), {port, stats, metrics})
    finally:
        serve.shutdown()


def test_chosen_port_taken_is_named_not_replaced(ray_local, held_port):
    """A port the caller chose is never swapped for another: the error names its holder."""
    from kiln.errors import PortInUseError
    from kiln.serve.runner import start_serve

    with pytest.raises(PortInUseError) as caught:
        start_serve(host="127.0.0.1", port=free_port(), metrics_port=held_port)
    message = str(caught.value)
    assert f"port {held_port} (HAProxy metrics)" in message, message
    assert f"held by pid {os.getpid()}" in message and "--metrics-port" in message, message
