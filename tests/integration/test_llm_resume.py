"""Step-level evaluation and checkpoints, and mid-epoch exact resume, in kiln's one loop.

A run stopped by an exception right after its step-7 checkpoint (mid-epoch) and
resumed from ``latest`` ends with the same weights as a run that was never stopped:
a LoRA fine-tune of a tiny model made here (dropout on, a shuffled DataLoader), and a
generic kiln run on in-memory data with gradient accumulation. Both in-process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from kiln import CallbackBase, Trainer, TrainingConfig
from kiln.engine.checkpoint import load_checkpoint_state, read_metadata
from kiln.llm import TrainerEngine, TrainingStatusWriter, create_default_config
from kiln.paths import RunPaths

pytestmark = pytest.mark.integration


class _StopAfter(CallbackBase):
    """Raises once ``stop_at`` batches are done, after run ``name``'s checkpoint ``wait_for``
    is on disk."""

    def __init__(self, stop_at: int, runs: Path, name: str, wait_for: str) -> None:
        self.stop_at, self.seen = stop_at, 0
        self.runs, self.pattern = runs, f"{name}-*/checkpoints/{wait_for}/metadata.json"

    def on_batch_end(self, batch, logs=None) -> None:
        self.seen += 1
        if self.seen < self.stop_at:
            return
        deadline = time.monotonic() + 30  # the step checkpoint is written in the background
        while not list(self.runs.glob(self.pattern)):
            assert time.monotonic() < deadline, f"no {self.pattern} under {self.runs}"
            time.sleep(0.05)
        raise RuntimeError("stopped on purpose")


class _Recorder(TrainingStatusWriter):
    """A status writer that also keeps every status it wrote."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.seen: list[dict] = []

    def update(self, state=None, **fields):
        snapshot = super().update(state, **fields)
        self.seen.append(snapshot)
        return snapshot


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from kiln.llm.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("resume")
    pairs = [(f"Say the number {i}.", str(i)) for i in range(20)]
    base = make_tiny_model(
        root / "base", [f"{q} {a}" for q, a in pairs], hidden_size=32, vocab_size=300
    )
    data = root / "rows.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, base, data


def _llm_config(llm, name: str):
    root, base, data = llm
    return create_default_config(
        model_path=str(base),
        dataset_path=str(data),
        output_dir=str(root / name),
        max_context_length=64,
        num_epochs=2,
        batch_size=2,  # 16 training rows: 8 batches an epoch, 16 steps
        learning_rate=1e-2,
        warmup_steps=2,
        lr_scheduler="cosine",
        validation_split=0.2,
        save_steps=7,
        eval_steps=3,
        lora={"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state matters
        run_name=name,
        tracking=False,
        logging_steps=1,
    )


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_llm_step_evals_checkpoints_and_exact_mid_epoch_resume(llm):
    root = llm[0]
    paths = RunPaths.resolve(root / "home")
    status = _Recorder(root / "status.json")
    straight = TrainerEngine(status, paths=paths).run_job(_llm_config(llm, "straight"))
    assert straight.success, straight.error
    history = straight.summary["history"]
    assert [[e["step"] for e in h.get("evals", [])] for h in history] == [[3, 6], [9, 12, 15]]
    assert all(e["val_perplexity"] > 1 for h in history for e in h["evals"])
    steps = straight.summary["steps"]  # every logging_steps=1 batch: loss, lr, tokens/s
    assert [s["step"] for s in steps] == list(range(1, 17))
    assert all(s["tokens_per_s"] > 0 and s["lr"] > 0 for s in steps[:-1])
    # The status file showed each step evaluation: evaluating, then its eval loss.
    at_3 = [s for s in status.seen if s["step"] == 3]
    assert at_3[0]["state"] == "evaluating"
    assert at_3[-1]["eval_loss"] == pytest.approx(history[0]["evals"][0]["val_loss"])

    killer = _StopAfter(9, paths.runs, "again", "epoch_0001_step_0000007")
    stopped = TrainerEngine(paths=paths, hooks=[killer]).run_job(_llm_config(llm, "again"))
    assert not stopped.success and "stopped on purpose" in stopped.error
    ckpt = next(paths.runs.glob("again-*/checkpoints/epoch_0001_step_0000007"))
    meta = read_metadata(ckpt)
    assert meta["epoch"] == 1 and meta["step"] == 7
    assert (
        meta["user"]["mid_epoch"]["batches"] == 7 and len(meta["user"]["mid_epoch"]["evals"]) == 2
    )

    resumed = TrainerEngine(paths=paths).run_job(_llm_config(llm, "again"), resume_from="latest")
    assert resumed.success, resumed.error
    assert Path(resumed.summary["resumed_from"]) == ckpt
    assert resumed.global_step == straight.global_step == 16
    a, b = _adapter(root / "straight"), _adapter(root / "again")
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    for row_a, row_b in zip(history, resumed.summary["history"], strict=True):
        assert row_b["train_loss"] == pytest.approx(row_a["train_loss"], abs=1e-6)
        assert row_b["val_loss"] == pytest.approx(row_a["val_loss"], abs=1e-6)
        assert [e["step"] for e in row_b["evals"]] == [e["step"] for e in row_a["evals"]]


def test_generic_run_resumes_mid_epoch_with_gradient_accumulation(tmp_path):
    """A kiln run on in-memory rows (dropout on, 2 batches per optimizer step)."""
    kw = dict(
        epochs=2,
        batch_size=16,  # 120 iris rows, 10% held out: 7 batches an epoch
        learning_rate=5e-3,
        lr_scheduler="cosine",
        warmup_ratio=0.2,
        random_seed=3,
        tracking=False,
        gradient_accumulation_steps=2,
        save_every_n_steps=2,  # every 2 optimizer steps (4 batches), epoch ends too
        keep_last_n=4,
        eval_every_n_steps=1,
        model={"name": "mlp", "hidden": [16], "dropout": 0.2},
    )

    def trainer(name: str, hooks=None) -> Trainer:
        cfg = TrainingConfig(run_name=name, **kw)
        return Trainer(training_config=cfg, hooks=hooks, paths=RunPaths.resolve(tmp_path))

    straight = trainer("a").train("iris")
    per_epoch = straight["history"][0]["global_step"]  # batches (8: 4 optimizer steps)
    assert [e["optimizer_step"] for e in straight["history"][0]["evals"]] == [1, 2, 3]
    saved = [Path(p).name for p in straight["checkpoints"]]
    mid = f"epoch_0002_step_{per_epoch + 4:07d}"  # optimizer step 6: 4 batches into epoch 2
    assert mid in saved, saved
    runs = RunPaths.resolve(tmp_path).runs
    with pytest.raises(Exception, match="stopped on purpose"):
        trainer("b", [_StopAfter(per_epoch + 5, runs, "b", mid)]).train("iris")
    resumed = trainer("b").train("iris", resume_from="latest")
    assert Path(resumed["resumed_from"]).name == mid
    final_a = load_checkpoint_state(straight["latest_checkpoint_path"]).model_state
    final_b = load_checkpoint_state(resumed["latest_checkpoint_path"]).model_state
    for key in final_a:
        assert torch.allclose(final_a[key], final_b[key], rtol=0, atol=1e-6), key
    assert resumed["history"][-1]["train_loss"] == pytest.approx(
        straight["history"][-1]["train_loss"], abs=1e-6
    )
