"""LLM fine-tuning throughput (issue 11): a kiln LoRA run vs a hand-written
transformers + peft loop on the same tiny model, data, batch size and steps.

    python benchmarks/bench_llm.py [--epochs 8] [--rows 192]

Throughput is measured with epochs interleaved in one process, so both sides see the
same machine load: a kiln hook runs one epoch of the hand-written loop after every
kiln epoch (outside kiln's epoch timing), and the HF Trainer reference does the same
through a ``TrainerCallback``. The ratio is the median of the per-epoch ratios (the
first epoch, which pays one-time costs, is left out). Peak memory and end-to-end
wall time come from each variant alone in a fresh child process.

* kiln: ``TrainerEngine.run_job`` with ``model.lora`` (kiln's Trainer, in-process).
* hand: the same token sequences and collator, ``get_peft_model``, AdamW, a
  forward/backward/clip/step loop written out.
* HF Trainer (reference): ``transformers.Trainer`` on the same sequences and collator.
"""

from __future__ import annotations

import argparse
import functools
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
    from kiln.data.collate import collate_language_modeling

    return functools.partial(
        collate_language_modeling,
        pad_token_id=tokenizer.pad_token_id,
        input_key="input_ids",
        label_key="labels",
    )


def lora_model(root: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "base")
    model.config.use_cache = False
    config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def kiln_config(root: Path, epochs: int, out: str):
    from kiln.llm import create_default_config

    return create_default_config(
        model_path=str(root / "base"),
        dataset_path=str(root / "chat.jsonl"),
        output_dir=str(root / out),
        max_context_length=128,
        batch_size=BATCH,
        learning_rate=LR,
        num_epochs=epochs,
        lr_scheduler="constant",
        lora=LORA,
        tracking=False,
        logging_steps=0,
    )


class HandLoop:
    """The hand-written loop: model, loader, optimizer; ``epoch()`` trains one epoch."""

    def __init__(self, root: Path) -> None:
        import torch

        torch.manual_seed(42)
        tokenizer, dataset, self.tokens = sequences(root)
        self.model = lora_model(root)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=BATCH,
            shuffle=True,
            collate_fn=collator(tokenizer),
            generator=torch.Generator().manual_seed(42),
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.durations: list[float] = []
        self.loss = float("nan")

    def epoch(self) -> None:
        import torch

        self.model.train()
        start = time.perf_counter()
        for batch in self.loader:
            loss = self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.durations.append(time.perf_counter() - start)
        self.loss = float(loss)


# ---------------------------------------------------------------------- interleaved
def interleaved(root: Path, epochs: int) -> dict:
    """Per-epoch durations of kiln and HF Trainer, each alternating with the hand loop."""
    from kiln.engine.callbacks import CallbackBase
    from kiln.llm import TrainerEngine
    from kiln.paths import RunPaths

    hand_k = HandLoop(root)

    class AlternateHand(CallbackBase):
        def on_epoch_end(self, epoch, logs=None):
            hand_k.epoch()

    engine = TrainerEngine(paths=RunPaths.resolve(root / "home"), hooks=[AlternateHand()])
    result = engine.run_job(kiln_config(root, epochs, "out-interleaved"))
    if not result.success:
        raise SystemExit(result.error)
    kiln_s = [h["epoch_duration_seconds"] for h in result.summary["history"]]

    from transformers import Trainer, TrainerCallback

    hand_h = HandLoop(root)
    hf_s: list[float] = []

    class AlternateHandHF(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            hf_s.append(time.perf_counter() - self.start)
            hand_h.epoch()

    tokenizer, dataset, _ = sequences(root)
    trainer = Trainer(
        model=lora_model(root),
        args=_hf_args(root, epochs),
        train_dataset=dataset,
        data_collator=collator(tokenizer),
        callbacks=[AlternateHandHF()],
    )
    trainer.train()
    return {
        "kiln": kiln_s,
        "hand_k": hand_k.durations,
        "hf": hf_s,
        "hand_h": hand_h.durations,
        "kiln_loss": result.final_loss,
        "hand_loss": hand_k.loss,
    }


def _hf_args(root: Path, epochs: int):
    import torch
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return TrainingArguments(
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


# ---------------------------------------------------------------------- alone
def alone(variant: str, root: Path, epochs: int) -> dict:
    """One variant end to end (load, train, save) in this process."""
    start = time.perf_counter()
    if variant == "kiln":
        from kiln.llm import TrainerEngine
        from kiln.paths import RunPaths

        result = TrainerEngine(paths=RunPaths.resolve(root / "home")).run_job(
            kiln_config(root, epochs, "out-kiln")
        )
        if not result.success:
            raise SystemExit(result.error)
    elif variant == "hand":
        hand = HandLoop(root)
        for _ in range(epochs):
            hand.epoch()
        hand.model.save_pretrained(root / "out-hand")
    else:
        from transformers import Trainer

        tokenizer, dataset, _ = sequences(root)
        trainer = Trainer(
            model=lora_model(root),
            args=_hf_args(root, epochs),
            train_dataset=dataset,
            data_collator=collator(tokenizer),
        )
        trainer.train()
        trainer.model.save_pretrained(root / "out-hf")
    return {"wall_s": time.perf_counter() - start}


def child(mode: str, root: Path, epochs: int) -> None:
    import torch

    result = interleaved(root, epochs) if mode == "interleaved" else alone(mode, root, epochs)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def spawn(mode: str, root: Path, epochs: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "platform"), KILN_HOME=str(root / "home"))
    cmd = [sys.executable, __file__, "--child", mode, "--root", str(root), "--epochs", str(epochs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _ratios(num: list[float], den: list[float]) -> list[float]:
    return [n / d for n, d in zip(num[1:], den[1:], strict=False)]  # epoch 1 left out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--child", choices=("interleaved", "kiln", "hand", "hf"))
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.root), args.epochs)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_llm_"))
    prepare(root, args.rows)
    inter = spawn("interleaved", root, args.epochs)
    solo = {v: spawn(v, root, args.epochs) for v in ("kiln", "hand", "hf")}

    k_ratio = _ratios(inter["hand_k"], inter["kiln"])  # kiln tokens/s over hand tokens/s
    h_ratio = _ratios(inter["hand_h"], inter["hf"])
    tokens = sequences(root)[2]
    rate = {k: tokens / statistics.median(inter[k][1:]) for k in ("kiln", "hand_k", "hf", "hand_h")}
    q = statistics.quantiles(k_ratio, n=4) if len(k_ratio) >= 4 else [min(k_ratio), 0, max(k_ratio)]
    steps = -(-args.rows // BATCH)
    print(
        f"tiny Llama (hidden 128, 4 layers), LoRA r={LORA['r']}, {args.rows} chat rows, "
        f"batch {BATCH} ({steps} steps/epoch), {args.epochs} epochs\n"
    )
    print("| benchmark | kiln | baseline | ratio | target | note |")
    print("|---|---|---|---|---|---|")
    print(
        f"| LoRA tokens/s: kiln run_job vs hand transformers+peft loop | {rate['kiln']:.0f} "
        f"| {rate['hand_k']:.0f} | {statistics.median(k_ratio):.3f} | >= 0.95 | epochs "
        f"alternate in one process; median of {len(k_ratio)} per-epoch ratios (spread "
        f"{q[0]:.3f}-{q[2]:.3f}); final loss kiln {inter['kiln_loss']:.3f}, "
        f"hand {inter['hand_loss']:.3f} |"
    )
    print(
        f"| LoRA tokens/s: HF Trainer (reference) vs hand loop | {rate['hf']:.0f} "
        f"| {rate['hand_h']:.0f} | {statistics.median(h_ratio):.3f} | reference | "
        "epochs alternate the same way |"
    )
    wall = {v: solo[v]["wall_s"] for v in solo}
    print(
        f"| end-to-end wall: kiln run_job vs hand script | {wall['kiln']:.1f} s "
        f"| {wall['hand']:.1f} s | {wall['kiln'] / wall['hand']:.3f} | reference | each alone, one after another (sensitive to machine load); "
        "both tokenize, load, add LoRA, train, save; kiln adds Ray Train local mode, its "
        f"checkpoint and a reload of the final weights; HF Trainer {wall['hf']:.1f} s |"
    )
    mem = {v: solo[v]["peak_rss_mb"] for v in solo}
    print(
        f"| peak RSS: kiln vs hand | {mem['kiln']:.0f} MiB | {mem['hand']:.0f} MiB "
        f"| {mem['kiln'] / mem['hand']:.3f} | reference | each alone in a fresh process, "
        f"imports included; HF Trainer {mem['hf']:.0f} MiB |"
    )
    if all("peak_cuda_mb" in solo[v] for v in solo):
        cuda = {v: solo[v]["peak_cuda_mb"] for v in solo}
        print(
            f"| peak CUDA memory: kiln vs hand | {cuda['kiln']:.0f} MiB | {cuda['hand']:.0f} MiB "
            f"| {cuda['kiln'] / cuda['hand']:.3f} | reference | HF Trainer {cuda['hf']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
