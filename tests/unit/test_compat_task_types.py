"""Sequence-to-sequence and segmentation end to end: the one task -> collator table,
arrays and data planning, the step loops' metrics, and kiln's Trainer in-process."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kiln import TaskSpec, Trainer, TrainingConfig
from kiln.config import TaskType
from kiln.data import DataLoaderConfig, DataLoaderFactory, from_arrays
from kiln.data.collate import get_collator, task_collator
from kiln.errors import ConfigError, DatasetError

VOCAB, SEQ = 12, 6


@pytest.fixture(autouse=True)
def _isolated_home(kiln_home):
    return kiln_home


def _segmentation_data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of noise; a pixel's class is its intensity band (3 classes)."""
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, (x[:, 0] > 0.4).long() + (x[:, 0] > 0.75).long()


def _seq2seq_data(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target token is its source token + 1 (mod the vocabulary)."""
    src = torch.randint(1, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return src, (src + 1) % VOCAB


class PixelNet(nn.Module):
    """Per-pixel logits ``[B, 3, H, W]`` from one-channel images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 16, 1), nn.ReLU(), nn.Conv2d(16, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokenMap(nn.Module):
    """Target logits ``[B, T, V]`` for source ids ``[B, T]``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.out = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.embed(x)))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def _config(**kw) -> TrainingConfig:
    base = dict(
        epochs=3,
        batch_size=16,
        learning_rate=0.05,
        validation_split=0.25,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        tracking=False,
    )
    return TrainingConfig(**{**base, **kw})


# ----------------------------------------------------------------- one collator table
def test_every_task_type_has_one_collator_and_the_factory_uses_it():
    assert {t.value: t.collator for t in TaskType} == {
        "classification": "classification",
        "image_classification": "vision",
        "regression": "regression",
        "language_modeling": "language_modeling",
        "sequence_to_sequence": "sequence_to_sequence",
        "segmentation": "segmentation",
    }
    for t in TaskType:  # every name resolves in the collator registry
        assert get_collator(task_collator(t.value)) is not None
    with pytest.raises(ConfigError, match="task_type='detection' has no collator; known"):
        task_collator("detection")

    x = torch.randn(6, 3)
    regression = DataLoaderFactory(TaskSpec.regression(num_outputs=1))
    loader = regression.create_loader(TensorDataset(x, x[:, 0]), DataLoaderConfig(6, False))
    batch = next(iter(loader))
    assert batch["y"].dtype == torch.float32 and torch.equal(batch["y"], x[:, 0])  # not cast

    seq = DataLoaderFactory(TaskSpec.sequence_to_sequence(pad_token_id=0))
    rows = [([5, 6, 7], [1, 2]), ([8], [3, 4, 9])]
    batch = next(iter(seq.create_loader(rows, DataLoaderConfig(2, shuffle=False))))
    assert batch["x"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["y"].tolist() == [[1, 2, -100], [3, 4, 9]]


def test_segmentation_collator_pads_images_with_zero_and_masks_with_ignore():
    seg = DataLoaderFactory(TaskSpec.segmentation(num_classes=3))
    rows = [
        (torch.full((2, 2), 255, dtype=torch.uint8), torch.ones(1, 2, 2, dtype=torch.long)),
        (torch.zeros(1, 3, 3), torch.zeros(3, 3, dtype=torch.long)),
    ]
    batch = next(iter(seg.create_loader(rows, DataLoaderConfig(2, shuffle=False))))
    assert batch["x"].shape == (2, 1, 3, 3) and batch["y"].shape == (2, 3, 3)
    assert batch["x"][0, 0, 0, 0] == 1.0 and batch["x"][0, 0, 2, 2] == 0.0
    assert batch["y"][0].tolist() == [[1, 1, -100], [1, 1, -100], [-100, -100, -100]]


# ------------------------------------------------------------------ arrays, data plan
def test_arrays_of_the_two_task_types_are_checked_and_described():
    x, y = _segmentation_data(8)
    seg = from_arrays(x[:, 0], y, task_type="segmentation")  # [N, H, W] gains a channel
    assert seg.info.input_shape == (1, 8, 8) and seg.info.num_classes == 3
    src, tgt = _seq2seq_data(8)
    s2s = from_arrays(src, tgt[:, :4], task_type="sequence_to_sequence")
    assert s2s.info.num_classes == VOCAB and s2s.y.shape == (8, 4)
    with pytest.raises(DatasetError, match=r"masks y \[N, H, W\] of the same height"):
        from_arrays(x, y[:, :4], task_type="segmentation")
    with pytest.raises(DatasetError, match="masks must be int class ids"):
        from_arrays(x, y.float(), task_type="segmentation")
    with pytest.raises(DatasetError, match="token ids must be >= 0"):
        from_arrays(src, tgt - 50, task_type="sequence_to_sequence")


def test_data_plan_reads_arrays_as_the_task_says_and_completes_it():
    from kiln.engine.data_plan import DataKind, plan_data

    x, y = _segmentation_data(20)
    plan = plan_data((x, y), None, TaskSpec.segmentation(), _config())
    assert plan.data_kind is DataKind.MEMORY and plan.task.num_classes == 3
    assert plan.input_shape == (1, 8, 8) and plan.arrays["val"][1].shape == (5, 8, 8)
    src, tgt = _seq2seq_data(20)
    plan = plan_data((src, tgt), None, TaskSpec.sequence_to_sequence(), _config())
    assert plan.task.vocab_size == VOCAB and plan.task.task_type == "sequence_to_sequence"
    with pytest.raises(DatasetError, match="num_classes=2 but the labels go up to class 2"):
        plan_data((x, y), None, TaskSpec.segmentation(num_classes=2), _config())
    # a torch Dataset of unequal-length pairs is batched by the task's collator
    pairs = [(torch.tensor([1, 2, 3]), torch.tensor([4])), (torch.tensor([5]), torch.tensor([6]))]
    task = TaskSpec.sequence_to_sequence(vocab_size=VOCAB)
    dataset = _Rows(pairs * 4)
    plan = plan_data(dataset, None, task, _config(validation_split=0.0, batch_size=2))
    first = next(iter(plan.loaders["train"]))
    assert first["x"].shape[0] == 2 and first["attention_mask"].shape == first["x"].shape
    with pytest.raises(ConfigError, match="num_classes is needed for segmentation"):
        plan_data(TensorDataset(x, y), None, TaskSpec.segmentation(), _config())


# ----------------------------------------------------------------- the loops' metrics
def test_segmentation_metrics_equal_torchmetrics_over_the_epoch():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    from kiln.engine.loops import ValidationLoop
    from kiln.engine.loss import get_loss_strategy

    x, y = _segmentation_data(40, seed=3)
    y[:, 0, :] = -100  # a row of pixels the loss and the metrics skip
    model = PixelNet().eval()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]
    loop = ValidationLoop(get_loss_strategy("segmentation"), task_type="segmentation")
    metrics = loop.run_epoch(1, model, batches).metrics
    with torch.no_grad():
        preds = model(x).argmax(1)
    accuracy = MulticlassAccuracy(3, average="micro", ignore_index=-100)(preds, y)
    iou = MulticlassJaccardIndex(3, average="macro", ignore_index=-100)(preds, y)
    assert metrics["val_pixel_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
    assert metrics["val_mean_iou"] == pytest.approx(float(iou), abs=1e-6)
    assert set(metrics) == {"val_loss", "val_pixel_accuracy", "val_mean_iou"}


# --------------------------------------------------------------- Trainer, in-process
def test_trainer_trains_segmentation_end_to_end():
    x, y = _segmentation_data()
    trainer = Trainer(
        model=PixelNet,
        training_config=_config(epochs=4, learning_rate=0.1),
        task_spec=TaskSpec.segmentation(num_classes=3),
        verbose=False,
    )
    results = trainer.train((x, y))
    history = results["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    first, last = history[0], history[-1]
    for key in ("train_pixel_accuracy", "train_mean_iou", "val_pixel_accuracy", "val_mean_iou"):
        assert 0.0 <= last[key] <= 1.0
    assert last["train_loss"] < first["train_loss"]
    assert last["val_mean_iou"] > first["val_mean_iou"] and last["val_pixel_accuracy"] > 0.6
    with torch.no_grad():
        logits = trainer.trained_model(x[:2])
    assert logits.shape == (2, 3, 8, 8)


def test_trainer_trains_sequence_to_sequence_end_to_end():
    src, tgt = _seq2seq_data()
    tgt[:, -1] = -100  # padding: left out of the token loss
    trainer = Trainer(
        model=TokenMap,
        training_config=_config(epochs=4),
        task_spec=TaskSpec.sequence_to_sequence(),
        verbose=False,
    )
    results = trainer.train((src, tgt))
    history = results["history"]
    assert results["task"]["vocab_size"] == VOCAB
    assert history[-1]["val_loss"] < 0.2 < history[0]["train_loss"]
    assert "val_accuracy" not in history[-1]  # the token loss is the metric
    with torch.no_grad():
        predicted = trainer.trained_model(src[:4]).argmax(-1)
    assert torch.equal(predicted[:, :-1], (src[:4, :-1] + 1) % VOCAB)


def test_the_two_task_types_need_a_model():
    x, y = _segmentation_data(16)
    trainer = Trainer(training_config=_config(), task_spec=TaskSpec.segmentation(), verbose=False)
    with pytest.raises(
        ConfigError, match="'segmentation' has no built-in architecture; pass model="
    ):
        trainer.train((x, y))
