"""cluster.yaml starts a token-protected cluster and still passes Ray's own validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    text = CLUSTER.read_text()
    for placeholder, ip in (("HEAD_NODE_IP", "10.0.0.1"), ("WORKER_1_IP", "10.0.0.2")):
        text = text.replace(placeholder, ip)
    return yaml.safe_load(text.replace("WORKER_2_IP", "10.0.0.3"))


def test_ray_accepts_it_as_ray_up_would(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_head_makes_a_token_before_ray_start_and_workers_get_it(config):
    head = config["head_start_ray_commands"]
    generate = next(i for i, c in enumerate(head) if "get-auth-token --generate" in c)
    start = next(i for i, c in enumerate(head) if "ray start --head" in c)
    assert generate < start  # the other order gives a cluster without a token check
    assert all("RAY_AUTH_MODE=token" in head[i] for i in (generate, start))
    token = "/home/ubuntu/.ray/auth_token"
    assert config["auth"]["ssh_user"] == "ubuntu" and token in config["cluster_synced_files"]
    workers = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert workers and all("RAY_AUTH_MODE=token" in c for c in workers)
