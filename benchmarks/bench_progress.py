"""Progress cost (issue 13): the quickstart with the live progress display and without.

    python benchmarks/bench_progress.py [--reps 5]

"on": ``Trainer(verbose=True)`` (the EpochProgress hook: a clock read per batch, a
step event every 0.25 s) with the CLI's live display listening, drawing to a
terminal-like console that discards its output. "off": ``verbose=False``, no hook.
Both: the quickstart's config (digits MLP, 30 epochs, in-process), tracking off.
Runs alternate; the statistic is the run's summed epoch time (train steps only, the
part the hook touches), median of --reps. One torch thread (both sides), so a busy
machine's oversubscription does not swamp the difference. Also the hook's own cost
per batch, timed alone. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
from pathlib import Path

from kiln.engine.progress import EpochProgress


def run_once(tmp: Path, progress: bool) -> float:
    from rich.console import Console

    from kiln import Trainer
    from kiln.cli._live import LiveTraining
    from kiln.cli.train import load_run_file

    cfg, task = load_run_file("examples/digits_mlp.yaml", ["tracking=false"], None)
    trainer = Trainer(
        training_config=cfg,
        task_spec=task,
        verbose=progress,
        storage_path=tmp / "runs",
        db_path=tmp / "kiln.db",
    )
    if progress:
        console = Console(file=io.StringIO(), force_terminal=True, width=120)
        with LiveTraining(console, "loading data"):
            results = trainer.train()
    else:
        results = trainer.train()
    return sum(h["epoch_duration_seconds"] for h in results["history"])


def per_batch_us(progress: bool, n: int = 200_000) -> float:
    """What the loop pays per batch for the hooks: float(loss) and the dispatch."""
    import time

    import torch

    from kiln.config import TrainingConfig
    from kiln.engine.worker import _Hooks

    hooks = [EpochProgress(30)] if progress else []
    dispatch = _Hooks(hooks, TrainingConfig(), None, None, 0, 1, 42, torch.device("cpu"))
    dispatch.training_start()
    dispatch.epoch_start(1)
    callback = dispatch.batch_end if dispatch.wants_batch_end else None
    loss = torch.tensor(0.5)
    start = time.perf_counter()
    for i in range(n):
        if callback is not None:
            callback(float(loss.detach()), i)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hook_us = statistics.median(per_batch_us(True) - per_batch_us(False) for _ in range(5))
    on, off = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run_once(tmp / "warm", False)  # imports and first-touch costs out of the way
        for r in range(args.reps):
            if r % 2:
                on.append(run_once(tmp / f"on{r}", True))
                off.append(run_once(tmp / f"off{r}", False))
            else:
                off.append(run_once(tmp / f"off{r}", False))
                on.append(run_once(tmp / f"on{r}", True))
    k, b = statistics.median(on), statistics.median(off)
    print("| benchmark | kiln | baseline | ratio | target | note |")
    print("|---|---|---|---|---|---|")
    print(
        f"| live progress on vs off (quickstart, 30 epochs in-process, summed epoch time) "
        f"| {k:.3f} s | {b:.3f} s | {k / b:.3f} | <= 1.02 | median of {args.reps}, "
        f"alternating; on: {', '.join(f'{x:.3f}' for x in on)}; "
        f"off: {', '.join(f'{x:.3f}' for x in off)} |"
    )
    print(
        f"| progress hook per batch (float(loss) + dispatch + clock read) | {hook_us:.2f} us "
        f"| 0 us | - | - | timed alone, median of 5 x 200k calls |"
    )


if __name__ == "__main__":
    main()
