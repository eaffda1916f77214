"""TrainerConfig: one causal-LM fine-tuning job, in sections, validated in one place.

YAML/JSON is mapped onto the dataclasses once (``ConfigLoader.load`` /
``ConfigLoader.from_dict``); ``ConfigLoader.validate_locked_config`` then collects
every problem, including the ones that need the disk but no model load (paths
exist, fp16 or 4-bit without CUDA, ``max_context_length`` above what the model's
``config.json`` allows), and raises one :class:`~kiln.errors.ConfigError`.

    model:        {model_path: models/Qwen2.5-0.5B-Instruct, lora: {r: 8, alpha: 16}}
    data:         {dataset_path: data/chat.jsonl}
    profile:      {name: chat}
    hyperparams:  {batch_size: 4, learning_rate: 2.0e-4, num_epochs: 1}
    output:       {output_dir: outputs/qwen-chat}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

__all__ = [
    "TrainerConfig",
    "ModelSection",
    "LoraSection",
    "DataSection",
    "ProfileSection",
    "HyperparamSection",
    "MonitoringSection",
    "OutputSection",
    "EnvironmentSection",
    "ConfigLoader",
    "create_default_config",
    "is_llm_mapping",
    "FP_PRECISIONS",
]

FP_PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULERS = ("constant", "linear", "cosine")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class LoraSection:
    """LoRA adapter settings (peft). ``target_modules=None`` picks the attention projections."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None


@dataclass
class ModelSection:
    """Which model to fine-tune and how to load it.

    ``base_model``, ``model_architecture`` and ``vocab_size`` are checked against the
    folder's ``config.json`` when given; ``max_context_length`` caps every sequence.
    """

    model_path: str = ""
    base_model: str | None = None
    model_architecture: str | None = None
    max_context_length: int = 512
    vocab_size: int | None = None
    load_in_4bit: bool = False
    lora: LoraSection | None = None
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    """The training file: JSONL/JSON/parquet, or a ``datasets`` ``save_to_disk`` folder."""

    dataset_path: str = ""
    skip_invalid: bool = False
    packing: bool = False
    max_samples: int | None = None


@dataclass
class ProfileSection:
    """How rows become conversations: ``chat``, ``instruction``, ``completion``, ``text``."""

    name: str = "chat"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class HyperparamSection:
    """Optimisation. ``max_steps`` (batches) stops early; ``fp_precision`` sets autocast.

    ``save_steps``: a checkpoint every N optimizer steps, inside epochs too (a resume
    continues at the exact next batch); the end of the run is always saved.
    ``eval_steps``: validation loss and perplexity every N optimizer steps (with a
    validation split), besides the validation at each epoch end.
    """

    batch_size: int = 4
    gradient_accumulation: int = 1
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    num_epochs: int = 1
    max_steps: int | None = None
    save_steps: int = 500
    eval_steps: int | None = None
    fp_precision: str = "fp32"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "cosine"


@dataclass
class MonitoringSection:
    """Validation hold-out and the system prompt (``{date}`` becomes today's date)."""

    validation_split: float = 0.0
    validation_max_samples: int = 200
    system_prompt_base: str = ""


@dataclass
class OutputSection:
    """Where the fine-tuned model goes, and what else to do with it."""

    output_dir: str = ""
    merge: bool = False
    register_as: str | None = None
    run_name: str | None = None


@dataclass
class EnvironmentSection:
    """Run settings: logging cadence, Ray workers, GPU, seed, status file."""

    logging_steps: int = 10
    report_to: str = "none"
    num_workers: int = 0
    use_gpu: bool = False
    seed: int = 42
    status_file: str | None = None
    tracking: bool = True


_SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "profile": ProfileSection,
    "hyperparams": HyperparamSection,
    "monitoring": MonitoringSection,
    "output": OutputSection,
    "environment": EnvironmentSection,
}


@dataclass
class TrainerConfig:
    """Every setting of one fine-tuning job, one dataclass per section."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    hyperparams: HyperparamSection = field(default_factory=HyperparamSection)
    monitoring: MonitoringSection = field(default_factory=MonitoringSection)
    output: OutputSection = field(default_factory=OutputSection)
    environment: EnvironmentSection = field(default_factory=EnvironmentSection)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, section by section."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def with_overrides(self, overrides: dict[str, Any]) -> TrainerConfig:
        """A copy with dotted keys replaced (``{"hyperparams.learning_rate": 1e-3}``)."""
        data = self.to_dict()
        for key, value in overrides.items():
            parts = key.split(".")
            if len(parts) < 2 or parts[0] not in _SECTIONS:
                raise ConfigError(
                    f"override {key!r}: use section.field, with a section among "
                    f"{', '.join(_SECTIONS)}"
                )
            target = data
            for part in parts[:-1]:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            target[parts[-1]] = value
        return ConfigLoader.from_dict(data)


def create_default_config(
    model_path: str, dataset_path: str, output_dir: str, **overrides: Any
) -> TrainerConfig:
    """A config with defaults; ``overrides`` are field names of any section.

    ``create_default_config(..., max_context_length=256, num_epochs=3, lora={"r": 8})``
    sets ``model.max_context_length``, ``hyperparams.num_epochs`` and ``model.lora``.
    A name that exists in no section is an error listing the close ones.
    """
    owners = {f.name: name for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    data: dict[str, dict[str, Any]] = {
        "model": {"model_path": model_path},
        "data": {"dataset_path": dataset_path},
        "output": {"output_dir": output_dir},
    }
    errors = []
    for key, value in overrides.items():
        if key in _SECTIONS and isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        elif key in owners:
            data.setdefault(owners[key], {})[key] = value
        else:
            close = difflib.get_close_matches(key, sorted(owners), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            errors.append(f"create_default_config: {key!r} is not a config field{hint}")
    if errors:
        raise ConfigError(errors)
    return ConfigLoader.from_dict(data)


_LLM_ONLY_SECTIONS = ("hyperparams", "profile", "monitoring", "output", "environment")


def is_llm_mapping(data: Any) -> bool:
    """True for a config mapping of a fine-tuning job (not a ``kiln train`` run file).

    A run file has no sections named like these, and its ``model`` (architecture
    parameters) has no ``model_path``.
    """
    if not isinstance(data, dict):
        return False
    model = data.get("model")
    return (isinstance(model, dict) and "model_path" in model) or any(
        key in data for key in _LLM_ONLY_SECTIONS
    )


class ConfigLoader:
    """Reads, builds and validates :class:`TrainerConfig` objects."""

    @staticmethod
    def load(path: str | Path) -> TrainerConfig:
        """Read a YAML or JSON file (types and ranges checked; paths not yet)."""
        from kiln.config.training import read_mapping

        return ConfigLoader.from_dict(read_mapping(path))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TrainerConfig:
        """Build from nested dicts; every unknown key and bad value is reported at once."""
        if not isinstance(data, dict):
            raise ConfigError(f"an LLM config must be a mapping, got {type(data).__name__}")
        errors: list[str] = []
        for key in data:
            if key not in _SECTIONS:
                errors.append(_unknown(key, list(_SECTIONS), "section"))
        sections = {}
        for name, cls in _SECTIONS.items():
            raw = data.get(name) or {}
            if not isinstance(raw, dict):
                errors.append(f"{name}={raw!r} must be a mapping of {cls.__name__} fields")
                raw = {}
            sections[name] = _build(cls, name, dict(raw), errors)
        config = TrainerConfig(**sections)
        errors.extend(_field_errors(config))
        if errors:
            raise ConfigError(errors)
        return config

    @staticmethod
    def validate_locked_config(config: TrainerConfig, *, check_paths: bool = True) -> TrainerConfig:
        """Every check that needs no model load; raise one ConfigError listing all problems."""
        errors = _field_errors(config)
        if check_paths:
            errors.extend(_environment_errors(config))
        if errors:
            raise ConfigError(errors)
        return config

    @staticmethod
    def from_args_and_json(args: Any) -> TrainerConfig:
        """A config from command-line arguments (an ``argparse.Namespace``): the YAML/JSON
        file named by ``args.config`` (if any), then the flags that are set on top.

        ``--dataset``, ``--model`` and ``--output`` set ``data.dataset_path``,
        ``model.model_path`` and ``output.output_dir``; a flag named like a field of any
        section (``--learning_rate``, ``--num_epochs``) sets that field. Other attributes
        (the parser's own, such as ``func``) are not config and are left alone.
        """
        values = {k: v for k, v in vars(args).items() if v is not None}
        path = values.pop("config", None)
        data = ConfigLoader.load(path).to_dict() if path else {}
        owners = {f.name: n for n, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
        flags = {"dataset": ("data", "dataset_path"), "model": ("model", "model_path")}
        flags["output"] = ("output", "output_dir")
        for key, value in values.items():
            section, name = flags.get(key) or (owners.get(key), key)
            if section is not None:
                data.setdefault(section, {})[name] = value
        return ConfigLoader.from_dict(data)


# ---------------------------------------------------------------------- building
def _unknown(key: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"{key!r} is not a {what}.{hint} Known: {', '.join(known)}"


def _build(cls: type, prefix: str, raw: dict[str, Any], errors: list[str]) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in [k for k in raw if k not in names]:
        errors.append(_unknown(f"{prefix}.{key}", [f"{prefix}.{n}" for n in names], "field"))
        raw.pop(key)
    if cls is ModelSection and isinstance(raw.get("lora"), dict):
        raw["lora"] = _build(LoraSection, "model.lora", dict(raw["lora"]), errors)
    elif cls is ModelSection and raw.get("lora") not in (None, False):
        errors.append(
            f"model.lora={raw['lora']!r} must be a mapping (r, alpha, dropout, "
            "target_modules) or null for a full fine-tune"
        )
        raw["lora"] = None
    elif cls is ModelSection and raw.get("lora") is False:
        raw["lora"] = None
    return cls(**raw)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checks:
    """Collects one message per invalid field (field=value, and what is allowed)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.errors.append(message)

    def integer(self, name: str, value: Any, low: int, optional: bool = False) -> None:
        if value is None and optional:
            return
        self.need(
            _is_int(value) and value >= low,
            f"{name}={value!r} must be an integer >= {low}" + (" or null" if optional else ""),
        )

    def number(self, name: str, value: Any, low: float, high: float | None = None) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and value >= low and (high is None or value < high)
        upper = f" and < {high}" if high is not None else ""
        self.need(ok, f"{name}={value!r} must be a number >= {low}{upper}")

    def text(self, name: str, value: Any, optional: bool = False) -> None:
        if value is None and optional:
            return
        self.need(
            isinstance(value, str) and bool(value), f"{name}={value!r} must be a non-empty string"
        )

    def flag(self, name: str, value: Any) -> None:
        self.need(isinstance(value, bool), f"{name}={value!r} must be true or false")

    def one_of(self, name: str, value: Any, allowed: tuple[str, ...]) -> None:
        self.need(value in allowed, f"{name}={value!r} is not one of {', '.join(allowed)}")


def _field_errors(c: TrainerConfig) -> list[str]:
    checks = _Checks()
    for section in (_model_checks, _data_checks, _hyperparam_checks, _run_checks):
        section(c, checks)
    return checks.errors


def _model_checks(c: TrainerConfig, k: _Checks) -> None:
    m = c.model
    k.text("model.model_path", m.model_path)
    k.integer("model.max_context_length", m.max_context_length, 8)
    k.integer("model.vocab_size", m.vocab_size, 1, optional=True)
    k.flag("model.load_in_4bit", m.load_in_4bit)
    k.flag("model.gradient_checkpointing", m.gradient_checkpointing)
    if m.lora is not None:
        k.integer("model.lora.r", m.lora.r, 1)
        k.integer("model.lora.alpha", m.lora.alpha, 1)
        k.number("model.lora.dropout", m.lora.dropout, 0.0, 1.0)
        tm = m.lora.target_modules
        k.need(
            tm is None
            or (isinstance(tm, list) and bool(tm) and all(isinstance(t, str) for t in tm)),
            f"model.lora.target_modules={tm!r} must be a list of module names "
            "(e.g. ['q_proj', 'v_proj']) or null for the attention projections",
        )
    k.need(
        not (m.load_in_4bit and m.lora is None),
        "model.load_in_4bit=true needs model.lora (4-bit weights cannot be fine-tuned fully); "
        "set model.lora or load_in_4bit: false",
    )


def _data_checks(c: TrainerConfig, k: _Checks) -> None:
    d = c.data
    k.text("data.dataset_path", d.dataset_path)
    k.flag("data.skip_invalid", d.skip_invalid)
    k.flag("data.packing", d.packing)
    k.integer("data.max_samples", d.max_samples, 1, optional=True)
    k.text("profile.name", c.profile.name)
    k.need(
        isinstance(c.profile.options, dict),
        f"profile.options={c.profile.options!r} must be a mapping",
    )
    if isinstance(c.profile.name, str) and c.profile.name:
        from kiln.llm.profiles import profile_names

        k.need(
            c.profile.name in profile_names(),
            f"profile.name={c.profile.name!r} is not a registered profile; known: "
            f"{', '.join(profile_names())}",
        )
    mon = c.monitoring
    k.number("monitoring.validation_split", mon.validation_split, 0.0, 1.0)
    k.integer("monitoring.validation_max_samples", mon.validation_max_samples, 1)
    k.need(
        isinstance(mon.system_prompt_base, str),
        f"monitoring.system_prompt_base={mon.system_prompt_base!r} must be a string",
    )


def _hyperparam_checks(c: TrainerConfig, k: _Checks) -> None:
    h = c.hyperparams
    k.integer("hyperparams.batch_size", h.batch_size, 1)
    k.integer("hyperparams.gradient_accumulation", h.gradient_accumulation, 1)
    k.number("hyperparams.learning_rate", h.learning_rate, 0.0)
    k.need(h.learning_rate != 0, "hyperparams.learning_rate=0 must be > 0")
    k.integer("hyperparams.warmup_steps", h.warmup_steps, 0)
    k.integer("hyperparams.num_epochs", h.num_epochs, 1)
    k.integer("hyperparams.max_steps", h.max_steps, 1, optional=True)
    k.integer("hyperparams.eval_steps", h.eval_steps, 1, optional=True)
    k.integer("hyperparams.save_steps", h.save_steps, 1)
    k.one_of("hyperparams.fp_precision", h.fp_precision, FP_PRECISIONS)
    k.number("hyperparams.weight_decay", h.weight_decay, 0.0)
    if h.max_grad_norm is not None:
        k.number("hyperparams.max_grad_norm", h.max_grad_norm, 1e-12)
    k.one_of("hyperparams.lr_scheduler", h.lr_scheduler, LR_SCHEDULERS)


def _run_checks(c: TrainerConfig, k: _Checks) -> None:
    o, e = c.output, c.environment
    k.text("output.output_dir", o.output_dir)
    k.flag("output.merge", o.merge)
    k.text("output.register_as", o.register_as, optional=True)
    k.text("output.run_name", o.run_name, optional=True)
    k.integer("environment.logging_steps", e.logging_steps, 0)
    k.integer("environment.num_workers", e.num_workers, 0)
    k.integer("environment.seed", e.seed, 0)
    k.flag("environment.use_gpu", e.use_gpu)
    k.flag("environment.tracking", e.tracking)
    k.need(
        e.report_to in ("none", "kiln"),
        f"environment.report_to={e.report_to!r} is not supported; use 'none' (kiln records "
        "every run in its own database) or 'kiln'",
    )
    k.text("environment.status_file", e.status_file, optional=True)


# ---------------------------------------------------------------------- environment
def _environment_errors(c: TrainerConfig) -> list[str]:
    """Checks against the disk and the machine: no model is loaded."""
    import torch

    errors: list[str] = []
    model_dir = Path(c.model.model_path)
    model_config = None
    if not model_dir.is_dir():
        errors.append(
            f"model.model_path={c.model.model_path!r} does not exist or is not a folder; "
            "give a local Hugging Face model folder (config.json + weights)"
        )
    elif not (model_dir / "config.json").is_file():
        errors.append(
            f"model.model_path={c.model.model_path!r} has no config.json; it must be a "
            "Hugging Face model folder (save_pretrained / a downloaded snapshot)"
        )
    else:
        try:
            model_config = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            errors.append(
                f"model.model_path={c.model.model_path!r}: config.json is unreadable: {exc}"
            )
    if model_config is not None:
        errors.extend(_model_config_errors(c, model_config))
    data = Path(c.data.dataset_path)
    if not data.exists():
        errors.append(
            f"data.dataset_path={c.data.dataset_path!r} does not exist; give a JSONL, JSON or "
            "parquet file, or a datasets save_to_disk folder"
        )
    elif data.is_file() and data.suffix.lower() not in DATA_SUFFIXES:
        errors.append(
            f"data.dataset_path={c.data.dataset_path!r} has suffix {data.suffix!r}; "
            f"allowed: {', '.join(DATA_SUFFIXES)} or a datasets folder"
        )
    cuda = torch.cuda.is_available()
    if c.hyperparams.fp_precision == "fp16" and not cuda:
        errors.append(
            "hyperparams.fp_precision='fp16' needs a CUDA GPU (fp16 training uses a "
            "GradScaler on CUDA only) and this machine has none; use 'bf16' or 'fp32'"
        )
    if c.model.load_in_4bit:
        if not cuda:
            errors.append(
                "model.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit kernels) and "
                "this machine has none; set load_in_4bit: false"
            )
        elif not _has_module("bitsandbytes"):
            errors.append(
                "model.load_in_4bit=true needs the bitsandbytes package, which is not "
                "installed; pip install 'kiln[qlora]' (bitsandbytes), or set load_in_4bit: false"
            )
    if c.environment.use_gpu and not cuda and c.environment.num_workers == 0:
        errors.append("environment.use_gpu=true, but this machine has no CUDA device; set it false")
    return errors


def _model_config_errors(c: TrainerConfig, model_config: dict[str, Any]) -> list[str]:
    errors = []
    limit = model_config.get("max_position_embeddings") or model_config.get("n_positions")
    if (
        isinstance(limit, int)
        and _is_int(c.model.max_context_length)
        and c.model.max_context_length > limit
    ):
        errors.append(
            f"model.max_context_length={c.model.max_context_length!r} is above the model's "
            f"max_position_embeddings={limit}; use at most {limit}"
        )
    vocab = model_config.get("vocab_size")
    if c.model.vocab_size is not None and vocab is not None and c.model.vocab_size != vocab:
        errors.append(
            f"model.vocab_size={c.model.vocab_size!r} does not match the model's "
            f"vocab_size={vocab}; remove it or set {vocab}"
        )
    archs = model_config.get("architectures") or []
    if c.model.model_architecture and archs and c.model.model_architecture not in archs:
        errors.append(
            f"model.model_architecture={c.model.model_architecture!r} does not match the "
            f"model folder's architectures {archs!r}"
        )
    return errors


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
