"""Checkpoints on storage: commit order, retention, torn uploads, URIs (no Ray).

``file://`` URIs go through pyarrow exactly as ``s3://`` or ``gs://`` would, so they
stand in for an object store here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kiln import TaskSpec, Trainer, TrainingConfig
from kiln.engine.checkpoint import CheckpointManager
from kiln.engine.checkpoint_reader import resolve_checkpoint
from kiln.engine.checkpoint_storage import (
    CheckpointStore,
    StagedCheckpoints,
    local_copy,
    split_location,
)
from kiln.errors import CheckpointError
from kiln.paths import RunPaths


def _save(manager: CheckpointManager, epoch: int, val_loss: float) -> str:
    model = torch.nn.Linear(2, 1)
    saved = manager.save_checkpoint(epoch, {"val_loss": val_loss}, model)
    assert saved is not None
    return saved.path


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/data/runs/r1/checkpoints", ("/data/runs", "r1", "checkpoints")),
        ("/r1/ckpt", ("/", "r1", "ckpt")),
        ("s3://bucket/runs/r1/checkpoints/", ("s3://bucket/runs", "r1", "checkpoints")),
        ("file:///mnt/runs/r1/checkpoints", ("file:///mnt/runs", "r1", "checkpoints")),
    ],
)
def test_split_location_names_what_ray_train_uploads_to(location, expected):
    assert split_location(location) == expected


def test_split_location_refuses_a_location_without_a_run_folder():
    with pytest.raises(CheckpointError, match="<storage>/<run>/<checkpoints>"):
        split_location("ckpt")


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_staged_checkpoints_commit_then_prune_in_storage(tmp_path, as_uri):
    remote = tmp_path / "remote" / "run" / "checkpoints"
    location = f"file://{remote}" if as_uri else str(remote)
    staged = StagedCheckpoints(CheckpointStore(location), tmp_path / "stage", 0, via_ray=False)
    manager = CheckpointManager(staged.dir, keep_best_k=1, keep_last_n=1)
    for epoch, loss in ((1, 0.5), (2, 0.9), (3, 0.7)):
        staged.upload(_save(manager, epoch, loss))
        staged.commit()
    store = CheckpointStore(location)
    # best (epoch 1) and latest (epoch 3) kept; epoch 2 pruned, in storage as in staging
    assert store.committed() == ["epoch_0001", "epoch_0003"]
    assert sorted(p.name for p in remote.iterdir()) == ["epoch_0001", "epoch_0003", "manifest.json"]
    assert store.resolve("latest") == store.ref("epoch_0003")
    assert store.resolve("best") == store.ref("epoch_0001")
    assert store.latest_ref() == store.ref("epoch_0003")


def test_an_upload_that_stopped_part_way_is_never_latest(tmp_path):
    remote = tmp_path / "run" / "checkpoints"
    staged = StagedCheckpoints(CheckpointStore(str(remote)), tmp_path / "stage", 0, via_ray=False)
    manager = CheckpointManager(staged.dir, keep_best_k=2, keep_last_n=2)
    staged.upload(_save(manager, 1, 0.5))
    staged.commit()
    torn = _save(manager, 2, 0.4)
    staged.upload(torn)  # the files arrive, then the node dies before the commit
    model = remote / "epoch_0002" / "model.pt"
    model.write_bytes(model.read_bytes()[:10])  # cut short
    assert resolve_checkpoint("latest", remote).name == "epoch_0001"
    (remote / "epoch_0002" / "model.pt").unlink()  # or not there at all
    assert resolve_checkpoint("latest", remote).name == "epoch_0001"
    uri = CheckpointStore(f"file://{remote}")  # a URI reader goes by the manifest alone
    assert uri.resolve("latest").endswith("/epoch_0001")


def test_download_and_local_copy_of_a_uri(tmp_path):
    remote = tmp_path / "remote" / "run" / "checkpoints"
    staged = StagedCheckpoints(
        CheckpointStore(f"file://{remote}"), tmp_path / "stage", 0, via_ray=False
    )
    manager = CheckpointManager(staged.dir, keep_best_k=1, keep_last_n=1)
    staged.upload(_save(manager, 1, 0.5))
    staged.commit()
    local = CheckpointStore(f"file://{remote}").download(tmp_path / "driver")
    assert resolve_checkpoint("latest", local).name == "epoch_0001"
    assert not [p for p in local.iterdir() if ".tmp-" in p.name]
    with local_copy(f"file://{remote}/epoch_0001") as folder:
        assert json.loads((folder / "metadata.json").read_text())["epoch"] == 1
    with (
        pytest.raises(CheckpointError, match="cannot download"),
        local_copy(f"file://{remote}/epoch_0009"),
    ):
        pass


def test_a_restarted_rank_0_stages_what_storage_committed(tmp_path):
    remote = tmp_path / "run" / "checkpoints"
    first = StagedCheckpoints(CheckpointStore(str(remote)), tmp_path / "s1", 0, via_ray=False)
    manager = CheckpointManager(first.dir, keep_best_k=1, keep_last_n=1)
    first.upload(_save(manager, 1, 0.5))
    first.commit()
    first.upload(_save(manager, 2, 0.3))  # uploaded, never committed: the worker died here
    again = StagedCheckpoints.open(str(remote), rank=0, via_ray=True)
    try:
        assert again.committed == ["epoch_0001"]
        assert sorted(p.name for p in remote.iterdir()) == ["epoch_0001", "manifest.json"]
        assert again.store.latest_ref() == str(remote / "epoch_0001")
        assert resolve_checkpoint("latest", again.dir).name == "epoch_0001"
        assert again.dir.is_relative_to(again.root) and not again.dir.is_relative_to(remote)
    finally:
        again.close()
    assert not again.root.exists()
    shutil.rmtree(first.root)


def _train(storage: str, home, epochs: int, resume: str | None = None) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    cfg = TrainingConfig(
        epochs=epochs, batch_size=16, random_seed=1, run_name="uri", tracking=False,
        keep_best_k=1, keep_last_n=1, model={"name": "mlp", "hidden": [4]},
    )  # fmt: skip
    return Trainer(
        training_config=cfg,
        task_spec=TaskSpec.classification(name="uri", num_classes=2),
        storage_path=storage,
        paths=RunPaths.resolve(home),
        verbose=False,
    ).train((x[:32], y[:32]), (x[32:], y[32:]), resume_from=resume)


def test_in_process_run_on_a_uri_resumes_latest_from_storage(tmp_path):
    storage = f"file://{tmp_path / 'bucket' / 'runs'}"
    first = _train(storage, tmp_path, epochs=2)
    assert first["checkpoint_location"].startswith(storage + "/uri-")
    # the driver's copy, not a folder named "file:" somewhere
    assert first["latest_checkpoint_path"].startswith(str(tmp_path / "runs"))
    assert not (tmp_path / "file:").exists()
    again = _train(storage, tmp_path, epochs=3, resume="latest")
    assert again["resumed_from"] == f"{first['checkpoint_location']}/epoch_0002"
    assert [row["epoch"] for row in again["history"]] == [1, 2, 3]
    committed = CheckpointStore(again["checkpoint_location"]).committed()
    assert committed[-1] == "epoch_0003"
