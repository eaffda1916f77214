"""TrainingLoop / ValidationLoop on plain lists of batches, plus the optimizer, schedule and AMP."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import TrainingConfig
from kiln.engine.gradients import GradientAccumulator
from kiln.engine.loops import EpochResult, TrainingLoop, ValidationLoop, unpack_batch
from kiln.engine.loss import get_loss_strategy
from kiln.engine.optim import Precision, build_optimizer, build_scheduler


def _data(n: int = 22, features: int = 5, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _batches(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _model(features: int = 5, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, classes))


def _train_loop(accumulation: int = 1, clip: float | None = None, **kwargs) -> TrainingLoop:
    return TrainingLoop(
        GradientAccumulator(accumulation, clip),
        None,
        get_loss_strategy("classification"),
        clip,
        **kwargs,
    )


class CountingSGD(torch.optim.SGD):
    """SGD that counts its steps."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


# ---------------------------------------------------------------------- TrainingLoop
def test_training_epoch_counts_and_loss_match_a_hand_loop():
    x, y = _data(22)
    batches = _batches(x, y, 8)  # 8 + 8 + 6
    model = _model()
    reference = copy.deepcopy(model)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = _train_loop().run_epoch(1, model, batches, optimizer)

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss_sum, correct = 0.0, 0
    for xb, yb in batches:
        logits = reference(xb)
        loss = F.cross_entropy(logits, yb)
        loss_sum += loss.item() * len(yb)
        correct += int((logits.argmax(-1) == yb).sum())
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    assert isinstance(result, EpochResult)
    assert result.epoch == 1
    assert result.num_samples == 22
    assert result.num_batches == 3
    assert result.loss == pytest.approx(loss_sum / 22, rel=1e-6)
    assert result.metrics["train_loss"] == pytest.approx(loss_sum / 22, rel=1e-6)
    assert result.metrics["train_accuracy"] == pytest.approx(correct / 22)
    assert result.learning_rate == pytest.approx(0.1)
    assert result.epoch_duration_seconds >= 0
    assert result.sums.tolist()[-1] == 22.0
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("num_batches, accumulation", [(5, 2), (6, 3), (7, 4), (3, 1)])
def test_accumulation_steps_optimizer_ceil_batches_over_n(num_batches, accumulation):
    x, y = _data(num_batches * 4)
    model = _model()
    optimizer = CountingSGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loop = _train_loop(accumulation)
    result = loop.run_epoch(1, model, _batches(x, y, 4), optimizer, scheduler)
    assert result.num_batches == num_batches
    assert optimizer.steps == math.ceil(num_batches / accumulation)
    assert scheduler.last_epoch == math.ceil(num_batches / accumulation)
    assert loop.global_step == num_batches


class FakeDDP(nn.Module):
    """Records, per forward, whether it ran inside ``no_sync()`` (as DDP skips the all-reduce)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.syncing = True
        self.synced: list[bool] = []

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        self.synced.append(self.syncing)
        return self.module(x)


@pytest.mark.parametrize(
    "num_batches, accumulation, expected",
    [
        (5, 2, [False, True, False, True, True]),  # the last, partial window syncs too
        (6, 3, [False, False, True, False, False, True]),
        (3, 1, [True, True, True]),
    ],
)
def test_no_sync_skips_only_batches_that_do_not_step(num_batches, accumulation, expected):
    x, y = _data(num_batches * 2)
    model = FakeDDP(_model())
    optimizer = CountingSGD(model.parameters(), lr=0.01)
    _train_loop(accumulation).run_epoch(1, model, _batches(x, y, 2), optimizer)
    assert model.synced == expected
    assert optimizer.steps == sum(expected)


def test_accumulated_step_equals_one_full_batch_step():
    x, y = _data(16)
    accumulated, full = _model(), _model()
    loop = _train_loop(accumulation=2)
    loop.run_epoch(
        1, accumulated, _batches(x, y, 8), torch.optim.SGD(accumulated.parameters(), 0.5)
    )
    _train_loop().run_epoch(1, full, [(x, y)], torch.optim.SGD(full.parameters(), 0.5))
    for p, q in zip(accumulated.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert not torch.equal(accumulated[0].weight, _model()[0].weight)  # it did train


def test_gradient_clipping_records_the_norm_and_limits_the_update():
    x, y = _data(8)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    loop = _train_loop(clip=1e-3)
    loop.run_epoch(1, model, [(x * 100, y)], torch.optim.SGD(model.parameters(), lr=1.0))
    assert loop.last_grad_norm is not None and loop.last_grad_norm > 1e-3
    delta = torch.sqrt(
        sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert float(delta) == pytest.approx(1e-3, rel=1e-3)


def test_metrics_callback_and_step_log_and_global_step_across_epochs():
    x, y = _data(20)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: list[tuple[float, int]] = []
    loop = _train_loop(log_every_n_steps=2)
    first = loop.run_epoch(
        1, model, _batches(x, y, 5), optimizer, metrics_callback=lambda v, i: seen.append((v, i))
    )
    assert [i for _, i in seen] == [0, 1, 2, 3]
    assert all(isinstance(v, float) for v, _ in seen)
    assert sum(v * 5 for v, _ in seen) / 20 == pytest.approx(first.loss, rel=1e-6)
    assert [row["step"] for row in first.step_log] == [2, 4]
    assert all(isinstance(row["loss"], float) for row in first.step_log)
    second = loop.run_epoch(2, model, _batches(x, y, 5), optimizer)
    assert loop.global_step == 8
    assert [row["step"] for row in second.step_log] == [6, 8]


def test_dict_batches_with_custom_columns_and_regression_metrics():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g)
    target = x.sum(dim=1, keepdim=True)
    model = nn.Linear(3, 1)
    loop = TrainingLoop(
        GradientAccumulator(1, None),
        None,
        get_loss_strategy("regression"),
        None,
        task_type="regression",
        input_column="features",
        label_column="target",
    )
    batches = [{"features": x[i : i + 4], "target": target[i : i + 4]} for i in range(0, 12, 4)]
    result = loop.run_epoch(1, model, batches, torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.num_samples == 12
    assert "train_mae" in result.metrics and "train_accuracy" not in result.metrics
    with torch.no_grad():  # lr=0: the model did not change, so the MAE is over all rows
        expected_mae = (model(x) - target).abs().mean().item()
        expected_mse = F.mse_loss(model(x), target).item()
    assert result.metrics["train_mae"] == pytest.approx(expected_mae, rel=1e-5)
    assert result.loss == pytest.approx(expected_mse, rel=1e-5)


def test_unpack_batch_errors_name_the_columns():
    assert unpack_batch({"x": 1, "y": 2}) == (1, 2)
    assert unpack_batch((1, 2)) == (1, 2)
    with pytest.raises(KeyError, match="'features'"):
        unpack_batch({"x": 1, "y": 2}, input_column="features")
    with pytest.raises(TypeError, match="got int"):
        unpack_batch(3)


def test_amp_bf16_on_cpu_trains_under_autocast():
    x, y = _data(16)
    model = _model()
    dtypes: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    precision = Precision.from_config(TrainingConfig(use_amp=True), torch.device("cpu"))
    assert precision == Precision(True, "cpu", torch.bfloat16)
    assert precision.make_scaler() is None
    before = model[0].weight.detach().clone()
    loop = _train_loop(precision=precision)
    result = loop.run_epoch(1, model, _batches(x, y, 8), torch.optim.SGD(model.parameters(), 0.1))
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert math.isfinite(result.loss)
    assert model[0].weight.dtype == torch.float32
    assert not torch.equal(model[0].weight, before)
    val = ValidationLoop(get_loss_strategy("classification"), precision=precision)
    assert math.isfinite(val.run_epoch(1, model, _batches(x, y, 8)).loss)


# ---------------------------------------------------------------------- ValidationLoop
def test_validation_epoch_matches_hand_computation_and_does_not_train():
    x, y = _data(21)
    model = _model()
    model.train()
    state = copy.deepcopy(model.state_dict())
    calls: list[int] = []
    result = ValidationLoop(get_loss_strategy("classification")).run_epoch(
        3, model, _batches(x, y, 10), metrics_callback=lambda loss, i: calls.append(i)
    )
    with torch.no_grad():
        logits = model(x)
        per_batch = [
            F.cross_entropy(model(xb), yb).item() * len(yb) for xb, yb in _batches(x, y, 10)
        ]
    assert result.epoch == 3
    assert (result.num_samples, result.num_batches) == (21, 3)
    assert result.loss == pytest.approx(sum(per_batch) / 21, rel=1e-6)
    assert result.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    acc = (logits.argmax(-1) == y).float().mean().item()
    assert result.metrics == pytest.approx({"val_loss": result.loss, "val_accuracy": acc})
    assert calls == [0, 1, 2]
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_validation_of_an_empty_loader():
    result = ValidationLoop(get_loss_strategy("classification")).run_epoch(1, _model(), [])
    assert (result.num_samples, result.num_batches, result.loss) == (0, 0, 0.0)


# ---------------------------------------------------------------------- optimizer / schedule
def test_build_optimizer_kinds_and_no_decay_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = build_optimizer(model, TrainingConfig(weight_decay=0.1, learning_rate=0.01))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 2  # the two Linear weights
    assert len(no_decay["params"]) == 4  # biases and the norm's weight/bias
    assert isinstance(build_optimizer(model, TrainingConfig(optimizer="adam")), torch.optim.Adam)
    sgd = build_optimizer(model, TrainingConfig(optimizer="sgd", momentum=0.5))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5


def _lrs(cfg: TrainingConfig, steps: int) -> list[float]:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=cfg.learning_rate)
    sched = build_scheduler(opt, cfg, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_cosine():
    lrs = _lrs(TrainingConfig(learning_rate=1.0, warmup_ratio=0.2, lr_scheduler="cosine"), 10)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert lrs[-1] < 0.1


def test_constant_and_linear_schedules():
    assert _lrs(
        TrainingConfig(learning_rate=0.3, warmup_ratio=0.0, lr_scheduler="constant"), 5
    ) == (pytest.approx([0.3] * 5))
    linear = _lrs(TrainingConfig(learning_rate=1.0, warmup_ratio=0.0, lr_scheduler="linear"), 4)
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_running_sums_resume_with_segmentations_confusion_matrix():
    """A mid-epoch checkpoint's running sums carry the pixel counts, and a resumed
    epoch adds to them as if it had never stopped."""
    from kiln.engine.loops import _Confusion, _Sums

    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))) for _ in range(3)]
    whole = _Sums(False, False, _Confusion(3))
    for logits, labels in batches:
        whole.add(torch.tensor(0.5), logits, labels, None)
    first = _Sums(False, False, _Confusion(3))
    first.add(torch.tensor(0.5), *batches[0], None)
    resumed = _Sums(False, False, _Confusion(3))
    resumed.restore(first.running())
    for logits, labels in batches[1:]:
        resumed.add(torch.tensor(0.5), logits, labels, None)
    assert resumed.batches == whole.batches == 3
    assert torch.equal(resumed.as_tensor(), whole.as_tensor())
    assert resumed.as_tensor().numel() == 4 + 9
