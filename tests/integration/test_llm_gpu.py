"""Mixed precision and 4-bit QLoRA fine-tuning on CUDA (skipped where there is none)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from kiln.llm import TrainerEngine, create_default_config
from kiln.paths import RunPaths

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires_gpu,
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kiln.llm.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gpu")
    pairs = [(f"Say the number {i}.", str(i)) for i in range(32)]
    base = make_tiny_model(root / "base", [f"{q} {a}" for q, a in pairs], vocab_size=300)
    data = root / "rows.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
            for q, a in pairs
        )
    )
    return root, base, data


def _run(setup, name, **overrides):
    root, base, data = setup
    config = create_default_config(
        model_path=str(base),
        dataset_path=str(data),
        output_dir=str(root / name),
        num_epochs=8,
        batch_size=8,
        learning_rate=3e-3,
        use_gpu=True,
        tracking=False,
        validation_split=0.25,  # 24 training rows: 3 steps an epoch
        eval_steps=2,  # step evaluations and mid-epoch checkpoints on the device too
        save_steps=2,
        **overrides,
    )
    result = TrainerEngine(paths=RunPaths.resolve(root / "home")).run_job(config)
    assert result.success, result.error
    history = result.summary["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [e["step"] for e in history[0]["evals"]] == [2]
    return result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_full_finetune(setup, precision):
    _run(setup, f"full-{precision}", fp_precision=precision)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_4bit(setup):
    result = _run(
        setup, "qlora", load_in_4bit=True, lora={"r": 8, "alpha": 16}, fp_precision="bf16"
    )
    assert result.summary["trainable_params"] < 0.2 * result.summary["total_params"]
