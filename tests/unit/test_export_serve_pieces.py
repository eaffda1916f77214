"""Serve pieces that need no Ray: options validation, tag following, CLI wiring."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.serve.options import ServeOptions
from kiln.serve.runner import TagFollower


def test_serve_options_collects_every_error():
    with pytest.raises(ConfigError) as err:
        ServeOptions(max_batch_size=0, max_queued_requests=0, route_prefix="x", num_cpus=-1)
    text = str(err.value)
    for field in ("max_batch_size", "max_queued_requests", "route_prefix", "num_cpus"):
        assert field in text


def test_serve_options_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="allowed keys"):
        ServeOptions.from_dict({"max_batch": 4})
    assert ServeOptions.from_dict({"max_batch_size": 4}).max_batch_size == 4


def test_batching_needs_room_for_a_batch():
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        ServeOptions(batching=True, max_batch_size=32, max_ongoing_requests=8)


def test_tag_follower_redeploys_only_when_the_tag_moves():
    targets = iter([(Path("/b1"), "k1"), (Path("/b2"), "k2"), (Path("/b2"), "k2")])
    deployed: list[Path] = []
    f = TagFollower(resolve=lambda: next(targets), redeploy=deployed.append, current_key="k1")
    assert f.poll() is False
    assert f.poll() is True
    assert f.poll() is False
    assert deployed == [Path("/b2")] and f.current_key == "k2"


def test_tag_follower_survives_registry_errors():
    def boom():
        raise RuntimeError("db locked")

    f = TagFollower(resolve=boom, redeploy=lambda p: pytest.fail("redeployed"), current_key="k")
    assert f.poll() is False


def _parser() -> argparse.ArgumentParser:
    from kiln.cli import export as export_cli
    from kiln.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--db")
    sub = parser.add_subparsers(dest="command")
    export_cli.register(sub)
    serve_cli.register(sub)
    return parser


def test_serve_cli_defaults_bind_loopback():
    args = _parser().parse_args(["serve", "exports/m"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.replicas == 1
    assert args.batching is False and args.func.__name__ == "cmd_serve"


def test_export_cli_from_checkpoint(tmp_path):
    pytest.importorskip("kiln.models")
    import json

    from kiln.export import load_bundle
    from kiln.models import build_model

    cfg = {"name": "mlp", "hidden": [8]}
    model = build_model(cfg, input_shape=(5,), num_outputs=2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "model.pt")
    meta = {
        "model_config": cfg,
        "input_shape": [5],
        "num_outputs": 2,
        "task_spec": {"task_type": "regression", "input_shape": [5]},
        "training_config": {"epochs": 1},
    }
    (ckpt / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "bundle"
    args = _parser().parse_args(["export", str(ckpt), "-o", str(out), "--formats", "onnx"])
    assert args.func(args) == 0
    bundle = load_bundle(out)
    assert bundle.formats == ["onnx"] and bundle.task_type == "regression"
    assert bundle.input_shape == [5]


def test_export_cli_rejects_non_checkpoint(tmp_path):
    from kiln.errors import CheckpointError

    args = _parser().parse_args(["export", str(tmp_path), "-o", str(tmp_path / "b")])
    with pytest.raises(CheckpointError, match="metadata.json"):
        args.func(args)


def test_build_app_refuses_bundle_without_onnx(tmp_path):
    from kiln.errors import KilnError
    from kiln.export import create_export_bundle
    from kiln.serve import build_app

    out = create_export_bundle(
        nn.Linear(3, 2), None, {"input_shape": [3]}, None, tmp_path, formats=["pytorch"]
    )
    with pytest.raises(KilnError, match="no 'onnx' artifact"):
        build_app(out)
