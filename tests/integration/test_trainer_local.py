"""Trainer end to end in the driver process (num_workers=0): every kind of input data,
results, early stopping, resume equivalence, checkpoint retention and bad input.

In-memory data with ``num_workers=0`` runs without starting Ray; only the tests that feed
Ray Data (a ``ray.data.Dataset``, ``data_backend="ray"``) use the ``ray_local`` fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kiln import (
    CallbackBase,
    CheckpointError,
    ConfigError,
    DatasetNotFoundError,
    ModelConfigError,
    TaskSpec,
    Trainer,
    TrainingConfig,
    TrainingHooks,
)
from kiln.engine.checkpoint import load_checkpoint_state

HISTORY_KEYS = {
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "epoch_duration_seconds",
}
RESULT_KEYS = {
    "best_epoch",
    "best_val_loss",
    "total_time",
    "final_metrics",
    "history",
    "checkpoint_path",
    "world_size",
}


def _config(**kw) -> TrainingConfig:
    base = dict(
        epochs=2,
        batch_size=16,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        random_seed=7,
        tracking=False,
    )
    return TrainingConfig(**{**base, **kw})


def _trainer(tmp_path: Path, model=None, hooks=None, task_spec=None, arch=None, **kw) -> Trainer:
    """A Trainer with an isolated home; ``arch`` is the config's architecture dict."""
    if arch is not None:
        kw["model"] = arch
    return Trainer(
        model=model,
        training_config=_config(**kw),
        task_spec=task_spec,
        hooks=hooks,
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
    )


def _iris_arrays(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 4)).astype(np.float32) + y[:, None].astype(np.float32) * 2.0
    return x, y.astype(np.int64)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _checkpoint_dirs(results: dict) -> list[Path]:
    root = Path(results["run_dir"]) / "checkpoints"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch_"))


def _check_results(results: dict, epochs: int, classification: bool = True) -> None:
    assert set(results) >= RESULT_KEYS
    history = results["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    keys = HISTORY_KEYS if classification else (HISTORY_KEYS - {"val_accuracy"}) | {"val_mae"}
    for row in history:
        assert keys <= set(row), sorted(row)
        assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
        assert row["epoch_duration_seconds"] >= 0
    best = min(history, key=lambda h: h["val_loss"])
    assert results["best_epoch"] == best["epoch"]
    assert results["best_val_loss"] == pytest.approx(best["val_loss"])
    assert results["final_metrics"]["epoch"] == epochs
    assert results["final_metrics"]["val_loss"] == history[-1]["val_loss"]
    assert results["total_time"] > 0
    assert results["world_size"] == 1
    assert Path(results["checkpoint_path"]).is_dir()
    meta = load_checkpoint_state(results["checkpoint_path"]).metadata
    assert meta["epoch"] == results["best_epoch"]


# ---------------------------------------------------------------------- inputs
def test_dataset_id_builds_the_default_model(tmp_path):
    trainer = _trainer(tmp_path)
    results = trainer.train("iris")
    _check_results(results, epochs=2)
    assert results["task"]["num_classes"] == 3
    assert results["task"]["input_shape"] == [4]
    assert 0.0 <= results["final_metrics"]["val_accuracy"] <= 1.0
    # iris has 150 rows: 15 held out for test (test_split, bundled data), then 10 % of
    # the remaining 135 for validation: 121 or 122 train rows in ceil(122/16) = 8 batches
    assert results["history"][-1]["global_step"] == 2 * 8
    assert results["test_metrics"]["test_rows"] == 15
    assert isinstance(trainer.trained_model, nn.Module)
    latest = load_checkpoint_state(results["latest_checkpoint_path"]).model_state
    for key, value in trainer.trained_model.state_dict().items():
        assert torch.equal(value, latest[key])


def _numpy_pair():
    return _iris_arrays(), _iris_arrays(30, seed=1)


def _tensor_pair():
    (x, y), (vx, vy) = _numpy_pair()
    return (torch.from_numpy(x), torch.from_numpy(y)), (torch.from_numpy(vx), torch.from_numpy(vy))


def _tensor_dataset():
    (x, y), _ = _tensor_pair()
    return torch.utils.data.TensorDataset(x, y), None  # validation_split carves val out of it


def _data_loader():
    (x, y), (vx, vy) = _tensor_pair()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(vx, vy), batch_size=16)
    return train, val


@pytest.mark.parametrize(
    "make_data, as_factory",
    [
        (_numpy_pair, False),
        (_tensor_pair, True),
        (_tensor_dataset, False),
        (_data_loader, True),
    ],
    ids=["numpy_pair-module", "tensor_pair-factory", "tensor_dataset-module", "loader-factory"],
)
def test_in_memory_and_torch_inputs(tmp_path, make_data, as_factory):
    train, val = make_data()
    user_model = _mlp()
    initial = {k: v.clone() for k, v in user_model.state_dict().items()}
    built: list[nn.Module] = []

    def factory() -> nn.Module:
        built.append(_mlp())
        return built[-1]

    trainer = _trainer(
        tmp_path,
        model=factory if as_factory else user_model,
        task_spec=TaskSpec.classification(name="blobs", num_classes=3),
        epochs=3,
        learning_rate=5e-2,
    )
    results = trainer.train(train, val)
    _check_results(results, epochs=3)
    latest = load_checkpoint_state(results["latest_checkpoint_path"]).model_state
    final = trainer.trained_model
    assert final is not None
    if as_factory:
        assert built, "the factory was never called"
    else:
        assert final is user_model  # the user's module ends with the trained weights
        assert any(not torch.equal(initial[k], v) for k, v in user_model.state_dict().items())
    for key, value in final.state_dict().items():
        assert torch.equal(value, latest[key])
    # The blobs are easy: three epochs at lr 5e-2 learn them.
    assert results["final_metrics"]["val_accuracy"] > 0.8


def test_lr_schedule_follows_the_loaders_own_batch_size(tmp_path):
    # The loader batches 16 rows while the config says 4: the schedule must be planned for
    # the loader's 8 batches per epoch, so a linear decay reaches 0 at the very end.
    train, _ = _data_loader()
    results = _trainer(
        tmp_path,
        model=_mlp,
        task_spec=TaskSpec.classification(num_classes=3),
        batch_size=4,
        lr_scheduler="linear",
        learning_rate=1e-2,
    ).train(train)
    history = results["history"]
    assert [h["global_step"] for h in history] == [8, 16]
    assert history[0]["learning_rate"] == pytest.approx(5e-3)
    assert history[1]["learning_rate"] == pytest.approx(0.0, abs=1e-12)


def test_regression_on_synthetic_regression(tmp_path):
    results = _trainer(tmp_path, epochs=2).train("synthetic_regression")
    _check_results(results, epochs=2, classification=False)
    assert results["task"]["task_type"] == "regression"
    history = results["history"]
    assert "val_accuracy" not in history[-1]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    state = load_checkpoint_state(results["checkpoint_path"]).model_state
    last_bias = [v for k, v in state.items() if k.endswith("bias")][-1]
    assert last_bias.shape == (1,)


# ---------------------------------------------------------------------- early stopping
def test_early_stopping_from_the_config(tmp_path):
    # min_delta far above any change: epoch 1 sets the best, epoch 2 is no improvement.
    results = _trainer(
        tmp_path, epochs=6, early_stopping_patience=1, early_stopping_min_delta=100.0
    ).train("iris")
    assert results["stopped_early"] is True
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert results["final_metrics"]["epoch"] == 2
    assert load_checkpoint_state(results["latest_checkpoint_path"]).metadata["epoch"] == 2


class StopAfter(TrainingHooks):
    """Asks the loop to stop at the end of epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.stop_training = False

    def on_epoch_end(self, epoch, metrics):
        if epoch >= self.epoch:
            self.stop_training = True


def test_early_stopping_from_a_hook(tmp_path):
    results = _trainer(tmp_path, epochs=5, hooks=StopAfter(3)).train("iris")
    assert results["stopped_early"] is True
    assert len(results["history"]) == 3


def test_no_early_stop_runs_every_epoch(tmp_path):
    results = _trainer(tmp_path, epochs=3, early_stopping_patience=50).train("iris")
    assert results["stopped_early"] is False
    assert len(results["history"]) == 3


# ---------------------------------------------------------------------- hooks
class Recorder(CallbackBase):
    """Writes every event it sees to a JSON file (the loop runs a copy of it)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.events: list = []

    def on_train_begin(self, logs=None):
        self.events.append(["train_begin", self.rank, self.world_size, self.model is not None])

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(["epoch_begin", epoch])

    def on_batch_end(self, batch, logs=None):
        self.events.append(["batch_end", batch, float(logs["loss"])])

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(["epoch_end", epoch, logs["val_loss"], logs["train_loss"]])

    def on_train_end(self, logs=None):
        self.events.append(["train_end"])
        Path(self.path).write_text(json.dumps(self.events))


class SeedHooks(TrainingHooks):
    """Seed 002 hooks, written to a file at the end."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.calls: list = []

    def on_training_start(self):
        self.calls.append("start")

    def on_epoch_start(self, epoch):
        self.calls.append(f"epoch_start {epoch}")

    def on_validation_end(self, metrics):
        self.calls.append(f"validation_end {sorted(metrics)}")

    def on_epoch_end(self, epoch, metrics):
        self.calls.append(f"epoch_end {epoch}")

    def on_training_end(self):
        self.calls.append("end")
        Path(self.path).write_text(json.dumps(self.calls))


def test_hooks_and_callbacks_fire_in_order(tmp_path):
    rec, seed = tmp_path / "callback.json", tmp_path / "hooks.json"
    recorder = Recorder(rec)
    # test_split=0: all 150 iris rows split 135/15 into train/validation
    trainer = _trainer(tmp_path, hooks=[recorder, SeedHooks(seed)], test_split=0.0)
    results = trainer.train("iris")
    events = json.loads(rec.read_text())
    assert json.loads(json.dumps(recorder.events)) == events  # in-process: the user's object
    assert events[0] == ["train_begin", 0, 1, True]
    assert events[-1] == ["train_end"]
    kinds = [e[0] for e in events]
    assert kinds.count("batch_end") == 2 * 9  # 135 rows / batch 16
    assert kinds.count("epoch_begin") == kinds.count("epoch_end") == 2
    ends = [e for e in events if e[0] == "epoch_end"]
    for (_, epoch, val_loss, train_loss), row in zip(ends, results["history"], strict=True):
        assert (epoch, val_loss, train_loss) == (row["epoch"], row["val_loss"], row["train_loss"])
    # The epoch's train loss is the sample-weighted mean of its batch losses.
    batches = [e[2] for e in events[1 : 1 + 1 + 9] if e[0] == "batch_end"]
    sizes = [16] * 8 + [135 - 16 * 8]
    weighted = sum(b * n for b, n in zip(batches, sizes, strict=True)) / 135
    assert weighted == pytest.approx(results["history"][0]["train_loss"], rel=1e-5)
    assert json.loads(seed.read_text()) == [
        "start",
        "epoch_start 1",
        "validation_end ['val_accuracy', 'val_loss']",
        "epoch_end 1",
        "epoch_start 2",
        "validation_end ['val_accuracy', 'val_loss']",
        "epoch_end 2",
        "end",
    ]


# ---------------------------------------------------------------------- resume
def _final_state(results: dict) -> dict[str, torch.Tensor]:
    return load_checkpoint_state(results["latest_checkpoint_path"]).model_state


def test_resume_equals_an_uninterrupted_run(tmp_path):
    kw = dict(
        random_seed=3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        learning_rate=5e-3,
        arch={"name": "mlp", "hidden": [16], "dropout": 0.2},  # dropout: RNG state matters
    )
    a = _trainer(tmp_path, epochs=4, run_name="a", **kw).train("iris")
    b = _trainer(tmp_path, epochs=2, run_name="b", **kw).train("iris")
    assert len(b["history"]) == 2
    resumed = _trainer(tmp_path, epochs=4, run_name="b", **kw).train(
        "iris", resume_from=b["latest_checkpoint_path"]
    )

    assert resumed["resumed_from"] == b["latest_checkpoint_path"]
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    state_a, state_r = _final_state(a), _final_state(resumed)
    assert state_a.keys() == state_r.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_r[key]), key
    for row_a, row_r in zip(a["history"], resumed["history"], strict=True):
        assert row_a["val_loss"] == row_r["val_loss"]
        assert row_a["train_loss"] == row_r["train_loss"]

    # "latest" picks run "b"'s newest checkpoint (the resumed run's epoch 4) and goes on to 6.
    again = _trainer(tmp_path, epochs=6, run_name="b", **kw).train("iris", resume_from="latest")
    assert again["resumed_from"] == resumed["latest_checkpoint_path"]
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3, 4, 5, 6]
    c = _trainer(tmp_path, epochs=6, run_name="c", **kw).train("iris")
    for key, value in _final_state(c).items():
        assert torch.equal(value, _final_state(again)[key]), key

    # A checkpoint already at `epochs` has nothing left to train: say so, do not "succeed".
    with pytest.raises(ConfigError, match="is at epoch 6 and epochs=6: nothing is left"):
        _trainer(tmp_path, epochs=6, run_name="c", **kw).train("iris", resume_from="latest")


def test_resume_from_a_missing_path_or_empty_storage(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _trainer(tmp_path).train("iris", resume_from=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no run under"):
        _trainer(tmp_path).train("iris", resume_from="latest")


# ---------------------------------------------------------------------- retention
def test_checkpoint_retention_keeps_best_and_last(tmp_path):
    results = _trainer(tmp_path, epochs=5, keep_best_k=1, keep_last_n=1).train("iris")
    on_disk = _checkpoint_dirs(results)
    assert 1 <= len(on_disk) <= 2
    assert {str(p) for p in on_disk} == set(results["checkpoints"])
    names = {p.name for p in on_disk}
    assert "epoch_0005" in names  # the last
    assert Path(results["checkpoint_path"]).name == f"epoch_{results['best_epoch']:04d}"
    assert Path(results["checkpoint_path"]) in on_disk


def test_save_every_n_epochs_still_saves_the_last(tmp_path):
    results = _trainer(
        tmp_path, epochs=3, save_every_n_epochs=2, keep_best_k=5, keep_last_n=5
    ).train("iris")
    assert [p.name for p in _checkpoint_dirs(results)] == ["epoch_0002", "epoch_0003"]


# ---------------------------------------------------------------------- bad input
def test_unknown_dataset_lists_known_ids(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        _trainer(tmp_path).train("irisx")
    message = str(info.value)
    assert "'irisx'" in message
    assert "iris" in message.replace("'irisx'", "") and "digits" in message


@pytest.mark.parametrize(
    "layers, needles",
    [
        (
            [{"type": "input", "neurons": 5}, {"type": "output", "neurons": 3}],
            ["iris", "neurons=5", "4 features"],
        ),
        (
            [{"type": "input", "neurons": 4}, {"type": "output", "neurons": 10}],
            ["iris", "neurons=10", "3"],
        ),
        (
            [
                {"type": "input", "neurons": 4},
                {"type": "hidden", "neurons": 8, "activation": "swish2"},
                {"type": "output", "neurons": 3},
            ],
            ["activation='swish2'", "relu"],
        ),
    ],
    ids=["input", "output", "activation"],
)
def test_layer_list_not_fitting_the_data(tmp_path, layers, needles):
    trainer = _trainer(tmp_path, arch={"layers": layers})
    with pytest.raises(ModelConfigError) as info:
        trainer.train("iris")
    for needle in needles:
        assert needle in str(info.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_invalid_config_fields(tmp_path):
    with pytest.raises(ConfigError) as info:
        _trainer(tmp_path, epochs=0, optimizer="lamb")
    assert len(info.value.errors) == 2
    with pytest.raises(ConfigError, match="device='tpu'"):
        Trainer(training_config=_config(), device="tpu")


def test_unsupported_train_data_type(tmp_path):
    from kiln import DatasetError

    with pytest.raises(DatasetError, match="not supported"):
        _trainer(tmp_path).train(42)


def test_tracking_records_the_run(tmp_path):
    from kiln.tracking import ExperimentDB

    results = _trainer(tmp_path, epochs=1, tracking=True).train("iris")
    assert results["run_id"] is not None
    db = ExperimentDB(tmp_path / "kiln.db")
    try:
        run = db.get_run(results["run_id"])
    finally:
        db.close()
    assert run is not None


# ---------------------------------------------------------------------- Ray Data
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ray_dataset_and_ray_backend(tmp_path, ray_local):
    import ray.data

    x, y = _iris_arrays(160)
    ds = ray.data.from_items([{"x": x[i], "y": int(y[i])} for i in range(len(x))])
    results = _trainer(tmp_path / "a", model=_mlp, epochs=3, learning_rate=5e-2).train(ds)
    _check_results(results, epochs=3)
    assert results["task"]["num_classes"] == 3
    assert results["final_metrics"]["val_accuracy"] > 0.8

    forced = _trainer(tmp_path / "b", data_backend="ray").train("iris")
    _check_results(forced, epochs=2)
    memory = _trainer(tmp_path / "c").train("iris")
    # Same rows, same order, same seed: Ray Data and the in-memory path train alike.
    for a, b in zip(forced["history"], memory["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


# ---------------------------------------------------------------------- gradient health
def test_gradient_check_interval_adds_gradient_health_to_each_epoch(tmp_path):
    """iris: 135 rows / batch 16 = 9 steps per epoch; checks on steps 0, 4, 8 of each."""
    results = _trainer(tmp_path, epochs=2, gradient_check_interval=4, max_grad_norm=None).train(
        "iris"
    )
    for row in results["history"]:
        assert row["grad_max_norm"] > 0
        assert row["grad_criticals"] == 0
        assert row["grad_warnings"] >= 0
    off = _trainer(tmp_path / "off", epochs=1).train("iris")
    assert "grad_max_norm" not in off["history"][0]


def test_gradient_health_counts_criticals_from_exploding_gradients(tmp_path):
    """A learning rate of 1e3 without clipping blows the weights up within a few steps."""
    results = _trainer(
        tmp_path,
        epochs=1,
        learning_rate=1e3,
        optimizer="sgd",
        momentum=0.0,
        gradient_check_interval=1,
        max_grad_norm=None,
    ).train("iris")
    assert results["history"][-1]["grad_criticals"] > 0


def test_alerts_are_raised_per_epoch_printed_and_recorded(tmp_path, capsys):
    """SGD at lr 1e3 without clipping: gradients explode and the loss goes non-finite."""
    from kiln.tracking import ExperimentDB

    results = _trainer(
        tmp_path,
        epochs=2,
        learning_rate=1e3,
        optimizer="sgd",
        momentum=0.0,
        max_grad_norm=None,
        tracking=True,
    ).train("iris")
    kinds = {a["type"] for a in results["alerts"]}
    assert kinds & {"non_finite_loss", "gradient_norm"}, results["alerts"]
    assert all(a["epoch"] in (1, 2) for a in results["alerts"])
    assert "alert (" in capsys.readouterr().out
    db = ExperimentDB(tmp_path / "kiln.db")
    try:
        params = db.get_run(results["run_id"])["params"]
    finally:
        db.close()
    assert [a["type"] for a in params["alerts"]] == [a["type"] for a in results["alerts"]]


def test_accuracy_alerts_agree_with_the_history(tmp_path):
    """Every epoch whose val accuracy fell > 5 % below its best so far has an alert, no other."""
    results = _trainer(tmp_path, epochs=6, learning_rate=5e-2).train("iris")
    best, expected = None, []
    for row in results["history"]:
        acc = row["val_accuracy"]
        if best is not None and (best - acc) / best > 0.05:
            expected.append(row["epoch"])
        best = acc if best is None else max(best, acc)
    got = [a["epoch"] for a in results["alerts"] if a["type"] == "accuracy_drop"]
    assert got == expected


class _FakeWandbRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, metrics, step):
        self.calls.append(("log", step, metrics))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_project_logs_every_epoch_once_from_the_driver(tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    calls: list = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or _FakeWandbRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    results = _trainer(tmp_path, epochs=3, wandb_project="kiln-tests").train("iris")
    assert [c[0] for c in calls] == ["init", "log", "log", "log", "finish"]
    assert calls[0][1]["project"] == "kiln-tests"
    assert calls[0][1]["name"] == results["run_name"]
    assert [c[1] for c in calls[1:4]] == [1, 2, 3]
    assert calls[3][2]["val_loss"] == pytest.approx(results["history"][-1]["val_loss"])


def test_wandb_project_without_wandb_fails_before_training(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="wandb_project='p' needs the `wandb` package"):
        TrainingConfig(wandb_project="p").validate()


def test_model_config_names_the_architecture_and_config_stays_its_alias(tmp_path):
    arch = {"name": "mlp", "hidden": [8]}
    kw = dict(
        training_config=_config(epochs=1),
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
    )
    new = Trainer(model_config=arch, **kw)
    old = Trainer(config=arch, **kw)
    assert new.training_config.model == old.training_config.model == arch
    with pytest.raises(ConfigError, match="not both"):
        Trainer(model_config=arch, config=arch, **kw)
    results = new.train("iris")
    assert results["final_metrics"]["val_loss"] > 0


def test_resume_latest_looks_in_the_configured_checkpoint_dir(tmp_path):
    """A run with checkpoint_dir=D that stopped at epoch 2 resumes from D/epoch_0002."""
    ckpts = tmp_path / "my_ckpts"
    first = _trainer(tmp_path, epochs=2, checkpoint_dir=str(ckpts)).train("iris")
    assert Path(first["latest_checkpoint_path"]).parent == ckpts
    again = _trainer(tmp_path / "other_home", epochs=3, checkpoint_dir=str(ckpts))
    resumed = again.train("iris", resume_from="latest")
    assert resumed["resumed_from"] == str(ckpts / "epoch_0002")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]


def test_artifacts_sit_next_to_the_tracking_db(tmp_path, monkeypatch):
    """register_as with tracking_db=/x/kiln.db puts artifacts in /x/artifacts, where
    `kiln export NAME:1.0.0 --db /x/kiln.db` looks for them."""
    from kiln.cli import main

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    db = tmp_path / "x" / "kiln.db"
    results = Trainer(
        training_config=_config(epochs=1, tracking_db=str(db), register_as="iris-x"),
        storage_path=tmp_path / "runs",
    ).train("iris")
    assert results["model_id"] is not None
    assert (tmp_path / "x" / "artifacts").is_dir()
    assert not (tmp_path / "home" / "artifacts").exists()
    out = tmp_path / "bundle"
    assert main(["--db", str(db), "export", "iris-x:1.0.0", "-o", str(out)]) == 0
    assert (out / "manifest.json").is_file()


class _DoubledCrossEntropy:
    """A user's loss: twice the cross-entropy (so the reported loss doubles)."""

    def compute_loss(self, logits, labels, **_):
        return 2.0 * torch.nn.functional.cross_entropy(logits, labels)


def test_a_registered_loss_is_chosen_by_name(tmp_path):
    from kiln.engine.loss import LOSSES, register_loss

    register_loss("doubled_ce", _DoubledCrossEntropy, overwrite=True)
    try:
        plain = _trainer(tmp_path / "a", epochs=1).train("iris")
        doubled = _trainer(tmp_path / "b", epochs=1, loss="doubled_ce").train("iris")
    finally:
        LOSSES._entries.pop("doubled_ce", None)
    assert doubled["history"][0]["val_loss"] == pytest.approx(
        2 * plain["history"][0]["val_loss"], rel=1e-4
    )
    with pytest.raises(ConfigError, match="'doubled_ce' is not a registered loss"):
        _trainer(tmp_path / "c", epochs=1, loss="doubled_ce").train("iris")


def test_resuming_with_another_architecture_says_so(tmp_path):
    _trainer(tmp_path, epochs=1, run_name="arch", arch={"name": "mlp", "hidden": [8]}).train("iris")
    other = _trainer(tmp_path, epochs=2, run_name="arch", arch={"name": "mlp", "hidden": [16]})
    with pytest.raises(Exception, match="another shape than this run's model config"):
        other.train("iris", resume_from="latest")
