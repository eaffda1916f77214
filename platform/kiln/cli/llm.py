"""``kiln llm``: fine-tune, watch, merge, try and serve causal language models.

    kiln llm tiny-model DIR --text corpus.txt        a small random model + tokenizer
    kiln llm train CONFIG [--set section.field=value ...] [--resume latest|PATH]
    kiln llm status STATUS.json [--watch]
    kiln llm generate MODEL_DIR --prompt "What is 2+2?" [--raw] [--max-new-tokens N]
    kiln llm merge ADAPTER_DIR -o MERGED_DIR [--base BASE_DIR]
    kiln llm serve MODEL_DIR [--port 8000]           POST /generate (= kiln serve MODEL_DIR)
    kiln llm tune CONFIG --space SPACE.yaml [--samples N]   Ray Tune, one job per trial

``train`` exits 1 when the job fails, with the error that says what to fix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "llm",
        help="fine-tune and serve causal language models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="llm_command", metavar="SUBCOMMAND")
    sub.required = True

    t = sub.add_parser("train", help="run a fine-tuning job from a YAML/JSON config")
    t.add_argument("config")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. hyperparams.learning_rate=1e-4 (repeatable)",
    )
    t.add_argument("--resume", metavar="PATH|latest", help="continue from a checkpoint")
    t.add_argument("--status-file", help="write the status JSON here")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("status", help="print a job's status file")
    s.add_argument("path")
    s.add_argument("--watch", action="store_true", help="follow until completed or failed")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between reads with --watch")
    s.set_defaults(func=cmd_status)

    g = sub.add_parser("generate", help="generate text with a model or adapter folder")
    g.add_argument("model_dir")
    g.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    g.add_argument("--system", help="a system message")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the text")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 picks greedily")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    g.add_argument("--base", help="base model folder for an adapter (default: its own record)")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    m.add_argument("adapter_dir")
    m.add_argument("-o", "--output", required=True, help="folder for the merged model")
    m.add_argument("--base", help="base model folder (default: the adapter's record)")
    m.set_defaults(func=cmd_merge)

    k = sub.add_parser("tiny-model", help="write a tiny random model with a trained tokenizer")
    k.add_argument("output_dir")
    k.add_argument("--text", required=True, action="append", help="text file(s) for the tokenizer")
    k.add_argument("--hidden-size", type=int, default=64, help="model width")
    k.add_argument("--layers", type=int, default=2, help="decoder layers")
    k.add_argument("--heads", type=int, default=4, help="attention heads")
    k.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary size")
    k.set_defaults(func=cmd_tiny_model)

    u = sub.add_parser("tune", help="Ray Tune over a job's settings (learning rate, LoRA r)")
    u.add_argument("config")
    u.add_argument("--space", required=True, help="YAML: dotted keys -> domains, tune: settings")
    u.add_argument("--samples", type=int, help="trials (default: tune.num_samples or 4)")
    u.add_argument("--metric", help="default: val_loss with a validation split, else train_loss")
    u.add_argument("--mode", choices=("min", "max"), help="min or max of --metric is better")
    u.add_argument("--scheduler", help="fifo (default: every trial ends), asha or median")
    u.set_defaults(func=cmd_tune)

    v = sub.add_parser("serve", help="serve POST /generate on Ray Serve (as kiln serve does)")
    v.add_argument("model_dir", help="model or adapter folder, or NAME@TAG of a registered LLM")
    v.add_argument("--host", default="127.0.0.1", help="interface to bind")
    v.add_argument("--port", type=int, default=8000, help="HTTP port")
    v.add_argument("--base", help="base model folder for an adapter")
    v.add_argument("--replicas", type=int, default=1, help="Serve replicas")
    v.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    v.set_defaults(func=cmd_serve)


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    from kiln.config.training import load_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--set {item!r} must look like section.field=value "
                "(e.g. --set hyperparams.learning_rate=1e-4)"
            )
        out[key.strip()] = load_yaml(value) if value.strip() else None
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from kiln.cli._live import training_display
    from kiln.llm.config import ConfigLoader
    from kiln.llm.engine import TrainerEngine

    config = ConfigLoader.load(args.config)
    overrides = _parse_overrides(args.overrides)
    if args.status_file:
        overrides["environment.status_file"] = args.status_file
    if overrides:
        config = config.with_overrides(overrides)
    starting = "starting Ray workers" if config.environment.num_workers else "loading the model"
    with training_display(starting, quiet=getattr(args, "quiet", False)):
        result = TrainerEngine(paths=args.paths).run_job(config, resume_from=args.resume)
    if not result.success:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    s = result.summary
    print(
        f"done: {result.global_step} steps in {result.runtime_sec:.1f} s, "
        f"final loss {result.final_loss:.4f}"
        + (f", val loss {s['val_loss']:.4f}" if s.get("val_loss") is not None else "")
    )
    print(f"model: {s['output_dir']}")
    if s.get("merged_dir"):
        print(f"merged: {s['merged_dir']}")
    if s.get("skipped_rows"):
        print(f"skipped {s['skipped_rows']} invalid rows (first: {s['invalid_rows'][0]})")
    if s.get("truncated"):
        print(f"truncated {s['truncated']} sequences to model.max_context_length")
    return 0


def _status_line(status: dict[str, Any]) -> str:
    parts = [status["state"]]
    if status.get("total_steps"):
        parts.append(f"step {status.get('step') or 0}/{status['total_steps']}")
    for key, label, fmt in (
        ("epoch", "epoch", "{}"),
        ("loss", "loss", "{:.4f}"),
        ("eval_loss", "eval", "{:.4f}"),
        ("learning_rate", "lr", "{:.2e}"),
        ("tokens_per_s", "tok/s", "{:.0f}"),
        ("eta_s", "eta", "{:.0f}s"),
    ):
        if isinstance(status.get(key), (int, float)):
            parts.append(f"{label} {fmt.format(status[key])}")
    if status.get("error"):
        parts.append(f"error: {status['error']}")
    return "  ".join(parts)


def cmd_status(args: argparse.Namespace) -> int:
    from kiln.llm.status import TrainingState, read_status

    if not Path(args.path).is_file():
        raise ConfigError(f"status file {args.path!r} does not exist (yet?)")
    last = None
    while True:
        status = read_status(args.path)
        line = _status_line(status)
        if line != last:
            print(line, flush=True)
            last = line
        if not args.watch or TrainingState(status["state"]).is_terminal:
            return 1 if status["state"] == TrainingState.FAILED.value else 0
        time.sleep(max(0.05, args.interval))


def cmd_generate(args: argparse.Namespace) -> int:
    from kiln.llm.generate import GenerationRequest, generate
    from kiln.llm.modeling import load_for_inference

    if args.raw:
        request = GenerationRequest(prompt=args.prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        request = GenerationRequest(messages=[*messages, {"role": "user", "content": args.prompt}])
    request.max_new_tokens = args.max_new_tokens
    request.temperature, request.top_p = args.temperature, args.top_p
    model, tokenizer = load_for_inference(args.model_dir, base=args.base)
    print(generate(model, tokenizer, request)["text"])
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from kiln.llm.modeling import merge_adapter

    print(merge_adapter(args.adapter_dir, args.output, base=args.base))
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from kiln.llm.tiny import make_tiny_model

    texts = []
    for name in args.text:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--text {name!r} does not exist")
        texts.extend(path.read_text(encoding="utf-8").splitlines())
    out = make_tiny_model(
        args.output_dir,
        texts,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        vocab_size=args.vocab_size,
    )
    print(json.dumps({"model_dir": str(out)}))
    return 0


_TUNE_SETTINGS = {"num_samples", "metric", "mode", "max_concurrent_trials", "scheduler"}
# `kiln tune` flags that have no meaning for fine-tuning trials (one job each)
_UNUSED_TUNE_FLAGS = ("time_budget_s", "name", "register_as", "resume")


def cmd_tune(args: argparse.Namespace) -> int:
    """``kiln llm tune``, and ``kiln tune`` given a fine-tuning config."""
    from kiln.llm.config import ConfigLoader
    from kiln.llm.tune import tune_llm
    from kiln.tune.spaces import load_search_file

    unused = [f"--{k.replace('_', '-')}" for k in _UNUSED_TUNE_FLAGS if getattr(args, k, None)]
    if unused:
        raise ConfigError(
            f"{', '.join(unused)}: not supported when tuning a fine-tuning config "
            f"({args.config}); its trials run one job each (use --samples, --metric, "
            "--mode, --scheduler, --max-concurrent, --set)"
        )
    config = ConfigLoader.load(args.config)
    overrides = _parse_overrides(getattr(args, "overrides", None) or [])
    if overrides:
        config = config.with_overrides(overrides)
    space, settings = load_search_file(args.space)
    unknown = sorted(set(settings) - _TUNE_SETTINGS)
    if unknown:
        raise ConfigError(
            f"{args.space}: tune settings {unknown!r} are not used when tuning a fine-tuning "
            f"config; allowed: {', '.join(sorted(_TUNE_SETTINGS))}"
        )
    concurrent = getattr(args, "max_concurrent_trials", None)
    result = tune_llm(
        config,
        space,
        num_samples=args.samples or settings.get("num_samples", 4),
        metric=args.metric or settings.get("metric"),
        mode=args.mode or settings.get("mode", "min"),
        paths=args.paths,
        max_concurrent_trials=concurrent or settings.get("max_concurrent_trials", 1),
        scheduler=getattr(args, "scheduler", None) or settings.get("scheduler", "fifo"),
    )
    for trial in result.trials:
        value = trial[result.metric]
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(
            f"{result.metric}={shown}  {trial['params']}"
            + (f"  error: {trial['error']}" if trial["error"] else "")
        )
    if result.best_output_dir is None:
        print("error: no trial finished", file=sys.stderr)
        return 1
    print(
        f"best: {result.metric}={result.best_metric:.4f} {result.best_params} -> {result.best_output_dir}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``kiln serve MODEL_DIR ...``: one server code path (lifetime, API key, ingress)."""
    from kiln.cli import main

    argv = [f"--home={args.home}"] if args.home else []
    argv += [f"--db={args.db}"] if args.db else []
    argv += ["--debug"] if args.debug else []
    argv += ["serve", args.model_dir, "--host", args.host, "--port", str(args.port)]
    argv += ["--replicas", str(args.replicas)]
    for flag, value in (("--base", args.base), ("--address", args.address)):
        if value:
            argv += [flag, value]
    return main(argv)
