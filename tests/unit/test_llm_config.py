"""LLM config validation, the status file, the loop's dict batches and max_steps, and
run_job's failures that are reported before any model load (no Ray)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from kiln.errors import ConfigError
from kiln.llm import (
    ConfigLoader,
    TrainerEngine,
    TrainingStatusWriter,
    create_default_config,
    read_status,
)


@pytest.fixture()
def model_dir(tmp_path):
    """A folder that looks like a HF model to the pre-load checks (config.json only)."""
    path = tmp_path / "model"
    path.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 1024}
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    return path


@pytest.fixture()
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps(row) + "\n")
    return path


def _config(model_dir, data, tmp_path, **overrides):
    return create_default_config(
        model_path=str(model_dir),
        dataset_path=str(data),
        output_dir=str(tmp_path / "out"),
        **overrides,
    )


def test_default_config_overrides_land_in_their_sections(model_dir, chat_file, tmp_path):
    cfg = _config(
        model_dir, chat_file, tmp_path, num_epochs=3, max_context_length=64, lora={"r": 4}
    )
    assert cfg.hyperparams.num_epochs == 3 and cfg.model.max_context_length == 64
    assert cfg.model.lora.r == 4 and cfg.model.lora.alpha == 16
    with pytest.raises(
        ConfigError, match="'num_epoch' is not a config field; did you mean 'num_epochs'"
    ):
        _config(model_dir, chat_file, tmp_path, num_epoch=3)


def test_field_errors_are_collected_with_field_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as info:
        ConfigLoader.from_dict(
            {
                "model": {"model_path": "m", "lora": {"r": 0}, "max_context_lenght": 5},
                "data": {"dataset_path": "d.jsonl"},
                "profile": {"name": "chatty"},
                "hyperparams": {"fp_precision": "fp8", "batch_size": "4"},
                "output": {"output_dir": "o"},
                "extra": {},
            }
        )
    errors = "\n".join(info.value.errors)
    assert "'extra' is not a section" in errors
    assert (
        "'model.max_context_lenght' is not a field. Did you mean 'model.max_context_length'"
        in errors
    )
    assert "model.lora.r=0 must be an integer >= 1" in errors
    assert "profile.name='chatty' is not a registered profile; known: chat, completion" in errors
    assert "hyperparams.fp_precision='fp8' is not one of fp32, bf16, fp16" in errors
    assert "hyperparams.batch_size='4' must be an integer >= 1" in errors


def test_load_yaml_and_dotted_overrides(tmp_path, model_dir, chat_file):
    path = tmp_path / "job.yaml"
    path.write_text(
        f"model: {{model_path: {model_dir}}}\n"
        f"data: {{dataset_path: {chat_file}}}\n"
        "hyperparams: {learning_rate: 1e-3}\n"
        f"output: {{output_dir: {tmp_path / 'o'}}}\n"
    )
    cfg = ConfigLoader.load(path)
    assert cfg.hyperparams.learning_rate == 1e-3
    assert cfg.with_overrides({"model.lora.r": 2}).model.lora.r == 2
    with pytest.raises(ConfigError, match="section.field"):
        cfg.with_overrides({"learning_rate": 1})


def test_locked_checks_need_no_model_load(tmp_path, model_dir, chat_file):
    assert not torch.cuda.is_available()  # this suite runs on CPU machines
    cfg = _config(
        model_dir,
        chat_file,
        tmp_path,
        max_context_length=4096,
        fp_precision="fp16",
        load_in_4bit=True,
        lora={"r": 4},
        vocab_size=999,
    )
    with pytest.raises(ConfigError) as info:
        ConfigLoader.validate_locked_config(cfg)
    errors = "\n".join(info.value.errors)
    assert (
        "model.max_context_length=4096 is above the model's max_position_embeddings=1024" in errors
    )
    assert "model.vocab_size=999 does not match the model's vocab_size=300" in errors
    assert "fp_precision='fp16' needs a CUDA GPU" in errors
    assert "model.load_in_4bit=true needs a CUDA GPU" in errors
    missing = _config(tmp_path / "nope", tmp_path / "nope.jsonl", tmp_path)
    with pytest.raises(ConfigError) as info:
        ConfigLoader.validate_locked_config(missing)
    errors = "\n".join(info.value.errors)
    assert "model.model_path=" in errors and "does not exist" in errors
    assert "data.dataset_path=" in errors


def test_run_job_reports_failures_without_raising(tmp_path, model_dir, chat_file):
    status = TrainingStatusWriter(tmp_path / "status.json")
    result = TrainerEngine(status).run_job(_config(tmp_path / "missing", chat_file, tmp_path))
    assert not result.success and "model.model_path=" in result.error
    saved = read_status(tmp_path / "status.json")
    assert saved["state"] == "failed" and "model.model_path" in saved["error"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no messages"}) + "\n")
    # The model folder has no weights: a failure naming the rows proves data comes first.
    result = TrainerEngine().run_job(_config(model_dir, bad, tmp_path, skip_invalid=True))
    assert not result.success
    assert "no valid rows" in result.error and "line 1: field 'messages'" in result.error

    result = TrainerEngine().run_job(_config(model_dir, chat_file, tmp_path, fp_precision="fp16"))
    assert not result.success and "fp_precision='fp16' needs a CUDA GPU" in result.error


def test_status_writer_never_shows_a_torn_file(tmp_path):
    path = tmp_path / "status.json"
    writer = TrainingStatusWriter(path)
    writer.update("training", total_steps=150, step=0)
    stop = threading.Event()
    seen, bad = [], []

    def poll():
        while not stop.is_set():
            try:
                seen.append(json.loads(path.read_text())["step"])
            except ValueError as exc:  # a torn or empty file
                bad.append(exc)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for step in range(1, 151):
            writer.update(step=step, loss=1.0 / step, learning_rate=1e-3)
    finally:
        stop.set()
        reader.join(10)
    writer.update("completed")
    assert not bad and seen and seen == sorted(seen)
    final = read_status(path)
    assert final["state"] == "completed" and final["step"] == 150 and final["eta_s"] == 0.0
    with pytest.raises(ConfigError, match="unknown"):
        writer.update(stepp=1)
    import pickle  # Ray workers get a copy (DDP runs write the file from rank 0)

    copy = pickle.loads(pickle.dumps(writer))
    assert copy.update("failed", error="boom")["state"] == "failed"
    assert read_status(path)["error"] == "boom"


def test_loop_trains_dict_batches_with_model_loss_and_stops_at_max_steps():
    from kiln.engine.gradients import GradientAccumulator
    from kiln.engine.loops import TrainingLoop, ValidationLoop

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.out = torch.nn.Linear(8, 10)
            self.seen_masks = 0

        def forward(self, input_ids, attention_mask, labels):
            self.seen_masks += int(attention_mask.sum())
            logits = self.out(self.emb(input_ids))
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            return type("Out", (), {"loss": loss, "logits": logits})()

    torch.manual_seed(0)
    ids = torch.randint(0, 10, (4, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][:, :2] = -100
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    loop = TrainingLoop(
        GradientAccumulator(1),
        None,
        None,
        None,
        task_type="language_modeling",
        input_column="input_ids",
        label_column="labels",
        max_steps=7,
    )
    first = loop.run_epoch(1, model, [batch] * 5, opt)
    second = loop.run_epoch(2, model, [batch] * 5, opt)
    assert loop.global_step == 7 and (first.num_batches, second.num_batches) == (5, 2)
    assert second.loss < first.loss and first.metrics["train_tokens_per_s"] > 0
    assert model.seen_masks == 7 * 20
    val = ValidationLoop(
        None, task_type="language_modeling", input_column="input_ids", label_column="labels"
    )
    result = val.run_epoch(1, model, [batch])
    assert result.sums[3] == 4 * 3  # averaged over the label tokens that count (shifted)
    with pytest.raises(TypeError, match="dict batches with a 'labels' column"):
        loop.max_steps = None
        loop.run_epoch(3, model, [(ids, ids)], opt)


def test_llm_exports_resolve():
    import kiln.llm

    assert sorted(kiln.llm.__all__) == [
        "CausalLMFactory",
        "ConfigLoader",
        "DataProfile",
        "GenerationRequest",
        "TrainerConfig",
        "TrainerEngine",
        "TrainingResult",
        "TrainingState",
        "TrainingStatusWriter",
        "build_generate_app",
        "create_default_config",
        "encode_example",
        "generate",
        "get_profile",
        "load_for_inference",
        "make_tiny_model",
        "merge_adapter",
        "read_status",
        "register_profile",
        "tune_llm",
    ]
    for name in kiln.llm.__all__:
        assert getattr(kiln.llm, name) is not None


def test_status_command_prints_and_watches_until_terminal(tmp_path, capsys):
    import time

    from kiln.cli import main

    path = tmp_path / "status.json"
    writer = TrainingStatusWriter(path)
    writer.update("training", step=3, total_steps=10, loss=1.5, learning_rate=1e-3)
    assert main(["--home", str(tmp_path / "h"), "llm", "status", str(path)]) == 0
    assert capsys.readouterr().out.startswith("training  step 3/10  loss 1.5000  lr 1.00e-03")

    def finish():
        time.sleep(0.3)
        writer.fail("out of memory")

    thread = threading.Thread(target=finish)
    thread.start()
    code = main(["--home", str(tmp_path / "h"), "llm", "status", str(path), "--watch",
                 "--interval", "0.05"])  # fmt: skip
    thread.join()
    lines = capsys.readouterr().out.splitlines()
    assert code == 1 and lines[-1].startswith("failed") and "error: out of memory" in lines[-1]
    assert main(["--home", str(tmp_path / "h"), "llm", "status", str(tmp_path / "nope")]) == 2
