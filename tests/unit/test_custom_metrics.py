"""Custom metrics, optimizer/scheduler factories and hook-added metrics, without Ray.

The synchronisation over ranks is tested with 2 DDP workers in
tests/integration/test_custom_pieces.py; here: naming and validation, the per-epoch
accumulators on one process, the factories' checks and the hooks' additions.
"""

from __future__ import annotations

import cloudpickle
import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from kiln import CallbackBase, Trainer, TrainingConfig, TrainingHooks
from kiln.engine.custom_metrics import MetricSet, added_metrics
from kiln.engine.custom_optim import (
    check_factories,
    make_optimizer,
    make_scheduler,
    resolve_choice,
)
from kiln.errors import ConfigError
from kiln.tune.spaces import check_metric


def error_rate(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.argmax(-1) != targets).float().mean())


def _batches(seed: int = 0, sizes=(8, 5, 3)):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes
    ]


# ---------------------------------------------------------------------- MetricSet
def test_metric_set_names_dicts_lists_and_collections():
    from torchmetrics import MetricCollection

    metrics = MetricSet.from_user(
        [MulticlassF1Score(num_classes=3), error_rate, {"acc3": MulticlassAccuracy(num_classes=3)}]
    )
    assert metrics.names == ["multiclass_f1_score", "acc3", "error_rate"]
    assert metrics.reported_names() == [
        "train_multiclass_f1_score", "train_acc3", "train_error_rate",
        "val_multiclass_f1_score", "val_acc3", "val_error_rate",
    ]  # fmt: skip
    collection = MetricCollection({"f1": MulticlassF1Score(num_classes=3)})
    assert MetricSet.from_user({"cls": collection}).names == ["cls_f1"]
    assert MetricSet.from_user(None) is None and MetricSet.from_user({}) is None


def test_metric_set_collects_every_problem_with_the_value():
    with pytest.raises(ConfigError) as info:
        MetricSet.from_user(
            {
                "accuracy": error_rate,  # kiln reports train_accuracy itself
                "val_f1": error_rate,  # the split prefix is kiln's
                "bad name": error_rate,
                "answer": 42,
            }
        )
    errors = info.value.errors
    assert len(errors) == 4, errors
    assert "'accuracy' is one kiln already reports" in errors[0]
    assert "name it 'f1'" in errors[1]
    assert "'bad name' must start with a letter" in errors[2]
    assert "metrics['answer']=42 (int) is not a metric" in errors[3]
    assert "torchmetrics.Metric" in errors[3]
    with pytest.raises(ConfigError, match="a lambda has no usable name; pass a dict"):
        MetricSet.from_user(lambda o, t: 0.0)
    with pytest.raises(ConfigError, match=r"metrics='f1' \(str\) is not a metric; allowed: a "):
        MetricSet.from_user(["f1"])


def test_a_metric_set_pickles_with_a_lambda_as_the_worker_plan_ships_it():
    metrics = MetricSet.from_user({"f1": MulticlassF1Score(num_classes=3), "neg": lambda o, t: -1})
    copy = cloudpickle.loads(cloudpickle.dumps(metrics))
    epoch = copy.for_epoch("val", "cpu")
    epoch.update(*_batches()[0])
    assert epoch.compute(distributed=False)["val_neg"] == -1.0


# ---------------------------------------------------------------------- EpochMetrics
def test_epoch_metrics_match_torchmetrics_and_weight_callables_by_batch_size():
    template = MulticlassF1Score(num_classes=3, average="macro")
    metrics = MetricSet.from_user({"f1": template, "err": error_rate})
    epoch = metrics.for_epoch("val", "cpu")
    reference = MulticlassF1Score(num_classes=3, average="macro")
    wrong = total = 0
    for outputs, targets in _batches():
        epoch.update(outputs.requires_grad_(), targets)
        reference.update(outputs.detach(), targets)
        wrong += int((outputs.argmax(-1) != targets).sum())
        total += len(targets)
    values = epoch.compute(distributed=False)
    assert values["val_f1"] == pytest.approx(float(reference.compute()))
    # sizes 8, 5, 3: a plain mean of the per-batch rates would differ from this
    assert values["val_err"] == pytest.approx(wrong / total)
    assert template._update_count == 0  # the user's metric is a template, never updated
    again = metrics.for_epoch("val", "cpu")  # each epoch starts from empty state
    again.update(*_batches(seed=1)[0])
    assert again.compute(distributed=False)["val_f1"] != pytest.approx(values["val_f1"])


def test_epoch_metrics_cast_low_precision_outputs_and_skip_missing_outputs():
    seen = []
    metrics = MetricSet.from_user({"dtype": lambda o, t: seen.append(o.dtype) or 0.0})
    epoch = metrics.for_epoch("train", "cpu")
    outputs, targets = _batches()[0]
    epoch.update(outputs.to(torch.bfloat16), targets)
    epoch.update(None, targets)  # a model that computes its own loss: nothing to add
    assert seen == [torch.float32]
    assert epoch.samples == len(targets)


def test_one_output_per_row_is_shaped_like_its_targets():
    from torchmetrics.regression import MeanAbsoluteError

    metrics = MetricSet.from_user({"l1": MeanAbsoluteError()})
    epoch = metrics.for_epoch("val", "cpu")
    epoch.update(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.5, 2.0, 3.0]))
    assert epoch.compute(distributed=False)["val_l1"] == pytest.approx(0.5)


def test_a_metric_that_is_not_one_number_names_itself():
    metrics = MetricSet.from_user({"per_class": MulticlassF1Score(num_classes=3, average=None)})
    epoch = metrics.for_epoch("val", "cpu")
    epoch.update(*_batches()[0])
    with pytest.raises(ConfigError, match=r"'val_per_class' gave a tensor of shape \(3,\)"):
        epoch.compute(distributed=False)
    text = MetricSet.from_user({"text": lambda o, t: "high"}).for_epoch("val", "cpu")
    with pytest.raises(ConfigError, match="'val_text' gave 'high' \\(str\\)"):
        text.update(*_batches()[0])


# ---------------------------------------------------------------------- hooks add metrics
def test_numbers_hooks_add_join_the_epoch_record_and_loop_values_stay():
    from kiln.engine.worker import _Hooks

    class Gap(CallbackBase):
        def on_epoch_end(self, epoch, logs=None):
            logs["gap"] = logs["val_loss"] - logs["train_loss"]
            logs["val_loss"] = -1.0  # the loop's value is kept
            logs["note"] = "text is not a metric"

    class Doubled(TrainingHooks):
        def on_epoch_end(self, epoch, metrics):
            metrics["double_loss"] = np.float32(2 * metrics["train_loss"])
            metrics["as_tensor"] = torch.tensor(3.0)

    cfg = TrainingConfig(epochs=1)
    hooks = _Hooks([Gap(), Doubled()], cfg, nn.Linear(1, 1), None, rank=0, world_size=1)
    metrics = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.75, "steps": [{"step": 1}]}
    hooks.epoch_end(1, metrics)
    assert metrics["gap"] == pytest.approx(0.25)
    assert metrics["double_loss"] == pytest.approx(1.0) and type(metrics["double_loss"]) is float
    assert metrics["as_tensor"] == 3.0 and metrics["val_loss"] == 0.75
    assert "note" not in metrics and metrics["steps"] == [{"step": 1}]
    assert added_metrics({"a": 1}, {"a": 2, "b": True}) == {}  # bools are not metrics


# ---------------------------------------------------------------------- factories
def test_names_and_factories_resolve_and_bad_values_name_the_parameter():
    assert resolve_choice("optimizer", "sgd") == ("sgd", None)
    factory = lambda params, cfg: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    assert resolve_choice("optimizer", factory) == (None, factory)
    with pytest.raises(ConfigError, match="optimizer='lion' is not one of adamw, adam, sgd"):
        resolve_choice("optimizer", "lion")
    with pytest.raises(ConfigError, match="a class is not a factory: wrap it in a lambda"):
        resolve_choice("optimizer", torch.optim.SGD)
    with pytest.raises(ConfigError, match=r"lr_scheduler=3 \(int\) must be one of constant"):
        resolve_choice("lr_scheduler", 3)


def test_factories_that_return_the_wrong_thing_fail_before_training():
    cfg = TrainingConfig()
    with pytest.raises(ConfigError) as info:
        check_factories(lambda params, cfg: nn.Linear(1, 1), None, cfg)
    message = str(info.value)
    assert (
        message.startswith("optimizer=<factory test_custom_metrics.")
        or "optimizer=<factory" in message
    )
    assert "returned Linear(in_features=1, out_features=1, bias=True) (Linear)" in message
    assert "must return a torch.optim.Optimizer" in message

    def plateau(optimizer, cfg, total_steps):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)

    with pytest.raises(ConfigError, match="returned a ReduceLROnPlateau; kiln steps"):
        check_factories(None, plateau, cfg)
    with pytest.raises(ConfigError, match=r"returned None \(NoneType\); the factory must return"):
        check_factories(None, lambda optimizer, cfg, total_steps: None, cfg)

    def elsewhere(optimizer, cfg, total_steps):
        other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        return torch.optim.lr_scheduler.StepLR(other, 1)

    with pytest.raises(ConfigError, match="a schedule on another optimizer"):
        check_factories(None, elsewhere, cfg)

    def needs_two(params, cfg):  # fails on the one-element stand-in: left to the workers
        first, second = params
        return torch.optim.SGD([first, second], lr=0.1)

    check_factories(needs_two, None, cfg)
    # Trainer checks them at construction, before any data or Ray
    with pytest.raises(ConfigError, match="lr_scheduler=<factory"):
        Trainer(training_config=cfg, lr_scheduler=plateau, verbose=False)


def test_factories_build_on_trainable_params_and_names_set_the_config():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    cfg = TrainingConfig(learning_rate=0.25)
    seen = {}

    def sgd(params, cfg):
        seen["params"] = params
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.5)

    optimizer = make_optimizer(model, cfg, sgd)
    assert len(seen["params"]) == 3 and optimizer.param_groups[0]["lr"] == 0.25
    scheduler = make_scheduler(
        optimizer, cfg, 40, lambda opt, cfg, total: torch.optim.lr_scheduler.StepLR(opt, total // 2)
    )
    assert scheduler.step_size == 20
    builtin = make_scheduler(make_optimizer(model, cfg, None), cfg, 10, None)
    assert isinstance(builtin, torch.optim.lr_scheduler.LambdaLR)
    trainer = Trainer(training_config=cfg, optimizer="sgd", lr_scheduler="linear", verbose=False)
    assert (trainer.training_config.optimizer, trainer.training_config.lr_scheduler) == (
        "sgd",
        "linear",
    )
    assert trainer.custom.params() == {}
    custom = Trainer(training_config=cfg, optimizer=sgd, metrics=[error_rate], verbose=False)
    assert custom.custom.params()["optimizer_factory"].endswith("sgd>")
    assert custom.custom.params()["custom_metrics"] == {"error_rate": "error_rate"}


# ---------------------------------------------------------------------- config and Tune
def test_report_to_is_checked_and_says_how_to_install_mlflow(monkeypatch):
    import importlib.util

    with pytest.raises(ConfigError, match=r"report_to=\['neptune'\] has unknown trackers"):
        TrainingConfig(report_to=["neptune"]).validate()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'kiln\[mlflow\]'"):
        TrainingConfig(report_to=["mlflow"]).validate()


def test_tune_accepts_a_custom_metric_as_the_search_metric():
    assert check_metric("val_f1", "max", "classification", True, ["f1"]) == []
    errors = check_metric("val_f1", "max", "classification", True)
    assert errors and "trials report: train_loss" in errors[0]


def test_run_plots_draw_the_custom_metrics_by_default():
    import pandas as pd

    from kiln.cli.runs import _plot_names

    table = pd.DataFrame(
        columns=["epoch", "train_loss", "val_accuracy", "learning_rate", "val_f1", "train_f1"]
    )
    custom = {"f1": "MulticlassF1Score"}  # the run's custom_metrics parameter
    assert _plot_names(table, None, custom) == ["train_loss", "val_accuracy", "val_f1", "train_f1"]
    assert "val_f1" not in _plot_names(table, None)  # another run's metric of that name
