"""GradientAccumulator arithmetic and clipping; gradient health checks and the monitor."""

from __future__ import annotations

import logging
import math
import pickle

import pytest
import torch

from kiln.engine.gradients import (
    GradientAccumulator,
    GradientExplosionError,
    GradientMonitor,
    check_gradient_health,
)
from kiln.errors import KilnError


def _model_with_grads(*grads: list[float]) -> torch.nn.Module:
    """A module whose parameters carry exactly the given gradients."""
    model = torch.nn.Module()
    for i, g in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g, dtype=torch.float32)
        model.register_parameter(f"p{i}", p)
    return model


def test_should_update_and_effective_step():
    acc = GradientAccumulator(accumulation_steps=4)
    assert [s for s in range(12) if acc.should_update_optimizer(s)] == [3, 7, 11]
    assert acc.get_effective_step(0) == 0
    assert acc.get_effective_step(3) == 0
    assert acc.get_effective_step(4) == 1
    assert acc.get_effective_step(9) == 2
    one = GradientAccumulator()
    assert all(one.should_update_optimizer(s) for s in range(5))


def test_scale_loss_and_counters():
    acc = GradientAccumulator(accumulation_steps=4)
    losses = [1.0, 2.0, 3.0, 4.0, 10.0]
    for v in losses:
        scaled = acc.scale_loss(torch.tensor(v))
        assert scaled.item() == pytest.approx(v / 4)
        if acc.stats.global_step == 4:
            assert acc.stats.accumulated_loss == pytest.approx(10.0)
    stats = acc.get_statistics()
    assert stats["global_step"] == 5
    assert stats["effective_step"] == 1
    assert stats["accumulated_loss"] == pytest.approx(10.0)  # new window holds only 10.0


def test_scaled_accumulation_matches_full_batch_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    full = torch.nn.Linear(3, 1)
    acc_model = torch.nn.Linear(3, 1)
    acc_model.load_state_dict(full.state_dict())
    torch.nn.functional.mse_loss(full(x), y).backward()
    acc = GradientAccumulator(accumulation_steps=4, max_gradient_norm=None)
    for chunk in range(4):
        xb, yb = x[chunk * 2 : chunk * 2 + 2], y[chunk * 2 : chunk * 2 + 2]
        acc.scale_loss(torch.nn.functional.mse_loss(acc_model(xb), yb)).backward()
    assert torch.allclose(full.weight.grad, acc_model.weight.grad, atol=1e-6)


def test_global_norm_clipping_records_norms():
    model = _model_with_grads([3.0, 4.0], [0.0, 12.0])  # global norm 13
    acc = GradientAccumulator(max_gradient_norm=1.0)
    before = acc.clip_gradients(model)
    assert before == pytest.approx(13.0)
    stats = acc.get_statistics()
    assert stats["norm_before"] == pytest.approx(13.0)
    assert stats["norm_after"] == pytest.approx(1.0, rel=1e-4)
    actual = torch.linalg.vector_norm(torch.cat([p.grad for p in model.parameters()]))
    assert actual.item() == pytest.approx(1.0, rel=1e-4)
    assert stats["num_parameters"] == 4
    assert stats["num_clipped"] == 1


def test_no_clip_below_threshold():
    model = _model_with_grads([0.3, 0.4])
    acc = GradientAccumulator(max_gradient_norm=1.0)
    assert acc.clip_gradients(model) == pytest.approx(0.5)
    assert acc.get_statistics()["norm_after"] == pytest.approx(0.5)
    assert model.p0.grad.tolist() == pytest.approx([0.3, 0.4])


def test_value_clipping():
    model = _model_with_grads([3.0, -0.5], [-4.0])
    acc = GradientAccumulator(max_gradient_norm=1.0, clip_by_global_norm=False)
    before = acc.clip_gradients(model)
    assert before == pytest.approx(math.sqrt(9 + 0.25 + 16))
    assert model.p0.grad.tolist() == [1.0, -0.5]
    assert model.p1.grad.tolist() == [-1.0]
    assert acc.get_statistics()["norm_after"] == pytest.approx(math.sqrt(1 + 0.25 + 1))


def test_clipping_off_measures_only_when_asked():
    model = _model_with_grads([30.0, 40.0])
    acc = GradientAccumulator(max_gradient_norm=None)
    assert math.isnan(acc.clip_gradients(model))
    assert acc.get_statistics()["norm_before"] is None
    assert model.p0.grad.tolist() == [30.0, 40.0]
    measuring = GradientAccumulator(max_gradient_norm=None, measure_norm=True)
    assert measuring.clip_gradients(model) == pytest.approx(50.0)
    assert model.p0.grad.tolist() == [30.0, 40.0]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"accumulation_steps": 0}, "accumulation_steps must be >= 1; got 0"),
        ({"accumulation_steps": 2.0}, "accumulation_steps must be an int >= 1; got 2.0"),
        ({"max_gradient_norm": -1.0}, "max_gradient_norm must be > 0 or None; got -1.0"),
    ],
)
def test_accumulator_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        GradientAccumulator(**kwargs)


def test_health_exploding_vanishing_zero():
    health = check_gradient_health(_model_with_grads([3.0, 4.0], [1e-9, 0.0], [0.0, 0.0]))
    assert health.max_norm == pytest.approx(5.0)
    assert health.min_norm == 0.0
    assert health.has_exploding_gradients
    assert health.has_vanishing_gradients
    assert health.num_zero_gradients == 1
    assert health.num_gradients == 3
    assert "T" in health.timestamp  # ISO 8601

    ok = check_gradient_health(_model_with_grads([0.1, 0.1], [0.2]), threshold_max=1.0)
    assert not ok.has_exploding_gradients and not ok.has_vanishing_gradients
    assert ok.mean_norm == pytest.approx((math.sqrt(0.02) + 0.2) / 2)


def test_health_nan_counts_as_exploding_and_skips_missing_grads():
    model = _model_with_grads([float("nan"), 1.0], [0.5])
    model.register_parameter("nograd", torch.nn.Parameter(torch.zeros(3)))
    health = check_gradient_health(model, threshold_max=100.0)
    assert health.has_exploding_gradients
    assert health.num_nonfinite_gradients == 1
    assert math.isinf(health.max_norm)
    assert health.num_gradients == 2
    empty = check_gradient_health(torch.nn.Linear(2, 2))
    assert empty.num_gradients == 0 and not empty.has_exploding_gradients


def test_monitor_interval_and_statistics(caplog):
    monitor = GradientMonitor(check_interval=3, norm_threshold_warning=1.0)
    model = _model_with_grads([3.0, 4.0])
    with caplog.at_level(logging.WARNING, logger="kiln.engine.gradients"):
        results = [monitor.check_step(model) for _ in range(7)]
    assert [r is not None for r in results] == [True, False, False, True, False, False, True]
    stats = monitor.get_statistics()
    assert stats["check_count"] == 3
    assert stats["max_norm_history"] == pytest.approx([5.0] * 3)
    assert stats["warnings"] == 3 and stats["criticals"] == 0
    assert stats["norm_distribution"] == {"1e0": 3}
    assert "large gradient norm" in caplog.text


def test_monitor_critical_records_or_raises(caplog):
    model = _model_with_grads([30.0, 40.0])
    monitor = GradientMonitor(check_interval=1)
    with caplog.at_level(logging.WARNING, logger="kiln.engine.gradients"):
        health = monitor.check_step(model)
    assert health is not None and health.has_exploding_gradients
    assert monitor.get_statistics()["criticals"] == 1
    assert "critical gradient norm" in caplog.text

    strict = GradientMonitor(check_interval=1, raise_on_critical=True)
    with pytest.raises(GradientExplosionError, match="max 50 > 10.0") as info:
        strict.check_step(model)
    assert isinstance(info.value, KilnError)
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value)
    nan_model = _model_with_grads([float("nan")])
    with pytest.raises(GradientExplosionError, match="1 NaN/inf"):
        GradientMonitor(check_interval=1, raise_on_critical=True).check_step(nan_model)


def test_monitor_validation():
    with pytest.raises(ValueError, match="check_interval must be an int >= 1; got 0"):
        GradientMonitor(check_interval=0)
    with pytest.raises(ValueError, match="norm_threshold_critical"):
        GradientMonitor(norm_threshold_warning=5.0, norm_threshold_critical=1.0)


def test_accumulator_and_monitor_pickle():
    import cloudpickle

    acc = GradientAccumulator(accumulation_steps=2)
    acc.scale_loss(torch.tensor(1.0))
    assert pickle.loads(cloudpickle.dumps(acc)).get_statistics()["global_step"] == 1
    mon = GradientMonitor(check_interval=2)
    assert pickle.loads(cloudpickle.dumps(mon)).check_interval == 2
