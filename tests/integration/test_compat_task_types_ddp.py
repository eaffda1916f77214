"""Segmentation on two Ray Train workers (DDP, gloo): each rank validates half of the
images, and the epoch's pixel accuracy and mean IoU, summed across ranks, equal
torchmetrics over every validation image scored by the final model in the driver."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from kiln import TaskSpec, Trainer, TrainingConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


class PixelNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, (x[:, 0] > 0.4).long() + (x[:, 0] > 0.75).long()


def test_segmentation_metrics_are_summed_over_two_workers(tmp_path, ray_local):
    import ray.cloudpickle
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import it
    train, val = _images(64, seed=0), _images(21, seed=1)  # 21: the ranks hold 11 and 10
    config = TrainingConfig(
        epochs=1, batch_size=16, learning_rate=0.05, num_workers=2, tracking=False
    )
    trainer = Trainer(
        model=PixelNet,
        training_config=config,
        task_spec=TaskSpec.segmentation(num_classes=3),
        storage_path=tmp_path / "runs",
        verbose=False,
    )
    results = trainer.train(train, val)
    last = results["history"][-1]
    assert results["world_size"] == 2 and last["epoch"] == 1

    with torch.no_grad():
        preds = trainer.trained_model.eval()(val[0]).argmax(1)  # the epoch's final weights
    accuracy = MulticlassAccuracy(3, average="micro")(preds, val[1])
    iou = MulticlassJaccardIndex(3, average="macro")(preds, val[1])
    assert last["val_pixel_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
    assert last["val_mean_iou"] == pytest.approx(float(iou), abs=1e-6)
    assert 0.0 < last["train_mean_iou"] <= 1.0
