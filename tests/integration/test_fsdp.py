"""strategy="fsdp": FSDP2 over 2 Ray Train worker actors (gloo on CPU) against DDP.

Three fits of the same data and model: DDP for 3 epochs; FSDP resumed from DDP's
epoch-1 checkpoint for epochs 2-3 (it exports and registers its best checkpoint);
and FSDP with activation checkpointing resumed from the second run's epoch-2 sharded
checkpoint. They show that FSDP continues DDP's curve with DDP's losses, that each rank
holds about half of DDP's parameter and optimizer-state bytes (measured from the local
shards in each rank), that resuming from DCP shards continues the curve exactly, and
that the checkpoint consolidated on rank 0 is the trained model (export parity passes,
and it scores the last epoch's validation loss on every validation row).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln import CallbackBase, TaskSpec, Trainer, TrainingConfig
from kiln.engine.checkpoint_reader import load_model_state
from kiln.engine.sharded_checkpoint import SHARDS_DIR, is_sharded_checkpoint
from kiln.models import build_model

FEATURES, CLASSES = 16, 3
MODEL = {"name": "mlp", "hidden": [64, 64]}
EPOCHS = 3
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    x[:, :CLASSES] += np.eye(CLASSES, dtype=np.float32)[y] * 1.5
    return x, y.astype(np.int64)


class StateBytes(CallbackBase):
    """Each rank writes the parameter and optimizer-state bytes it holds at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = str(out_dir)

    def on_train_end(self, logs=None):
        from kiln.engine.strategy import local_state_bytes

        held = local_state_bytes(self.model, self.optimizer)
        (Path(self.out_dir) / f"bytes{self.rank}.json").write_text(json.dumps(held))


def _fit(root: Path, name: str, *, resume_from: str | None = None, **overrides) -> dict:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # StateBytes
    out = root / name
    out.mkdir()
    settings = dict(
        epochs=EPOCHS,
        batch_size=16,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lr_scheduler="cosine",
        num_workers=2,
        random_seed=5,
        report_interval_s=0,
        keep_best_k=0,
        keep_last_n=2,
        tracking=False,
        run_name=name,
        model=MODEL,
    )
    results = Trainer(
        training_config=TrainingConfig(**{**settings, **overrides}),
        task_spec=TaskSpec.classification(name="blobs", num_classes=CLASSES),
        hooks=[StateBytes(out)],
        storage_path=root / "runs",
        db_path=root / "kiln.db",
        artifacts_dir=root / "artifacts",
        verbose=False,
    ).train(_data(192, 0), _data(33, 1), resume_from=resume_from)
    results["bytes"] = [json.loads((out / f"bytes{r}.json").read_text()) for r in (0, 1)]
    return results


@pytest.fixture(scope="module")
def fits(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("fsdp")
    ddp = _fit(root, "ddp", keep_last_n=3)
    # FSDP takes over DDP's epoch-1 checkpoint (a plain optimizer state, loaded by name).
    fsdp = _fit(
        root,
        "fsdp",
        strategy="fsdp",
        export_formats=["onnx"],
        register_as="fsdp-mlp",
        tracking=True,
        resume_from=ddp["checkpoints"][0],
    )
    # Activation checkpointing recomputes, it does not change the numbers or the keys.
    epoch2 = Path(fsdp["latest_checkpoint_path"]).parent / "epoch_0002"
    resumed = _fit(
        root, "resumed", strategy="fsdp", activation_checkpointing=True, resume_from=str(epoch2)
    )
    return ddp, fsdp, resumed


@pytest.mark.timeout(600)  # the shared fixture runs three 2-worker fits
def test_fsdp_reaches_ddp_loss_with_half_the_bytes_per_rank(fits):
    ddp, fsdp, _ = fits
    assert fsdp["resumed_from"] == ddp["checkpoints"][0]  # epoch 1 of the DDP run
    for key in ("train_loss", "val_loss", "val_accuracy"):
        got = [h[key] for h in fsdp["history"]]
        want = [h[key] for h in ddp["history"]]
        assert got == pytest.approx(want, rel=1e-3, abs=1e-4), key
    assert fsdp["history"][-1]["train_loss"] < fsdp["history"][1]["train_loss"]
    full = ddp["bytes"][0]
    assert ddp["bytes"][1] == full  # DDP: each rank holds everything
    assert full["param_bytes"] == 4 * sum(p.numel() for p in _model().parameters())
    for rank_bytes in fsdp["bytes"]:  # dim-0 shards: half, give or take an odd row
        for kind in ("param_bytes", "optimizer_bytes"):
            assert 0.45 <= rank_bytes[kind] / full[kind] <= 0.55, (kind, rank_bytes, full)
    total = sum(b["param_bytes"] + b["optimizer_bytes"] for b in fsdp["bytes"])
    assert total == pytest.approx(full["param_bytes"] + full["optimizer_bytes"], rel=0.01)


def _model() -> torch.nn.Module:
    return build_model(MODEL, input_shape=(FEATURES,), num_outputs=CLASSES)


@pytest.mark.timeout(600)  # the shared fixture runs three 2-worker fits
def test_sharded_checkpoints_consolidate_export_and_register(fits):
    _, fsdp, _ = fits
    kept = [Path(p) for p in fsdp["checkpoints"]]
    assert [p.name for p in kept] == ["epoch_0002", "epoch_0003"]  # keep_last_n=2
    for ckpt in kept:
        assert is_sharded_checkpoint(ckpt)
        shards = sorted(p.name for p in (ckpt / SHARDS_DIR).iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert not any(".tmp-" in p.name for p in ckpt.parent.iterdir())
    # model.pt is the whole trained model: it scores the last epoch's val loss on all rows.
    model = _model()
    model.load_state_dict(load_model_state(fsdp["latest_checkpoint_path"]))
    x, y = _data(33, 1)
    with torch.no_grad():
        val_loss = F.cross_entropy(model.eval()(torch.as_tensor(x)), torch.as_tensor(y)).item()
    assert val_loss == pytest.approx(fsdp["history"][-1]["val_loss"], rel=1e-5)
    manifest = json.loads((Path(fsdp["bundle_path"]) / "manifest.json").read_text())
    assert manifest["parity"]["onnx"]["max_abs_diff"] < 1e-4
    assert fsdp["registered"].startswith("fsdp-mlp:1")


@pytest.mark.timeout(600)  # the shared fixture runs three 2-worker fits
def test_resume_from_sharded_checkpoint_continues_the_curve(fits):
    _, fsdp, resumed = fits
    assert resumed["resumed_from"].endswith("epoch_0002")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]  # the history carries on
    for key in ("train_loss", "val_loss", "learning_rate"):
        assert resumed["history"][-1][key] == pytest.approx(fsdp["history"][-1][key], rel=1e-6)
