"""Loss strategies against hand computations with torch.nn.functional."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kiln.compat.losses import PEFTAwareLoss, QuantizationSafeLoss
from kiln.engine.loss import (
    ClassificationLoss,
    LanguageModelingLoss,
    LossStrategy,
    LossStrategyRegistry,
    ModelOutput,
    RegressionLoss,
    SequenceToSequenceLoss,
    VisionLoss,
    get_loss_strategy,
    loss_for_task,
)
from kiln.errors import ConfigError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_lm_loss_shifts_and_ignores_pad():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 1, 2]])
    loss = LanguageModelingLoss().compute_loss(logits, labels, {"pad_token_id": 0})
    # hand: predictions at t for label t+1, drop pad targets
    kept = []
    for b in range(2):
        for t in range(4):
            target = int(labels[b, t + 1])
            if target != 0:
                kept.append(F.cross_entropy(logits[b, t][None], torch.tensor([target])))
    expected = torch.stack(kept).mean()
    assert len(kept) == 6
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[:, -1].abs().sum() == 0  # last position predicts nothing


def test_lm_loss_attention_mask_and_constructor_pad():
    logits = torch.randn(1, 4, 3)
    labels = torch.tensor([[0, 1, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = LanguageModelingLoss(pad_token_id=2).compute_loss(
        logits, labels, {"attention_mask": mask}
    )
    # targets: pos1 -> 1 kept, pos2 -> 2 is pad, pos3 -> masked
    expected = F.cross_entropy(logits[0, 0][None], torch.tensor([1]))
    assert torch.allclose(loss, expected)


def test_lm_loss_all_ignored_is_zero_with_grad():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = LanguageModelingLoss(pad_token_id=0).compute_loss(logits, torch.zeros(1, 3).long())
    assert loss.item() == 0.0
    loss.backward()


def test_lm_loss_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"logits shape \(2, 5\).*labels shape \(2,\)"):
        LanguageModelingLoss().compute_loss(torch.randn(2, 5), torch.zeros(2).long())


def test_classification_weights_and_smoothing():
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    w = torch.tensor([1.0, 2.0, 0.5])
    got = ClassificationLoss(label_smoothing=0.1).compute_loss(logits, labels, {"class_weights": w})
    assert torch.allclose(got, F.cross_entropy(logits, labels, weight=w, label_smoothing=0.1))
    plain = ClassificationLoss().compute_loss(logits, labels)
    assert torch.allclose(plain, F.cross_entropy(logits, labels))
    assert not torch.allclose(plain, got)


def test_classification_shape_errors():
    loss = ClassificationLoss()
    with pytest.raises(ValueError, match=r"logits shape \(4, 3\), labels shape \(5,\)"):
        loss.compute_loss(torch.randn(4, 3), torch.zeros(5).long())
    with pytest.raises(ValueError, match="integer class ids"):
        loss.compute_loss(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        loss.compute_loss(
            torch.randn(4, 3), torch.zeros(4).long(), {"class_weights": torch.ones(2)}
        )


def test_peft_loss_scale_regularization_and_check():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    got = PEFTAwareLoss(adapter_scale=2.0).compute_loss(logits, labels)
    assert torch.allclose(got, 2.0 * F.cross_entropy(logits, labels))

    lm_logits = torch.randn(2, 4, 5)
    lm_labels = torch.randint(0, 5, (2, 4))
    expected = LanguageModelingLoss().compute_loss(lm_logits, lm_labels)
    assert torch.allclose(PEFTAwareLoss().compute_loss(lm_logits, lm_labels), expected)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    strategy = PEFTAwareLoss(l2_weight=0.5)
    with pytest.raises(ValueError, match="9 trainable and 0 frozen"):
        strategy.check_model(model)
    for p in model[0].parameters():
        p.requires_grad_(False)
    strategy.check_model(model)
    expected_reg = 0.5 * sum(p.pow(2).sum() for p in model[1].parameters())
    assert torch.allclose(strategy.regularization(model), expected_reg)
    assert PEFTAwareLoss().regularization(model).item() == 0.0


def test_quantization_safe_loss_values():
    logits = torch.tensor([[2.0, -1.0, 0.3], [0.5, 0.25, -4.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    s = QuantizationSafeLoss(bits=4)
    # hand: symmetric 4-bit, 7 levels per side, scale = row max |x| / 7
    q = []
    for row in logits.detach():
        scale = row.abs().max() / 7
        q.append(torch.round(row / scale) * scale)
    expected = F.cross_entropy(torch.stack(q), labels)
    got = s.compute_loss(logits, labels)
    assert torch.allclose(got, expected)
    got.backward()  # straight-through: gradient is that of CE at the quantized point
    assert torch.isfinite(logits.grad).all()

    exact = QuantizationSafeLoss(fake_quantize=False).compute_loss(logits, labels)
    assert torch.allclose(exact, F.cross_entropy(logits, labels))


def test_quantization_safe_loss_handles_inf_and_half():
    logits = torch.tensor([[float("inf"), 1.0, -2.0], [0.0, float("-inf"), 3.0]])
    loss = QuantizationSafeLoss(bits=8, fake_quantize=False).compute_loss(
        logits, torch.tensor([0, 1])
    )
    clamped = torch.tensor([[2.0, 1.0, -2.0], [0.0, -3.0, 3.0]])
    assert torch.isfinite(loss)
    assert torch.allclose(loss, F.cross_entropy(clamped, torch.tensor([0, 1])))
    half = QuantizationSafeLoss(symmetric=False).compute_loss(
        torch.randn(3, 4).half(), torch.tensor([0, 1, 2])
    )
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="bits must be an int in \\[2, 16\\]; got 1"):
        QuantizationSafeLoss(bits=1)


def test_quantization_safe_loss_clips_logit_gradients_whatever_the_loss_scale():
    # row 0 is confidently wrong: cross entropy's gradient on its logits is +/-1 per row
    logits = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0])

    def grad(clip, scale):
        x = logits.clone().requires_grad_()
        loss = QuantizationSafeLoss(fake_quantize=False, grad_clip=clip).compute_loss(x, labels)
        (loss * scale).backward()  # a GradScaler or accumulation scales the same way
        return x.grad

    free = grad(None, 1.0)
    assert torch.allclose(free, torch.tensor([[0.5, -0.5], [-0.25, 0.25]]))  # mean over 2 rows
    clipped = grad(0.5, 1.0)
    assert torch.allclose(clipped, torch.tensor([[0.25, -0.25], [-0.25, 0.25]]))
    assert torch.allclose(grad(0.5, 1000.0), clipped * 1000.0)
    with pytest.raises(ValueError, match="grad_clip must be a number > 0 or None; got 0"):
        QuantizationSafeLoss(grad_clip=0)


def test_sequence_to_sequence_loss_is_unshifted_and_skips_padding():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, -100], [4, 0, 0]])
    got = SequenceToSequenceLoss(pad_token_id=0).compute_loss(logits, labels)
    keep = torch.tensor([True, True, False, True, False, False])
    expected = F.cross_entropy(logits.reshape(6, 5)[keep], labels.reshape(6)[keep])
    assert torch.allclose(got, expected)
    assert get_loss_strategy("segmentation").task == "segmentation"
    with pytest.raises(ValueError, match="target_len"):
        SequenceToSequenceLoss().compute_loss(torch.randn(2, 5), torch.tensor([1, 2]))


def test_vision_loss_classification_and_segmentation():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    seg = VisionLoss(task="segmentation").compute_loss(logits, labels)
    assert torch.allclose(seg, F.cross_entropy(logits, labels))
    cls_logits = torch.randn(2, 3)
    cls = VisionLoss().compute_loss(
        cls_logits, torch.tensor([1, 2]), {"pixel_values": torch.zeros(2, 1, 4, 4)}
    )
    assert torch.allclose(cls, F.cross_entropy(cls_logits, torch.tensor([1, 2])))
    with pytest.raises(ValueError, match=r"logits shape \(2, 3, 4, 4\), labels shape \(2, 4\)"):
        VisionLoss(task="segmentation").compute_loss(logits, labels[:, 0])
    with pytest.raises(ValueError, match="'detection'"):
        VisionLoss(task="detection")


@pytest.mark.parametrize(
    ("kind", "fn"),
    [("mse", F.mse_loss), ("l1", F.l1_loss), ("huber", lambda a, b: F.huber_loss(a, b, delta=0.5))],
)
def test_regression_kinds(kind, fn):
    out = torch.randn(5, 1)
    target = torch.randn(5)
    got = RegressionLoss(kind=kind, delta=0.5).compute_loss(out, target)
    assert torch.allclose(got, fn(out, target[:, None]))


def test_regression_shape_error():
    with pytest.raises(ValueError, match=r"logits shape \(5, 2\), labels shape \(5,\)"):
        RegressionLoss().compute_loss(torch.randn(5, 2), torch.randn(5))


def test_model_output_from_raw():
    t = torch.randn(2, 3)
    assert ModelOutput.from_raw(t).logits is t
    assert ModelOutput.from_raw((t, "aux")).logits is t
    assert ModelOutput.from_raw([t]).logits is t
    assert ModelOutput.from_raw({"logits": t, "loss": 1}).logits is t
    assert ModelOutput.from_raw(SimpleNamespace(logits=t)).logits is t
    with pytest.raises(TypeError, match="dict"):
        ModelOutput.from_raw({"scores": t})


def test_registry_builtins_custom_and_unknown():
    registry = LossStrategyRegistry()
    assert registry.names() == sorted(
        [
            "language_modeling",
            "classification",
            "peft",
            "quantization_safe",
            "vision",
            "segmentation",
            "sequence_to_sequence",
            "regression",
        ]
    )
    for name in registry.names():
        assert isinstance(registry.get(name), LossStrategy)

    class Custom:
        def compute_loss(self, logits, labels, inputs=None):
            return F.cross_entropy(logits, labels)

        def validate_inputs(self, logits, labels):
            pass

    instance = Custom()
    registry.register("custom", instance)
    assert registry.get("custom") is instance
    with pytest.raises(ConfigError, match="already registered"):
        registry.register("custom", Custom)
    with pytest.raises(ConfigError) as info:
        registry.get("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert "classification" in message and "custom" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="known losses are: .*regression"):
        get_loss_strategy("custom")  # a fresh registry has only the built-ins


def test_get_loss_strategy_kwargs():
    s = get_loss_strategy("regression", kind="l1")
    assert isinstance(s, RegressionLoss) and s.kind == "l1"
    with pytest.raises(ConfigError, match="cannot be built"):
        get_loss_strategy("regression", bogus=1)


def test_loss_for_task():
    assert loss_for_task("classification") == "classification"
    assert loss_for_task("image_classification") == "classification"
    assert loss_for_task("regression") == "regression"
    assert loss_for_task("language_modeling") == "language_modeling"
    assert loss_for_task("sequence_to_sequence") == "sequence_to_sequence"
    assert loss_for_task("segmentation") == "segmentation"
    with pytest.raises(ConfigError, match="'ranking'.*regression"):
        loss_for_task("ranking")


def test_strategies_pickle():
    import cloudpickle

    strategies = [
        LanguageModelingLoss(pad_token_id=0),
        ClassificationLoss(class_weights=torch.tensor([1.0, 2.0]), label_smoothing=0.1),
        PEFTAwareLoss(adapter_scale=0.5),
        QuantizationSafeLoss(bits=4),
        VisionLoss("segmentation"),
        SequenceToSequenceLoss(pad_token_id=0),
        RegressionLoss("huber"),
    ]
    logits = torch.randn(3, 2)
    labels = torch.tensor([0, 1, 1])
    for s in strategies:
        for dumps in (pickle.dumps, cloudpickle.dumps):
            clone = pickle.loads(dumps(s))
            assert type(clone) is type(s)
            assert vars(clone).keys() == vars(s).keys()
    clone = pickle.loads(pickle.dumps(strategies[1]))
    assert torch.allclose(
        clone.compute_loss(logits, labels), strategies[1].compute_loss(logits, labels)
    )
