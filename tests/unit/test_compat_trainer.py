"""ModelTrainer's two epoch paths agree, its task inference, callbacks both ways, the
checkpoint callback's registry link, and the compat re-exports."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln import TaskSpec, TrainingConfig


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] - x[:, 2] > 0).long()


def _model(out=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))


def _cfg(**kw):
    base = dict(epochs=2, learning_rate=0.05, warmup_ratio=0.0, lr_scheduler="linear")
    return TrainingConfig(**{**base, **kw})


def _loader(x, y, batch_size=16):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_kiln_loop_and_step_methods_train_the_same_weights():
    from kiln.compat import ModelTrainer

    class StepByStep(ModelTrainer):  # any override routes train_epoch through the step methods
        def backward_step(self, loss):
            super().backward_step(loss)

    x, y = _data(90)  # 90 rows / 16 = 6 batches; accumulation 4 leaves a partial window
    cfg = _cfg(gradient_accumulation_steps=4, max_grad_norm=0.5)
    runs = []
    for cls in (ModelTrainer, StepByStep):
        trainer = cls(_model(), cfg)
        result = trainer.train(_loader(x, y), _loader(x[:32], y[:32]))
        runs.append((trainer, result))
    (a, ra), (b, rb) = runs
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert ra.metrics["train_loss"] == pytest.approx(rb.metrics["train_loss"], rel=1e-5)
    assert ra.metrics["train_accuracy"] == pytest.approx(rb.metrics["train_accuracy"])
    assert ra.metrics["learning_rate"] == pytest.approx(rb.metrics["learning_rate"])
    assert a.global_step == b.global_step == 12
    assert a.scheduler.last_epoch == b.scheduler.last_epoch == 4  # 2 optimizer steps per epoch


def test_task_inference_regression_and_explicit_task_spec_columns():
    from kiln.compat import ModelTrainer

    x, _ = _data(64)
    target = x[:, :1] * 2.0 + 1.0
    result = ModelTrainer(_model(out=1), _cfg(epochs=3)).train(_loader(x, target))
    assert "train_mae" in result.metrics and "train_accuracy" not in result.metrics
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_epoch == 3  # no validation: ranked by train_loss

    rows = [{"features": xi, "target": yi} for xi, yi in zip(*_data(48), strict=True)]
    loader = DataLoader(rows, batch_size=16)
    task = TaskSpec.classification(name="cols", num_classes=2, input_column="features",
                                   label_column="target")  # fmt: skip
    trainer = ModelTrainer(_model(), _cfg(epochs=1), task_spec=task)
    metrics = trainer.train_epoch(loader)
    assert {"train_loss", "train_accuracy"} <= set(metrics)
    assert set(trainer.validate(loader)) == {"val_loss", "val_accuracy"}


def test_model_that_returns_its_own_loss_trains_through_the_step_methods():
    from kiln.compat import ModelTrainer

    class OwnLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, features, labels):
            logits = self.net(features)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    x, y = _data(64)
    batches = [{"features": x[i : i + 16], "labels": y[i : i + 16]} for i in range(0, 64, 16)]
    result = ModelTrainer(OwnLoss(), _cfg(epochs=3)).train(batches, batches)
    assert result.global_step == 12
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0


def test_kiln_callbacks_and_stop_requests_inside_model_trainer(capsys):
    from kiln import EarlyStoppingCallback, LoggingCallback, TrainingHooks
    from kiln.compat import ModelTrainer, TrainingCallback

    class Hooks(TrainingHooks):
        def __init__(self):
            self.events = []

        def on_batch_end(self, batch_idx, loss):
            self.events.append(batch_idx)

        def on_validation_end(self, metrics):
            self.events.append(sorted(metrics))

    class StopAfterTwo(TrainingCallback):
        def on_epoch_end(self, trainer, epoch, metrics):
            if epoch == 2:
                trainer.stop_training = True

    hooks = Hooks()
    x, y = _data(64)
    result = ModelTrainer(_model(), _cfg(epochs=6)).train(
        _loader(x, y, 32),
        _loader(x, y, 64),
        callbacks=[LoggingCallback(), EarlyStoppingCallback(patience=50), hooks, StopAfterTwo()],
    )
    assert [h["epoch"] for h in result.history] == [1, 2] and result.stopped_early
    assert hooks.events == [0, 1, ["val_accuracy", "val_loss"], 0, 1, ["val_accuracy", "val_loss"]]
    assert "epoch 2/6 - " in capsys.readouterr().out


def test_config_checks():
    from kiln.compat import ModelTrainer
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="model must be a torch.nn.Module"):
        ModelTrainer("not a model", _cfg())
    with pytest.raises(ConfigError, match="optimization_frequency=0"):
        ModelTrainer(_model(), _cfg(), optimization_frequency=0)
    with pytest.raises(ConfigError, match="lacks formulate_problem"):
        ModelTrainer(_model(), _cfg(), quantum_optimizer=object())
    with pytest.raises(ConfigError, match="epochs=0"):
        ModelTrainer(_model(), {"num_epochs": 0})
    with pytest.raises(ConfigError, match="no solver: pass quantum_optimizer="):
        ModelTrainer(_model(), _cfg()).quantum_optimize()
    with pytest.raises(ConfigError, match="'anneal' builds its solver from the loaders"):
        ModelTrainer(_model(), _cfg(), quantum_optimizer="anneal").quantum_optimize()
    with pytest.raises(ConfigError, match="yielded no batches"):
        ModelTrainer(_model(), _cfg()).train_epoch([])


class StopAtOne:
    """A trainer-first callback (module level: it is pickled)."""

    def on_epoch_end(self, trainer, epoch, metrics):
        trainer.stop_training = epoch >= 1


def test_seed_callback_adapter_pickles_and_passes_stop_requests():
    from kiln.compat import SeedCallbackAdapter, adapt_callback

    assert isinstance(adapt_callback(StopAtOne()), SeedCallbackAdapter)  # by its signature
    adapter = SeedCallbackAdapter(StopAtOne(), config=_cfg())
    adapter.set_context(model=_model(), optimizer=None, rank=1, world_size=2)
    adapter.on_epoch_end(0, {"val_loss": 0.4})
    assert adapter.trainer.rank == 1 and not adapter.stop_training
    clone = pickle.loads(pickle.dumps(adapter))
    assert clone.trainer is None and clone.model is None
    adapter.on_epoch_end(1, {"val_loss": 0.3})
    assert adapter.stop_training


def test_model_checkpoint_callback_registers_in_process_and_not_from_a_copy(tmp_path, caplog):
    from kiln import ModelCheckpointCallback
    from kiln.tracking import ModelRegistry

    registry = ModelRegistry(tmp_path / "kiln.db")
    cb = ModelCheckpointCallback(
        tmp_path / "ckpt", registry=registry, register_as="m", register="every"
    )
    cb.set_context(model=_model())
    for epoch, loss in ((1, 0.5), (2, 0.4)):
        cb.on_epoch_end(epoch, {"val_loss": loss})
    cb.on_train_end()
    assert [registry.get_model(model_id=i).version for i in cb.registered] == ["1.0.0", "1.1.0"]

    best_only = ModelCheckpointCallback(tmp_path / "best", registry=registry, register_as="b")
    copy = pickle.loads(pickle.dumps(best_only))  # what a Ray worker receives
    assert copy.registry is None
    copy.set_context(model=_model())
    with caplog.at_level(logging.WARNING):
        copy.on_epoch_end(1, {"val_loss": 0.5})
        copy.on_train_end()
    assert copy.registered == [] and "not registering b" in caplog.text
    best_only.set_context(model=_model())
    best_only.on_epoch_end(1, {"val_loss": 0.5})
    best_only.on_epoch_end(2, {"val_loss": 0.7})
    best_only.on_train_end()
    entry = registry.get_model(name="b")
    assert best_only.registered == [entry.model_id] and entry.metrics["val_loss"] == 0.5
    with pytest.raises(ValueError, match="register_as must name the model"):
        ModelCheckpointCallback(tmp_path, registry=registry)
    with pytest.raises(ValueError, match="register must be one of best, every; got 'all'"):
        ModelCheckpointCallback(tmp_path, register="all")


def test_compat_names_are_re_exported_where_older_code_imports_them():
    import kiln
    import kiln.compat as compat
    import kiln.engine as engine
    import kiln.tune as tune

    assert kiln.TrainingEngine is engine.TrainingEngine is compat.TrainingEngine
    assert kiln.TrainingSession is engine.TrainingSession is compat.TrainingSession
    assert tune.ModelTrainer is compat.ModelTrainer and tune.TrainingResult is compat.TrainingResult
    assert tune.OptimizationStep is compat.OptimizationStep
    assert engine.QuantizationSafeLoss is compat.QuantizationSafeLoss
    assert compat.QuantumOptimizer is tune.PeriodicOptimizer
    assert compat.EarlyStoppingCallback is not kiln.EarlyStoppingCallback  # trainer-first form
    missing = [name for name in compat.__all__ if not hasattr(compat, name)]
    assert not missing
    from kiln.engine import get_loss_strategy

    assert type(get_loss_strategy("quantization_safe", bits=4)) is compat.QuantizationSafeLoss
    assert type(get_loss_strategy("peft", adapter_scale=2.0)) is compat.PEFTAwareLoss


def test_task_spec_types_and_errors():
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="'detection' is not one of .*sequence_to_sequence"):
        TaskSpec(name="t", task_type="detection")
    spec = TaskSpec.sequence_to_sequence(name="t", vocab_size=100, pad_token_id=0)
    assert spec.output_dim == 100 and spec.modality == "text"
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert TaskSpec.regression().collator == "regression"


def test_data_manager_errors_and_file_rows(tmp_path):
    from kiln.compat import DataManager
    from kiln.errors import DatasetError

    with pytest.raises(DatasetError, match="batch_size=0 .*; num_workers=-1"):
        DataManager(TensorDataset(*_data(8)), batch_size=0, num_workers=-1)
    path = tmp_path / "rows.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(10)))
    manager = DataManager(str(path), batch_size=4, num_workers=0)
    xb, yb = next(iter(manager.get_dataloader(shuffle=False)))
    assert xb.shape == (4, 2) and yb.tolist() == [0, 1, 0, 1]


def test_hand_driven_steps_call_the_periodic_optimizer_every_n_steps():
    from kiln.compat import LRMultiplierAnnealer, ModelTrainer

    x, y = _data(64)
    annealer = LRMultiplierAnnealer((x[:32], y[:32]))
    trainer = ModelTrainer(_model(), _cfg(), quantum_optimizer=annealer, optimization_frequency=2)
    for batch in _loader(x, y):  # the custom loop, without train() or train_epoch()
        loss = trainer.train_step(batch)
        trainer.backward_step(loss)
        trainer.optimization_step()
    assert [r.step for r in trainer.optimization_results] == [2, 4]
    assert annealer.optimizer is trainer.optimizer  # bound at construction
    assert set(trainer.get_epoch_metrics()) >= {"epoch", "train_loss", "train_accuracy"}
