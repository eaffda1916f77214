"""Search spaces: TrainingConfig fields mapped to Ray Tune domains, checked before any trial.

A search space is a mapping of TrainingConfig field names (``model.<param>`` for
architecture parameters, ``preset`` for the config presets) to Ray Tune domains::

    {"learning_rate": tune.loguniform(1e-4, 1e-1),
     "model.hidden": tune.choice([[32], [64, 32]]),
     "preset": tune.choice(["quick_prototype", "baseline"])}

In YAML the same space reads (a bare list is a ``choice``; a plain value is fixed)::

    learning_rate: {loguniform: [1.0e-4, 1.0e-1]}
    model.hidden: {choice: [[32], [64, 32]]}
    preset: [quick_prototype, baseline]

:func:`check_space` tries every choice and both ends of every range against
``TrainingConfig.validate()`` (and against the model factory for ``model.*``), so a
space that would make a trial fail is rejected with every problem listed at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.config import PRESETS, TrainingConfig, get_preset, read_mapping
from kiln.config.modes import MetricMode
from kiln.config.training import field_names
from kiln.errors import ConfigError

#: YAML spellings of Ray Tune domains: name -> (tune function name, takes a list of args).
YAML_DOMAINS = {
    "loguniform": "loguniform",
    "uniform": "uniform",
    "quniform": "quniform",
    "qloguniform": "qloguniform",
    "randint": "randint",
    "qrandint": "qrandint",
    "lograndint": "lograndint",
    "randn": "randn",
    "choice": "choice",
    "grid": "grid_search",
}

#: Fields a search must not vary: kiln sets them per trial or per search.
NOT_SEARCHABLE = {
    "checkpoint_dir": "each trial writes its checkpoints under the search directory",
    "run_name": "trials are named by their trial id",
    "tracking": "set it on the base config; the driver records every trial",
    "tracking_db": "pass db_path to search()",
    "register_as": "pass register_as to search()",
    "monitor": "pass metric= to search(); trials rank checkpoints by it",
    "mode": "pass mode= to search()",
    "export_formats": "export the winner after the search",
}

#: Fields a preset never replaces: they describe the user's data, model and records.
KEPT_FROM_BASE = frozenset(
    {
        "dataset", "data_backend", "validation_split", "random_seed", "deterministic", "loss",
        "model", "model_name", "run_name", "notes", "tracking", "tracking_db", "register_as",
        "checkpoint_dir", "monitor", "mode", "log_every_n_steps", "report_interval_s",
        "wandb_project", "report_to", "tensorboard",
    }
)  # fmt: skip

PRESET_KEY = "preset"
MODEL_PREFIX = "model."

# Metrics every trial reports each epoch (besides <split>_loss and the task's score).
_ALWAYS_REPORTED = (
    "epoch",
    "learning_rate",
    "global_step",
    "epoch_duration_seconds",
    "training_iteration",
    "time_total_s",
    "time_this_iter_s",
)


# ---------------------------------------------------------------------- parsing
def parse_space(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a YAML/dict space into Ray Tune domains; Tune domains pass through unchanged."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"a search space must be a mapping of field: domain, got {type(raw).__name__}"
        )
    space, errors = {}, []
    for key, value in raw.items():
        try:
            space[str(key)] = _parse_domain(str(key), value)
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    return space


def load_search_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a YAML/JSON search file: the space, plus search settings under ``tune:``.

    ``tune:`` may hold any keyword of :func:`kiln.tune.search` that is a plain value
    (num_samples, scheduler, metric, mode, max_concurrent_trials, resources_per_trial,
    time_budget_s, plateau, name, register_as).
    """
    raw = dict(read_mapping(path))
    settings = raw.pop("tune", None) or {}
    allowed = (
        "num_samples",
        "scheduler",
        "metric",
        "mode",
        "max_concurrent_trials",
        "resources_per_trial",
        "time_budget_s",
        "plateau",
        "name",
        "register_as",
    )
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: tune={settings!r} must be a mapping of search settings")
    unknown = [k for k in settings if k not in allowed]
    if unknown:
        raise ConfigError(
            [
                f"{path}: tune.{k} is not a search setting; allowed: {', '.join(allowed)}"
                for k in unknown
            ]
        )
    try:
        return parse_space(raw), settings
    except ConfigError as exc:
        raise ConfigError([f"{path}: {e}" for e in exc.errors]) from None


def _parse_domain(key: str, value: Any) -> Any:
    from ray import tune

    if _is_domain(value) or _is_grid(value):
        return value
    if isinstance(value, list):
        return tune.choice(value)
    if isinstance(value, Mapping) and len(value) == 1:
        ((form, args),) = value.items()
        if form in YAML_DOMAINS:
            fn = getattr(tune, YAML_DOMAINS[form])
            if form in ("choice", "grid"):
                if not isinstance(args, list) or not args:
                    raise ConfigError(
                        f"{key}: {form} needs a non-empty list of values, got {args!r}"
                    )
                return fn(args)
            args = list(args) if isinstance(args, (list, tuple)) else [args]
            try:
                return fn(*args)
            except (TypeError, ValueError, AssertionError) as exc:
                raise ConfigError(
                    f"{key}: {{{form}: {args!r}}} is not a valid Tune domain ({exc}); "
                    f"e.g. {{loguniform: [1.0e-4, 1.0e-1]}} needs 0 < lower < upper"
                ) from None
        close = difflib.get_close_matches(str(form), list(YAML_DOMAINS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{key}: {{{form}: ...}} is not a domain.{hint} Known domains: {', '.join(YAML_DOMAINS)}"
        )
    return value  # a constant: every trial uses it


# ---------------------------------------------------------------------- trial configs
def trial_config(base: TrainingConfig, params: Mapping[str, Any]) -> TrainingConfig:
    """The validated config of one trial: preset (if any), then fields, then ``model.*``."""
    cfg = base
    preset = params.get(PRESET_KEY)
    if preset is not None:
        cfg = with_preset(base, preset)
    fields = {k: v for k, v in params.items() if k != PRESET_KEY and not k.startswith(MODEL_PREFIX)}
    model = {k[len(MODEL_PREFIX) :]: v for k, v in params.items() if k.startswith(MODEL_PREFIX)}
    if model:
        fields["model"] = {**cfg.model, **model}
    return cfg.replace(**fields) if fields else cfg.validate()


def with_preset(base: TrainingConfig, name: str) -> TrainingConfig:
    """The preset's hyperparameters, with the base's data, model and bookkeeping fields."""
    preset = get_preset(name)
    return base.replace(
        **{
            f.name: getattr(preset, f.name)
            for f in dataclasses.fields(TrainingConfig)
            if f.name not in KEPT_FROM_BASE
        }
    )


def candidate_values(domain: Any) -> list[Any] | None:
    """Values that stand for a domain in checks: every choice, or the ends of a range."""
    from ray.tune.search.sample import Categorical, Float, Integer, Normal, Quantized

    if _is_grid(domain):
        return list(domain["grid_search"])
    if isinstance(domain, Categorical):
        return list(domain.categories)
    sampler = domain.get_sampler() if isinstance(domain, (Float, Integer)) else None
    inner = sampler.get_sampler() if isinstance(sampler, Quantized) else sampler
    if isinstance(domain, Float):
        if isinstance(inner, Normal):
            return [inner.mean - 3 * inner.sd, inner.mean + 3 * inner.sd]
        top = domain.upper if isinstance(sampler, Quantized) else _below(domain.upper)
        return [domain.lower, top]
    if isinstance(domain, Integer):
        top = domain.upper if isinstance(sampler, Quantized) else domain.upper - 1
        return [int(domain.lower), int(top)]
    if _is_domain(domain):
        return None  # sample_from(fn): nothing to check before it runs
    return [domain]  # a constant


def epoch_bound(space: Mapping[str, Any], base: TrainingConfig) -> int:
    """The most epochs any trial of this space can run (ASHA's ``max_t``)."""
    bases = [base]
    if PRESET_KEY in space:
        bases = [with_preset(base, p) for p in candidate_values(space[PRESET_KEY]) or []] or bases
    values = candidate_values(space["epochs"]) if "epochs" in space else None
    if values:
        return max(int(v) for v in values)
    return max(b.epochs for b in bases)


def hardware_candidates(space: Mapping[str, Any], base: TrainingConfig) -> list[TrainingConfig]:
    """One config per combination of preset and searched hardware values (for resources)."""
    bases = [base]
    if PRESET_KEY in space:
        bases = [with_preset(base, p) for p in candidate_values(space[PRESET_KEY]) or []]
    out: list[TrainingConfig] = []
    for cfg in bases:
        combos: list[dict[str, Any]] = [{}]
        for key in ("num_workers", "use_gpu", "cpus_per_worker"):
            values = candidate_values(space[key]) if key in space else None
            if values:
                combos = [{**c, key: v} for c in combos for v in values]
        out.extend(cfg.replace(**c) if c else cfg for c in combos)
    return out


# ---------------------------------------------------------------------- checks
def check_space(
    space: Mapping[str, Any],
    base: TrainingConfig,
    *,
    model_check: Callable[[dict[str, Any]], list[str]] | None = None,
) -> list[str]:
    """Every problem with ``space`` for ``base``, one line each; empty when it is valid.

    Args:
        space: parsed space (Tune domains).
        base: the config trials start from.
        model_check: returns problems with an architecture dict (``model.*`` keys are
            checked with it when given).
    """
    if not space:
        return ["the search space is empty; give at least one field: domain"]
    names = field_names()
    errors: list[str] = []
    for key, domain in space.items():
        if key == PRESET_KEY:
            errors.extend(_check_preset(domain))
            continue
        if key.startswith(MODEL_PREFIX):
            errors.extend(_check_model_param(key, domain, base, model_check))
            continue
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            errors.append(
                f"{key!r} is not a TrainingConfig field.{hint} Search TrainingConfig fields, "
                f"'model.<param>' for architecture parameters, or 'preset'"
            )
            continue
        if key in NOT_SEARCHABLE:
            errors.append(f"{key!r} cannot be searched: {NOT_SEARCHABLE[key]}")
            continue
        errors.extend(_check_field(key, domain, base))
    return errors


def reportable_metrics(task_type: str, has_val: bool, custom: Sequence[str] = ()) -> list[str]:
    """Names every trial of this task reports each epoch (``custom``: the names of
    ``metrics=``, reported as ``<split>_<name>``)."""
    score = {"classification": "accuracy", "image_classification": "accuracy"}.get(
        task_type, "mae" if task_type == "regression" else None
    )
    out = []
    for split in ("train", "val") if has_val else ("train",):
        out.append(f"{split}_loss")
        if score:
            out.append(f"{split}_{score}")
        out += [f"{split}_{name}" for name in custom]
    return out + list(_ALWAYS_REPORTED)


def check_metric(
    metric: str, mode: str, task_type: str, has_val: bool, custom: Sequence[str] = ()
) -> list[str]:
    """Problems with the search metric/mode for this task (no trial would report it...)."""
    errors = []
    allowed = reportable_metrics(task_type, has_val, custom)
    if metric not in allowed:
        why = ""
        if metric.startswith("val_") and not has_val:
            why = " (there is no validation data: pass val_data or set validation_split > 0)"
        errors.append(
            f"metric={metric!r} is not reported by any trial of this {task_type} task{why}; "
            f"trials report: {', '.join(allowed)}"
        )
    if mode not in tuple(MetricMode):
        errors.append(f"mode={mode!r} must be 'min' or 'max'")
    return errors


def describe(domain: Any) -> str:
    """A short readable form of a domain for messages, e.g. ``loguniform(0.0001, 0.1)``."""
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

    if _is_grid(domain):
        return f"grid({list(domain['grid_search'])!r})"
    if isinstance(domain, Categorical):
        return f"choice({list(domain.categories)!r})"
    if isinstance(domain, (Float, Integer)):
        sampler = domain.get_sampler()
        inner = sampler.get_sampler() if isinstance(sampler, Quantized) else sampler
        kind = "log" if isinstance(inner, LogUniform) else ""
        kind += "uniform" if isinstance(domain, Float) else "randint"
        if isinstance(sampler, Quantized):
            kind = "q" + kind
        return f"{kind}({domain.lower!r}, {domain.upper!r})"
    return repr(domain)


def _check_preset(domain: Any) -> list[str]:
    values = candidate_values(domain)
    if not values or not (_is_grid(domain) or _is_categorical(domain) or isinstance(domain, str)):
        return [
            f"preset: {describe(domain)} must be a choice or grid of preset names "
            f"({', '.join(PRESETS)})"
        ]
    bad = [v for v in values if v not in PRESETS]
    if bad:
        return [f"preset: {bad!r} are not presets; known presets: {', '.join(PRESETS)}"]
    return []


def _check_field(key: str, domain: Any, base: TrainingConfig) -> list[str]:
    from ray.tune.search.sample import Float, Integer

    kind = _field_kind(key)
    if isinstance(domain, Float) and kind == "int":
        return [
            f"{key}: {describe(domain)} samples floats, but {key} must be an integer; "
            "use randint/qrandint/lograndint or a choice of integers"
        ]
    if isinstance(domain, (Float, Integer)) and kind not in ("int", "float"):
        return [
            f"{key}: {describe(domain)} samples numbers, but {key} is a {kind} field; "
            "use a choice or grid of allowed values"
        ]
    values = candidate_values(domain)
    if values is None:
        return []
    errors = []
    for value in values:
        try:
            trial_config(base, {key: value})
        except ConfigError as exc:
            errors.append(
                f"{key}: {describe(domain)} allows {value!r}, but {'; '.join(exc.errors)}"
            )
        except (TypeError, ValueError) as exc:
            errors.append(f"{key}: {describe(domain)} allows {value!r}, but {exc}")
    return errors


def _check_model_param(
    key: str,
    domain: Any,
    base: TrainingConfig,
    model_check: Callable[[dict[str, Any]], list[str]] | None,
) -> list[str]:
    param = key[len(MODEL_PREFIX) :]
    if not param or "." in param:
        return [f"{key!r}: use 'model.<param>' with one architecture parameter name"]
    values = candidate_values(domain)
    if model_check is None or values is None:
        return []
    errors = []
    for value in values:
        spec = {**base.model_spec(), param: value}
        problems = model_check(spec)
        if problems:
            errors.append(f"{key}: {describe(domain)} allows {value!r}, but {'; '.join(problems)}")
    return errors


def _field_kind(name: str) -> str:
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainingConfig)}
    text = types[name].replace(" ", "")
    if text in ("int", "int|None"):
        return "int"
    if text in ("float", "float|None"):
        return "float"
    if text == "bool":
        return "true/false"
    if text in ("str", "str|None"):
        return "string"
    return "structured"


def _below(x: float) -> float:
    return math.nextafter(x, -math.inf) if math.isfinite(x) else x


def _is_domain(value: Any) -> bool:
    from ray.tune.search.sample import Domain

    return isinstance(value, Domain)


def _is_categorical(value: Any) -> bool:
    from ray.tune.search.sample import Categorical

    return isinstance(value, Categorical)


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def searched_keys(space: Mapping[str, Any]) -> list[str]:
    """Keys whose value varies between trials (not constants)."""
    return [k for k, v in space.items() if _is_domain(v) or _is_grid(v)]
