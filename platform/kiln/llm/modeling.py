"""Loading, LoRA, saving and merging causal LMs (transformers + peft).

:class:`CausalLMFactory` is the picklable model factory kiln's worker loop calls in
each rank (after seeding, so LoRA adapters start identical everywhere). A LoRA model
is marked ``kiln_save_trainable_only``: its checkpoints hold the adapter weights
and optimizer state only, and the base weights are never touched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.engine.checkpoint import TRAINABLE_ONLY_ATTR
from kiln.errors import ConfigError, ModelConfigError

__all__ = [
    "CausalLMFactory",
    "load_tokenizer",
    "load_for_inference",
    "save_output",
    "merge_adapter",
    "is_adapter_dir",
]

ADAPTER_CONFIG = "adapter_config.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quiet_hf_logging() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The folder's tokenizer, with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    quiet_hf_logging()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class CausalLMFactory:
    """Builds the model to train: base weights from ``model_path``, optionally LoRA.

    Args:
        model_path: a local Hugging Face model folder.
        lora: ``{"r", "alpha", "dropout", "target_modules"}`` or None for a full fine-tune.
        dtype: weights' dtype (``fp32`` for training; autocast gives bf16/fp16 compute).
        vocab_size: resize the embeddings to this many tokens (tokens added to the tokenizer).
        gradient_checkpointing: recompute activations in backward to save memory.
        load_in_4bit: QLoRA: 4-bit base weights (bitsandbytes, CUDA only).
    """

    model_path: str
    lora: dict[str, Any] | None = None
    dtype: str = "fp32"
    vocab_size: int | None = None
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def load_base(self) -> torch.nn.Module:
        """The base model, as saved (resized to ``vocab_size`` when given)."""
        from transformers import AutoModelForCausalLM

        quiet_hf_logging()
        kwargs: dict[str, Any] = {"dtype": _DTYPES[self.dtype]}
        if self.load_in_4bit:
            kwargs["quantization_config"] = _four_bit_config()
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs)
        if self.vocab_size and model.get_input_embeddings().num_embeddings < self.vocab_size:
            model.resize_token_embeddings(self.vocab_size)
        return model

    def __call__(self) -> torch.nn.Module:
        model: Any = self.load_base()
        model.config.use_cache = False  # training: no KV cache
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if self.lora is not None:
                model.enable_input_require_grads()  # frozen embeddings: keep the graph
        if self.lora is None:
            return model
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if self.load_in_4bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.gradient_checkpointing
            )
        config = LoraConfig(
            r=int(self.lora.get("r", 8)),
            lora_alpha=int(self.lora.get("alpha", 16)),
            lora_dropout=float(self.lora.get("dropout", 0.0)),
            target_modules=self.lora.get("target_modules"),
            task_type="CAUSAL_LM",
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:  # e.g. no default target modules for this architecture
            raise ModelConfigError(
                f"model.lora.target_modules={self.lora.get('target_modules')!r}: {exc}"
            ) from None
        setattr(peft_model, TRAINABLE_ONLY_ATTR, True)
        return peft_model


def _four_bit_config() -> Any:
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.load_in_4bit=true needs a CUDA GPU (bitsandbytes); this machine has none"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding a peft adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_output(
    model: Any, tokenizer: Any, output_dir: str | os.PathLike[str], *, base: str | None = None
) -> Path:
    """``save_pretrained`` the model (or adapter) and the tokenizer into ``output_dir``.

    A LoRA model writes its adapter, with ``base_model_name_or_path`` set to ``base``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and base is not None:
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = str(Path(base).resolve())
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.config.use_cache = True
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _adapter_base(adapter_dir: Path, base: str | None) -> str:
    if base:
        return base
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    found = config.get("base_model_name_or_path")
    if not found or not Path(found).is_dir():
        raise ConfigError(
            f"adapter {str(adapter_dir)!r} names base model {found!r}, which is not a local "
            "folder; pass the base model folder explicitly (--base)"
        )
    return found


def load_for_inference(
    model_dir: str | os.PathLike[str], *, base: str | None = None
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a full model folder or an adapter folder."""
    from transformers import AutoModelForCausalLM

    quiet_hf_logging()
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"model folder {str(path)!r} does not exist")
    tokenizer = load_tokenizer(path)
    if is_adapter_dir(path):
        from peft import PeftModel

        base_model = CausalLMFactory(
            _adapter_base(path, base), vocab_size=len(tokenizer)
        ).load_base()
        model: Any = PeftModel.from_pretrained(base_model, str(path))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path))
    model.config.use_cache = True
    return model.eval(), tokenizer


def merge_adapter(
    adapter_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    base: str | None = None,
) -> Path:
    """Write base + adapter merged into one plain model folder (with the tokenizer)."""
    path = Path(adapter_dir)
    if not is_adapter_dir(path):
        raise ConfigError(f"{str(path)!r} is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    model, tokenizer = load_for_inference(path, base=base)
    merged = model.merge_and_unload()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
