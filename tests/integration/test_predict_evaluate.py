"""Evaluation end to end in the driver process: Trainer.evaluate, kiln.predict.evaluate and
`kiln eval`, checked against sklearn on the same model's predictions, and recorded in the
registry. In-memory data with num_workers=0 runs without starting Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from kiln import ConfigError, Trainer, TrainingConfig
from kiln.cli import main
from kiln.data import get_dataset
from kiln.export import load_checkpoint_model
from kiln.paths import RunPaths
from kiln.predict import evaluate
from kiln.tracking import ModelRegistry

pytestmark = pytest.mark.integration


def _config(**kw) -> TrainingConfig:
    base = dict(
        epochs=3,
        batch_size=64,
        learning_rate=1e-2,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        random_seed=0,
        validation_split=0.2,
    )
    return TrainingConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A small digits MLP, trained in-process and registered as digits-eval:1.0.0."""
    paths = RunPaths.resolve(tmp_path_factory.mktemp("home"))
    cfg = _config(
        dataset="digits", model={"name": "mlp", "hidden": [32]}, register_as="digits-eval"
    )
    trainer = Trainer(training_config=cfg, paths=paths)
    results = trainer.train()
    return trainer, results, paths


def _val_predictions(checkpoint: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, logits, predicted classes) of the run's validation rows, computed here."""
    from kiln.config import TrainingConfig
    from kiln.engine.data_plan import split_for_run

    model, _ = load_checkpoint_model(checkpoint)
    # the run's own split: 10 % test rows first (bundled data), then 20 % validation
    _, val, _ = split_for_run(
        get_dataset("digits"), TrainingConfig(validation_split=0.2, random_seed=0)
    )
    with torch.inference_mode():
        logits = model(torch.as_tensor(val.x)).numpy()
    return val.y, logits, logits.argmax(1)


def test_trainer_evaluate_matches_sklearn_and_is_recorded(digits_run):
    trainer, results, paths = digits_run
    result = trainer.evaluate("digits", split="val")

    y, logits, pred = _val_predictions(results["checkpoint_path"])
    m = result.metrics
    assert result.split == "val" and m["num_rows"] == len(y) == 323
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), rel=1e-5)
    assert m["precision_macro"] == pytest.approx(
        skm.precision_score(y, pred, average="macro", zero_division=0), rel=1e-5
    )
    assert result.confusion_matrix == skm.confusion_matrix(y, pred, labels=range(10)).tolist()
    recall = skm.recall_score(y, pred, average=None)
    np.testing.assert_allclose([c["recall"] for c in result.per_class], recall, rtol=1e-5)
    # The loss is the training loop's own validation loss of that checkpoint.
    best = results["history"][results["best_epoch"] - 1]
    assert m["loss"] == pytest.approx(best["val_loss"], rel=1e-5)

    assert result.model == "digits-eval:1.0.0" and result.evaluation_id is not None
    registry = ModelRegistry(paths.db, paths.artifacts)
    try:
        rows = registry.evaluations(registry.resolve("digits-eval:1.0.0").model_id)
    finally:
        registry.close()
    row = rows[rows["evaluation_id"] == result.evaluation_id].iloc[0]
    assert (row["dataset"], row["split"]) == ("digits", "val")
    assert row["accuracy"] == pytest.approx(m["accuracy"])
    assert row["details"]["confusion_matrix"] == result.confusion_matrix


def top1(outputs, targets):
    """A plain-callable metric: the share of rows whose arg-max is the label."""
    return (outputs.argmax(1) == targets).float().mean()


def test_your_own_metrics_are_scored_beside_kiln_s(tmp_path):
    """Trainer(metrics=...) trains with them, and Trainer.evaluate scores them too (a
    torchmetrics object and a callable); evaluate(metrics=...) takes them directly."""
    from torchmetrics.classification import MulticlassF1Score

    paths = RunPaths.resolve(tmp_path / "home")
    mine = {"f1": MulticlassF1Score(num_classes=10, average="macro"), "top1": top1}
    cfg = _config(dataset="digits", model={"name": "mlp", "hidden": [32]}, epochs=1)
    trainer = Trainer(training_config=cfg, paths=paths, metrics=mine)
    results = trainer.train()
    scored = trainer.evaluate("digits", split="val")
    m = scored.metrics
    assert m["f1"] == pytest.approx(m["f1_macro"], rel=1e-5)  # the same number, two ways
    assert m["top1"] == pytest.approx(m["accuracy"], rel=1e-6)
    # the training loop's own val_f1 for the same checkpoint and rows
    assert m["f1"] == pytest.approx(results["history"][-1]["val_f1"], rel=1e-5)
    plain = trainer.evaluate("digits", split="val", metrics=None)
    assert "f1" not in plain.metrics and plain.metrics["accuracy"] == m["accuracy"]
    only = evaluate(results["checkpoint_path"], "digits", split="val", paths=paths,
                    record=False, metrics={"hits": top1})  # fmt: skip
    assert only.metrics["hits"] == pytest.approx(m["accuracy"]) and "f1" not in only.metrics

    with pytest.raises(ConfigError, match="'f1_macro' is one kiln's evaluation already"):
        trainer.evaluate("digits", split="val", metrics={"f1_macro": top1})
    with pytest.raises(ConfigError, match="metrics=42 .int. is not a metric"):
        evaluate(tmp_path / "nowhere", "digits", metrics=42)  # refused before any loading


def test_cli_eval_plots_prints_json_and_models_show_lists_it(digits_run, tmp_path, capsys):
    _, _, paths = digits_run
    png = tmp_path / "cm.png"
    home = str(paths.home)
    code = main(["--home", home, "eval", "digits-eval:1.0.0", "digits", "--split", "val",
                 "--plot", str(png), "--json"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    payload = json.loads(out[out.index("{") :])
    assert payload["split"] == "val" and payload["model"] == "digits-eval:1.0.0"
    assert len(payload["confusion_matrix"]) == 10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    assert main(["--home", home, "models", "show", "digits-eval:1.0.0"]) == 0
    shown = capsys.readouterr().out
    assert "evaluations" in shown and str(payload["evaluation_id"]) in shown


def test_latest_checkpoint_and_the_runs_held_out_test_rows(digits_run):
    trainer, results, paths = digits_run
    result = trainer.evaluate("digits", checkpoint="latest", split="test")
    assert result.split == "test" and result.metrics["num_rows"] == 180  # the run's test_split
    assert not result.notes
    assert result.checkpoint == results["latest_checkpoint_path"]
    whole = evaluate(results["checkpoint_path"], "digits", paths=paths, record=False)
    assert whole.split == "all" and whole.metrics["num_rows"] == 1797
    assert whole.evaluation_id is None


def test_a_users_own_regressor_on_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], dtype=np.float32) + 0.1).astype(np.float32)
    torch.manual_seed(0)
    trainer = Trainer(
        model=nn.Linear(3, 1),
        training_config=_config(epochs=2, tracking=False),
        paths=RunPaths.resolve(tmp_path / "home"),
    )
    results = trainer.train((x, y))
    result = trainer.evaluate((x, y))

    model = nn.Linear(3, 1)
    model.load_state_dict(torch.load(f"{results['checkpoint_path']}/model.pt", weights_only=True))
    with torch.inference_mode():
        pred = model(torch.from_numpy(x)).numpy()[:, 0]
    assert result.task_type == "regression" and result.confusion_matrix is None
    assert result.metrics["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-5)
    assert result.metrics["rmse"] == pytest.approx(skm.mean_squared_error(y, pred) ** 0.5, rel=1e-5)
    assert result.metrics["r2"] == pytest.approx(skm.r2_score(y, pred), rel=1e-4)
    assert result.evaluation_id is None  # nothing registered
    with pytest.raises(ConfigError, match="classification only"):
        result.plot_confusion_matrix(tmp_path / "cm.png")


def test_bad_options_are_reported_together(digits_run):
    trainer, _, _ = digits_run
    with pytest.raises(ConfigError) as info:
        trainer.evaluate("digits", split="holdout", batch_size=0)
    text = str(info.value)
    assert "split='holdout'" in text and "all, train, val, test" in text and "batch_size=0" in text
    x, y = get_dataset("digits").x[:10], get_dataset("digits").y[:10]
    with pytest.raises(ConfigError, match="split='val' needs a dataset id"):
        trainer.evaluate((x, y), split="val")
