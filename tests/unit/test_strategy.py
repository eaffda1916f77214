"""strategy / activation_checkpointing: config validation, the per-block policy, and
sharded (DCP) checkpoints written and read in one process (no Ray)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

from kiln.cli import build_parser
from kiln.cli.train import load_run_mapping
from kiln.config import TrainingConfig
from kiln.engine import strategy
from kiln.engine.checkpoint import CheckpointManager, resolve_checkpoint
from kiln.engine.optim import build_optimizer
from kiln.engine.sharded_checkpoint import (
    SHARDS_DIR,
    is_sharded_checkpoint,
    load_sharded,
    read_resume_state,
    save_sharded,
)
from kiln.errors import CheckpointError, ConfigError
from kiln.models import build_model

TINY_LM = {"name": "tiny_transformer", "vocab_size": 16, "d_model": 16, "num_layers": 3}


# ---------------------------------------------------------------------- config
def test_strategy_is_validated_with_field_value_and_allowed_values():
    with pytest.raises(ConfigError, match="activation_checkpointing='yes' must be true or false"):
        TrainingConfig(activation_checkpointing="yes").validate()
    with pytest.raises(ConfigError) as err:
        TrainingConfig(strategy="zero3", epochs=0).validate()
    assert err.value.errors[0] == "epochs=0 must be >= 1"  # every problem, collected
    assert "strategy='zero3' is not one of ddp, fsdp" in err.value.errors


def test_fsdp_in_process_is_a_config_error():
    with pytest.raises(ConfigError, match=r"strategy='fsdp'.*num_workers >= 1.*num_workers=0"):
        TrainingConfig(strategy="fsdp").validate()
    assert TrainingConfig(strategy="fsdp", num_workers=2).validate().strategy == "fsdp"
    with pytest.raises(ConfigError, match="needs amp_dtype='bf16'; got amp_dtype='auto'"):
        TrainingConfig(strategy="fsdp", num_workers=2, use_gpu=True, use_amp=True).validate()
    assert TrainingConfig().strategy == "ddp"


def test_cli_strategy_flag_and_set_override():
    args = build_parser().parse_args(["train", "run.yaml", "--strategy", "fsdp"])
    assert args.strategy == "fsdp"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "run.yaml", "--strategy", "zero"])
    cfg, _ = load_run_mapping(
        {"num_workers": 2}, ["strategy=fsdp", "activation_checkpointing=true"]
    )
    assert (cfg.strategy, cfg.activation_checkpointing) == ("fsdp", True)
    with pytest.raises(ConfigError, match=r"--set: strategy='fsdp'.*num_workers=0"):
        load_run_mapping({}, ["strategy=fsdp"])


# ---------------------------------------------------------------------- policy
def test_blocks_are_transformer_layers_hf_decoder_layers_or_children_with_parameters():
    lm = build_model(TINY_LM, input_shape=(8,), num_outputs=16)
    assert strategy.shard_units(lm) == list(lm.blocks)
    mlp = build_model({"name": "mlp", "hidden": [8, 8]}, input_shape=(4,), num_outputs=2)
    assert strategy.shard_units(mlp) == [m for m in mlp if isinstance(m, nn.Linear)]
    hf = _tiny_llama()
    layers = strategy.shard_units(hf)
    assert len(layers) == 2 and all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def test_activation_checkpointing_keeps_keys_outputs_and_gradients():
    torch.manual_seed(0)
    plain = build_model(TINY_LM, input_shape=(8,), num_outputs=16)
    wrapped = strategy.apply_activation_checkpointing(
        build_model(TINY_LM, input_shape=(8,), num_outputs=16)
    )
    wrapped.load_state_dict(plain.state_dict())
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.blocks)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 16, (2, 8))
    for model in (plain, wrapped):
        model(ids).logsumexp(-1).sum().backward()
    assert torch.allclose(plain(ids), wrapped(ids))
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_activation_checkpointing_of_a_hugging_face_model_uses_its_own_switch():
    hf = strategy.apply_activation_checkpointing(_tiny_llama())
    assert getattr(hf, "is_activation_checkpointing", None) or hf.is_gradient_checkpointing


# ---------------------------------------------------------------------- sharded checkpoints
def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = build_model({"name": "mlp", "hidden": [8]}, input_shape=(4,), num_outputs=2)
    optimizer = build_optimizer(model, TrainingConfig())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_sharded_checkpoint_round_trip_in_one_process(tmp_path):
    model, optimizer = _trained()
    manager = CheckpointManager(tmp_path, keep_last_n=1, keep_best_k=0)
    with warnings.catch_warnings():  # DCP warns that there is no process group
        warnings.simplefilter("ignore")
        for epoch in (1, 2):
            save_sharded(manager, epoch, {"val_loss": 1.0 / epoch}, model, optimizer, None, {})
        manager.wait()
        ckpt = resolve_checkpoint("latest", tmp_path)
        assert ckpt.name == "epoch_0002" and not (tmp_path / "epoch_0001").exists()
        assert is_sharded_checkpoint(ckpt) and (ckpt / SHARDS_DIR / ".metadata").is_file()
        state = read_resume_state(ckpt)
        assert state.model_state == {} and state.train_state["optimizer"] is None
        shard_files = sorted(f"{SHARDS_DIR}/{p.name}" for p in (ckpt / SHARDS_DIR).iterdir())
        assert shard_files == [f"{SHARDS_DIR}/.metadata", f"{SHARDS_DIR}/__0_0.distcp"]
        assert state.metadata["files"] == ["model.pt", "train_state.pt", *shard_files]
        assert all(
            state.metadata["file_bytes"][f] == (ckpt / f).stat().st_size > 0 for f in shard_files
        )
        fresh, fresh_opt = _trained(seed=1)
        load_sharded(ckpt, fresh, fresh_opt)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    want, got = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(want[i]["exp_avg_sq"], got[i]["exp_avg_sq"]) for i in want)
    consolidated = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(torch.equal(consolidated[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="is sharded.*shards/"):
        manager.load_checkpoint(ckpt, _trained()[0], _trained()[1])


def test_unpublished_shards_are_never_loaded_and_are_cleaned_up(tmp_path):
    model, optimizer = _trained()
    manager = CheckpointManager(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_sharded(manager, 1, {"val_loss": 1.0}, model, optimizer, None, {})
        manager.wait()
    staged = manager.stage(2)  # a crash after the shards, before the publish
    (staged / SHARDS_DIR).mkdir()
    (staged / SHARDS_DIR / ".metadata").write_bytes(b"")
    assert resolve_checkpoint("latest", tmp_path).name == "epoch_0001"
    CheckpointManager(tmp_path)  # the next run's manager removes the leftover
    assert sorted(os.listdir(tmp_path)) == ["epoch_0001", "manifest.json"]


def test_a_sharded_checkpoint_outside_the_manifest_is_adopted_only_whole(tmp_path):
    """A crash between the folder's rename and the manifest (or an upload to storage that
    stopped part way) leaves a folder the manifest does not list: it is taken as the
    latest checkpoint only when every shard metadata.json lists is there at its size."""
    model, optimizer = _trained()
    manager = CheckpointManager(tmp_path, keep_last_n=3, keep_best_k=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in (1, 2):
            save_sharded(manager, epoch, {"val_loss": 1.0}, model, optimizer, None, {})
        manager.wait()
    manifest = tmp_path / "manifest.json"
    listed = json.loads(manifest.read_text())
    listed["checkpoints"] = [e for e in listed["checkpoints"] if e["name"] == "epoch_0001"]
    listed["history"] = [h for h in listed["history"] if h["name"] == "epoch_0001"]
    manifest.write_text(json.dumps(listed))
    assert resolve_checkpoint("latest", tmp_path).name == "epoch_0002"  # whole: adopted

    shard = tmp_path / "epoch_0002" / SHARDS_DIR / "__0_0.distcp"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # an upload that stopped part way
    assert resolve_checkpoint("latest", tmp_path).name == "epoch_0001"
    shard.unlink()  # one rank's shards never arrived
    assert resolve_checkpoint("latest", tmp_path).name == "epoch_0001"
    shard.write_bytes(whole)
    assert resolve_checkpoint("latest", tmp_path).name == "epoch_0002"


def test_parameter_names_lose_only_the_wrappers_path_parts():
    name = "_orig_mod.blocks.0._checkpoint_wrapped_module.submodule.weight"
    assert strategy._clean(name) == "blocks.0.submodule.weight"


def test_plain_optimizer_state_loads_by_parameter_name():
    model, optimizer = _trained()
    fresh, fresh_opt = _trained(seed=1)
    fresh.load_state_dict(model.state_dict())
    strategy.load_full_optimizer_state(fresh, fresh_opt, optimizer.state_dict())
    want, got = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(want[i]["exp_avg"], got[i]["exp_avg"]) for i in want)


def test_local_state_bytes_counts_parameters_and_optimizer_state():
    model, optimizer = _trained()
    params = sum(p.numel() for p in model.parameters())
    held = strategy.local_state_bytes(model, optimizer)
    assert held["param_bytes"] == 4 * params
    assert held["optimizer_bytes"] == 2 * 4 * params + 4 * len(optimizer.state)  # moments, step
