"""FSDP vs DDP (issue 14): what each rank holds, side by side.

    python benchmarks/bench_fsdp.py [--width 1024] [--epochs 2]

Trains the same MLP on the same rows twice over 2 Ray Train worker actors (gloo on
CPU): ``strategy="ddp"`` then ``strategy="fsdp"``. Each rank measures, at the end,
the bytes of parameters and of optimizer state (AdamW) that it holds: its local
shards under FSDP, everything under DDP. Prints a markdown table (benchmarks/run.py
collects it into RESULTS.md) with the per-rank bytes, the ratio fsdp / ddp and the
final validation losses.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from kiln import CallbackBase, TaskSpec, Trainer, TrainingConfig


class StateBytes(CallbackBase):
    """Each rank writes the parameter and optimizer-state bytes it holds at the end."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, logs=None):
        from kiln.engine.strategy import local_state_bytes

        held = local_state_bytes(self.model, self.optimizer)
        (Path(self.out_dir) / f"bytes{self.rank}.json").write_text(json.dumps(held))


def _data(n: int, features: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, features)).astype(np.float32)
    x[:, :classes] += np.eye(classes, dtype=np.float32)[y]
    return x, y.astype(np.int64)


def fit(strategy: str, width: int, epochs: int, root: Path) -> dict:
    out = root / strategy
    out.mkdir()
    config = TrainingConfig(
        epochs=epochs,
        batch_size=64,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        num_workers=2,
        strategy=strategy,
        tracking=False,
        keep_best_k=0,
        keep_last_n=1,
        report_interval_s=0,
        model={"name": "mlp", "hidden": [width, width, width]},
    )
    results = Trainer(
        training_config=config,
        task_spec=TaskSpec.classification(name="bench", num_classes=10),
        hooks=[StateBytes(str(out))],
        storage_path=root / "runs",
        verbose=False,
    ).train(_data(4096, 64, 10, 0), _data(512, 64, 10, 1))
    ranks = [json.loads((out / f"bytes{r}.json").read_text()) for r in (0, 1)]
    return {"ranks": ranks, "loss": results["history"][-1]["val_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {s: fit(s, args.width, args.epochs, Path(tmp)) for s in ("ddp", "fsdp")}
    ray.shutdown()
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    mib = float(2**20)
    print(f"MLP 64 -> 3 x {args.width} -> 10, AdamW, 2 workers (gloo), {args.epochs} epochs\n")
    print("| held per rank | ddp | fsdp rank 0 | fsdp rank 1 | ratio fsdp / ddp (max rank) |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("param_bytes", "optimizer_bytes"):
        full = ddp["ranks"][0][kind]
        shards = [r[kind] for r in fsdp["ranks"]]
        print(
            f"| {kind.replace('_', ' ')} | {full / mib:.2f} MiB | {shards[0] / mib:.2f} MiB | "
            f"{shards[1] / mib:.2f} MiB | {max(shards) / full:.3f} |"
        )
    print(
        f"| final val_loss | {ddp['loss']:.4f} | {fsdp['loss']:.4f} | | "
        f"{fsdp['loss'] / ddp['loss']:.4f} |"
    )


if __name__ == "__main__":
    main()
