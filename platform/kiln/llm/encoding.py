"""Tokenization: profile output -> ``input_ids`` + ``labels`` with the prompt masked.

* ``{"messages"}``: rendered with the tokenizer's chat template (kiln's built-in
  ChatML template when it has none, see :mod:`kiln.llm.chat`). Only the assistant
  turns count in the loss: each turn's span runs from the end of the rendered
  conversation before it (with the generation prompt) to the end of the turn, end
  marker included, so the model learns to stop. Everything else is label -100.
* ``{"prompt", "completion"}``: ``prompt + completion + eos``; the loss covers the
  completion and eos.
* ``{"text"}``: ``text + eos``; every token counts.

Sequences longer than ``max_length`` are cut (counted as truncated); one whose
labels were all cut away is dropped (counted), since it would teach nothing.
``pack`` concatenates sequences into blocks of ``max_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.data.collate import IGNORE_INDEX
from kiln.errors import DatasetError

__all__ = ["Encoded", "EncodingStats", "encode_example", "encode_examples", "pack", "TokenDataset"]


@dataclass
class Encoded:
    """One training sequence."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class EncodingStats:
    """Counts over a tokenized dataset (reported in the run's summary)."""

    sequences: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    tokens: int = 0
    label_tokens: int = 0
    packed_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "sequences": self.sequences,
            "truncated": self.truncated,
            "dropped_no_labels": self.dropped_no_labels,
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
        }
        if self.packed_from is not None:
            out["packed_from"] = self.packed_from
        return out


def _spans_for_messages(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list]:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        # A template that rewrites earlier turns (e.g. strips reasoning) breaks the prefix
        # property; fall back to locating the turn's content in the full text.
        if full.startswith(before) and full.startswith(upto):
            spans.append((len(before), len(upto)))
        else:
            start = full.find(message["content"], len(before) if full.startswith(before) else 0)
            if start >= 0:
                spans.append((start, start + len(message["content"])))
    return full, spans


def _tokenize_with_spans(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for token, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        # A token that overlaps a span counts (one may straddle the prompt's end).
        inside = end > start and any(start < e and end > s for s, e in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return ids, labels


def encode_example(example: dict[str, Any], tokenizer: Any, max_length: int) -> Encoded:
    """Tokenize one profile-transformed example (see the module docstring)."""
    eos = tokenizer.eos_token_id
    if "messages" in example:
        text, spans = _spans_for_messages(tokenizer, example["messages"])
        # A chat template writes its own special tokens (bos included) into the text.
        ids, labels = _tokenize_with_spans(tokenizer, text, spans, add_special_tokens=False)
    elif "completion" in example:
        prompt = example["prompt"]
        text = prompt + example["completion"]
        ids, labels = _tokenize_with_spans(tokenizer, text, [(len(prompt), len(text))], True)
        if eos is not None:
            ids, labels = ids + [eos], labels + [eos]
    elif "text" in example:
        ids = list(tokenizer(example["text"], add_special_tokens=True)["input_ids"])
        if eos is not None:
            ids = ids + [eos]
        labels = list(ids)
    else:
        raise DatasetError(
            f"example with keys {sorted(example)} is none of messages, prompt/completion, text"
        )
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def encode_examples(
    examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, *, packing: bool = False
) -> tuple[list[Encoded], EncodingStats]:
    """Tokenize every example; drop the ones left without label tokens; pack if asked."""
    stats = EncodingStats()
    kept = []
    for example in examples:
        encoded = encode_example(example, tokenizer, max_length)
        stats.truncated += encoded.truncated
        if encoded.num_label_tokens == 0:
            stats.dropped_no_labels += 1
            continue
        kept.append(encoded)
    if packing and kept:
        stats.packed_from = len(kept)
        kept = pack(kept, max_length)
    stats.sequences = len(kept)
    stats.tokens = sum(len(e.input_ids) for e in kept)
    stats.label_tokens = sum(e.num_label_tokens for e in kept)
    return kept, stats


def pack(sequences: Sequence[Encoded], max_length: int) -> list[Encoded]:
    """Concatenate sequences (labels kept per token) and cut into ``max_length`` blocks."""
    ids: list[int] = []
    labels: list[int] = []
    for s in sequences:
        ids.extend(s.input_ids)
        labels.extend(s.labels)
    blocks = []
    for start in range(0, len(ids), max_length):
        block = Encoded(ids[start : start + max_length], labels[start : start + max_length])
        if block.num_label_tokens:
            blocks.append(block)
    return blocks


class TokenDataset(torch.utils.data.Dataset):
    """Encoded sequences as ``{"input_ids": LongTensor, "labels": LongTensor}`` samples."""

    def __init__(self, sequences: Sequence[Encoded]) -> None:
        self.sequences = list(sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.sequences[i]
        return {
            "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
            "labels": torch.tensor(s.labels, dtype=torch.long),
        }
