"""LLM fine-tuning throughput (issue 11): a kiln LoRA run vs a hand-written
transformers + peft loop on the same tiny model, data, batch size and steps.

    python benchmarks/bench_llm.py [--reps 3] [--epochs 2] [--rows 384]

Each variant runs in a fresh child process (so peak memory is its own), the variants
alternate within each repetition, and the table reports medians:

* kiln: ``TrainerEngine.run_job`` with ``model.lora`` (kiln's Trainer, in-process);
  training time is the sum of the loop's epoch durations.
* hand: the same token sequences and collator, ``get_peft_model``, AdamW, a
  forward/backward/clip/step loop written out; training time is the loop.
* HF Trainer (reference): ``transformers.Trainer`` on the same sequences and collator.

Tokens/s counts the non-padding tokens trained. Peak memory is the child's peak RSS
(``ru_maxrss``), and ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "red",
    "green",
    "blue",
    "amber",
    "violet",
    "silver",
    "golden",
    "black",
    "white",
    "orange",
    "purple",
    "teal",
]
BATCH, LR, LORA = 8, 2e-3, {"r": 8, "alpha": 16, "dropout": 0.0}


# ---------------------------------------------------------------------- workload
def prepare(root: Path, rows: int) -> None:
    """A tiny Llama-style model and a chat file of ``rows`` question/answer pairs."""
    from kiln.llm.tiny import make_tiny_model

    pairs = [
        (f"Which colour is item {i} of box {i % 7}?", f"It is {WORDS[i % len(WORDS)]}.")
        for i in range(rows)
    ]
    make_tiny_model(
        root / "base",
        [f"{q} {a}" for q, a in pairs],
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        vocab_size=1000,
    )
    with open(root / "chat.jsonl", "w") as fh:
        for q, a in pairs:
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            fh.write(json.dumps({"messages": messages}) + "\n")


def sequences(root: Path):
    """The token sequences kiln trains on (same profile, template and masking)."""
    from kiln.llm.encoding import TokenDataset, encode_examples
    from kiln.llm.modeling import load_tokenizer
    from kiln.llm.profiles import get_profile, prepare_examples, read_rows

    tokenizer = load_tokenizer(root / "base")
    examples = prepare_examples(read_rows(root / "chat.jsonl"), get_profile("chat")).examples
    seqs, stats = encode_examples(examples, tokenizer, 128)
    return tokenizer, TokenDataset(seqs), stats.tokens


def collator(tokenizer):
    import functools

    from kiln.data.collate import collate_language_modeling

    return functools.partial(
        collate_language_modeling,
        pad_token_id=tokenizer.pad_token_id,
        input_key="input_ids",
        label_key="labels",
    )


# ---------------------------------------------------------------------- variants
def run_kiln(root: Path, epochs: int) -> dict:
    from kiln.llm import TrainerEngine, create_default_config
    from kiln.paths import RunPaths

    config = create_default_config(
        model_path=str(root / "base"),
        dataset_path=str(root / "chat.jsonl"),
        output_dir=str(root / "out-kiln"),
        max_context_length=128,
        batch_size=BATCH,
        learning_rate=LR,
        num_epochs=epochs,
        lr_scheduler="constant",
        lora=LORA,
        tracking=False,
        logging_steps=0,
    )
    start = time.perf_counter()
    result = TrainerEngine(paths=RunPaths.resolve(root / "home")).run_job(config)
    wall = time.perf_counter() - start
    if not result.success:
        raise SystemExit(result.error)
    train_s = sum(h["epoch_duration_seconds"] for h in result.summary["history"])
    tokens = result.summary["encoding"]["train"]["tokens"] * epochs
    return {"train_s": train_s, "wall_s": wall, "tokens": tokens, "loss": result.final_loss}


def run_hand(root: Path, epochs: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    torch.manual_seed(42)
    tokenizer, dataset, n_tokens = sequences(root)
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    model.config.use_cache = False
    lora = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        collate_fn=collator(tokenizer),
        generator=torch.Generator().manual_seed(42),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    loop_start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - loop_start
    model.save_pretrained(root / "out-hand")
    return {
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
        "tokens": n_tokens * epochs,
        "loss": float(loss),
    }


def run_hf(root: Path, epochs: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    tokenizer, dataset, n_tokens = sequences(root)
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    model.config.use_cache = False
    lora = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(root / "out-hf"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        seed=42,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator(tokenizer)
    )
    out = trainer.train()
    return {
        "train_s": out.metrics["train_runtime"],
        "wall_s": time.perf_counter() - start,
        "tokens": n_tokens * epochs,
        "loss": out.training_loss,
    }


VARIANTS = {"kiln": run_kiln, "hand": run_hand, "hf": run_hf}


def child(variant: str, root: Path, epochs: int) -> None:
    import torch

    result = VARIANTS[variant](root, epochs)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def spawn(variant: str, root: Path, epochs: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "platform"), KILN_HOME=str(root / "home"))
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--root",
        str(root),
        "--epochs",
        str(epochs),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--child", choices=sorted(VARIANTS))
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.root), args.epochs)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_llm_"))
    prepare(root, args.rows)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            runs[variant].append(spawn(variant, root, args.epochs))

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    rate = {v: statistics.median(r["tokens"] / r["train_s"] for r in runs[v]) for v in VARIANTS}
    steps = args.epochs * -(-args.rows // BATCH)
    print(
        f"tiny Llama (hidden 128, 4 layers), LoRA r={LORA['r']}, {args.rows} chat rows, "
        f"batch {BATCH}, {steps} steps; median of {args.reps}\n"
    )
    print("| benchmark | kiln | baseline | ratio | target | note |")
    print("|---|---|---|---|---|---|")
    print(
        f"| LoRA tokens/s: kiln run_job vs hand transformers+peft loop | {rate['kiln']:.0f} "
        f"| {rate['hand']:.0f} | {rate['kiln'] / rate['hand']:.3f} | >= 0.95 | training loop time; "
        f"final loss kiln {median('kiln', 'loss'):.3f}, hand {median('hand', 'loss'):.3f} |"
    )
    print(
        f"| LoRA tokens/s: HF Trainer (reference) vs hand loop | {rate['hf']:.0f} "
        f"| {rate['hand']:.0f} | {rate['hf'] / rate['hand']:.3f} | reference | train_runtime |"
    )
    print(
        f"| end-to-end wall: kiln run_job vs hand script | {median('kiln', 'wall_s'):.1f} s "
        f"| {median('hand', 'wall_s'):.1f} s | {median('kiln', 'wall_s') / median('hand', 'wall_s'):.3f} "
        "| reference | both: tokenize, load, LoRA, train, save; kiln adds Ray Train local mode, "
        "its checkpoint and a reload of the final weights |"
    )
    mem = {v: median(v, "peak_rss_mb") for v in VARIANTS}
    print(
        f"| peak RSS: kiln vs hand | {mem['kiln']:.0f} MiB | {mem['hand']:.0f} MiB "
        f"| {mem['kiln'] / mem['hand']:.3f} | reference | HF Trainer {mem['hf']:.0f} MiB; each "
        "variant in its own process (imports included) |"
    )
    if all("peak_cuda_mb" in r for v in VARIANTS for r in runs[v]):
        cuda = {v: median(v, "peak_cuda_mb") for v in VARIANTS}
        print(
            f"| peak CUDA memory: kiln vs hand | {cuda['kiln']:.0f} MiB | {cuda['hand']:.0f} MiB "
            f"| {cuda['kiln'] / cuda['hand']:.3f} | reference | HF Trainer {cuda['hf']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
