"""Export bundles: parity per format, layout, manifest, tampering, standalone inference.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kiln.errors import IntegrityError
from kiln.export import (
    SUPPORTED_FORMATS,
    ExportError,
    create_export_bundle,
    load_bundle,
)
from kiln.serve.predictor import Predictor, RequestError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


class Residual(nn.Module):
    """A user-defined module with its own forward (skip connection, layer norm, tanh)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + torch.tanh(self.norm(h))
        return self.out(h)


CLASSIFY = {"task_type": "classification", "input_shape": [4], "class_names": ["a", "b", "c"]}


@pytest.mark.parametrize(
    ("model", "task", "shape"),
    [
        (_mlp, {"task_type": "classification", "input_shape": [4]}, [4]),
        (_cnn, {"task_type": "classification", "input_shape": [1, 8, 8]}, [1, 8, 8]),
        (Residual, {"task_type": "regression", "input_shape": [6]}, [6]),
    ],
    ids=["mlp", "cnn", "user-defined"],
)
def test_every_format_matches_pytorch(tmp_path, model, task, shape):
    net = model()
    out = create_export_bundle(
        net, {"arch": "x"}, task, {"epochs": 1}, tmp_path, formats=SUPPORTED_FORMATS
    )
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["formats"] == list(SUPPORTED_FORMATS)
    assert m["inputs"][0]["shape"] == ["batch", *shape]
    assert m["inputs"][0]["dtype"] == "float32"
    for fmt in SUPPORTED_FORMATS:
        assert m["parity"][fmt]["max_abs_diff"] <= 1e-4
        assert 1 in m["parity"][fmt]["batch_sizes"] and 8 in m["parity"][fmt]["batch_sizes"]
        assert (out / m["artifacts"][fmt]["path"]).is_file()
    # ONNX on onnxruntime with a batch size never seen at export time.
    x = np.random.default_rng(1).standard_normal((11, *shape)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = Predictor(bundle).run(x)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_layout_and_manifest(tmp_path):
    out = create_export_bundle(
        _mlp(), {"hidden": 16}, CLASSIFY, {"learning_rate": 0.1}, tmp_path, bundle_name="b1"
    )
    assert out == (tmp_path / "b1").resolve()
    for rel in [
        "artifacts/model.onnx",
        "artifacts/model.pytorch.pt",
        "configs/task_spec.json",
        "configs/training_config.json",
        "configs/serve_config.yaml",
        "inference.py",
        "README.md",
        "requirements.txt",
        "Dockerfile",
        "manifest.json",
    ]:
        assert (out / rel).is_file(), rel
    m = json.loads((out / "manifest.json").read_text())
    assert m["formats"] == ["onnx", "pytorch"]
    assert m["preprocessing"]["class_names"] == ["a", "b", "c"]
    assert set(m["files"]) >= {"inference.py", "configs/serve_config.yaml"}
    assert m["torch_version"] == torch.__version__
    assert json.loads((out / "configs/training_config.json").read_text()) == {"learning_rate": 0.1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    # state dict loads without unpickling arbitrary objects
    state = torch.load(out / "artifacts/model.pytorch.pt", weights_only=True)
    assert set(state) == set(_mlp().state_dict())


def test_accepts_objects_with_to_dict(tmp_path):
    class Spec:
        def to_dict(self):
            return {"task_type": "regression", "input_shape": [6], "preprocessing_config": {}}

    out = create_export_bundle(Residual(), None, Spec(), None, tmp_path)
    assert load_bundle(out).task_type == "regression"


def test_unknown_format_lists_allowed(tmp_path):
    with pytest.raises(ExportError, match="allowed formats are") as err:
        create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path, formats=["onnx", "tflite"])
    assert "'tflite'" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_missing_input_shape_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="input_shape"):
        create_export_bundle(_mlp(), None, None, None, tmp_path)


def test_wrong_class_names_count(tmp_path):
    with pytest.raises(ExportError, match="class_names"):
        create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path, class_names=["x", "y"])


def test_parity_failure_is_loud(tmp_path, monkeypatch):
    from kiln.export import formats

    real_run = formats.OnnxExporter.run

    def skewed(self, model, path, x):
        return real_run(self, model, path, x) + 1e-3

    monkeypatch.setattr(formats.OnnxExporter, "run", skewed)
    with pytest.raises(ExportError, match="parity: 'onnx'"):
        create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path, bundle_name="bad")
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.iterdir())


def test_existing_bundle_needs_overwrite(tmp_path):
    create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path, bundle_name="b")
    with pytest.raises(ExportError, match="already exists"):
        create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path, bundle_name="b")
    create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path, bundle_name="b", overwrite=True)


@pytest.mark.parametrize("victim", ["artifacts/model.onnx", "inference.py"])
def test_tampered_bundle_is_refused(tmp_path, victim):
    out = create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path)
    with open(out / victim, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(IntegrityError, match=victim):
        load_bundle(out)
    with pytest.raises(IntegrityError):
        Predictor(str(out))
    load_bundle(out, verify=False)  # explicit opt-out still opens it


def test_missing_artifact_is_refused(tmp_path):
    out = create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path)
    (out / "artifacts/model.onnx").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_bundle(out)


def test_normalisation_applied_identically(tmp_path):
    task = {
        "task_type": "classification",
        "input_shape": [1, 8, 8],
        "preprocessing_config": {"mean": [0.5], "std": [0.25]},
    }
    net = _cnn()
    out = create_export_bundle(net, None, task, None, tmp_path)
    raw = np.random.default_rng(2).random((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy((raw - 0.5) / 0.25)), dim=1).numpy()
    got = Predictor(str(out)).predict(raw.tolist())
    np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)
    with pytest.raises(ExportError, match="std"):
        bad = dict(task, preprocessing_config={"mean": [0.0], "std": [0.0]})
        create_export_bundle(net, None, bad, None, tmp_path)


def test_standalone_inference_script(tmp_path):
    net = _mlp()
    out = create_export_bundle(net, None, CLASSIFY, None, tmp_path)
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    (tmp_path / "x.json").write_text(json.dumps({"inputs": x.tolist()}))
    # Only onnxruntime + numpy: -I isolates from kiln's source tree and PYTHONPATH.
    proc = subprocess.run(
        [sys.executable, "-I", str(out / "inference.py"), "--input", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(result["probabilities"], probs, atol=1e-5)
    assert result["predictions"] == [["a", "b", "c"][i] for i in probs.argmax(1)]


def test_inference_script_does_not_import_torch_or_kiln(tmp_path):
    out = create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path)
    source = (out / "inference.py").read_text()
    assert "import torch" not in source and "kiln" not in source.split('"""', 2)[2]


@pytest.mark.parametrize(
    ("inputs", "status", "needle"),
    [
        ([], 422, "non-empty"),
        ([[1.0, 2.0]], 422, "[batch, 4]"),
        ([[1, 2, 3, 4], [1, 2]], 422, "[batch, 4]"),
        ([["a", "b", "c", "d"]], 422, "float32"),
        ([[1.0, float("nan"), 3.0, 4.0]], 422, "NaN"),
        ([[1.0, float("inf"), 3.0, 4.0]], 422, "inf"),
        ("text", 422, "[batch, 4]"),
    ],
)
def test_predictor_rejects_bad_inputs(tmp_path, inputs, status, needle):
    p = Predictor(str(create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path)))
    with pytest.raises(RequestError) as err:
        p.validate(inputs)
    assert err.value.status == status and needle in err.value.message


def test_predictor_parse_errors(tmp_path):
    p = Predictor(str(create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path)))
    with pytest.raises(RequestError) as err:
        p.parse(b"{not json")
    assert err.value.status == 400
    with pytest.raises(RequestError) as err:
        p.parse(b'{"rows": []}')
    assert err.value.status == 422
    assert p.parse(b'{"inputs": [[1, 2, 3, 4]]}').shape == (1, 4)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "cannot read --input"),
        ("{not json", "is not valid JSON"),
        ('{"rows": [[1, 2, 3, 4]]}', 'must be {"inputs"'),
        ('{"inputs": [[1, 2, 3]]}', "inputs must have shape [batch>=1, 4], got [1, 3]"),
    ],
)
def test_inference_script_answers_bad_input_with_one_line_and_exit_2(tmp_path, content, message):
    out = create_export_bundle(_mlp(), None, CLASSIFY, None, tmp_path / "b")
    target = tmp_path / "x.json"
    if content is not None:
        target.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-I", str(out / "inference.py"), "--input", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
