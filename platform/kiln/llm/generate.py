"""Text generation from a fine-tuned model: greedy when temperature is 0.

``messages`` are rendered with the tokenizer's chat template and the generation
prompt; a raw ``prompt`` is tokenized as it is. Generation stops at eos, at the
chat template's end-of-turn marker, after ``max_new_tokens``, or at the first of
the ``stop`` strings (cut from the text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.errors import ConfigError
from kiln.llm.chat import end_of_turn_ids
from kiln.llm.profiles import ROLES

__all__ = ["GenerationRequest", "generate"]


@dataclass
class GenerationRequest:
    """One request; ``validate()`` lists every problem (used for HTTP 422 answers)."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Any) -> GenerationRequest:
        if not isinstance(data, dict):
            raise ConfigError(f"the request body must be a JSON object, got {type(data).__name__}")
        known = {"messages", "prompt", "max_new_tokens", "temperature", "top_p", "stop"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown fields {unknown!r}; allowed: {', '.join(sorted(known))}")
        stop = data.get("stop") or []
        request = cls(**{**data, "stop": [stop] if isinstance(stop, str) else stop})
        return request.validate()

    def validate(self, max_tokens_limit: int = 4096) -> GenerationRequest:
        errors = []
        if (self.messages is None) == (self.prompt is None):
            errors.append("give exactly one of 'messages' (a chat) or 'prompt' (raw text)")
        if self.prompt is not None and not isinstance(self.prompt, str):
            errors.append(f"prompt={self.prompt!r} must be a string")
        if self.messages is not None:
            ok = (
                isinstance(self.messages, list)
                and self.messages
                and all(
                    isinstance(m, dict)
                    and m.get("role") in ROLES
                    and isinstance(m.get("content"), str)
                    for m in self.messages
                )
            )
            if not ok:
                errors.append(
                    "messages must be a non-empty list of {'role': system|user|assistant, "
                    "'content': string}"
                )
        mnt = self.max_new_tokens
        if not isinstance(mnt, int) or isinstance(mnt, bool) or not 1 <= mnt <= max_tokens_limit:
            errors.append(f"max_new_tokens={mnt!r} must be an integer in [1, {max_tokens_limit}]")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 10:
            errors.append(f"temperature={t!r} must be a number in [0, 10] (0: greedy)")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            errors.append(f"top_p={p!r} must be a number in (0, 1]")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            errors.append(f"stop={self.stop!r} must be a string or a list of non-empty strings")
        if errors:
            raise ConfigError(errors)
        return self


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, request: GenerationRequest | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Generate one completion; returns ``{"text", "prompt_tokens", "completion_tokens"}``.

    Pass a :class:`GenerationRequest` or its fields as keyword arguments
    (``generate(model, tok, messages=[...], max_new_tokens=16)``).
    """
    request = (request or GenerationRequest(**kwargs)).validate()
    if request.messages is not None:
        text = tokenizer.apply_chat_template(
            request.messages, tokenize=False, add_generation_prompt=True
        )
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(request.prompt, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    options: dict[str, Any] = {
        "max_new_tokens": request.max_new_tokens,
        "eos_token_id": end_of_turn_ids(tokenizer) or None,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": request.temperature > 0,
    }
    if request.temperature > 0:
        options.update(temperature=float(request.temperature), top_p=float(request.top_p))
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **options)
    new = out[0, enc["input_ids"].shape[1] :]
    completion = tokenizer.decode(new, skip_special_tokens=True)
    for stop in request.stop:
        cut = completion.find(stop)
        if cut >= 0:
            completion = completion[:cut]
    return {
        "text": completion.strip(),
        "prompt_tokens": int(enc["input_ids"].shape[1]),
        "completion_tokens": int(new.shape[0]),
    }
