"""Models for kiln: build a ``torch.nn.Module`` from a config dict.

    >>> from kiln.models import build_model
    >>> model = build_model({"name": "mlp", "hidden": [32]}, input_shape=(4,), num_outputs=3)

Models take float32 ``[batch, *input_shape]`` (int64 ``[batch, seq]`` token ids for
``tiny_transformer``) and return raw logits: ``[batch, num_outputs]``, or
``[batch, seq, vocab]`` for language models.
"""

from kiln.models.architectures import TinyTransformer
from kiln.models.factory import (
    ModelFactory,
    build_model,
    count_parameters,
    list_architectures,
    register_architecture,
    validate_model_config,
)
from kiln.models.layers import ACTIVATIONS

__all__ = [
    "ACTIVATIONS",
    "ModelFactory",
    "TinyTransformer",
    "build_model",
    "count_parameters",
    "list_architectures",
    "register_architecture",
    "validate_model_config",
]
