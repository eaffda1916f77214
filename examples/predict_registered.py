"""Load a registered model and predict, from Python.

    kiln train examples/digits_mlp.yaml --set register_as=digits
    python examples/predict_registered.py digits:1.0.0 --rows 5
    python examples/predict_registered.py digits-custom:1.0.0   # after train_custom_module.py

The registry hands back the checkpoint it stored (its sha256 checked). A model kiln
built from a config (``model: {name: mlp, ...}``) is rebuilt from the checkpoint's
metadata; a model from your own ``nn.Module`` class is built by that class and given
the checkpoint's weights. Either runs on rows of the digits validation split.
"""

from __future__ import annotations

import argparse

import torch

from kiln.data import get_dataset
from kiln.engine.checkpoint_reader import load_model_state
from kiln.errors import CheckpointError
from kiln.export import load_checkpoint_model, registered_checkpoint
from kiln.paths import RunPaths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="NAME@TAG or NAME:VERSION")
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    paths = RunPaths.resolve()  # $KILN_HOME or ~/.kiln, as the kiln command uses
    checkpoint, entry = registered_checkpoint(args.model, paths.db, paths.artifacts)
    try:
        model, _ = load_checkpoint_model(checkpoint)
    except CheckpointError:  # trained from a user's nn.Module: kiln has only its weights
        from train_custom_module import SmallNet

        model = SmallNet()
        model.load_state_dict(load_model_state(checkpoint))
        model.eval()
    _, val = get_dataset("digits").split(0.2, 0)
    x, y = torch.as_tensor(val.x[: args.rows]), val.y[: args.rows]
    with torch.no_grad():
        predicted = model(x).argmax(dim=1).tolist()
    print(f"{entry.name}:{entry.version}")
    print(f"predicted: {predicted}")
    print(f"actual:    {[int(v) for v in y]}")


if __name__ == "__main__":
    main()
