"""``kiln llm`` end to end on a tiny model made by ``kiln llm tiny-model``: train (bf16
autocast on CPU, a held-out split, --set overrides), status, generate, and merge of a
LoRA adapter; ``jobs/llm_train.py`` takes the same arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.cli import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _chat_rows(n: int) -> list[str]:
    return [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Say the number {i}."},
                    {"role": "assistant", "content": f"{i}"},
                ]
            }
        )
        for i in range(n)
    ]


def test_tiny_model_train_status_generate_merge(tmp_path, capsys):
    home = ["--home", str(tmp_path / "home")]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Say the number {i}. {i}" for i in range(40)))
    assert (
        main(
            [
                *home,
                "llm",
                "tiny-model",
                str(tmp_path / "base"),
                "--text",
                str(corpus),
                "--hidden-size",
                "32",
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(_chat_rows(20)) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"model: {{model_path: {tmp_path / 'base'}, max_context_length: 64}}\n"
        f"data: {{dataset_path: {data}}}\n"
        "profile: {name: chat}\n"
        "hyperparams: {batch_size: 4, num_epochs: 2, learning_rate: 1.0e-3}\n"
        "monitoring: {validation_split: 0.2, system_prompt_base: 'Today is {date}.'}\n"
        f"output: {{output_dir: {tmp_path / 'full'}}}\n"
    )
    status = tmp_path / "status.json"
    code = main(
        [
            *home,
            "llm",
            "train",
            str(config),
            "--set",
            "hyperparams.fp_precision=bf16",
            "--set",
            "hyperparams.max_steps=6",
            "--status-file",
            str(status),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "done: 6 steps" in out and "val loss" in out
    assert main([*home, "llm", "status", str(status)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("completed") and "step 6/6" in line
    assert (
        main(
            [
                *home,
                "llm",
                "generate",
                str(tmp_path / "full"),
                "--prompt",
                "Say the number 3.",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    capsys.readouterr()

    code = main(
        [
            *home,
            "llm",
            "train",
            str(config),
            "--set",
            "model.lora={r: 4, alpha: 8}",
            "--set",
            f"model.model_path={tmp_path / 'full'}",
            "--set",
            f"output.output_dir={tmp_path / 'adapter'}",
            "--set",
            "model.gradient_checkpointing=true",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (
        main([*home, "llm", "merge", str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")])
        == 0
    )
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


def test_train_failure_exits_1_with_the_error(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(
        f"model: {{model_path: {tmp_path / 'missing'}}}\n"
        f"data: {{dataset_path: {tmp_path / 'missing.jsonl'}}}\n"
        f"output: {{output_dir: {tmp_path / 'out'}}}\n"
    )
    assert main(["--home", str(tmp_path / "h"), "llm", "train", str(config)]) == 1
    err = capsys.readouterr().err
    assert "model.model_path=" in err and "data.dataset_path=" in err
    assert (
        main(["--home", str(tmp_path / "h"), "llm", "train", str(config), "--set", "nope=1"]) == 2
    )
    job = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "llm_train.py"), str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 1 and "model.model_path=" in job.stderr


@pytest.mark.slow
def test_llm_tune_runs_one_job_per_trial(tmp_path, capsys, ray_local):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Say the number {i}. {i}" for i in range(40)))
    home = ["--home", str(tmp_path / "home")]
    assert (
        main(
            [
                *home,
                "llm",
                "tiny-model",
                str(tmp_path / "base"),
                "--text",
                str(corpus),
                "--hidden-size",
                "32",
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(_chat_rows(16)) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"model: {{model_path: {tmp_path / 'base'}, max_context_length: 64}}\n"
        f"data: {{dataset_path: {data}}}\n"
        "hyperparams: {batch_size: 8, num_epochs: 2}\n"
        "environment: {tracking: false}\n"
        f"output: {{output_dir: {tmp_path / 'out'}}}\n"
    )
    space = tmp_path / "space.yaml"
    space.write_text(
        "hyperparams.learning_rate: {grid: [1.0e-4, 5.0e-3]}\n"
        "tune: {num_samples: 1, metric: train_loss, mode: min}\n"
    )
    capsys.readouterr()
    # `kiln tune` takes a fine-tuning config as it is (`kiln llm tune` is the same search).
    assert main([*home, "tune", str(config), "--space", str(space), "--scheduler", "asha"]) == 0
    out = capsys.readouterr().out
    assert out.count("train_loss=") == 3  # two trials and the best line
    best = out.splitlines()[-1]
    assert "0.005" in best  # the larger learning rate learns more in two epochs
    best_dir = Path(best.rsplit("-> ", 1)[1])
    assert (best_dir / "model.safetensors").is_file()
    bad = tmp_path / "bad_space.yaml"
    bad.write_text("hyperparams.learning_rat: [0.1]\n")
    assert main([*home, "llm", "tune", str(config), "--space", str(bad)]) == 2
    assert "did you mean 'hyperparams.learning_rate'" in capsys.readouterr().err.lower()
