"""A kiln run across two Ray nodes, built with Ray's own ``ray.cluster_utils.Cluster``.

The cluster (a head with no CPUs and its dashboard, two worker nodes of 1 CPU, each
with its own ``--temp-dir``, so the nodes share no local run directory) lives in a
child process: this test must not touch the session's ``ray_local``. The child runs,
and writes what it saw to a JSON file that the test then checks:

1. a 2-worker DDP run, one worker per node, ``storage_path`` a folder both nodes see;
   rank 0 stages its checkpoints under its own node's temp dir, and the driver reads
   them from storage only (the staging is gone when the run returns);
2. the same run on one node (a third node of 2 CPUs; the first two removed), with a
   ``file://`` URI ``storage_path``: its metrics and final weights equal run 1's;
3. ``ray job submit`` of ``jobs/train.py`` through the head's dashboard (it trains in
   its driver, on the head, while runs 1 and 2 run); the run lands in ``kiln runs list``;
4. run 1 with ``strategy="fsdp"`` on the two nodes: each rank writes its shards on its
   own node, and the checkpoint in storage holds both ranks' shards, which read back
   (DCP to one file) into exactly the gathered ``model.pt``; its losses are DDP's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kiln import TrainingHooks
from kiln.serve._ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
PLATFORM = REPO / "platform"
EPOCHS = 3
RUN_FILE = """\
dataset: digits
task: {task_type: classification}
model: {name: mlp, hidden: [16]}
epochs: 2
batch_size: 64
validation_split: 0.2
random_seed: 0
"""


def test_two_node_run_matches_one_node_and_takes_a_job(tmp_path):
    out = tmp_path / "seen.json"
    env = {**os.environ, "PYTHONPATH": f"{PLATFORM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    root = tempfile.mkdtemp(prefix="kc", dir="/tmp")  # short: Ray's socket paths live in it
    child = subprocess.Popen(
        [sys.executable, __file__, str(out), root],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = child.communicate(timeout=360)
    except subprocess.TimeoutExpired:
        child.terminate()  # the child shuts its cluster down on SIGTERM
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()  # Ray's reaper then stops the nodes it started
        shutil.rmtree(root, ignore_errors=True)
    assert child.returncode == 0, stdout[-4000:] + stderr[-6000:]
    seen = json.loads(out.read_text())

    two, one = seen["two_nodes"], seen["one_node"]
    nodes = seen["nodes"]
    # One worker on each worker node, and neither on the head (it has no CPUs).
    assert sorted(two["worker_nodes"]) == sorted([nodes["a"], nodes["b"]])
    assert one["worker_nodes"] == [nodes["c"], nodes["c"]]
    # Rank 0 staged on its own node (its own temp dir), not in storage; the driver
    # read checkpoints from storage, and the staging folder is gone.
    staged = two["staged"]
    rank0_node = "a" if two["worker_nodes"][0] == nodes["a"] else "b"
    assert staged["session_dir"].startswith(seen["temp_dirs"][rank0_node])
    assert staged["checkpoints"], "rank 0 staged nothing"
    assert not any(os.path.exists(p) for p in staged["checkpoints"])
    assert two["checkpoint_path"].startswith(seen["storage"] + os.sep)
    assert two["checkpoint_location"].startswith(seen["storage"] + os.sep)
    assert one["checkpoint_location"].startswith("file://")
    assert one["checkpoint_path"].startswith(seen["driver_runs"] + os.sep)  # downloaded
    # The same numbers on one node as on two.
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert one["history"][key] == pytest.approx(two["history"][key], abs=1e-6), key
    assert seen["max_abs_weight_diff"] <= 1e-6
    assert seen["bundle_files"], "the export bundle is empty"
    # ray job submit through the dashboard; the run is in `kiln runs list`.
    assert seen["job"]["succeeded"], seen["job"]["output"]
    rows = [line for line in seen["runs_list"].splitlines() if "digits-" in line]
    assert len(rows) == 1 and "completed" in rows[0], seen["runs_list"]
    # FSDP over the two nodes: both ranks' shards reached the one checkpoint in storage.
    fsdp = seen["fsdp"]
    assert sorted(fsdp["worker_nodes"]) == sorted([nodes["a"], nodes["b"]])
    assert fsdp["shards"] == [".metadata", "__0_0.distcp", "__1_0.distcp"], fsdp["shards"]
    # ... though rank 0's staged folders (on its node) only ever held rank 0's shards:
    # rank 1 wrote its own on its node, Ray Train uploaded them, and rank 1 removed them.
    rank0, rank1 = fsdp["staged"]
    assert rank0["shards"] and all(
        files == [".metadata", "__0_0.distcp"] for files in rank0["shards"].values()
    ), rank0
    assert rank1["session_dir"] != rank0["session_dir"] and not rank1["own_shards_left"], rank1
    assert fsdp["shards_vs_model_pt"] == 0.0
    # metadata.json lists every rank's shard at the size it has in storage (rank 0
    # gathered them), so a reader can tell a whole checkpoint from a torn upload.
    listed, stored = fsdp["shards_listed_vs_stored"]
    assert listed == stored and len(listed) == 3, (listed, stored)
    for key in ("train_loss", "val_loss"):
        assert fsdp["history"][key] == pytest.approx(two["history"][key], rel=1e-3), key
    print("cluster drill timings (s):", seen["timings"])


# ----------------------------------------------------------------------------- the child
class _RecordStaging(TrainingHooks):
    """Each rank, at the end of training: its node's session dir, the checkpoint folders
    it staged there (rank 0) with what their ``shards/`` hold, and any of its own shard
    folders still there (a rank > 0 of an FSDP run, whose shards went to storage).
    Written to ``<out>`` (rank 0) and ``<out>.rank<N>`` (the others)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_training_end(self) -> None:
        import glob

        import ray
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        session = ray._private.worker._global_node.get_session_dir_path()
        found = glob.glob(f"{session}/**/kiln-rank{rank}-*/checkpoints/epoch_*", recursive=True)
        shards = {
            p: sorted(os.listdir(f"{p}/shards")) for p in found if os.path.isdir(f"{p}/shards")
        }
        own = glob.glob(f"{session}/**/kiln-rank{rank}-*/shards-epoch_*", recursive=True)
        with open(self.out if rank == 0 else f"{self.out}.rank{rank}", "w") as f:
            json.dump({"session_dir": session, "checkpoints": found, "shards": shards,
                       "own_shards_left": own}, f)  # fmt: skip


def _train(storage: str, home: Path, name: str, hooks=(), **settings):
    import numpy as np

    from kiln import TaskSpec, Trainer, TrainingConfig
    from kiln.paths import RunPaths

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    cfg = TrainingConfig(
        epochs=EPOCHS, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, num_workers=2,
        random_seed=5, run_name=name, keep_best_k=1, keep_last_n=1,
        model={"name": "mlp", "hidden": [16]}, export_formats=["pytorch"], **settings,
    )  # fmt: skip
    return Trainer(
        training_config=cfg,
        task_spec=TaskSpec.classification(name="two", num_classes=2),
        hooks=list(hooks),
        storage_path=storage,
        paths=RunPaths.resolve(home),
        verbose=False,
    ).train((x[:64], y[:64]), (x[64:], y[64:]))


def _summary(results: dict) -> dict:
    history = {
        k: [row[k] for row in results["history"]]
        for k in ("train_loss", "val_loss", "val_accuracy")
    }
    keep = ("worker_nodes", "checkpoint_path", "checkpoint_location", "latest_checkpoint_path")
    return {"history": history, **{k: results[k] for k in keep}}


def _child(out: Path, root: Path) -> None:
    import signal
    import time

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: below
    os.environ["RAY_TMPDIR"] = str(root)  # Ray's address file and defaults stay in here
    import ray
    from ray.cluster_utils import Cluster

    temp = {name: str(root / name) for name in ("h", "a", "b", "c")}
    storage, home = root / "shared" / "runs", root / "home"
    seen: dict = {"temp_dirs": temp, "storage": str(storage), "timings": {}}
    started = time.monotonic()
    dashboard = free_port()
    (root / "ray").mkdir()  # RAY_TMPDIR's default temp dir (the address file goes there)
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args=dict(
                num_cpus=0, temp_dir=temp["h"],
                include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard,
                dashboard_agent_listen_port=free_port(),
            ),
        )  # fmt: skip
        a = cluster.add_node(num_cpus=1, temp_dir=temp["a"])
        b = cluster.add_node(num_cpus=1, temp_dir=temp["b"])
        ray.init(address=cluster.address, logging_level="WARNING")
        seen["nodes"] = {"a": a.node_id, "b": b.node_id}
        seen["timings"]["cluster_up"] = round(time.monotonic() - started, 1)
        address = f"http://127.0.0.1:{dashboard}"
        job_id = _submit_job(root, address, home, storage)  # it runs while runs 1 and 2 do

        t = time.monotonic()
        staged = root / "staged.json"
        two = _train(str(storage), home, "two-nodes", [_RecordStaging(str(staged))])
        seen["timings"]["two_node_run"] = round(time.monotonic() - t, 1)
        seen["two_nodes"] = {**_summary(two), "staged": json.loads(staged.read_text())}

        t = time.monotonic()
        staged = root / "fsdp_staged.json"
        fsdp = _train(str(storage), home, "fsdp-two-nodes", [_RecordStaging(str(staged))],
                      strategy="fsdp")  # fmt: skip
        seen["timings"]["fsdp_two_node_run"] = round(time.monotonic() - t, 1)
        seen["fsdp"] = {
            **_summary(fsdp),
            **_shards(fsdp["latest_checkpoint_path"], root),
            "staged": [json.loads(p.read_text()) for p in (staged, Path(f"{staged}.rank1"))],
        }

        t = time.monotonic()
        c = cluster.add_node(num_cpus=2, temp_dir=temp["c"])
        cluster.remove_node(a)
        cluster.remove_node(b)
        seen["nodes"]["c"] = c.node_id
        seen["timings"]["add_node_c"] = round(time.monotonic() - t, 1)
        one = _train(f"file://{root}/shared/uri-runs", home, "one-node")
        seen["timings"]["one_node_run"] = round(time.monotonic() - t, 1)
        seen["one_node"] = _summary(one)
        seen["driver_runs"] = str(home / "runs")
        seen["max_abs_weight_diff"] = _weight_diff(two, one)
        seen["bundle_files"] = sorted(os.listdir(one["bundle_path"]))

        seen["job"] = _wait_for_job(address, job_id)
        seen["timings"]["job_done"] = round(time.monotonic() - started, 1)
        listing = subprocess.run(
            [sys.executable, "-m", "kiln.cli", "--home", str(home), "runs", "list"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        seen["runs_list"] = listing.stdout + listing.stderr
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        seen["timings"]["total"] = round(time.monotonic() - started, 1)
        out.write_text(json.dumps(seen))


def _weight_diff(a: dict, b: dict) -> float:
    from kiln.engine.checkpoint import load_checkpoint_state

    x = load_checkpoint_state(a["latest_checkpoint_path"]).model_state
    y = load_checkpoint_state(b["latest_checkpoint_path"]).model_state
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def _shards(checkpoint: str, root: Path) -> dict:
    """The shard files of a sharded checkpoint, and how far what they hold (converted to
    one file with DCP's own tool) is from the gathered ``model.pt`` beside them."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from kiln.engine.checkpoint import load_checkpoint_state

    shards = Path(checkpoint) / "shards"
    whole = root / "fsdp_whole.pt"
    dcp_to_torch_save(shards, whole)
    from_shards = torch.load(whole, weights_only=True)["model"]
    gathered = load_checkpoint_state(checkpoint).model_state
    assert from_shards.keys() == gathered.keys(), (from_shards.keys(), gathered.keys())
    diff = max((from_shards[k] - gathered[k]).abs().max().item() for k in gathered)
    meta = json.loads((Path(checkpoint) / "metadata.json").read_text())
    listed = {f: meta["file_bytes"].get(f) for f in meta["files"] if f.startswith("shards/")}
    stored = {f"shards/{p.name}": p.stat().st_size for p in shards.iterdir()}
    return {
        "shards": sorted(os.listdir(shards)),
        "shards_vs_model_pt": diff,
        "shards_listed_vs_stored": [listed, stored],
    }


def _submit_job(root: Path, address: str, home: Path, storage: Path) -> str:
    """``ray job submit`` of jobs/train.py (in-process training in the job's driver)."""
    run_file = root / "digits.yaml"
    run_file.write_text(RUN_FILE)
    _wait_for_dashboard(address)
    runtime_env = {"env_vars": {"PYTHONPATH": str(PLATFORM), "KILN_HOME": str(home)}}
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
        "--no-wait", "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, str(REPO / "jobs" / "train.py"), str(run_file), "--workers", "0",
        "--storage", str(storage), "--quiet",
    ]  # fmt: skip
    job = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stdout + job.stderr
    return re.search(r"Job '(raysubmit_\w+)' submitted", job.stdout + job.stderr).group(1)


def _wait_for_dashboard(address: str) -> None:
    import time

    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:  # the jobs API answers once the dashboard and its agent are up
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            assert time.monotonic() < deadline, "the Ray dashboard did not come up"
            time.sleep(0.5)


def _wait_for_job(address: str, job_id: str) -> dict:
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 180
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, f"job {job_id} still {status} after 180 s"
        time.sleep(0.5)
    return {
        "succeeded": status == JobStatus.SUCCEEDED,
        "output": client.get_job_logs(job_id)[-4000:],
    }


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
