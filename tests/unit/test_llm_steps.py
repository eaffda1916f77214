"""Step-level settings, the mid-epoch data position, and how ``kiln serve`` / ``kiln tune``
recognise fine-tuning outputs and configs (no Ray, no model load)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kiln.cli import main
from kiln.config import TrainingConfig
from kiln.engine.seed import get_rng_state
from kiln.engine.steps import EpochPosition, StepSchedule, epoch_batches
from kiln.errors import ConfigError
from kiln.llm import create_default_config


def test_step_settings_are_validated_with_field_and_value():
    assert TrainingConfig(save_every_n_steps=5, eval_every_n_steps=2).validate()
    with pytest.raises(ConfigError) as info:
        TrainingConfig(save_every_n_steps=0, eval_every_n_steps=-1).validate()
    errors = "\n".join(info.value.errors)
    assert "save_every_n_steps=0 must be >= 1" in errors and "eval_every_n_steps=-1" in errors
    with pytest.raises(ConfigError, match=r"eval_every_n_steps='3' must be an integer or null"):
        TrainingConfig(eval_every_n_steps="3").validate()
    schedule = StepSchedule(eval_every=3, save_every=4)
    assert [n for n in range(1, 13) if schedule.evaluates(n)] == [3, 6, 9, 12]
    assert [n for n in range(1, 13) if schedule.saves(n)] == [4, 8, 12]
    assert not StepSchedule().active


def test_llm_save_and_eval_steps_become_the_loops_step_settings(tmp_path):
    from kiln.llm.engine import _training_config

    config = create_default_config(
        model_path="m", dataset_path="d.jsonl", output_dir=str(tmp_path), save_steps=7,
        eval_steps=3, num_epochs=4,
    )  # fmt: skip
    cfg = _training_config(config, batches_per_epoch=10, has_val=True)
    assert (cfg.save_every_n_steps, cfg.eval_every_n_steps, cfg.save_every_n_epochs) == (7, 3, 4)
    assert _training_config(config, 10, has_val=False).eval_every_n_steps is None
    with pytest.raises(ConfigError, match="hyperparams.eval_steps=0 must be an integer >= 1"):
        create_default_config(model_path="m", dataset_path="d", output_dir="o", eval_steps=0)


class _Noisy(torch.utils.data.Dataset):
    """Rows whose values draw from the global RNGs, as random augmentation does."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.rand(()).item(), random.random()])


@pytest.mark.parametrize("generator", [True, False])
def test_a_resumed_epoch_yields_exactly_the_batches_not_yet_seen(generator):
    """The loader's order comes from its generator, or from the global RNG when it has none."""
    torch.manual_seed(5)
    random.seed(5)
    gen = torch.Generator().manual_seed(1) if generator else None
    loader = torch.utils.data.DataLoader(_Noisy(), batch_size=4, shuffle=True, generator=gen)
    for _ in loader:  # a first epoch moves the generator and the RNGs on
        pass
    record: dict = {}
    full, after = [], None
    for i, batch in enumerate(epoch_batches(loader, record)):
        full.append(batch)
        torch.rand(3)  # the training step's own draws (dropout)
        if i == 2:
            after = get_rng_state()  # what a checkpoint after 3 batches stores
    position = EpochPosition(epoch=2, batches=3, epoch_data=record["state"], rng=after)
    torch.manual_seed(99)  # a new process: other RNG states, a fresh generator
    random.seed(99)
    if gen is not None:
        gen.manual_seed(12345)
    again: dict = {}
    rest = []
    for batch in epoch_batches(loader, again, position):
        rest.append(batch)
        torch.rand(3)
    assert len(rest) == len(full) - 3
    for got, want in zip(rest, full[3:], strict=True):
        assert torch.equal(got, want)
    assert torch.equal(again["state"]["rng"]["torch_cpu"], record["state"]["rng"]["torch_cpu"])


def test_epoch_position_round_trips_through_checkpoint_metadata():
    position = EpochPosition(3, 130, [1.0, 0.0, 0.0, 8.0, 4.0], [{"step": 2, "val_loss": 1.5}])
    meta = json.loads(json.dumps({"mid_epoch": position.metadata()}))
    back = EpochPosition.from_checkpoint(meta, {"epoch_data": {"x": 1}, "rng": {"y": 2}})
    assert (back.epoch, back.batches, back.sums, back.evals) == (
        3,
        130,
        position.sums,
        position.evals,
    )
    assert back.epoch_data == {"x": 1} and back.rng == {"y": 2}
    assert EpochPosition.from_checkpoint({}, {}) is None  # an epoch-end checkpoint


def _llm_folder(path, adapter=False):
    path.mkdir(parents=True)
    name = "adapter_config.json" if adapter else "config.json"
    (path / name).write_text(json.dumps({"base_model_name_or_path": "/nowhere"}))
    return path


def test_kiln_serve_takes_llm_folders_and_registered_llms(tmp_path):
    from kiln.cli.serve import _resolver
    from kiln.llm.config import is_llm_mapping
    from kiln.llm.serve import is_llm_dir, llm_source
    from kiln.tracking import ModelRegistry

    full, adapter = _llm_folder(tmp_path / "full"), _llm_folder(tmp_path / "lora", adapter=True)
    bundle = _llm_folder(tmp_path / "bundle")
    (bundle / "manifest.json").write_text("{}")  # an export bundle is not an LLM folder
    assert is_llm_dir(full) and is_llm_dir(adapter) and not is_llm_dir(bundle)
    args = type("Args", (), {"source": str(adapter)})()
    assert _resolver(args)() == (adapter, "")

    db, artifacts = tmp_path / "kiln.db", tmp_path / "artifacts"
    registry = ModelRegistry(db, artifacts)
    try:
        registry.register_model(
            "tiny-lora",
            adapter,
            config={"kind": "lora_adapter", "base_model": "/nowhere"},
            task_type="language_modeling",
            export_formats=[],
        )
    finally:
        registry.close()
    folder, key = llm_source("tiny-lora:1.0.0", db, artifacts)
    assert (folder / "adapter_config.json").is_file() and key.startswith("tiny-lora:1.0.0:")
    assert llm_source(str(full), db, artifacts) == (full, "")
    assert llm_source(str(bundle), db, artifacts) is None
    assert is_llm_mapping({"model": {"model_path": "m"}, "data": {"dataset_path": "d"}})
    assert not is_llm_mapping({"model": {"name": "mlp"}, "epochs": 2})


def test_generate_needs_the_api_key_when_one_is_set():
    import hashlib

    from starlette.requests import Request

    from kiln.llm.serve import GenerateDeployment

    deployment = GenerateDeployment.__new__(GenerateDeployment)
    deployment._key_digest = hashlib.sha256(b"k" * 16).digest()

    def request(auth: str | None) -> Request:
        headers = [(b"authorization", auth.encode())] if auth else []
        return Request({"type": "http", "method": "POST", "path": "/generate", "headers": headers})

    assert deployment._authorized(request("Bearer " + "k" * 16))
    assert not deployment._authorized(request(None))
    assert not deployment._authorized(request("Bearer wrong"))
    deployment._key_digest = None
    assert deployment._authorized(request(None))


def test_kiln_tune_routes_a_fine_tuning_config_and_refuses_flags_it_cannot_use(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(
        f"model: {{model_path: {tmp_path / 'missing'}}}\n"
        f"data: {{dataset_path: {tmp_path / 'rows.jsonl'}}}\n"
        f"output: {{output_dir: {tmp_path / 'out'}}}\n"
    )
    space = tmp_path / "space.yaml"
    space.write_text("hyperparams.learning_rate: [1.0e-3]\n")
    home = ["--home", str(tmp_path / "home")]
    assert main([*home, "tune", str(config), "--space", str(space), "--resume"]) == 2
    assert "--resume: not supported when tuning a fine-tuning config" in capsys.readouterr().err
    assert main([*home, "tune", str(config), "--space", str(space), "--scheduler", "pbt"]) == 2
    assert "scheduler='pbt' is not one of fifo, asha, median" in capsys.readouterr().err
    # Routed to the fine-tuning search: its pre-load checks run before Ray starts.
    assert main([*home, "tune", str(config), "--space", str(space)]) == 2
    err = capsys.readouterr().err
    assert "model.model_path=" in err and "does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("hyperparams.learning_rat: [0.1]\n")
    assert main([*home, "tune", str(config), "--space", str(bad)]) == 2
    assert "did you mean 'hyperparams.learning_rate'" in capsys.readouterr().err.lower()


def test_gpu_only_settings_fail_before_any_model_load_on_cpu(tmp_path):
    """What tests/integration/test_llm_gpu.py runs on CUDA is refused here, naming the field."""
    from kiln.llm import TrainerEngine
    from kiln.paths import RunPaths

    assert not torch.cuda.is_available()  # this suite runs on CPU machines
    model = tmp_path / "model"
    model.mkdir()  # config.json only: a model load would fail, so errors come first
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")

    def run(**overrides):
        config = create_default_config(
            model_path=str(model), dataset_path=str(data), output_dir=str(tmp_path / "out"),
            profile={"name": "completion"}, **overrides,
        )  # fmt: skip
        result = TrainerEngine(paths=RunPaths.resolve(tmp_path / "home")).run_job(config)
        assert not result.success
        return result.error

    assert "hyperparams.fp_precision='fp16' needs a CUDA GPU" in run(fp_precision="fp16")
    error = run(load_in_4bit=True, lora={"r": 4}, fp_precision="bf16")
    assert "model.load_in_4bit=true needs a CUDA GPU" in error
    with pytest.raises(ConfigError, match="model.load_in_4bit=true needs model.lora"):
        run(load_in_4bit=True)  # refused when the config is built
    assert "environment.use_gpu=true, but this machine has no CUDA device" in run(use_gpu=True)


def test_kiln_llm_serve_is_kiln_serve(tmp_path, monkeypatch):
    """One server code path: ``kiln llm serve`` runs ``kiln serve`` with the same options."""
    import kiln.cli
    from kiln.cli import build_parser
    from kiln.cli.llm import cmd_serve

    seen = []
    monkeypatch.setattr(kiln.cli, "main", lambda argv: seen.append(argv) or 0)
    args = build_parser().parse_args(
        ["--home", str(tmp_path), "llm", "serve", "out/tiny", "--port", "8123", "--base", "b"]
    )
    assert cmd_serve(args) == 0
    assert seen == [
        [f"--home={tmp_path}", "serve", "out/tiny", "--host", "127.0.0.1", "--port", "8123",
         "--replicas", "1", "--base", "b"]
    ]  # fmt: skip
    served = build_parser().parse_args(seen[0])  # and `kiln serve` accepts every one of them
    assert (served.source, served.port, served.base) == ("out/tiny", 8123, "b")
