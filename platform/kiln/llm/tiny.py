"""A tiny randomly initialised causal LM with a tokenizer trained on local text.

It lets the whole fine-tuning path (train, merge, generate, serve) run offline in
seconds: ``kiln llm tiny-model DIR --text corpus.txt`` or :func:`make_tiny_model`.
The folder is a plain Hugging Face model folder (``save_pretrained``) that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load; the tokenizer carries kiln's
built-in chat template.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from kiln.errors import ConfigError
from kiln.llm.chat import BUILTIN_CHAT_TEMPLATE, END_OF_TURN, START_OF_TURN

__all__ = ["make_tiny_model", "train_tokenizer"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", START_OF_TURN, END_OF_TURN]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` (decoding gives the text back exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token=END_OF_TURN,
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[START_OF_TURN],
    )
    tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    output_dir: str | os.PathLike[str],
    texts: Iterable[str],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random Llama-style model and a tokenizer trained on ``texts`` to ``output_dir``.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln.llm.modeling import quiet_hf_logging

    quiet_hf_logging()

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError("texts: no non-empty text to train the tokenizer on")
    if hidden_size % num_heads:
        raise ConfigError(
            f"hidden_size={hidden_size!r} must be a multiple of num_heads={num_heads!r}"
        )
    tokenizer = train_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
