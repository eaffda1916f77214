"""``kiln train CONFIG``: run the training described by a YAML/JSON run file.

A run file holds TrainingConfig fields plus an optional ``task:`` mapping (TaskSpec
fields). ``--set key=value`` overrides any field (values are YAML: numbers, lists,
booleans); dotted keys reach into mappings (``--set model.hidden=[64,32]``).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml

from kiln.config import TaskSpec, TrainingConfig, read_mapping
from kiln.config.training import STRATEGIES, load_yaml
from kiln.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a run file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="run file (.yaml/.yml/.json)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field (repeatable)",
    )
    p.add_argument("--workers", type=int, help="Ray Train workers (0: in-process)")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="ddp: a whole model per worker; fsdp: shard it over the workers (FSDP2)",
    )
    p.add_argument("--resume", metavar="PATH|latest", help="continue from a checkpoint")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument(
        "--storage",
        metavar="PATH|URI",
        help="where run folders and checkpoints go (default: <home>/runs); on a cluster a "
        "mount every node sees or a URI such as s3://bucket/runs",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="start the local Ray with its dashboard (slower start)",
    )
    p.add_argument(
        "--help-config",
        action="store_true",
        help="list every run-file field by group, with its default and meaning, and exit",
    )
    p.set_defaults(func=run)


def load_run_file(
    path: str, overrides: list[str], workers: int | None
) -> tuple[TrainingConfig, TaskSpec | None]:
    """Read a run file, apply ``--set`` overrides, and validate both parts."""
    raw = read_mapping(path)
    return load_run_mapping(raw, overrides, workers, source=path)


def load_run_mapping(
    raw: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    workers: int | None = None,
    *,
    source: str = "config",
) -> tuple[TrainingConfig, TaskSpec | None]:
    """What :func:`load_run_file` does, for a run file's mapping already in memory."""
    raw = dict(raw)
    from_set: set[str] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} must look like key=value (e.g. --set epochs=5)")
        _assign(raw, key.strip(), _parse_value(value))
        from_set.add(key.strip().split(".", 1)[0])
    if workers is not None:
        raw["num_workers"] = workers
    task_raw = raw.pop("task", None)
    errors: list[str] = []
    config = task = None
    try:
        config = TrainingConfig.from_dict(raw)
    except ConfigError as exc:
        errors.extend(exc.errors)
    if task_raw is not None:
        try:
            if not isinstance(task_raw, dict):
                raise ConfigError(f"task={task_raw!r} must be a mapping of TaskSpec fields")
            task = TaskSpec.from_dict({"name": raw.get("dataset") or "task", **task_raw})
        except ConfigError as exc:
            errors.extend(f"task.{e}" for e in exc.errors)
    if errors:
        raise ConfigError([f"{_origin(e, from_set, source)}: {e}" for e in errors])
    assert config is not None  # no errors: the config was built
    return config, task


def config_help() -> str:
    """Every TrainingConfig field, grouped as the builder groups them, with defaults."""
    import dataclasses

    from kiln.config.training import GROUPS

    fields = dataclasses.fields(TrainingConfig)
    defaults = TrainingConfig()
    lines = []
    for group in GROUPS:
        lines.append(f"{group}:")
        for f in fields:
            if f.metadata.get("group") != group:
                continue
            default = getattr(defaults, f.name)
            lines.append(f"  {f.name} ({f.type}, default {default!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
        lines.append("")
    lines.append("task: (a mapping of TaskSpec fields: task_type, num_classes, input_column, ...)")
    return "\n".join(lines)


def _origin(error: str, from_set: set[str], source: str) -> str:
    """``--set`` for an error about a field an override set, else the run file."""
    match = re.match(r"'?([A-Za-z_][\w]*)", error)
    return "--set" if match and match.group(1) in from_set else source


def precheck(config: TrainingConfig) -> None:
    """What can be known before training starts: the dataset exists, the model's keys."""
    from kiln.models.factory import _named

    problems = []
    if config.dataset:
        from kiln.data import dataset_ids, get_dataset
        from kiln.errors import DatasetNotFoundError

        if config.dataset not in dataset_ids():
            try:
                get_dataset(config.dataset)
            except DatasetNotFoundError as exc:
                problems.append(str(exc))
    spec = config.model_spec()
    if spec and "layers" not in spec:  # a named architecture: its keys are known now
        problems.extend(_named(spec)[2])
    if problems:
        raise ConfigError(problems)


def run(args: argparse.Namespace) -> int:
    from kiln.cli._live import training_display
    from kiln.cli.runs import run_paths
    from kiln.engine.trainer import Trainer

    if args.help_config:
        print(config_help())
        return 0
    if not args.config:
        raise ConfigError("kiln train needs a run file, e.g. examples/digits_mlp.yaml")
    overrides = list(args.overrides)
    if args.strategy:  # --strategy S is --set strategy=S
        overrides.append(f"strategy={args.strategy}")
    config, task = load_run_file(args.config, overrides, args.workers)
    precheck(config)
    quiet = getattr(args, "quiet", False)
    if args.address or args.dashboard:
        from kiln._ray import ensure_ray

        ensure_ray(args.address, dashboard=args.dashboard)
    where = "in-process" if config.num_workers == 0 else f"{config.num_workers} Ray workers"
    if config.strategy == "fsdp":
        where += ", fsdp"
    if not quiet:
        print(
            f"kiln: training {config.dataset or 'data'} for {config.epochs} epochs ({where})",
            flush=True,
        )
    trainer = Trainer(
        training_config=config,
        task_spec=task,
        verbose=not quiet,
        paths=run_paths(args),
        storage_path=args.storage,
    )
    starting = "starting Ray workers" if config.num_workers else "loading data"
    with training_display(starting, quiet=quiet):
        results = trainer.train(resume_from=args.resume)
    print_summary(results)
    return 0


def print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    final, history = results["final_metrics"], results["history"]
    best = next((h for h in history if h["epoch"] == results["best_epoch"]), final)
    table = Table(title=f"run {results['run_name']}")
    table.add_column("metric")
    table.add_column(f"final (epoch {final.get('epoch')})", justify="right")
    table.add_column(f"best (epoch {results['best_epoch']})", justify="right")
    for key, value in final.items():
        if key.startswith(("train_", "val_")) and isinstance(value, float):
            table.add_row(key, _fmt(key, value), _fmt(key, best.get(key)))
    console = Console(file=sys.stdout, width=110)
    console.print(table)
    test = results.get("test_metrics") or {}
    acc = best.get("val_accuracy")
    if "test_accuracy" in test:
        print(
            f"test accuracy: {test['test_accuracy']:.2%} on {int(test['test_rows'])} held-out "
            "rows no selection saw (test_split)"
        )
    elif "test_loss" in test:
        print(f"test loss: {test['test_loss']:.4f} on {int(test['test_rows'])} held-out rows")
    if acc is not None:
        print(
            f"validation accuracy: {acc:.2%} (the split that chose best epoch "
            f"{results['best_epoch']}, so optimistic)"
        )
    print(f"best checkpoint: {results['checkpoint_path']}")
    if results.get("stopped_early"):
        print(f"stopped early after epoch {final.get('epoch')}")
    if results.get("run_id") is not None:
        print(f"run id: {results['run_id']}  (kiln runs show {results['run_id']})")
    if results.get("registered"):
        ref = results["registered"]
        print(f"registered {ref}  (next: kiln models promote {ref} production)")
    print(f"total time: {results['total_time']:.1f} s")


def _fmt(key: str, value: Any) -> str:
    from kiln.engine.progress import format_metric

    return format_metric(key, value)


def _parse_value(text: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def _assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value
