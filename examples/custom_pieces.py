"""Your own optimizer, learning-rate schedule and metrics, from a Python script.

    python examples/custom_pieces.py              # in-process
    python examples/custom_pieces.py --workers 2  # DDP over 2 Ray Train workers

The optimizer and schedule are factories (each worker calls them on its own model);
the metrics are a torchmetrics metric and a plain function. Both are reported each
epoch as ``train_<name>`` and ``val_<name>``, averaged over every worker's rows, and
``val_f1`` ranks the checkpoints and drives early stopping. ``kiln runs plot RUN``
draws them and ``tensorboard --logdir $KILN_HOME/runs`` shows them.
"""

from __future__ import annotations

import argparse

import torch
from torchmetrics.classification import MulticlassF1Score

from kiln import CallbackBase, TaskSpec, Trainer, TrainingConfig


def top3_error(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows whose class is not among the 3 highest scores (averaged over rows)."""
    top3 = outputs.topk(3, dim=-1).indices
    return float((top3 != targets[:, None]).all(dim=-1).float().mean())


class Overfit(CallbackBase):
    """A hook that adds a number to each epoch's record (history, plots, monitor)."""

    def on_epoch_end(self, epoch, logs=None):
        logs["overfit"] = logs["val_loss"] - logs["train_loss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    config = TrainingConfig(
        epochs=args.epochs,
        batch_size=32,
        learning_rate=0.05,
        num_workers=args.workers,
        monitor="val_f1",
        mode="max",
        early_stopping_patience=3,
        model={"name": "mlp", "hidden": [128]},
        run_name="digits-custom-pieces",
    )
    results = Trainer(
        training_config=config,
        task_spec=TaskSpec.classification(name="digits", num_classes=10),
        optimizer=lambda params, cfg: torch.optim.SGD(
            params, lr=cfg.learning_rate, momentum=0.9, nesterov=True
        ),
        lr_scheduler=lambda optimizer, cfg, total_steps: torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.learning_rate, total_steps=total_steps
        ),
        metrics={"f1": MulticlassF1Score(num_classes=10), "top3_error": top3_error},
        hooks=[Overfit()],
    ).train("digits")
    best = results["history"][results["best_epoch"] - 1]
    print(
        f"best epoch {results['best_epoch']}: val_f1 {best['val_f1']:.4f}, "
        f"val_top3_error {best['val_top3_error']:.4f}, overfit {best['overfit']:+.4f}"
    )


if __name__ == "__main__":
    main()
