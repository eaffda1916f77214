"""TrainingConfig: every knob of a training run, validated in one place.

YAML or JSON is mapped onto the dataclass once, at the edge (``from_dict`` /
``load``); everything after that reads typed attributes. ``validate()`` collects
every problem before raising one :class:`~kiln.errors.ConfigError` whose lines
name the field, echo the value and say what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kiln.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULERS = ("constant", "linear", "cosine")
AMP_DTYPES = ("auto", "bf16", "fp16")
MODES = ("min", "max")
DATA_BACKENDS = ("auto", "ray", "memory")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")
EXPORT_FORMATS = ("onnx", "pytorch", "torchscript", "torch_export", "safetensors")
STRATEGIES = ("ddp", "fsdp")  # how worker actors hold the model (kiln.engine.strategy)
REPORT_TO = ("mlflow",)

# Groups tie fields to the builder method that sets them (TrainingConfigBuilder.with_*).
GROUPS = ("training", "optimizer", "hardware", "logging", "model", "checkpoint", "data")


def _f(default: Any, group: str, help: str) -> Any:
    meta = {"group": group, "help": help}
    if default in (list, dict):  # mutable defaults: a fresh one per instance
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainingConfig:
    """Hyperparameters and run settings for one kiln training run.

    Build one directly, from a preset (``TrainingConfigBuilder.baseline()``), or from a
    file (``TrainingConfig.load("run.yaml")``). Every public entry point validates it.
    """

    # Reproducibility
    random_seed: int = _f(42, "training", "Seed for python, numpy, torch and data order.")
    deterministic: bool = _f(False, "training", "Bit-exact mode (slower).")
    # Hyperparameters
    learning_rate: float = _f(5e-5, "training", "Peak learning rate.")
    batch_size: int = _f(4, "training", "Batch size per worker.")
    epochs: int = _f(10, "training", "Number of epochs.")
    max_steps: int | None = _f(
        None, "training", "Stop once this many batches have been trained (None: all epochs)."
    )
    warmup_ratio: float = _f(0.1, "training", "Fraction of optimizer steps spent warming up.")
    validation_split: float = _f(0.1, "training", "Held-out fraction when no val data is given.")
    test_split: float | None = _f(
        None,
        "training",
        "Held-out test fraction that no selection sees, scored once at the end (test_loss, "
        "test_accuracy). None: 0.1 for the bundled datasets, 0 otherwise; 0 turns it off.",
    )
    early_stopping_patience: int | None = _f(None, "training", "Epochs without improvement.")
    early_stopping_min_delta: float = _f(0.0, "training", "Smallest change that counts.")
    loss: str | None = _f(
        None,
        "training",
        "Loss strategy name; None picks by task type; 'model': the model computes its own "
        "loss from dict batches (model(**batch).loss, as Hugging Face models do).",
    )
    # Optimizer
    optimizer: str = _f("adamw", "optimizer", "One of adamw, adam, sgd.")
    lr_scheduler: str = _f("cosine", "optimizer", "One of constant, linear, cosine.")
    weight_decay: float = _f(0.01, "optimizer", "Decoupled weight decay (AdamW) or L2.")
    momentum: float = _f(0.9, "optimizer", "SGD momentum.")
    max_grad_norm: float | None = _f(1.0, "optimizer", "Global-norm clip; None disables.")
    gradient_accumulation_steps: int = _f(1, "optimizer", "Batches per optimizer step.")
    gradient_check_interval: int = _f(
        0,
        "optimizer",
        "Check gradient health (per-parameter norms, NaN/inf; GradientMonitor) every N "
        "optimizer steps and add grad_max_norm, grad_warnings and grad_criticals to each "
        "epoch's metrics; 0: off.",
    )
    # Hardware
    num_workers: int = _f(0, "hardware", "0 runs in-process; N>=1 runs N Ray Train workers.")
    use_gpu: bool = _f(False, "hardware", "One GPU per worker (nccl).")
    cpus_per_worker: float | None = _f(None, "hardware", "CPUs reserved per worker.")
    use_amp: bool = _f(False, "hardware", "Automatic mixed precision.")
    amp_dtype: str = _f("auto", "hardware", "auto (bf16 on CPU, fp16 on CUDA), bf16 or fp16.")
    compile_mode: str | None = _f(None, "hardware", "torch.compile mode; None disables.")
    max_failures: int = _f(0, "hardware", "Worker-group restarts on failure (-1: forever).")
    strategy: str = _f(
        "ddp",
        "hardware",
        "ddp: every worker holds the whole model and optimizer state; fsdp: FSDP2 shards "
        "parameters, gradients and optimizer state over the workers (per block), for models "
        "that do not fit one worker; needs num_workers >= 1.",
    )
    activation_checkpointing: bool = _f(
        False,
        "hardware",
        "Recompute each block's activations in backward instead of keeping them (less "
        "memory, ~30% more compute): transformer layers, Hugging Face gradient checkpointing.",
    )
    # Checkpoints
    checkpoint_dir: str | None = _f(None, "checkpoint", "Defaults to <runs>/<run_name>.")
    save_every_n_epochs: int = _f(1, "checkpoint", "Checkpoint interval in epochs.")
    save_every_n_steps: int | None = _f(
        None,
        "checkpoint",
        "Also checkpoint every N optimizer steps inside an epoch; resuming from such a "
        "checkpoint continues at the exact next batch. None: epoch ends only.",
    )
    eval_every_n_steps: int | None = _f(
        None,
        "training",
        "Also validate every N optimizer steps inside an epoch (each epoch's history row "
        "lists them under 'evals'). None: at epoch ends only.",
    )
    keep_best_k: int = _f(3, "checkpoint", "Checkpoints kept by the monitored metric.")
    keep_last_n: int = _f(2, "checkpoint", "Most recent checkpoints kept (>= 1).")
    monitor: str = _f("val_loss", "checkpoint", "Metric that ranks checkpoints.")
    mode: str = _f("min", "checkpoint", "min or max for the monitored metric.")
    on_checkpoint_error: str = _f(
        "raise", "checkpoint", "A failed save (disk full): raise, or warn and keep training."
    )
    # Logging and tracking
    run_name: str | None = _f(None, "logging", "Run name; generated when None.")
    notes: str = _f("", "logging", "Free text recorded with the run.")
    tracking: bool = _f(True, "logging", "Record the run in the experiment database.")
    tracking_db: str | None = _f(None, "logging", "SQLite path; None uses $KILN_HOME/kiln.db.")
    register_as: str | None = _f(None, "logging", "Register the best checkpoint under this name.")
    log_every_n_steps: int = _f(0, "logging", "Record loss/lr every N steps (0: per epoch only).")
    report_interval_s: float | None = _f(
        None,
        "logging",
        "With worker actors: least seconds between reports to Ray Train (each one waits for "
        "the controller's next poll); the last epoch is always reported and every epoch is "
        "in the history. None: the poll interval; 0: every epoch. In-process runs and Tune "
        "trials report every epoch.",
    )
    export_formats: list[str] = _f(list, "logging", "Export a bundle in these formats at the end.")
    wandb_project: str | None = _f(
        None,
        "logging",
        "Also log the run's per-epoch metrics to this Weights & Biases project, from the "
        "driver once the run ends (needs `pip install wandb`).",
    )
    report_to: list[str] = _f(
        list,
        "logging",
        "Also send each finished run (params, per-epoch metrics, tags, the best checkpoint) "
        "to these trackers, from the driver: 'mlflow' (to MLFLOW_TRACKING_URI; needs "
        "`pip install 'kiln[mlflow]'`).",
    )
    tensorboard: bool = _f(
        True,
        "logging",
        "Write TensorBoard event files to <runs>/<run_name>/tensorboard: each epoch's "
        "scalars as it ends, the per-step rows (log_every_n_steps) when the run ends; "
        "`tensorboard --logdir $KILN_HOME/runs` shows them.",
    )
    # Data
    dataset: str | None = _f(None, "data", "Dataset id or local parquet/csv/jsonl path.")
    data_backend: str = _f(
        "auto",
        "data",
        "auto: (X, y) arrays, and dataset ids in an in-process run, are fed from memory (each "
        "rank takes an equal slice); dataset ids with worker actors, files and ray.data go "
        "through Ray Data. 'ray' forces Ray Data; 'memory' forces memory.",
    )
    # Model
    model_name: str | None = _f(None, "model", "Architecture name (mlp, cnn, tiny_transformer).")
    model: dict[str, Any] = _f(dict, "model", "Architecture parameters for kiln.models.")
    vocab_size: int | None = _f(None, "model", "Vocabulary size (token models).")
    max_seq_len: int | None = _f(None, "model", "Maximum sequence length (token models).")
    d_model: int | None = _f(None, "model", "Transformer width.")
    num_layers: int | None = _f(None, "model", "Transformer depth.")
    num_heads: int | None = _f(None, "model", "Attention heads.")
    d_ff: int | None = _f(None, "model", "Transformer feed-forward width.")

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainingConfig:
        """Raise ConfigError listing every invalid field; return self when valid."""
        errors = _type_errors(self)
        if not errors:
            errors = _range_errors(self)
        if errors:
            raise ConfigError(errors)
        return self

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build and validate from a dict; unknown keys are errors with suggestions."""
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a mapping, got {type(data).__name__}")
        names = field_names()
        unknown = [k for k in data if k not in names]
        if unknown:  # report the known fields' problems too: every error at once
            errors = [_unknown_field_message(k, names) for k in unknown]
            try:
                cls(**{k: v for k, v in data.items() if k in names}).validate()
            except ConfigError as exc:
                errors.extend(exc.errors)
            raise ConfigError(errors)
        return cls(**data).validate()

    def replace(self, **changes: Any) -> TrainingConfig:
        """A validated copy with ``changes`` applied (unknown names are errors)."""
        names = field_names()
        unknown = [k for k in changes if k not in names]
        if unknown:
            raise ConfigError([_unknown_field_message(k, names) for k in unknown])
        return dataclasses.replace(self, **changes).validate()

    def save(self, path: str | Path | None = None) -> Path:
        """Write the config as JSON, or YAML when the suffix is .yaml/.yml; return the path.

        With no ``path`` the file goes next to the run's checkpoints:
        ``<checkpoint_dir>/training_config_<YYYYmmdd-HHMMSS>.json``, or in the current
        directory when ``checkpoint_dir`` is not set. The write is atomic (a complete
        file or none).
        """
        if path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(self.checkpoint_dir or ".") / f"training_config_{stamp}.json"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if path.suffix.lower() in (".yaml", ".yml"):
            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        _write_atomic(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        """Read a config saved by :meth:`save` (JSON or YAML)."""
        return cls.from_dict(read_mapping(path))

    # ------------------------------------------------------------------ helpers
    def model_spec(self) -> dict[str, Any]:
        """The architecture dict for ``kiln.models.build_model`` (flat seed fields merged)."""
        spec = dict(self.model)
        if self.model_name and "name" not in spec and "layers" not in spec:
            spec["name"] = self.model_name
        for key in ("vocab_size", "max_seq_len", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, key)
            if value is not None and spec.get("name") == "tiny_transformer":
                spec.setdefault(key, value)
        return spec


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it over."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainingConfig)}


def fields_in_group(group: str) -> list[str]:
    return [f.name for f in dataclasses.fields(TrainingConfig) if f.metadata["group"] == group]


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML file holding one mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: "
            f"{_parse_error(exc)}"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of field: value, got {type(data).__name__}"
        )
    return data


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2; PyYAML's 1.1 needs ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely, reading scientific notation such as ``1e-3`` as a number."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def _parse_error(exc: Exception) -> str:
    """A one-line description of a JSON/YAML parse error (YAML's own spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.YAMLError) and mark is not None:
        problem = getattr(exc, "problem", None) or "syntax error"
        context = getattr(exc, "context", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{problem} ({context}) at {where}" if context else f"{problem} at {where}"
    return " ".join(str(exc).split())


def _unknown_field_message(key: str, names: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(names), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{key!r} is not a TrainingConfig field.{hint} Known fields: {', '.join(sorted(names))}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What each annotated type accepts, and how an error says so. The checks are derived
# from the dataclass annotations, so a new field is checked without another list.
_TYPE_CHECKS: dict[str, tuple[Any, str]] = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "a mapping"),
    "list[str]": (
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
        "a list of strings",
    ),
}


def _field_check(annotation: str) -> tuple[Any, str]:
    """``(accepts(value), "what is allowed")`` for a field's annotation (a string here)."""
    base, optional = annotation, annotation.endswith(" | None")
    if optional:
        base = annotation[: -len(" | None")]
    accepts, allowed = _TYPE_CHECKS[base]
    if optional:
        return (lambda v: v is None or accepts(v)), f"{allowed} or null"
    return accepts, allowed


def _type_errors(c: TrainingConfig) -> list[str]:
    errors = []
    for f in dataclasses.fields(c):
        accepts, allowed = _field_check(str(f.type))
        value = getattr(c, f.name)
        if not accepts(value):
            errors.append(f"{f.name}={value!r} must be {allowed}")
    return errors


def _range_errors(c: TrainingConfig) -> list[str]:
    errors = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    need(c.learning_rate > 0, f"learning_rate={c.learning_rate!r} must be > 0")
    need(c.batch_size >= 1, f"batch_size={c.batch_size!r} must be >= 1")
    need(c.epochs >= 1, f"epochs={c.epochs!r} must be >= 1")
    need(
        c.max_steps is None or c.max_steps >= 1,
        f"max_steps={c.max_steps!r} must be >= 1 or null (null: every epoch's steps)",
    )
    need(0 <= c.warmup_ratio < 1, f"warmup_ratio={c.warmup_ratio!r} must be in [0, 1)")
    need(0 <= c.validation_split < 1, f"validation_split={c.validation_split!r} must be in [0, 1)")
    if c.test_split is not None:
        need(0 <= c.test_split < 1, f"test_split={c.test_split!r} must be in [0, 1) or null")
        need(
            c.test_split + c.validation_split < 1,
            f"test_split={c.test_split!r} + validation_split={c.validation_split!r} must stay "
            "below 1 (rows are left for training)",
        )
    need(c.weight_decay >= 0, f"weight_decay={c.weight_decay!r} must be >= 0")
    need(0 <= c.momentum < 1, f"momentum={c.momentum!r} must be in [0, 1)")
    need(
        c.max_grad_norm is None or c.max_grad_norm > 0,
        f"max_grad_norm={c.max_grad_norm!r} must be > 0, or null to disable clipping",
    )
    need(
        c.gradient_accumulation_steps >= 1,
        f"gradient_accumulation_steps={c.gradient_accumulation_steps!r} must be >= 1",
    )
    need(
        c.early_stopping_patience is None or c.early_stopping_patience >= 1,
        f"early_stopping_patience={c.early_stopping_patience!r} must be >= 1, or null to disable",
    )
    need(
        c.early_stopping_min_delta >= 0,
        f"early_stopping_min_delta={c.early_stopping_min_delta!r} must be >= 0",
    )
    need(
        c.optimizer in OPTIMIZERS,
        f"optimizer={c.optimizer!r} is not one of {', '.join(OPTIMIZERS)}",
    )
    need(
        c.lr_scheduler in LR_SCHEDULERS,
        f"lr_scheduler={c.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}",
    )
    need(
        c.amp_dtype in AMP_DTYPES,
        f"amp_dtype={c.amp_dtype!r} is not one of {', '.join(AMP_DTYPES)}",
    )
    need(
        c.compile_mode in COMPILE_MODES,
        f"compile_mode={c.compile_mode!r} is not one of null, default, reduce-overhead, max-autotune",
    )
    need(c.num_workers >= 0, f"num_workers={c.num_workers!r} must be >= 0 (0 runs in-process)")
    need(
        c.cpus_per_worker is None or c.cpus_per_worker > 0,
        f"cpus_per_worker={c.cpus_per_worker!r} must be > 0",
    )
    need(
        c.strategy in STRATEGIES,
        f"strategy={c.strategy!r} is not one of {', '.join(STRATEGIES)}",
    )
    need(
        c.strategy != "fsdp" or c.num_workers >= 1,
        f"strategy='fsdp' shards the model over Ray Train worker actors and needs "
        f"num_workers >= 1 (2 or more to save memory); got num_workers={c.num_workers!r} "
        "(in-process); set num_workers, or strategy='ddp'",
    )
    need(c.max_failures >= -1, f"max_failures={c.max_failures!r} must be >= 0, or -1 for unlimited")
    need(c.log_every_n_steps >= 0, f"log_every_n_steps={c.log_every_n_steps!r} must be >= 0")
    need(
        c.gradient_check_interval >= 0,
        f"gradient_check_interval={c.gradient_check_interval!r} must be >= 0 (0: off)",
    )
    need(
        c.report_interval_s is None or c.report_interval_s >= 0,
        f"report_interval_s={c.report_interval_s!r} must be >= 0 seconds, or null for the Ray "
        "Train controller's poll interval",
    )
    need(c.save_every_n_epochs >= 1, f"save_every_n_epochs={c.save_every_n_epochs!r} must be >= 1")
    for name in ("save_every_n_steps", "eval_every_n_steps"):
        value = getattr(c, name)
        need(
            value is None or value >= 1, f"{name}={value!r} must be >= 1, or null (epoch ends only)"
        )
    need(c.keep_best_k >= 0, f"keep_best_k={c.keep_best_k!r} must be >= 0")
    need(
        c.keep_last_n >= 1,
        f"keep_last_n={c.keep_last_n!r} must be >= 1 (the latest checkpoint is always kept)",
    )
    need(c.mode in MODES, f"mode={c.mode!r} must be 'min' or 'max'")
    need(
        c.on_checkpoint_error in ("raise", "warn"),
        f"on_checkpoint_error={c.on_checkpoint_error!r} must be 'raise' (stop the run) or "
        "'warn' (log it and keep training without that checkpoint)",
    )
    need(
        c.data_backend in DATA_BACKENDS,
        f"data_backend={c.data_backend!r} is not one of {', '.join(DATA_BACKENDS)}",
    )
    need(bool(c.monitor), f"monitor={c.monitor!r} must name a metric such as 'val_loss'")
    bad_formats = [f for f in c.export_formats if f not in EXPORT_FORMATS]
    need(
        not bad_formats,
        f"export_formats={list(c.export_formats)!r} has unknown formats {bad_formats!r}; "
        f"allowed: {', '.join(EXPORT_FORMATS)}",
    )
    for f in dataclasses.fields(c):  # the architecture's sizes
        if f.metadata["group"] == "model" and str(f.type) == "int | None":
            v = getattr(c, f.name)
            need(v is None or v >= 1, f"{f.name}={v!r} must be >= 1")
    if c.wandb_project:
        need(
            importlib.util.find_spec("wandb") is not None,
            f"wandb_project={c.wandb_project!r} needs the `wandb` package, which is not "
            "installed; `pip install wandb` or set wandb_project to null",
        )
    if c.strategy == "fsdp" and c.use_amp and c.use_gpu and c.amp_dtype != "bf16":
        errors.append(
            f"strategy='fsdp' with use_amp on CUDA needs amp_dtype='bf16'; got "
            f"amp_dtype={c.amp_dtype!r} (fp16's GradScaler does not agree on skipped steps "
            "across shards)"
        )
    if c.strategy == "fsdp" and c.save_every_n_steps is not None:
        errors.append(
            f"save_every_n_steps={c.save_every_n_steps!r} is not available with "
            "strategy='fsdp' yet (sharded checkpoints are taken at epoch ends); use "
            "save_every_n_epochs, or strategy='ddp'"
        )
    bad_trackers = [t for t in c.report_to if t not in REPORT_TO]
    need(
        not bad_trackers,
        f"report_to={list(c.report_to)!r} has unknown trackers {bad_trackers!r}; allowed: "
        f"{', '.join(REPORT_TO)} (W&B: set wandb_project)",
    )
    if "mlflow" in c.report_to:
        need(
            importlib.util.find_spec("mlflow") is not None,
            f"report_to={list(c.report_to)!r} needs the `mlflow` package, which is not "
            "installed; `pip install 'kiln[mlflow]'` (or `pip install mlflow-skinny`), or "
            "remove 'mlflow' from report_to",
        )
    if not c.use_gpu and c.use_amp and c.amp_dtype == "fp16":
        errors.append("amp_dtype='fp16' needs use_gpu=true; on CPU use 'bf16' or 'auto'")
    return errors
