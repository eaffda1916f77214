"""Every usage example of the older training APIs, run as written with ``kiln`` imports.

One test per example, in the order the API documents show them (``docs/seeds.md``
maps each class to its home). Module paths are mapped to kiln
(``backend.training.engine`` / ``utils.training.*`` -> ``kiln``); sizes are cut to a few
steps on bundled or generated data, and each test checks the shapes and fields the
example documents. In-memory data with ``num_workers=0`` trains without starting Ray.
Examples of the job queue, retraining triggers and LLM fine-tuning are tested where
those packages live.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln import TaskSpec, TrainingConfig, TrainingConfigBuilder


@pytest.fixture(autouse=True)
def _isolated_home(kiln_home):
    """Runs write under a temporary KILN_HOME, never ~/.kiln."""
    return kiln_home


def _xy(n: int = 160, features: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()


def _mlp(features: int = 4, classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def _loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    x, y = _xy()
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=batch_size, shuffle=True)
    return train, DataLoader(TensorDataset(x[128:], y[128:]), batch_size=32)


def _quick(**kw) -> TrainingConfig:
    base = dict(epochs=2, learning_rate=0.05, warmup_ratio=0.0, lr_scheduler="constant")
    return TrainingConfig(**{**base, **kw})


# =========================================================================== TrainingEngine
DIGITS_LAYERS = [
    {"type": "input", "neurons": 64, "activation": None, "position": 0},
    {"type": "hidden", "neurons": 32, "activation": "relu", "position": 1},
    {"type": "output", "neurons": 10, "activation": None, "position": 2},
]


def test_training_engine_basic_usage(tmp_path, capsys):
    from kiln import TrainingEngine

    model_config = {"layers": DIGITS_LAYERS}  # the guide's 784-128-10 MNIST net, for digits
    engine = TrainingEngine(
        dataset_id="digits",
        model_config=model_config,
        device="cpu",
        training_config=_quick(batch_size=64, learning_rate=1e-2),
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
    )
    session = engine.train(model_id="my_model_v1")
    print(f"Status: {session.status}")
    print(f"Final Loss: {session.metrics[-1].loss}")
    if session.metrics[-1].accuracy:
        print(f"Final Accuracy: {session.metrics[-1].accuracy}")

    out = capsys.readouterr().out
    assert "Status: completed" in out and "Final Accuracy: " in out
    data = session.to_dict()
    assert set(data) >= {
        "session_id", "model_id", "dataset_id", "status", "start_time", "end_time",
        "total_epochs", "current_epoch", "metrics", "error_message",
    }  # fmt: skip
    assert (data["model_id"], data["dataset_id"], data["error_message"]) == (
        "my_model_v1",
        "digits",
        None,
    )
    assert data["total_epochs"] == data["current_epoch"] == 2
    assert [m["epoch"] for m in data["metrics"]] == [1, 2]
    for m in data["metrics"]:
        assert set(m) >= {"epoch", "loss", "accuracy", "timestamp"}
        assert isinstance(m["timestamp"], datetime) and 0.0 <= m["accuracy"] <= 1.0
    assert session.metrics[-1].accuracy > 0.5


# ===================================================================== callbacks, registry
def test_callback_system_logging_checkpoint_registry_and_early_stopping(tmp_path, capsys):
    from kiln import (
        CallbackBase,
        EarlyStoppingCallback,
        LoggingCallback,
        ModelCheckpointCallback,
        TrainingEngine,
    )
    from kiln.engine import CallbackList
    from kiln.tracking import ModelRegistry

    class BatchCounter(CallbackBase):  # a custom callback on the CallbackBase interface
        def __init__(self):
            self.batches = 0

        def on_batch_end(self, batch, logs=None):
            self.batches += 1

    registry = ModelRegistry(tmp_path / "models.db")
    checkpoints = ModelCheckpointCallback(
        tmp_path / "ckpt", monitor="val_loss", registry=registry, register_as="iris-mlp"
    )
    counter = BatchCounter()
    callbacks = CallbackList(
        [LoggingCallback(), checkpoints, EarlyStoppingCallback(patience=1, min_delta=10.0), counter]
    )
    layers = [
        {"type": "input", "neurons": 4},
        {"type": "hidden", "neurons": 16, "activation": "relu"},
        {"type": "output", "neurons": 3},
    ]
    session = TrainingEngine(
        "iris",
        {"layers": layers},
        training_config=_quick(epochs=4, batch_size=40, validation_split=0.2),
        callbacks=[callbacks],
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
    ).train(model_id="iris_v1")

    assert session.status == "completed", session.error_message
    assert session.current_epoch == 2  # min_delta=10: epoch 2 is no improvement, patience 1
    assert "epoch 1/4 - train_loss=" in capsys.readouterr().out
    assert counter.batches == 2 * 3  # 120 training rows / batch 40, two epochs
    entry = registry.get_model(name="iris-mlp")  # the best checkpoint, registered at the end
    assert checkpoints.registered == [entry.model_id]
    assert entry.metrics["val_loss"] == pytest.approx(checkpoints.best)
    assert (Path(checkpoints.best_path) / "model.pt").is_file()


def test_training_engine_resumes_from_a_checkpoint(tmp_path):
    from kiln import TrainingEngine

    def engine(epochs: int) -> TrainingEngine:
        config = _quick(epochs=epochs, batch_size=50, checkpoint_dir=str(tmp_path / "ckpt"))
        return TrainingEngine(
            "iris",
            {"name": "mlp", "hidden": [8]},
            training_config=config,
            storage_path=tmp_path / "runs",
            db_path=tmp_path / "kiln.db",
        )

    first = engine(2).train()
    resumed = engine(3).train(resume_from="latest")
    assert resumed.status == "completed", resumed.error_message
    assert [m.epoch for m in resumed.metrics] == [1, 2, 3]  # two restored, one trained
    assert [m.loss for m in resumed.metrics[:2]] == [m.loss for m in first.metrics]
    assert resumed.current_epoch == 3


def test_data_manager_by_dataset_id():
    from kiln.compat import DataManager

    manager = DataManager("iris", batch_size=30, num_workers=0)
    assert manager.dataset_id == "iris" and manager.info.num_classes == 3
    x, y = next(iter(manager.get_dataloader(shuffle=False)))
    assert x.shape == (30, 4) and y.shape == (30,) and y.dtype == torch.int64
    train, val = manager.get_dataloaders(validation_split=0.2, seed=0)
    assert len(train.dataset) + len(val.dataset) == 150 and len(val.dataset) == 30


# ============================================================= CheckpointManager
def test_checkpoint_manager_save_load_best_history(tmp_path):
    from kiln.engine import CheckpointManager

    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    manager = CheckpointManager(
        checkpoint_dir=str(tmp_path / "checkpoints"),
        keep_best_k=3,
        keep_last_n=5,
        monitor="val_loss",
        mode="min",
        save_interval_epochs=1,
        drive_backup=False,
    )
    for epoch, loss in ((1, 0.62), (2, 0.51), (3, 0.42), (10, 0.38)):
        meta = manager.save_checkpoint(
            epoch=epoch,
            metrics={"val_loss": loss, "val_accuracy": 0.87},
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            metadata={"best_epoch": 5, "notes": "Added attention dropout"},
        )
    assert meta.is_best and meta.epoch == 10 and meta.metrics["val_loss"] == 0.38
    assert meta.model_size_mb > 0 and datetime.fromisoformat(meta.timestamp)
    checkpoint = manager.load_checkpoint(
        path=meta.path, model=_mlp(seed=1), optimizer=optimizer, scheduler=scheduler
    )
    assert checkpoint.epoch == 10
    assert manager.get_best_checkpoint() == meta.path
    history = manager.get_checkpoint_history()
    assert list(history[["epoch", "val_loss", "is_best"]]["epoch"]) == [1, 2, 3, 10]
    assert list(history["is_best"]) == [False, False, False, True]
    manager.close()


# ==================================================================== loss strategies
def test_loss_strategy_registry_builtin_and_custom():
    from kiln.engine import LossStrategyRegistry, get_loss_strategy

    strategy = get_loss_strategy("language_modeling")
    registry = LossStrategyRegistry()
    assert type(registry.get("classification")).__name__ == "ClassificationLoss"

    class CustomLoss:
        def compute_loss(self, logits, labels, inputs=None):
            return F.cross_entropy(logits, labels)

        def validate_inputs(self, logits, labels):
            pass

    registry.register("custom", CustomLoss())
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert torch.allclose(
        registry.get("custom").compute_loss(logits, labels), F.cross_entropy(logits, labels)
    )
    assert strategy.compute_loss(torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))).dim() == 0


def test_workflow_custom_loss_strategy():
    from kiln.engine import LossStrategyRegistry

    registry = LossStrategyRegistry()
    weights = torch.tensor([0.2, 0.8])

    class CustomWeightedLoss:
        def __init__(self, class_weights):
            self.class_weights = class_weights

        def compute_loss(self, logits, labels, inputs=None):
            return F.cross_entropy(logits, labels, weight=self.class_weights, reduction="mean")

        def validate_inputs(self, logits, labels):
            assert logits.ndim == 2
            assert labels.ndim == 1

    registry.register("weighted-ce", CustomWeightedLoss(weights))
    strategy = registry.get("weighted-ce")
    logits, labels = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 1])
    expected = F.cross_entropy(logits, labels, weight=weights)
    assert torch.allclose(strategy.compute_loss(logits, labels), expected)


def test_language_modeling_loss_with_padding():
    from kiln.engine import LanguageModelingLoss, LossInputs

    model_output = torch.randn(2, 6, 11)  # [batch, seq_len, vocab_size]
    input_ids = torch.tensor([[5, 3, 2, 0, 0, 0], [1, 4, 4, 9, 2, 0]])
    mask = (input_ids != 0).long()
    strategy = LanguageModelingLoss()
    loss = strategy.compute_loss(
        logits=model_output,
        labels=input_ids,
        inputs=LossInputs(pad_token_id=0, attention_mask=mask),
    )
    keep = (input_ids[:, 1:] != 0).reshape(-1)
    flat = model_output[:, :-1].reshape(-1, 11)[keep]
    assert torch.allclose(loss, F.cross_entropy(flat, input_ids[:, 1:].reshape(-1)[keep]))


def test_classification_loss_with_class_weights():
    from kiln.engine import ClassificationLoss, LossInputs

    weights = torch.tensor([1.0, 3.0])
    logits, class_ids = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    loss = ClassificationLoss().compute_loss(
        logits=logits, labels=class_ids, inputs=LossInputs(class_weights=weights)
    )
    assert torch.allclose(loss, F.cross_entropy(logits, class_ids, weight=weights))


def test_peft_aware_loss():
    from kiln.engine import PEFTAwareLoss

    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    strategy = PEFTAwareLoss(base_model_frozen=True, adapter_scale=1.0)
    assert torch.allclose(strategy.compute_loss(logits, labels), F.cross_entropy(logits, labels))


def test_quantization_safe_loss():
    from kiln.engine import QuantizationSafeLoss

    logits = torch.tensor([[12.0, -3.0, 0.5], [0.1, 0.2, float("inf")]], requires_grad=True)
    labels = torch.tensor([1, 0])
    strategy = QuantizationSafeLoss(bits=8, symmetric=True)
    loss = strategy.compute_loss(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().max() <= 0.5 / 2 + 1e-6  # clipped: grad_clip 0.5 over 2 rows


def test_vision_loss_with_pixel_values():
    from kiln.engine import LossInputs, VisionLoss

    images, labels = torch.rand(3, 1, 8, 8), torch.tensor([0, 4, 9])
    model_output = torch.randn(3, 10)
    loss = VisionLoss(task="classification").compute_loss(
        logits=model_output, labels=labels, inputs=LossInputs(pixel_values=images)
    )
    assert torch.allclose(loss, F.cross_entropy(model_output, labels))


def test_model_output_from_raw():
    from kiln.engine import ClassificationLoss, ModelOutput

    model = _mlp()
    input_ids, labels = torch.randn(3, 4), torch.tensor([0, 1, 0])
    output = ModelOutput.from_raw(model(input_ids))
    loss = ClassificationLoss().compute_loss(logits=output.logits, labels=labels)
    assert output.logits.shape == (3, 2) and loss.dim() == 0


# ==================================================================== gradients
def _backward(model: nn.Module, scale: float = 1.0) -> None:
    x, y = _xy(32)
    (F.cross_entropy(model(x), y) * scale).backward()


def test_gradient_monitor_and_check_gradient_health():
    from kiln.engine import GradientMonitor, check_gradient_health

    model = _mlp()
    monitor = GradientMonitor(
        check_interval=10,
        norm_threshold_warning=1.0,
        norm_threshold_critical=10.0,
        log_distribution=True,
    )
    _backward(model, scale=1e4)
    health = monitor.check_step(model)
    assert health.has_exploding_gradients and health.max_norm > 10.0
    stats = monitor.get_statistics()
    assert stats["check_count"] == 1 and len(stats["max_norm_history"]) == 1
    model.zero_grad()
    _backward(model)
    health = check_gradient_health(model=model, threshold_max=1e3, threshold_min=1e-7)
    assert not health.has_exploding_gradients and health.num_zero_gradients == 0


def test_gradient_accumulator_loop():
    from kiln.engine import GradientAccumulator

    accumulator = GradientAccumulator(
        accumulation_steps=4, max_gradient_norm=1.0, clip_by_global_norm=True
    )
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _xy(64)
    effective = []
    for step, (xb, yb) in enumerate(DataLoader(TensorDataset(x, y), batch_size=8)):
        loss = F.cross_entropy(model(xb), yb) * 100.0
        loss.backward()
        if accumulator.should_update_optimizer(step):
            accumulator.clip_gradients(model)
            optimizer.step()
            optimizer.zero_grad()
            effective.append(accumulator.get_effective_step(step))
    stats = accumulator.get_statistics()
    assert effective == [0, 1]  # steps 3 and 7 of 8 batches
    assert stats["norm_before"] > 1.0 and stats["norm_after"] == pytest.approx(1.0, rel=1e-4)


# ======================================================================== data, loops
def test_collator_registry():
    from kiln.data import CollatorRegistry

    registry = CollatorRegistry()
    collator = registry.get("language_modeling")
    batch = collator([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert batch["x"].shape == (2, 3) and batch["y"][1, 2] == -100

    def my_collator(batch):
        return {"input_ids": torch.tensor([b[0] for b in batch]), "labels": torch.tensor([0])}

    from kiln.data import collate

    registry.register("custom", my_collator)
    assert registry.get("custom")([(7,), (8,)])["input_ids"].tolist() == [7, 8]
    collate._COLLATORS.pop("custom")  # the table is module-wide: leave it as found
    assert {"classification", "vision", "sequence_to_sequence"} <= set(registry.names())


def test_builtin_collators_as_listed():
    from kiln.data import CollatorRegistry

    registry = CollatorRegistry()
    # 'language_modeling': pads to seq_len, excludes padding from loss
    lm = registry.get("language_modeling")(
        [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], seq_len=5
    )
    assert lm["x"].tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]]
    assert lm["y"][1].tolist() == [4, -100, -100, -100, -100]
    # 'classification': pads to max in batch, right-pads
    cls = registry.get("classification")([([1, 2, 3], 0), ([4], 1)])
    assert cls["x"].tolist() == [[1, 2, 3], [4, 0, 0]] and cls["y"].tolist() == [0, 1]
    # 'vision': normalizes images, handles variable sizes
    images = [(torch.full((1, 2, 2), 255, dtype=torch.uint8), 0), (torch.zeros(1, 3, 3), 1)]
    vision = registry.get("vision")(images, mean=0.5, std=0.5)
    assert vision["x"].shape == (2, 1, 3, 3) and vision["x"][0, 0, 0, 0] == 1.0
    assert vision["x"][1].min() == -1.0
    # 'sequence_to_sequence': pads input/output independently
    s2s = registry.get("sequence_to_sequence")([([1, 2, 3], [7]), ([4], [8, 9])])
    assert s2s["x"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert s2s["y"].tolist() == [[7, -100], [8, 9]]


def test_training_loop_and_validation_loop():
    from kiln.engine import (
        ClassificationLoss,
        GradientAccumulator,
        GradientMonitor,
        TrainingLoop,
        ValidationLoop,
    )

    strategy = ClassificationLoss()
    train_loop = TrainingLoop(
        gradient_accumulator=GradientAccumulator(accumulation_steps=1),
        gradient_monitor=GradientMonitor(check_interval=10),
        loss_strategy=strategy,
        gradient_clip_norm=1.0,
    )
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    train_loader, val_loader = _loaders()
    seen = []
    result = train_loop.run_epoch(
        epoch=5,
        model=model,
        train_loader=train_loader,
        optimizer=optimizer,
        scheduler=None,
        device=torch.device("cpu"),
        metrics_callback=lambda loss, step: seen.append(step),
    )
    assert (result.epoch, result.num_samples, result.num_batches) == (5, 128, 8)
    assert seen == list(range(8)) and result.epoch_duration_seconds > 0
    assert result.learning_rate == 0.05 and "train_accuracy" in result.metrics
    val_result = ValidationLoop(loss_strategy=strategy).run_epoch(
        epoch=1, model=model, val_loader=val_loader, device="cpu", metrics_callback=None
    )
    assert val_result.num_samples == 32 and 0.0 <= val_result.metrics["val_accuracy"] <= 1.0


def test_data_module_protocol_is_runtime_checkable():
    from kiln.compat import DataModuleProtocol
    from kiln.data import from_arrays, get_dataset

    assert isinstance(get_dataset("iris"), DataModuleProtocol)
    x, y = _xy(20)
    assert isinstance(from_arrays(x.numpy(), y.numpy()), DataModuleProtocol)
    assert not isinstance(TensorDataset(x, y), DataModuleProtocol)


def test_data_loader_factory_with_task_collator():
    from kiln.compat import DataLoaderConfig, DataLoaderFactory

    task_spec = TaskSpec.classification(name="xor", num_classes=2)
    factory = DataLoaderFactory(task_spec=task_spec, seed=42, pin_memory=True, num_workers=0)
    x, y = _xy(40)
    train_dataset = TensorDataset(x, y)
    train_loader = factory.create_loader(
        dataset=train_dataset, config=DataLoaderConfig(batch_size=16, shuffle=True, drop_last=True)
    )
    batches = list(train_loader)
    assert [b["x"].shape for b in batches] == [(16, 4), (16, 4)]  # the collator's dict
    again = factory.create_loader(train_dataset, DataLoaderConfig(16, True, True))
    assert torch.equal(next(iter(again))["y"], batches[0]["y"])  # same seed, same order
    is_eval = True
    loader = factory.create_loader(
        dataset=train_dataset,
        config=DataLoaderConfig(batch_size=16, shuffle=not is_eval, drop_last=not is_eval),
        is_eval=is_eval,
    )
    assert [len(b["y"]) for b in loader] == [16, 16, 8]
    assert torch.equal(torch.cat([b["y"] for b in loader]), y)


def test_universal_data_module_file_and_huggingface(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never the network

    from kiln.compat import UniversalDataModule

    x, y = _xy(60)
    rows = [
        {"a": float(r[0]), "b": float(r[1]), "label": int(t)} for r, t in zip(x, y, strict=True)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task_spec = TaskSpec.classification(name="file", num_classes=2)
    module = UniversalDataModule(task_spec=task_spec, batch_size=32, num_workers=0, seed=42)
    train_loader, val_loader = module.load_from_file(file_path=str(data), validation_split=0.1)
    n_train = sum(len(b["y"]) for b in train_loader)
    n_val = sum(len(b["y"]) for b in val_loader)
    assert n_train + n_val == 60 and 0 < n_val < 20
    assert next(iter(train_loader))["x"].shape[1] == 2

    hub = tmp_path / "hub_like"  # a local folder stands in for the hub (no downloads)
    hub.mkdir()
    for split, n in (("train", 40), ("validation", 20)):
        table = datasets.Dataset.from_dict({"x": x[:n].tolist(), "y": y[:n].tolist()})
        table.to_parquet(str(hub / f"{split}.parquet"))
    train_loader, val_loader = module.load_huggingface(
        dataset_name=str(hub),
        dataset_config=None,
        train_split="train",
        validation_split="validation",
        max_samples=30,
        cache_dir=str(tmp_path / "hf_cache"),
    )
    assert sum(len(b["y"]) for b in train_loader) == 30
    assert sum(len(b["y"]) for b in val_loader) == 20
    assert next(iter(val_loader))["x"].dtype == torch.float32


# ============================================================================ metrics
def test_metrics_engine_epoch_scalar_confidence_alerts():
    from kiln.tracking import AlertConfig, MetricsEngine

    engine = MetricsEngine(
        use_wandb=False,  # the example's W&B logging needs the wandb package
        gradient_accumulation_steps=4,
        drift_threshold_warning=0.1,
        drift_threshold_critical=0.2,
        alert_config=AlertConfig(val_loss_spike_threshold=0.2, accuracy_drop_threshold=0.05),
    )
    for epoch, val_loss in ((4, 0.30), (5, 0.38)):  # +27 % val loss: a spike
        engine.log_epoch(
            epoch=epoch,
            train_metrics={"loss": 0.42, "accuracy": 0.85},
            val_metrics={"loss": val_loss, "accuracy": 0.87},
            learning_rate=1e-4,
            gradient_norm=0.5,
            epoch_duration=120.5,
        )
    engine.log_scalar("train/batch_loss", 0.45, step=100)
    values = engine.log_confidence(logits=torch.randn(8, 10), labels=torch.arange(8), step=100)
    assert {"top1_confidence", "top5_confidence", "entropy"} <= set(values)
    assert engine.has_alerts()
    assert any("loss" in alert["type"] for alert in engine.get_alerts())


def test_metrics_tracker_log_epoch_and_summary_frame():
    from kiln.tracking import MetricsTracker

    tracker = MetricsTracker(use_wandb=False)
    for epoch, (train, val) in enumerate(((0.6, 0.55), (0.42, 0.38)), start=4):
        tracker.log_epoch(
            epoch=epoch,
            train_metrics={"loss": train},
            val_metrics={"loss": val},
            learning_rate=1e-4,
            gradient_norm=0.5,
        )
    summary = tracker.get_summary()
    frame = summary[["epoch", "train_loss", "val_loss"]]
    assert frame.shape == (2, 3) and list(frame["val_loss"]) == [0.55, 0.38]
    assert summary["val_loss"]["best"] == 0.38 and summary["val_loss"]["best_epoch"] == 5


# ======================================================================= Trainer, hooks
def test_trainer_orchestrator_with_hooks(tmp_path):
    from kiln.engine import Trainer, TrainingHooks

    class CustomHooks(TrainingHooks):
        def __init__(self):
            self.events = []

        def on_training_start(self):
            self.events.append("start")

        def on_batch_end(self, batch_idx, loss):
            self.events.append("batch")

        def on_validation_end(self, metrics):
            self.events.append("val")

        def on_epoch_end(self, epoch, metrics):
            self.events.append(f"epoch{epoch}")

        def on_training_end(self):
            self.events.append("end")

    hooks = CustomHooks()
    x, y = _xy()
    trainer = Trainer(
        model=_mlp(),
        config={"name": "mlp"},  # the model architecture dict (ignored for a built module)
        training_config=_quick(batch_size=32, tracking=False),
        task_spec=TaskSpec.classification(name="xor", num_classes=2),
        hooks=hooks,
        device="cpu",
        storage_path=tmp_path / "runs",
    )
    results = trainer.train(train_data=(x[:128], y[:128]), val_data=(x[128:], y[128:]))
    print(f"Best epoch: {results['best_epoch']}")
    print(f"Best val loss: {results['best_val_loss']:.4f}")
    print(f"Total time: {results['total_time']:.1f}s")
    assert results["best_epoch"] in (1, 2) and results["total_time"] > 0
    assert hooks.events[0] == "start" and hooks.events[-1] == "end"
    assert hooks.events.count("batch") == 2 * 4 and "epoch2" in hooks.events


def test_workflow_simple_training_loop_language_modeling(tmp_path):
    from kiln.data import tiny_tokens
    from kiln.engine import Trainer

    config = (
        TrainingConfigBuilder.baseline()
        .with_training(epochs=1, batch_size=16, learning_rate=1e-3)
        .with_logging(tracking=False)
        .build()
    )
    task_spec = TaskSpec.language_modeling(name="wikitext")
    data = tiny_tokens(n=64, seq_len=16, vocab_size=32)
    trainer = Trainer(
        model=None,
        config={
            "name": "tiny_transformer",
            "vocab_size": 32,
            "d_model": 16,
            "num_layers": 1,
            "num_heads": 2,
            "d_ff": 32,
            "max_seq_len": 16,
        },  # fmt: skip
        training_config=config,
        task_spec=task_spec,
        storage_path=tmp_path / "runs",
    )
    results = trainer.train(data)
    print(f"Best val loss: {results['best_val_loss']:.4f}")
    assert results["best_val_loss"] > 0 and results["final_metrics"]["train_loss"] > 0


# ====================================================================== configuration
def test_training_config_validate_to_dict_save_load(tmp_path, monkeypatch):
    config = TrainingConfig(
        random_seed=42,
        deterministic=False,
        learning_rate=5e-5,
        batch_size=4,
        epochs=10,
        warmup_ratio=0.1,
        weight_decay=0.01,
        max_grad_norm=1.0,
        use_amp=True,
        gradient_accumulation_steps=1,
        early_stopping_patience=5,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        save_every_n_epochs=1,
        # wandb_project="transformer-training": needs the wandb package, not installed here
        run_name="baseline-v1",
        vocab_size=50257,
        max_seq_len=128,
        d_model=768,
        num_layers=12,
    )
    assert config.validate() is config
    config_dict = config.to_dict()
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config_dict, f)
    config_path = config.save()  # timestamped, next to the run's checkpoints
    assert config_path.parent == tmp_path / "checkpoints"
    assert config_path.name.startswith("training_config_") and config_path.suffix == ".json"
    explicit = config.save(tmp_path / "experiments" / "my_config.json")
    assert TrainingConfig.load(explicit) == config == TrainingConfig.load(config_path)
    monkeypatch.chdir(tmp_path)
    bare = TrainingConfig(epochs=1).save()  # no checkpoint_dir: the current directory
    assert bare.parent.resolve() == tmp_path.resolve()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_training_config_builder_presets_and_chains():
    presets = {
        "quick_prototype": TrainingConfigBuilder.quick_prototype().build(),
        "baseline": TrainingConfigBuilder.baseline().build(),
        "production": TrainingConfigBuilder.production().build(),
        "distributed": TrainingConfigBuilder.distributed().build(),
        "low_memory": TrainingConfigBuilder.low_memory().build(),
    }
    assert presets["quick_prototype"].epochs == 3 and presets["baseline"].epochs == 10
    assert presets["production"].epochs == 20
    assert presets["low_memory"].batch_size == 2
    assert presets["low_memory"].gradient_accumulation_steps == 8
    config = (
        TrainingConfigBuilder.baseline()
        .with_training(epochs=30, batch_size=8)
        .with_optimizer(gradient_accumulation_steps=4)
        .with_logging(run_name="custom-baseline")
        .build()
    )
    assert (config.epochs, config.batch_size, config.gradient_accumulation_steps) == (30, 8, 4)
    config = (
        TrainingConfigBuilder()
        .with_model(model_name="custom-gpt", vocab_size=50257, d_model=768, num_layers=12,
                    num_heads=12, d_ff=3072, max_seq_len=512)
        .with_training(learning_rate=5e-5, batch_size=16, epochs=20, warmup_ratio=0.1,
                       validation_split=0.1)
        .with_optimizer(weight_decay=0.01, max_grad_norm=1.0, gradient_accumulation_steps=4)
        .with_hardware(use_amp=True, compile_mode="default", devices=1, precision="bf16-mixed")
        .with_logging(run_name="exp-1",  # wandb_project="my-project" needs wandb
                      notes="Testing new augmentation")
        .build()
    )  # fmt: skip
    assert (config.d_ff, config.max_seq_len, config.notes) == (
        3072,
        512,
        "Testing new augmentation",
    )
    assert config.use_amp and config.amp_dtype == "bf16" and config.compile_mode == "default"


def test_task_spec_examples_and_factories():
    lm = TaskSpec(
        name="wikitext-lm",
        modality="text",
        task_type="language_modeling",
        preprocessing_config={"truncate_length": 512, "stride": 256},
    )
    cls = TaskSpec(
        name="imdb-sentiment",
        modality="text",
        task_type="classification",
        num_classes=2,
        class_names=["negative", "positive"],
    )
    vision = TaskSpec(
        name="imagenet-classification",
        modality="vision",
        task_type="image_classification",
        num_classes=1000,
    )
    assert lm.preprocessing_config["stride"] == 256 and lm.collator == "language_modeling"
    assert cls.output_dim == 2 and vision.collator == "vision"
    assert TaskSpec.language_modeling(name="wikitext").task_type == "language_modeling"
    assert TaskSpec.classification(name="imdb", num_classes=2).num_classes == 2
    assert TaskSpec.vision_tiny().input_shape == (1, 28, 28)
    seq = TaskSpec(name="translate", modality="text", task_type="sequence_to_sequence")
    seg = TaskSpec.segmentation(name="masks", num_classes=3)
    assert seq.collator == "sequence_to_sequence" and seg.collator == "segmentation"
    assert seg.output_dim == 3 and not seg.is_classification


# ============================================================= registry, export, tracking
def test_model_registry_register_promote_get_compare(tmp_path):
    from kiln.tracking import ModelRegistry

    checkpoint = tmp_path / "epoch_10.pt"
    torch.save(_mlp().state_dict(), checkpoint)
    registry = ModelRegistry(tmp_path / "models.db")
    model_id = registry.register_model(
        name="transformer-v1",
        version="1.0.0",
        checkpoint_path=str(checkpoint),
        task_type="language_modeling",
        metrics={"val_loss": 0.38, "perplexity": 1.46},
        config_hash="abc123",
        training_run_id=42,
    )
    second = registry.register_model("transformer-v1", checkpoint, metrics={"val_loss": 0.35})
    registry.promote_model(model_id, "production")
    model = registry.get_model(tag="production")
    assert (model.model_id, model.version, model.config_hash) == (model_id, "1.0.0", "abc123")
    assert model.tags == ["production"] and model.training_run_id == 42
    comparison = registry.compare_models([model_id, second])
    assert list(comparison[["version", "val_loss", "created_at"]]["val_loss"]) == [0.38, 0.35]


def test_export_bundle(tmp_path):
    from kiln.export import create_export_bundle

    export_dir = create_export_bundle(
        model=_mlp(),
        config={"name": "mlp"},
        task_spec=TaskSpec.classification(name="xor", num_classes=2),
        training_config=_quick(),
        output_dir=str(tmp_path / "exports"),
        formats=["onnx", "pytorch"],
        input_shape=(4,),
    )
    names = {p.name for p in Path(export_dir).rglob("*") if p.is_file()}
    assert {"inference.py", "README.md", "requirements.txt"} <= names
    assert any(n.endswith(".onnx") for n in names)


def test_experiment_db_log_run_metrics_best(tmp_path):
    from kiln.tracking import ExperimentDB

    db = ExperimentDB(str(tmp_path / "experiments.db"))
    run_id = db.log_run(run_name="baseline-v1", config=_quick().to_dict(), notes="Initial baseline")
    db.log_metric(run_id, "train/loss", 0.42, epoch=5)
    db.log_metric(run_id, "val/loss", 0.38, epoch=5)
    other = db.log_run(run_name="other")
    db.log_metric(other, "val/loss", 0.55, epoch=5)
    best = db.get_best_run("val/loss", mode="min")
    print(f"Best: {best['run_name']} (loss={best['best_value']:.4f})")
    assert best["run_name"] == "baseline-v1" and best["best_value"] == 0.38


def test_set_random_seed_fast_and_deterministic():
    from kiln.engine import set_random_seed

    set_random_seed(42, deterministic=False)
    a = torch.rand(3)
    set_random_seed(42, deterministic=True)
    try:
        assert torch.equal(a, torch.rand(3))
    finally:
        set_random_seed(42, deterministic=False)


# ======================================================== hand-driven training (ModelTrainer)
def test_model_trainer_basic_training():
    from kiln.compat import LRMultiplierAnnealer, ModelTrainer, TrainingResult

    train_loader, val_loader = _loaders()
    held_out = next(iter(val_loader))
    quantum_optimizer = LRMultiplierAnnealer(held_out=(held_out[0], held_out[1]))
    model = _mlp()
    trainer = ModelTrainer(
        model=model,
        config={"num_epochs": 2, "learning_rate": 0.05},
        quantum_optimizer=quantum_optimizer,
    )
    result = trainer.train(train_dataloader=train_loader, val_dataloader=val_loader)
    assert isinstance(result, TrainingResult) and result.model is model
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(result.metrics)
    assert set(result.model_state) == set(model.state_dict())
    assert [h["epoch"] for h in result.history] == [1, 2] and result.global_step == 16
    # should_optimize(): 100 steps between rounds by default, and 16 were trained
    assert result.optimization_results == [] and not trainer.should_optimize()
    assert result.metrics["val_accuracy"] > 0.8


def test_model_trainer_custom_training_loop_with_callbacks(tmp_path):
    from kiln.compat import (
        CheckpointCallback,
        EarlyStoppingCallback,
        MetricsCallback,
        ModelTrainer,
    )

    train_loader, val_loader = _loaders()
    callbacks = [
        MetricsCallback(),
        CheckpointCallback(),
        EarlyStoppingCallback(patience=1, min_delta=10.0),
    ]
    config = _quick(epochs=5, checkpoint_dir=str(tmp_path / "ckpt"))
    trainer = ModelTrainer(_mlp(), config)
    result = trainer.train(train_loader, val_loader, callbacks=callbacks)
    assert [h["epoch"] for h in result.history] == [1, 2] and result.stopped_early
    assert callbacks[2].stopped_epoch == 2
    assert result.checkpoint_path == callbacks[1].best_path
    assert (Path(result.checkpoint_path) / "model.pt").is_file()
    assert [row["epoch"] for row in callbacks[0].history] == [1, 2]
    summary = callbacks[0].get_summary()
    assert summary["step_loss"]["count"] == 16 and summary["val_loss"]["count"] == 2


def test_model_trainer_hand_driven_steps():
    from kiln.compat import ModelTrainer

    class Tracing(ModelTrainer):  # overriding a step method: train_epoch calls these per batch
        calls = 0

        def train_step(self, batch):
            Tracing.calls += 1
            return super().train_step(batch)

    train_loader, val_loader = _loaders()
    trainer = Tracing(_mlp(), _quick(epochs=3, gradient_accumulation_steps=3))
    first = trainer.train_epoch(train_loader)
    assert Tracing.calls == 8 and trainer.global_step == 8
    assert set(first) >= {"epoch", "train_loss", "train_accuracy", "learning_rate"}
    loss = trainer.train_step(next(iter(train_loader)))  # one more step, by hand
    assert loss.dim() == 0 and loss.requires_grad
    trainer.backward_step(loss)
    trainer.optimization_step()
    val = trainer.validate(val_loader)
    assert set(val) == {"val_loss", "val_accuracy"}
    assert trainer.get_epoch_metrics()["val_loss"] == val["val_loss"]
    result = trainer.get_training_result()
    assert result.global_step == 9 and result.metrics["epoch"] == 1


def test_model_trainer_periodic_optimizer_rounds():
    from kiln.compat import ModelTrainer

    train_loader, val_loader = _loaders()
    trainer = ModelTrainer(
        _mlp(), _quick(learning_rate=1e-3), quantum_optimizer="anneal", optimization_frequency=5
    )
    result = trainer.train(train_loader, val_loader)
    assert [r.step for r in result.optimization_results] == [5, 10, 15]
    assert all(r.objective_after <= r.objective_before for r in result.optimization_results)
    assert trainer._last_optimized == 15 and not trainer.should_optimize()
    manual = trainer.quantum_optimize()
    assert manual.step == 16 and len(trainer.optimization_results) == 4


def test_training_step_dict_and_tensor_batches():
    from kiln.compat import TrainingStep

    class HFStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, input_values, labels):
            logits = self.net(input_values)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    model = HFStyle()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = TrainingStep(model, optimizer, scheduler=None)
    assert step.precision.enabled and step.precision.device_type == "cpu"  # model's device
    x, y = _xy(8)
    loss, metrics = step.forward_step({"input_values": x, "labels": y})
    assert loss.dim() == 0 and set(metrics) == {"loss", "batch_size", "accuracy"}
    step.backward_step(loss, gradient_accumulation=2)
    assert all(p.grad is not None for p in model.parameters())
    plain = TrainingStep(_mlp(), optimizer, use_amp=False)
    loss, metrics = plain.forward_step((x, y))
    assert loss.dtype == torch.float32 and metrics["batch_size"] == 8.0


def test_optimization_step_formulate_solve_apply():
    from kiln.compat import LRMultiplierAnnealer, OptimizationResult, OptimizationStep

    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, y = _xy(64)
    annealer = LRMultiplierAnnealer((x, y), choices=(0.5, 1.0, 4.0, 16.0))
    annealer.bind(optimizer)
    handler = OptimizationStep(quantum_optimizer=annealer, optimization_frequency=100)
    assert handler.should_optimize(100) and not handler.should_optimize(99)
    result = handler.optimize_step(model, {"step": 100, "loss": 0.7})
    assert isinstance(result, OptimizationResult) and result.step == 100
    assert result.applied and result.objective_after < result.objective_before


def test_data_manager_get_dataloader():
    from kiln.compat import DataManager

    x, y = _xy(50)
    manager = DataManager(TensorDataset(x, y), batch_size=16, num_workers=0)
    loader = manager.get_dataloader(shuffle=True)
    assert loader.pin_memory == torch.cuda.is_available()
    assert [len(b[0]) for b in loader] == [16, 16, 16, 2]
    with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1"):
        DataManager(TensorDataset(x, y), batch_size=0)


def test_metrics_tracker_update_and_get_summary():
    from kiln.compat import MetricsTracker

    tracker = MetricsTracker()
    tracker.update({"loss": 1.0, "accuracy": 0.5})
    tracker.update({"loss": 0.4, "accuracy": 0.8}, step=10)
    tracker.update({"loss": 0.6})
    assert tracker.current_step == 12
    assert tracker.metrics["loss"] == [(0, 1.0), (10, 0.4), (11, 0.6)]
    summary = tracker.get_summary()
    assert summary["loss"]["min"] == 0.4 and summary["loss"]["last"] == 0.6
    assert summary["accuracy"]["best"] == 0.8 and summary["accuracy"]["count"] == 2


def test_training_callback_interface_order():
    from kiln.compat import ModelTrainer, TrainingCallback

    class Recorder(TrainingCallback):
        def __init__(self):
            self.events = []

        def on_training_start(self, trainer):
            self.events.append(("start", type(trainer).__name__))

        def on_epoch_start(self, trainer, epoch):
            self.events.append(("epoch_start", epoch))

        def on_step_end(self, trainer, step, metrics):
            self.events.append(("step", step, round(metrics["loss"], 6) > 0))

        def on_epoch_end(self, trainer, epoch, metrics):
            self.events.append(("epoch_end", epoch, "val_loss" in metrics))

    recorder = Recorder()
    train_loader, val_loader = _loaders(batch_size=64)
    ModelTrainer(_mlp(), _quick()).train(train_loader, val_loader, callbacks=[recorder])
    assert recorder.events == [
        ("start", "ModelTrainer"),
        ("epoch_start", 1), ("step", 1, True), ("step", 2, True), ("epoch_end", 1, True),
        ("epoch_start", 2), ("step", 3, True), ("step", 4, True), ("epoch_end", 2, True),
    ]  # fmt: skip
