"""Search hyperparameters from Python with Ray Tune (ASHA stops the losers early).

    python examples/search.py --samples 6

Every trial is one kiln run on the bundled digits data; the best trial's best
checkpoint is registered as ``digits-search``.
"""

from __future__ import annotations

import argparse

from ray import tune

from kiln import TrainingConfig
from kiln.tune import SearchConfig, search


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=6)
    args = parser.parse_args()
    base = TrainingConfig(
        epochs=8,
        batch_size=32,
        model={"name": "mlp", "hidden": [64]},
        validation_split=0.2,
        random_seed=0,
    )
    space = {
        "learning_rate": tune.loguniform(1e-4, 3e-2),
        "model.hidden": tune.choice([[64], [128, 64]]),
    }
    result = search(
        base,
        None,
        "digits",
        None,
        space,
        SearchConfig(num_samples=args.samples, scheduler="asha", register_as="digits-search"),
    )
    print(result.trials.to_string(index=False))
    print(f"best: {result.best_metrics.get('val_loss'):.4f} val_loss with")
    print(
        f"  learning_rate={result.best_config.learning_rate:.2e}, model={result.best_config.model}"
    )
    print(f"registered model id: {result.model_id}")


if __name__ == "__main__":
    main()
