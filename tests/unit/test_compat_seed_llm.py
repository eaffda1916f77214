"""The causal-LM fine-tuning examples of the older ``TrainerEngine.run_job`` design, run
as written with ``trainer.*`` imports mapped to ``kiln.llm``.

One test per example: the ``run_job`` flow, its model/tokenizer and dataset steps as
the older ``UltimateTrainer`` calls them (option B), the delegating ``UltimateTrainer``
(option A), the helpers, and "Test 1: direct engine usage". The model is a tiny
random Llama-style model with a tokenizer trained here on the rows' own text
(:func:`kiln.llm.make_tiny_model`); jobs train in-process for a few steps.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import pytest

QA = [(f"What is code word {i}?", w) for i, w in enumerate(["apple", "river", "stone", "cloud"])]
ROWS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in QA * 3
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from kiln.llm.tiny import make_tiny_model

    texts = [f"{q} {a}" for q, a in QA] + ["Answer briefly. Today is 2026-01-01."]
    root = tmp_path_factory.mktemp("seed_llm")
    return make_tiny_model(root / "tiny", texts, hidden_size=32, num_heads=2, vocab_size=300)


@pytest.fixture()
def chat_file(tmp_path) -> Path:
    path = tmp_path / "data" / "small_test.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


@pytest.fixture(autouse=True)
def _in_tmp(kiln_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples' relative paths (status/, outputs/) land here


def _quick(**overrides):
    return {"num_epochs": 1, "batch_size": 4, "learning_rate": 5e-3, "max_context_length": 64,
            "logging_steps": 1, **overrides}  # fmt: skip


def test_run_job_flow(tiny_model, chat_file):
    from kiln.llm import ConfigLoader, TrainerEngine, create_default_config, get_profile
    from kiln.llm.engine import system_prompt

    config = create_default_config(
        str(tiny_model),
        str(chat_file),
        "outputs/flow",
        system_prompt_base="Answer briefly. Today is {date}.",
        **_quick(),
    )
    # 1. Validate
    assert ConfigLoader.validate_locked_config(config) is config
    # 2. Load profile
    profile = get_profile(config.profile.name)
    prompt = system_prompt(config)
    assert prompt == f"Answer briefly. Today is {date.today().isoformat()}."
    example = profile.transform_example(ROWS[0], 0, prompt)
    assert example["messages"][0] == {"role": "system", "content": prompt}
    # 3-8. Load, prepare, train, save, return a TrainingResult
    result = TrainerEngine().run_job(config)
    assert result.success, result.error
    assert result.global_step == 3 and result.runtime_sec > 0  # 12 rows / batch 4
    assert isinstance(result.final_loss, float) and result.error is None
    assert Path(result.last_checkpoint_path).is_dir()
    assert result.summary["output_dir"] == "outputs/flow"
    saved = Path("outputs/flow")
    assert (saved / "config.json").is_file() and (saved / "tokenizer.json").is_file()


def test_option_b_engine_steps(tiny_model, chat_file):
    """``UltimateTrainer`` keeps its own features and lets the engine load and prepare."""
    from kiln.llm import TrainerEngine, TrainingStatusWriter, create_default_config, get_profile

    class UltimateTrainer:
        def __init__(self, config, status_writer):
            self.config = config
            self.engine = TrainerEngine(status_writer)

        def load_model(self):
            self.model, self.tokenizer = self.engine.load_model_and_tokenizer(self.config)

        def prepare_dataset(self):
            profile = get_profile(self.config.profile.name)
            self.train_dataset, self.val_dataset = self.engine.prepare_dataset(
                self.config, profile, self.tokenizer
            )

    config = create_default_config(
        str(tiny_model),
        str(chat_file),
        "outputs/b",
        validation_split=0.25,
        validation_max_samples=2,
        **_quick(),
    )
    trainer = UltimateTrainer(config, TrainingStatusWriter("status/training_status.json"))
    trainer.load_model()
    assert trainer.tokenizer.pad_token is not None
    assert trainer.model.config.use_cache is False  # disabled for training
    trainer.prepare_dataset()
    # val_size = min(validation_max_samples, int(len(examples) * validation_split))
    assert (len(trainer.train_dataset), len(trainer.val_dataset)) == (10, 2)
    sample = trainer.train_dataset[0]
    assert sample["input_ids"].shape == sample["labels"].shape
    answer = trainer.tokenizer.decode(sample["labels"][sample["labels"] != -100])
    assert any(answer.startswith(a) for _, a in QA)  # only the assistant's reply is learned
    out = trainer.model(input_ids=sample["input_ids"][None], labels=sample["labels"][None])
    assert out.logits.shape[-1] == len(trainer.tokenizer) and out.loss.item() > 0


def test_option_a_ultimate_trainer_delegates(tiny_model, chat_file):
    from kiln.llm import ConfigLoader, TrainerEngine, TrainingStatusWriter

    class UltimateTrainer:
        def __init__(self, args, controller=None):
            self.args = args
            self.config = ConfigLoader.from_args_and_json(args)
            status_writer = TrainingStatusWriter("status/training_status.json")
            self.engine = TrainerEngine(status_writer)

        def run(self):
            # Delegate to engine
            result = self.engine.run_job(self.config)
            return result.success

    args = argparse.Namespace(
        dataset=str(chat_file), model=str(tiny_model), output="outputs/test", config=None,
        num_epochs=1, batch_size=6, max_context_length=64, learning_rate=None,
    )  # fmt: skip
    trainer = UltimateTrainer(args)
    assert trainer.config.hyperparams.batch_size == 6
    assert trainer.config.hyperparams.learning_rate == 2e-4  # None: the default stays
    assert trainer.run() is True
    status = json.loads(Path("status/training_status.json").read_text())
    assert (status["state"], status["step"]) == ("completed", 2)


def test_config_loader_from_args_and_a_json_file(tiny_model, chat_file, tmp_path):
    from kiln.errors import ConfigError
    from kiln.llm import ConfigLoader, create_default_config

    base = create_default_config(str(tiny_model), str(chat_file), "outputs/json", **_quick())
    (tmp_path / "job.json").write_text(json.dumps(base.to_dict()))
    args = argparse.Namespace(config="job.json", output="outputs/other", lora={"r": 2}, func=print)
    config = ConfigLoader.from_args_and_json(args)
    assert config.output.output_dir == "outputs/other" and config.model.lora.r == 2
    assert config.hyperparams.num_epochs == 1 and config.data.dataset_path == str(chat_file)
    with pytest.raises(ConfigError, match="hyperparams.batch_size=0 must be an integer >= 1"):
        ConfigLoader.from_args_and_json(argparse.Namespace(config="job.json", batch_size=0))


def test_direct_engine_usage(tiny_model, chat_file, capsys):
    """The design's "Test 1", with the tiny model standing in for Qwen3-0.6B."""
    from kiln.llm import TrainerEngine, TrainingStatusWriter, create_default_config

    config = create_default_config(
        model_path=str(tiny_model),
        dataset_path=str(chat_file),
        output_dir="outputs/engine_test",
        base_model="tiny-llama",
        model_architecture="LlamaForCausalLM",
        max_context_length=64,
        vocab_size=json.loads((tiny_model / "config.json").read_text())["vocab_size"],
        num_epochs=1,
        batch_size=4,
    )

    status_writer = TrainingStatusWriter("status/training_status.json")
    engine = TrainerEngine(status_writer)
    result = engine.run_job(config)

    print(f"Success: {result.success}")
    print(f"Final loss: {result.final_loss}")
    out = capsys.readouterr().out
    assert "Success: True" in out and "Final loss: " in out, result.error
    assert float(out.split("Final loss: ")[1].split()[0]) > 0
    status = json.loads(Path("status/training_status.json").read_text())
    assert status["state"] == "completed" and status["total_steps"] == 3
    assert Path("outputs/engine_test/model.safetensors").is_file()
