"""Tracking cost (issue 3): the same in-process run with tracking on and off.

    python benchmarks/bench_tracking.py [--reps 5]

Tracking on records the run (config, params, per-epoch metrics, checkpoints, data
profile) in the ExperimentDB and registers the best checkpoint; off does neither.
Interleaved, median of --reps; prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def run_once(tmp: Path, tracking: bool) -> float:
    from kiln import Trainer, TrainingConfig

    cfg = TrainingConfig(
        dataset="digits",
        epochs=20,
        batch_size=32,
        learning_rate=2e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        validation_split=0.2,
        random_seed=0,
        model={"name": "mlp", "hidden": [256, 128]},
        tracking=tracking,
        register_as="digits-bench" if tracking else None,
        keep_best_k=1,
        keep_last_n=1,
    )
    trainer = Trainer(
        training_config=cfg,
        storage_path=tmp / "runs",
        db_path=tmp / "kiln.db",
        artifacts_dir=tmp / "artifacts",
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    on, off = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run_once(tmp / "warm", False)  # imports and first-touch costs out of the way
        for r in range(args.reps):
            off.append(run_once(tmp / f"off{r}", False))
            on.append(run_once(tmp / f"on{r}", True))
    k, b = statistics.median(on), statistics.median(off)
    print("| benchmark | kiln | baseline | ratio | target | note |")
    print("|---|---|---|---|---|---|")
    print(
        f"| tracking on vs off (digits MLP, 20 epochs, in-process, wall) | {k:.2f} s | {b:.2f} s | "
        f"{k / b:.3f} | <= 1.02 | on: run + metrics + profile + registration; median of {args.reps} |"
    )


if __name__ == "__main__":
    main()
