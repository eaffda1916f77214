"""strategy="fsdp" on CUDA: FSDP2 over nccl, DCP checkpoints, resume (skipped without CUDA).

One worker per GPU; the 2-worker case needs 2 GPUs. Each run trains the built-in
transformer with activation checkpointing, writes sharded checkpoints, resumes from
the first one, and checks that the resumed run continues the curve.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln import Trainer, TrainingConfig
from kiln.engine.sharded_checkpoint import is_sharded_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.requires_gpu, pytest.mark.slow]


def _fit(root: Path, name: str, workers: int, resume_from: str | None = None) -> dict:
    config = TrainingConfig(
        epochs=3,
        batch_size=16,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        num_workers=workers,
        use_gpu=True,
        strategy="fsdp",
        activation_checkpointing=True,
        keep_best_k=0,
        keep_last_n=3,
        tracking=False,
        report_interval_s=0,
        run_name=name,
        dataset="tiny_tokens",  # token progressions mod 32, built in memory
        model={"name": "tiny_transformer", "vocab_size": 32, "max_seq_len": 16},
    )
    trainer = Trainer(training_config=config, storage_path=root / "runs", verbose=False)
    return trainer.train(resume_from=resume_from)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_fsdp_on_cuda_trains_checkpoints_and_resumes(tmp_path, ray_local, workers):
    if torch.cuda.device_count() < workers:
        pytest.skip(f"needs {workers} CUDA devices; {torch.cuda.device_count()} present")
    first = _fit(tmp_path, "fsdp", workers)
    history = first["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    epoch1 = Path(first["checkpoints"][0])
    assert epoch1.name == "epoch_0001" and is_sharded_checkpoint(epoch1)
    resumed = _fit(tmp_path, "resumed", workers, resume_from=str(epoch1))
    for key in ("train_loss", "val_loss"):
        assert resumed["history"][-1][key] == pytest.approx(history[-1][key], rel=1e-4)
