"""kiln.models: every config form builds and runs; validation messages say what to fix."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kiln.models as km
from kiln.errors import ModelConfigError
from kiln.models import (
    ModelFactory,
    build_model,
    count_parameters,
    list_architectures,
    register_architecture,
    validate_model_config,
)

SEED_LAYERS = {
    "layers": [
        {"type": "input", "neurons": 784, "activation": None, "position": 0},
        {
            "type": "hidden",
            "neurons": 128,
            "activation": "relu",
            "position": 1,
            "dropout": 0.1,
            "batch_norm": True,
        },
        {"type": "output", "neurons": 10, "activation": None, "position": 2},
    ]
}


def layers(*specs):
    return {"layers": [dict(s) for s in specs]}


def test_exported_names_are_pinned():
    assert sorted(km.__all__) == sorted(
        [
            "ACTIVATIONS",
            "ModelFactory",
            "TinyTransformer",
            "build_model",
            "count_parameters",
            "list_architectures",
            "register_architecture",
            "validate_model_config",
        ]
    )


@pytest.mark.parametrize(
    "cfg,input_shape,num_outputs,x,out_shape",
    [
        (SEED_LAYERS, (1, 28, 28), 10, torch.rand(5, 1, 28, 28), (5, 10)),
        (SEED_LAYERS, None, None, torch.rand(5, 784), (5, 10)),
        ({"name": "mlp", "hidden": [16, 8]}, (4,), 3, torch.rand(5, 4), (5, 3)),
        (
            {
                "name": "mlp",
                "hidden": [8],
                "batch_norm": True,
                "dropout": 0.2,
                "activation": "gelu",
            },
            (6,),
            1,
            torch.rand(5, 6),
            (5, 1),
        ),
        ({"name": "cnn", "channels": [4, 8]}, (1, 28, 28), 10, torch.rand(5, 1, 28, 28), (5, 10)),
        ({"model_name": "cnn", "channels": [4]}, (64,), 10, torch.rand(5, 64), (5, 10)),
        ({"name": "cnn", "channels": [4, 4, 4]}, (3, 5, 5), 2, torch.rand(5, 3, 5, 5), (5, 2)),
        (
            {"name": "tiny_transformer", "d_model": 32, "num_heads": 2},
            (16,),
            32,
            torch.randint(0, 32, (5, 16)),
            (5, 16, 32),
        ),
    ],
)
def test_every_form_builds_and_runs(cfg, input_shape, num_outputs, x, out_shape):
    model = build_model(copy.deepcopy(cfg), input_shape=input_shape, num_outputs=num_outputs)
    model.train()
    assert model(x).shape == out_shape
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, *out_shape[1:])


def test_seed_flat_keys_with_none_are_accepted():
    cfg = {"model_name": "tiny_transformer", "vocab_size": 32, "d_model": 32, "d_ff": None}
    model = build_model(cfg, input_shape=(8,), num_outputs=32)
    assert isinstance(model, km.TinyTransformer)


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = build_model({"name": "tiny_transformer", "vocab_size": 16}, input_shape=(8,)).eval()
    a = torch.randint(0, 16, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 16
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[0, :5], lb[0, :5])
    assert not torch.allclose(la[0, 5:], lb[0, 5:])


def test_same_seed_same_weights():
    def weights():
        torch.manual_seed(123)
        return build_model({"name": "mlp"}, input_shape=(4,), num_outputs=3).state_dict()

    a, b = weights(), weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_layer_list_shape_mismatch_names_layer_field_value_and_fix():
    with pytest.raises(ModelConfigError) as exc:
        build_model(SEED_LAYERS, input_shape=(4,), num_outputs=3, dataset_id="iris")
    msg = str(exc.value)
    assert "layer 0 (input) has neurons=784 but dataset 'iris' has 4 features" in msg
    assert "set neurons to 4" in msg
    assert "layer 2 (output) has neurons=10" in msg and "set neurons to 3" in msg
    assert msg.startswith("2 problems")


@pytest.mark.parametrize(
    "cfg,expected",
    [
        (
            layers(
                {"type": "input", "neurons": 4, "position": 0},
                {"type": "hiddn", "neurons": 8, "activation": "relu", "position": 1},
                {"type": "output", "neurons": 3, "position": 2},
            ),
            "layer 1 has type='hiddn'; allowed: input, hidden, output",
        ),
        (
            layers(
                {"type": "input", "neurons": 4, "position": 0},
                {"type": "hidden", "neurons": 8, "activation": "swish", "position": 1},
                {"type": "output", "neurons": 3, "position": 2},
            ),
            "layer 1 (hidden) has unknown activation='swish'; allowed: relu",
        ),
        (
            layers(
                {"type": "input", "neurons": 4, "position": 0},
                {"type": "output", "neurons": 3, "activation": "softmax", "position": 1},
            ),
            "raw logits",
        ),
        (
            layers(
                {"type": "input", "neurons": 4, "position": 0},
                {"type": "hidden", "neurons": 0, "activation": "relu", "position": 1},
                {"type": "output", "neurons": 3, "position": 2},
            ),
            "layer 1 (hidden) has neurons=0; expected a positive int",
        ),
        (
            layers(
                {"type": "input", "neurons": 4, "position": 0},
                {"type": "hidden", "neurons": 8, "activation": "relu", "position": 1},
                {"type": "output", "neurons": 3, "position": 1},
            ),
            "position 1 is used by 2 layers",
        ),
        (
            layers(
                {"type": "hidden", "neurons": 8, "activation": "relu", "position": 0},
                {"type": "output", "neurons": 3, "position": 1},
            ),
            "0 'input' layers; expected exactly one",
        ),
        (
            layers(
                {"type": "output", "neurons": 3, "position": 0},
                {"type": "input", "neurons": 4, "position": 1},
            ),
            "the input layer must come first",
        ),
        (
            layers(
                {"type": "input", "neurons": 4, "position": 0, "units": 3},
                {"type": "output", "neurons": 3, "position": 1},
            ),
            "unknown keys ['units']",
        ),
    ],
)
def test_layer_list_validation_messages(cfg, expected):
    problems = validate_model_config(cfg)
    assert any(expected in p for p in problems), problems
    with pytest.raises(ModelConfigError, match="layer|position"):
        build_model(cfg)


def test_problems_are_all_collected():
    cfg = layers(
        {"type": "input", "neurons": -1, "position": 0},
        {"type": "hidden", "neurons": 8, "activation": "swish", "position": 1},
        {"type": "output", "neurons": 3, "activation": "softmax", "position": 2},
    )
    assert len(validate_model_config(cfg)) == 3


def test_named_config_errors():
    with pytest.raises(
        ModelConfigError, match="unknown architecture name='resnet'; known: cnn, mlp"
    ):
        build_model({"name": "resnet"}, input_shape=(4,), num_outputs=3)
    with pytest.raises(
        ModelConfigError,
        match=r"mlp does not take 'hiden'; did you mean 'hidden'\? \(allowed keys: .*hidden",
    ):
        build_model({"name": "mlp", "hiden": [3]}, input_shape=(4,), num_outputs=3)
    with pytest.raises(ModelConfigError, match="needs 'layers'.*or 'name'"):
        build_model({"hidden": [3]})
    with pytest.raises(ModelConfigError, match="mlp needs input_shape"):
        build_model({"name": "mlp"}, num_outputs=3)
    with pytest.raises(ModelConfigError, match="activation='swish'"):
        build_model({"name": "mlp", "activation": "swish"}, input_shape=(4,), num_outputs=3)
    with pytest.raises(ModelConfigError, match="not divisible by num_heads"):
        build_model({"name": "tiny_transformer", "vocab_size": 8, "d_model": 30})
    with pytest.raises(ModelConfigError, match="max_seq_len=4"):
        build_model(
            {"name": "tiny_transformer", "max_seq_len": 4}, input_shape=(16,), num_outputs=8
        )
    assert validate_model_config({"name": "cnn"}, (1, 28, 28), 10) == []


def test_registry_and_factory():
    assert {"mlp", "cnn", "tiny_transformer"} <= set(list_architectures())

    def linear(*, input_shape, num_outputs, bias=True):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_outputs, bias=bias))

    register_architecture("linear_test", linear)
    model = ModelFactory().create(
        {"name": "linear_test", "bias": False}, input_shape=(4,), num_outputs=2
    )
    assert count_parameters(model) == 8
    with pytest.raises(ModelConfigError, match="already registered"):
        register_architecture("linear_test", linear)
    with pytest.raises(ModelConfigError, match="allowed keys: name, bias"):
        ModelFactory().create({"name": "linear_test", "w": 1}, input_shape=(4,), num_outputs=2)


def test_count_parameters():
    model = build_model({"name": "mlp", "hidden": [5]}, input_shape=(4,), num_outputs=3)
    assert count_parameters(model) == (4 * 5 + 5) + (5 * 3 + 3)
    model[1].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 5 + 5 * 3 + 3


def test_cnn_exports_to_onnx_with_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    model = build_model(
        {"name": "cnn", "channels": [4]}, input_shape=(1, 8, 8), num_outputs=3
    ).eval()
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(
        model,
        (torch.rand(2, 1, 8, 8),),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    x = np.random.rand(5, 1, 8, 8).astype(np.float32)
    out = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
