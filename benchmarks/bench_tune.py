"""kiln.tune benchmarks: ASHA vs FIFO, kiln's per-trial overhead, trivial trials per second.

    python benchmarks/bench_tune.py            # prints a markdown table (about 3-4 minutes)

1. The same search (space, samples and seed) under ASHA and FIFO: epochs spent, wall
   time and the best val_loss each reaches (digits, MLP, 12 samples x 12 epochs).
2. kiln's per-trial overhead: the same FIFO grid run by kiln.tune.search and by a
   hand-written Tune function trainable that runs the same model, optimizer, schedule
   and data loop itself (iris, 8 trials x 10 epochs); ratio of wall times.
3. Trivial trials per second (1 epoch on 32 rows): kiln with reused trial actors, and
   a bare Tune function that reports once, with and without reuse_actors.
Each search runs on one shared local Ray with 2 CPUs (started once, not timed).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402

from kiln.config import TrainingConfig  # noqa: E402
from kiln.data import get_dataset  # noqa: E402
from kiln.tune import search  # noqa: E402

ROOT = Path(tempfile.mkdtemp(prefix="kiln-bench-tune-"))


def _paths(tag: str) -> dict:
    return {
        "storage_path": ROOT / tag / "tune",
        "db_path": ROOT / tag / "kiln.db",
        "artifacts_dir": ROOT / tag / "artifacts",
        "data_dir": ROOT / "datasets",
    }


def asha_vs_fifo() -> list[dict]:
    base = TrainingConfig(
        epochs=12, batch_size=32, validation_split=0.2, random_seed=0, tracking=False,
        model={"name": "mlp", "hidden": [64]},
    )  # fmt: skip
    space = {
        "learning_rate": tune.loguniform(1e-5, 3e-2),
        "model.hidden": tune.choice([[32], [64], [128, 64]]),
    }
    rows = []
    for scheduler in ("fifo", "asha"):
        started = time.perf_counter()
        result = search(
            base, None, "digits", None, space, num_samples=12, scheduler=scheduler,
            seed=7, grace_period=2, reduction_factor=2, **_paths(scheduler),
        )  # fmt: skip
        wall = time.perf_counter() - started
        rows.append(
            {
                "scheduler": scheduler,
                "trials": len(result.trials),
                "epochs": int(result.trials["epochs"].sum()),
                "stopped": int(result.trials["stopped_early"].sum()),
                "wall_s": wall,
                "best_val_loss": result.best_metrics["val_loss"],
                "best_val_accuracy": result.best_metrics["val_accuracy"],
            }
        )
    return rows


# ---------------------------------------------------------------------- hand-written trial
def hand_trial(config, x=None, y=None):
    """The same loop kiln runs, written out: seed, MLP, AdamW + cosine, shuffled batches."""
    torch.manual_seed(0)
    n_val = int(len(x) * 0.2)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    xv, yv = x[order[:n_val]], y[order[:n_val]]
    xt, yt = x[order[n_val:]], y[order[n_val:]]
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, int(y.max()) + 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=0.01)
    epochs, bs = 10, 16
    steps = epochs * ((len(xt) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(epoch))
        total = 0.0
        for i in range(0, len(xt), bs):
            idx = perm[i : i + bs]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        model.eval()
        with torch.no_grad():
            out = model(xv)
            val_loss = float(loss_fn(out, yv))
            acc = float((out.argmax(-1) == yv).float().mean())
        tune.report({"epoch": epoch, "train_loss": total / len(xt), "val_loss": val_loss,
                     "val_accuracy": acc})  # fmt: skip


def overhead() -> dict:
    data = get_dataset("iris")
    x, y = torch.as_tensor(data.x, dtype=torch.float32), torch.as_tensor(data.y)
    lrs = [1e-3, 3e-3, 1e-2, 3e-2, 5e-2, 1e-1, 2e-3, 2e-2]
    base = TrainingConfig(
        epochs=10, batch_size=16, validation_split=0.2, random_seed=0, tracking=False,
        lr_scheduler="cosine", warmup_ratio=0.0, model={"name": "mlp", "hidden": [32]},
    )  # fmt: skip
    started = time.perf_counter()
    kiln = search(
        base, None, "iris", None, {"learning_rate": tune.grid_search(lrs)}, scheduler="fifo",
        **_paths("overhead"),
    )  # fmt: skip
    kiln_wall = time.perf_counter() - started
    started = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(hand_trial, x=x, y=y), {"CPU": 1}),
        param_space={"learning_rate": tune.grid_search(lrs)},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(ROOT / "hand"), name="hand", verbose=0),
    )
    hand = tuner.fit()
    hand_wall = time.perf_counter() - started
    return {
        "trials": len(lrs),
        "kiln_s": kiln_wall,
        "hand_s": hand_wall,
        "ratio": kiln_wall / hand_wall,
        "kiln_best": kiln.best_metrics["val_loss"],
        "hand_best": hand.get_best_result().metrics["val_loss"],
    }


def trivial(config):
    tune.report({"val_loss": config["x"]})


def trivial_rates(n: int = 24) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    base = TrainingConfig(epochs=1, batch_size=32, validation_split=0.25, tracking=False,
                          model={"name": "mlp", "hidden": [8]})  # fmt: skip
    started = time.perf_counter()
    search(base, None, (x, y), None, {"learning_rate": tune.loguniform(1e-3, 1e-1)},
           num_samples=n, scheduler="fifo", **_paths("trivial"))  # fmt: skip
    kiln_rate = n / (time.perf_counter() - started)
    out = {"kiln_reuse": kiln_rate}
    for reuse in (True, False):
        started = time.perf_counter()
        tune.Tuner(
            trivial,
            param_space={"x": tune.uniform(0, 1)},
            tune_config=tune.TuneConfig(num_samples=n, reuse_actors=reuse),
            run_config=tune.RunConfig(
                storage_path=str(ROOT / "raw"), name=f"raw{reuse}", verbose=0
            ),  # fmt: skip
        ).fit()
        out[f"bare_reuse_{reuse}"] = n / (time.perf_counter() - started)
    return out


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    schedulers = asha_vs_fifo()
    over = overhead()
    rates = trivial_rates()
    fifo = next(r for r in schedulers if r["scheduler"] == "fifo")
    print(
        "\n### ASHA (grace 2, reduction 2) vs FIFO (digits MLP, 12 samples x 12 epochs, seed 7, 2 CPUs)\n"
    )
    print(
        "| scheduler | trials | stopped early | epochs spent | wall (s) | best val_loss | best val_acc |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in schedulers:
        print(
            f"| {r['scheduler']} | {r['trials']} | {r['stopped']} | {r['epochs']} "
            f"({r['epochs'] / fifo['epochs']:.0%}) | {r['wall_s']:.1f} | "
            f"{r['best_val_loss']:.4f} | {r['best_val_accuracy']:.3f} |"
        )
    print("\n### kiln trial vs hand-written Tune function (iris, 8 trials x 10 epochs, FIFO)\n")
    print("| runner | wall (s) | best val_loss |")
    print("|---|---|---|")
    print(f"| hand-written function trainable | {over['hand_s']:.1f} | {over['hand_best']:.4f} |")
    print(f"| kiln.tune.search | {over['kiln_s']:.1f} | {over['kiln_best']:.4f} |")
    print(f"| ratio kiln / hand | {over['ratio']:.2f}x | |")
    print("\n### Trivial trials per second (24 trials)\n")
    print("| runner | trials/s |")
    print("|---|---|")
    print(f"| kiln.tune.search, in-process trials, reused actors | {rates['kiln_reuse']:.2f} |")
    print(f"| bare Tune function, reuse_actors=True | {rates['bare_reuse_True']:.2f} |")
    print(f"| bare Tune function, reuse_actors=False | {rates['bare_reuse_False']:.2f} |")


if __name__ == "__main__":
    main()
