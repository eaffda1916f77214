"""cluster.yaml passes Ray's own cluster-launcher validation (as `ray up` runs it), and
the KubeRay RayJob example is well formed and runs kiln's own entry point."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _filled_cluster_config(tmp_path: Path) -> dict:
    text = (ROOT / "cluster.yaml").read_text()
    text = text.replace("HEAD_NODE_IP", "10.0.0.1")
    text = text.replace("WORKER_1_IP", "10.0.0.2").replace("WORKER_2_IP", "10.0.0.3")
    token = tmp_path / "auth_token"
    token.write_text("t" * 32)
    config = yaml.safe_load(text)
    config["file_mounts"] = {
        k: (str(token) if v.endswith("auth_token") else str(ROOT))
        for k, v in config["file_mounts"].items()
    }
    return config


def test_cluster_yaml_passes_rays_own_validation(tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_filled_cluster_config(tmp_path))
    validate_config(config)  # raises on a schema error
    assert config["provider"]["type"] == "local"


def test_cluster_yaml_starts_every_node_with_token_auth(tmp_path):
    config = _filled_cluster_config(tmp_path)
    assert any(k.endswith("/.ray/auth_token") for k in config["file_mounts"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), config[key]
    head = " ".join(config["head_start_ray_commands"])
    assert "auth_token" in head  # refuses to start without the token


def test_kuberay_rayjob_runs_kilns_entrypoint():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/rayjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"] and (ROOT / argv[1]).is_file()
    assert (ROOT / argv[2]).is_file()  # the run file it names exists
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["workerGroupSpecs"][0]["replicas"] >= 2
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["KILN_HOME"].startswith("/mnt/")  # storage every pod sees
