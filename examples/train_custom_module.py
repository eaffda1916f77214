"""Train your own ``nn.Module`` with kiln from a Python script.

    python examples/train_custom_module.py            # in-process
    python examples/train_custom_module.py --workers 2  # DDP over 2 Ray Train workers

The module is built by a factory, so every Ray worker builds its own copy. The run
is recorded (``kiln runs list``) and its best checkpoint registered as
``digits-custom`` (``kiln models list``).
"""

from __future__ import annotations

import argparse

from torch import nn

from kiln import TaskSpec, Trainer, TrainingConfigBuilder


class SmallNet(nn.Module):
    """A two-layer MLP with batch norm: 64 pixels in, 10 class logits out."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x):
        return self.net(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    config = (
        TrainingConfigBuilder.quick_prototype()
        .with_training(epochs=args.epochs, batch_size=32, learning_rate=3e-3)
        .with_hardware(num_workers=args.workers)
        .build()
        .replace(run_name="digits-custom", register_as="digits-custom")
    )
    trainer = Trainer(
        model=SmallNet,  # a zero-argument factory: each worker builds its own module
        training_config=config,
        task_spec=TaskSpec.classification(name="digits", num_classes=10),
    )
    results = trainer.train("digits")
    best = results["history"][results["best_epoch"] - 1]
    print(
        f"best epoch {results['best_epoch']}: val_loss {best['val_loss']:.4f}, "
        f"val_accuracy {best['val_accuracy']:.2%}"
    )
    print(f"checkpoint: {results['checkpoint_path']}")
    print(f"registered model id: {results.get('model_id')} (kiln models list)")


if __name__ == "__main__":
    main()
