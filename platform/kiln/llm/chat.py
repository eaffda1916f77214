"""kiln's built-in chat template, for tokenizers that bring none.

ChatML layout, one turn per role::

    <|im_start|>system
    You are helpful.<|im_end|>
    <|im_start|>user
    What is 2+2?<|im_end|>
    <|im_start|>assistant
    4<|im_end|>

A tokenizer with its own ``chat_template`` (Qwen, Llama 3, ...) keeps it; this one
is installed only where ``tokenizer.chat_template`` is empty. The two markers are
added as special tokens when the vocabulary lacks them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BUILTIN_CHAT_TEMPLATE", "START_OF_TURN", "END_OF_TURN", "ensure_chat_template"]

START_OF_TURN = "<|im_start|>"
END_OF_TURN = "<|im_end|>"

BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> bool:
    """Install the built-in template (and its markers) when the tokenizer has none.

    Returns:
        True when tokens were added to the vocabulary (resize the model's embeddings).
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
    vocab = tokenizer.get_vocab()
    missing = [t for t in (START_OF_TURN, END_OF_TURN) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return bool(missing)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: eos, and the template's end marker if known."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    marker = tokenizer.get_vocab().get(END_OF_TURN)
    if marker is not None and marker not in ids:
        ids.append(int(marker))
    return ids
