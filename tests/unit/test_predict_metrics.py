"""TaskMetrics against sklearn/numpy on the same predictions, fed in uneven batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from kiln.config import TaskSpec
from kiln.errors import ConfigError
from kiln.predict import TaskMetrics


def _feed(metrics: TaskMetrics, logits: torch.Tensor, labels: torch.Tensor, loss_fn) -> None:
    for lo, hi in ((0, 7), (7, 40), (40, 41), (41, len(labels))):  # uneven batch sizes
        metrics.update(logits[lo:hi], labels[lo:hi], loss_fn(logits[lo:hi], labels[lo:hi]))


def test_classification_matches_sklearn():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (97,), generator=gen)
    logits = torch.randn(97, 4, generator=gen) + F.one_hot(labels, 4) * 1.2  # better than chance
    m = TaskMetrics.for_task(TaskSpec.classification(num_classes=4))
    _feed(m, logits, labels, F.cross_entropy)
    out = m.compute()

    y, pred = labels.numpy(), logits.argmax(1).numpy()
    assert out["num_rows"] == 97
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert 0.3 < out["accuracy"] < 1.0  # not a degenerate case where everything agrees
    p, r, f1, support = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    assert out["precision_macro"] == pytest.approx(p.mean(), rel=1e-5)
    assert out["recall_macro"] == pytest.approx(r.mean(), rel=1e-5)
    assert out["f1_macro"] == pytest.approx(f1.mean(), rel=1e-5)
    assert [c["support"] for c in out["per_class"]] == support.tolist()
    np.testing.assert_allclose([c["precision"] for c in out["per_class"]], p, rtol=1e-5)
    np.testing.assert_allclose([c["recall"] for c in out["per_class"]], r, rtol=1e-5)
    np.testing.assert_allclose([c["f1"] for c in out["per_class"]], f1, rtol=1e-5)
    assert out["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert "roc_auc" not in out


def test_binary_roc_auc_matches_sklearn():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (80,), generator=gen)
    logits = torch.randn(80, 2, generator=gen) + F.one_hot(labels, 2) * 0.8
    m = TaskMetrics.for_task(TaskSpec.classification(num_classes=2))
    _feed(m, logits, labels, F.cross_entropy)
    out = m.compute()
    prob1 = logits.softmax(1)[:, 1].numpy()
    assert out["roc_auc"] == pytest.approx(skm.roc_auc_score(labels.numpy(), prob1), rel=1e-5)
    assert 0.5 < out["roc_auc"] < 1.0


@pytest.mark.parametrize("outputs", [1, 2])
def test_regression_matches_sklearn(outputs):
    rng = np.random.default_rng(outputs)
    target = rng.normal(size=(60, outputs)).astype(np.float32)
    preds = (target + rng.normal(scale=0.5, size=target.shape)).astype(np.float32)
    labels = torch.from_numpy(target[:, 0] if outputs == 1 else target)
    m = TaskMetrics.for_task(TaskSpec.regression(num_outputs=outputs))
    _feed(m, torch.from_numpy(preds), labels, lambda p, t: F.mse_loss(p.reshape(t.shape), t))
    out = m.compute()
    assert out["mae"] == pytest.approx(skm.mean_absolute_error(target, preds), rel=1e-5)
    assert out["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(target, preds)), rel=1e-5)
    assert out["r2"] == pytest.approx(skm.r2_score(target, preds), rel=1e-4)
    assert out["loss"] == pytest.approx(skm.mean_squared_error(target, preds), rel=1e-4)
    assert out["num_rows"] == 60


def test_perplexity_is_exp_of_next_token_cross_entropy_without_pads():
    gen = torch.Generator().manual_seed(2)
    pad = 0
    tokens = torch.randint(1, 11, (9, 6), generator=gen)
    tokens[0, 4:] = pad
    tokens[3, 2:] = pad
    logits = torch.randn(9, 6, 11, generator=gen)
    m = TaskMetrics.for_task(TaskSpec.language_modeling(vocab_size=11, pad_token_id=pad))
    m.update(logits[:4], tokens[:4], torch.tensor(0.0))
    m.update(logits[4:], tokens[4:], torch.tensor(0.0))
    out = m.compute()

    logp = torch.log_softmax(logits[:, :-1], dim=-1).numpy()
    targets = tokens[:, 1:].numpy()
    kept = targets != pad
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0][kept]
    assert out["perplexity"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)


def test_a_classifier_needs_two_classes():
    with pytest.raises(ConfigError, match="num_classes=None"):
        TaskMetrics.for_task(TaskSpec.classification())
