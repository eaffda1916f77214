"""The KubeRay RayJob example is well formed and runs kiln's own entry point.

(cluster.yaml is held to Ray's own validator in test_serve_cluster_auth.py.)"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


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
