"""Data profiles: how a row of a training file becomes something to tokenize.

A profile checks a row (``problems(example)``: one message per bad field) and
transforms it (``transform_example(example, idx, system_prompt)``) into one of
three shapes the tokenizer understands:

    {"messages": [{"role": ..., "content": ...}, ...]}   chat-templated; loss on the
                                                          assistant turns only
    {"prompt": str, "completion": str}                    loss on the completion only
    {"text": str}                                         loss on every token

Built in: ``chat`` (a ``messages`` list), ``instruction`` (Alpaca: instruction,
input, output), ``completion`` (prompt, completion) and ``text``. Names from a
config are looked up with :func:`get_profile`; :func:`register_profile` adds one.
:func:`read_rows` reads JSONL/JSON/parquet files and ``datasets`` folders with each
row's line number, and :func:`prepare_examples` reports bad rows by line and field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kiln.errors import ConfigError, DatasetError, NotFoundError

__all__ = [
    "DataProfile",
    "ChatProfile",
    "InstructionProfile",
    "CompletionProfile",
    "TextProfile",
    "get_profile",
    "register_profile",
    "profile_names",
    "read_rows",
    "prepare_examples",
    "PreparedExamples",
]

ROLES = ("system", "user", "assistant")


class DataProfile(Protocol):
    """What a profile provides."""

    name: str

    def problems(self, example: Any) -> list[str]:
        """One message per field that does not fit (empty when the row is usable)."""

    def transform_example(self, example: dict[str, Any], idx: int, system_prompt: str) -> dict:
        """The row as ``{"messages": ...}``, ``{"prompt", "completion"}`` or ``{"text"}``."""


def _text_problem(example: dict[str, Any], key: str, required: bool = True) -> str | None:
    if key not in example or example[key] is None:
        return f"field {key!r} is missing" if required else None
    value = example[key]
    if not isinstance(value, str):
        return f"field {key!r} must be a string, got {type(value).__name__}"
    if required and not value.strip():
        return f"field {key!r} is empty"
    return None


def _not_a_mapping(example: Any) -> list[str]:
    return (
        [] if isinstance(example, dict) else [f"row is a {type(example).__name__}, not an object"]
    )


def _with_system(messages: list[dict[str, str]], system_prompt: str) -> list[dict[str, str]]:
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


@dataclass(frozen=True)
class ChatProfile:
    """``{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}``."""

    name: str = "chat"
    messages_key: str = "messages"

    def problems(self, example: Any) -> list[str]:
        bad = _not_a_mapping(example)
        if bad:
            return bad
        messages = example.get(self.messages_key)
        if not isinstance(messages, list) or not messages:
            return [f"field {self.messages_key!r} must be a non-empty list of messages"]
        out = []
        for i, m in enumerate(messages):
            where = f"{self.messages_key}[{i}]"
            if not isinstance(m, dict):
                out.append(f"{where} must be an object with 'role' and 'content'")
                continue
            if m.get("role") not in ROLES:
                out.append(f"{where}.role={m.get('role')!r} is not one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                out.append(
                    f"{where}.content must be a string, got {type(m.get('content')).__name__}"
                )
        if not out and not any(m["role"] == "assistant" for m in messages):
            out.append(f"field {self.messages_key!r} has no 'assistant' message to learn from")
        return out

    def transform_example(self, example: dict[str, Any], idx: int, system_prompt: str) -> dict:
        messages = [
            {"role": m["role"], "content": m["content"]} for m in example[self.messages_key]
        ]
        return {"messages": _with_system(messages, system_prompt)}


@dataclass(frozen=True)
class InstructionProfile:
    """Alpaca rows: ``instruction``, optional ``input``, ``output``."""

    name: str = "instruction"

    def problems(self, example: Any) -> list[str]:
        bad = _not_a_mapping(example)
        if bad:
            return bad
        found = [
            _text_problem(example, "instruction"),
            _text_problem(example, "input", required=False),
            _text_problem(example, "output"),
        ]
        return [p for p in found if p]

    def transform_example(self, example: dict[str, Any], idx: int, system_prompt: str) -> dict:
        prompt = example["instruction"]
        if example.get("input"):
            prompt = f"{prompt}\n\n{example['input']}"
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": example["output"]},
        ]
        return {"messages": _with_system(messages, system_prompt)}


@dataclass(frozen=True)
class CompletionProfile:
    """``prompt`` + ``completion``, no chat template; the loss covers the completion."""

    name: str = "completion"

    def problems(self, example: Any) -> list[str]:
        bad = _not_a_mapping(example)
        if bad:
            return bad
        found = [_text_problem(example, "prompt"), _text_problem(example, "completion")]
        return [p for p in found if p]

    def transform_example(self, example: dict[str, Any], idx: int, system_prompt: str) -> dict:
        prompt = f"{system_prompt}\n\n{example['prompt']}" if system_prompt else example["prompt"]
        return {"prompt": prompt, "completion": example["completion"]}


@dataclass(frozen=True)
class TextProfile:
    """Plain text in ``text_key``; the loss covers every token."""

    name: str = "text"
    text_key: str = "text"

    def problems(self, example: Any) -> list[str]:
        bad = _not_a_mapping(example)
        if bad:
            return bad
        found = _text_problem(example, self.text_key)
        return [found] if found else []

    def transform_example(self, example: dict[str, Any], idx: int, system_prompt: str) -> dict:
        return {"text": example[self.text_key]}


_PROFILES: dict[str, Any] = {
    "chat": ChatProfile(),
    "instruction": InstructionProfile(),
    "completion": CompletionProfile(),
    "text": TextProfile(),
}


def profile_names() -> list[str]:
    """Registered profile names, sorted."""
    return sorted(_PROFILES)


def get_profile(name: str, **options: Any) -> Any:
    """The profile registered as ``name``; ``options`` replace its fields (``messages_key``)."""
    try:
        profile = _PROFILES[name]
    except KeyError:
        raise NotFoundError(
            f"unknown profile {name!r}; known: {', '.join(profile_names())}"
        ) from None
    if not options:
        return profile
    if not dataclasses.is_dataclass(profile):
        raise ConfigError(f"profile.options={options!r}: profile {name!r} takes no options")
    allowed = sorted(f.name for f in dataclasses.fields(profile) if f.name != "name")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"profile.options has unknown keys {unknown!r} for profile {name!r}; allowed: "
            f"{', '.join(allowed) or 'none'}"
        )
    return dataclasses.replace(profile, **options)  # type: ignore[type-var]  # profiles are dataclass instances


def register_profile(name: str, profile: Any, *, overwrite: bool = False) -> None:
    """Add a profile (an object with ``problems`` and ``transform_example``)."""
    for method in ("problems", "transform_example"):
        if not callable(getattr(profile, method, None)):
            raise TypeError(f"profile {name!r} must have a {method}() method; got {profile!r}")
    if name in _PROFILES and not overwrite:
        raise ValueError(f"profile {name!r} already registered; pass overwrite=True to replace it")
    _PROFILES[name] = profile


# ---------------------------------------------------------------------- reading
def read_rows(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, row)`` pairs of a JSONL/JSON/parquet file or a ``datasets`` folder.

    A JSONL line that is not JSON is returned as a ``_BadLine`` row so that it is
    reported with the others. JSON arrays, parquet files and folders number rows from 1.
    """
    path = Path(path)
    if path.is_dir():
        return _read_datasets_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        return [(i + 1, row) for i, row in enumerate(frame.to_dict(orient="records"))]
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DatasetError(
                f"data.dataset_path={str(path)!r} is not valid JSON: {exc}"
            ) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DatasetError(
                f"data.dataset_path={str(path)!r} must hold a JSON array of rows (or use JSONL)"
            )
        return [(i + 1, row) for i, row in enumerate(data)]
    rows: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except ValueError as exc:
            rows.append((number, _BadLine(str(exc))))
    return rows


@dataclass(frozen=True)
class _BadLine:
    error: str


def _read_datasets_folder(path: Path) -> list[tuple[int, Any]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several kinds
        raise DatasetError(
            f"data.dataset_path={str(path)!r} is a folder but not a datasets save_to_disk "
            f"folder: {exc}"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DatasetError(
                f"data.dataset_path={str(path)!r} has splits {sorted(data)} but no 'train'"
            )
        data = data["train"]
    return [(i + 1, row) for i, row in enumerate(data)]


@dataclass
class PreparedExamples:
    """Rows a profile accepted (transformed), and the rejected ones' descriptions."""

    examples: list[dict[str, Any]]
    invalid: list[str]
    total_rows: int


def prepare_examples(
    rows: list[tuple[int, Any]],
    profile: Any,
    system_prompt: str = "",
    *,
    skip_invalid: bool = False,
    source: str = "dataset",
) -> PreparedExamples:
    """Check and transform every row.

    Raises:
        DatasetError: a row does not fit the profile and ``skip_invalid`` is false
            (every bad row is listed by line and field, up to 20), or no row fits.
    """
    examples, invalid = [], []
    for idx, (line, row) in enumerate(rows):
        problems = (
            [f"not valid JSON ({row.error})"]
            if isinstance(row, _BadLine)
            else profile.problems(row)
        )
        if problems:
            invalid.append(f"line {line}: " + "; ".join(problems))
            continue
        examples.append(profile.transform_example(row, idx, system_prompt))
    name = getattr(profile, "name", type(profile).__name__)
    if invalid and not skip_invalid:
        shown = invalid[:20] + ([f"... and {len(invalid) - 20} more"] if len(invalid) > 20 else [])
        raise DatasetError(
            f"{source}: {len(invalid)} of {len(rows)} rows do not fit profile {name!r} "
            "(set data.skip_invalid: true to skip them):\n" + "\n".join(f"  {s}" for s in shown)
        )
    if not examples:
        detail = f"; first problem: {invalid[0]}" if invalid else ""
        raise DatasetError(
            f"{source}: no valid rows for profile {name!r} in {len(rows)} rows{detail}"
        )
    return PreparedExamples(examples, invalid, len(rows))
