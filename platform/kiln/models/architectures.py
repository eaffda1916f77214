"""Named architectures: ``mlp``, ``cnn`` (small images) and ``tiny_transformer`` (causal LM).

Each builder takes its keyword arguments plus the data's ``input_shape`` and
``num_outputs``, computes every size at build time (so ONNX export sees static
shapes except the batch axis) and returns a module producing raw logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import ModelConfigError
from kiln.models.layers import activation as make_activation

__all__ = ["build_mlp", "build_cnn", "build_tiny_transformer", "TinyTransformer"]


def _need(
    name: str, input_shape: tuple[int, ...] | None, num_outputs: int | None
) -> tuple[tuple[int, ...], int]:
    missing = [
        n for n, v in (("input_shape", input_shape), ("num_outputs", num_outputs)) if v is None
    ]
    if missing:
        raise ModelConfigError(
            f"{name} needs {' and '.join(missing)} (normally taken from the dataset's info)"
        )
    return tuple(input_shape), int(num_outputs)  # type: ignore[arg-type]


def _positive_ints(name: str, **values: object) -> None:
    bad = [
        f"{k}={v!r}"
        for k, v in values.items()
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0
    ]
    if bad:
        raise ModelConfigError(f"{name}: {', '.join(bad)}; expected positive ints")


def _dropout(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ModelConfigError(f"{name}: dropout={value!r}; expected a number in [0, 1)")
    return float(value)


def build_mlp(
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    hidden: list[int] | tuple[int, ...] = (128, 64),
    activation: str | None = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Flatten -> [Linear -> (BatchNorm) -> activation -> (Dropout)] per hidden size -> Linear."""
    shape, out = _need("mlp", input_shape, num_outputs)
    hidden = list(hidden)
    _positive_ints("mlp", **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
    p = _dropout("mlp", dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    previous = math.prod(shape)
    for width in hidden:
        layers.append(nn.Linear(previous, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(make_activation(activation))
        if p:
            layers.append(nn.Dropout(p))
        previous = width
    layers.append(nn.Linear(previous, out))
    return nn.Sequential(*layers)


def _image_shape(input_shape: tuple[int, ...]) -> tuple[tuple[int, int, int], nn.Module | None]:
    """(C, H, W) for the input, and an Unflatten when rows are not already images."""
    if len(input_shape) == 3:
        return input_shape, None  # type: ignore[return-value]
    if len(input_shape) == 2:
        h, w = input_shape
        return (1, h, w), nn.Unflatten(1, (1, h, w))
    side = math.isqrt(input_shape[0]) if len(input_shape) == 1 else 0
    if len(input_shape) == 1 and side * side == input_shape[0]:
        return (1, side, side), nn.Unflatten(1, (1, side, side))
    raise ModelConfigError(
        f"cnn needs image rows: input_shape (C, H, W), (H, W) or (N*N,) for square grey images; got {input_shape}"
    )


def build_cnn(
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    channels: list[int] | tuple[int, ...] = (16, 32),
    kernel_size: int = 3,
    hidden: int = 64,
    dropout: float = 0.0,
    activation: str | None = "relu",
) -> nn.Sequential:
    """[Conv -> activation -> MaxPool(2)] per channel count -> Flatten -> Linear -> act -> Linear.

    Pooling stops once the feature map is 1 pixel wide, so tiny images work too.
    """
    shape, out = _need("cnn", input_shape, num_outputs)
    channels = list(channels)
    _positive_ints(
        "cnn",
        kernel_size=kernel_size,
        hidden=hidden,
        **{f"channels[{i}]": c for i, c in enumerate(channels)},
    )
    p = _dropout("cnn", dropout)
    (c, h, w), reshape = _image_shape(shape)
    layers: list[nn.Module] = [reshape] if reshape is not None else []
    for width in channels:
        layers += [
            nn.Conv2d(c, width, kernel_size, padding=kernel_size // 2),
            make_activation(activation),
        ]
        h, w = (
            h + 2 * (kernel_size // 2) - kernel_size + 1,
            w + 2 * (kernel_size // 2) - kernel_size + 1,
        )
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = width
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), make_activation(activation)]
    if p:
        layers.append(nn.Dropout(p))
    layers.append(nn.Linear(hidden, out))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, each residual."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (
            z.reshape(b, t, self.num_heads, d // self.num_heads).transpose(1, 2) for z in (q, k, v)
        )
        attn = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Decoder-only causal LM: token + learned position embeddings, blocks, tied-free head.

    Takes int64 token ids ``[batch, seq]`` and returns logits ``[batch, seq, vocab]``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int,
        max_seq_len: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            _Block(d_model, num_heads, d_ff, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.tokens(ids) + self.positions(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_tiny_transformer(
    *,
    input_shape: tuple[int, ...] | None = None,
    num_outputs: int | None = None,
    vocab_size: int | None = None,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    max_seq_len: int = 64,
    dropout: float = 0.0,
) -> TinyTransformer:
    """A ``TinyTransformer``; ``vocab_size`` defaults to the data's ``num_outputs``."""
    vocab = vocab_size if vocab_size is not None else num_outputs
    if vocab is None:
        raise ModelConfigError(
            "tiny_transformer needs vocab_size (or the dataset's vocabulary size)"
        )
    problems = []
    if num_outputs is not None and vocab_size is not None and vocab_size < num_outputs:
        problems.append(
            f"vocab_size={vocab_size} but the data has token ids up to {num_outputs - 1}; set vocab_size >= {num_outputs}"
        )
    if input_shape is not None and input_shape[0] > max_seq_len:
        problems.append(
            f"max_seq_len={max_seq_len} but the data has sequences of {input_shape[0]}; set max_seq_len >= {input_shape[0]}"
        )
    if problems:
        raise ModelConfigError("tiny_transformer: " + "; ".join(problems))
    _positive_ints(
        "tiny_transformer",
        vocab_size=vocab,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        d_ff=d_ff,
        max_seq_len=max_seq_len,
    )
    if d_model % num_heads:
        raise ModelConfigError(
            f"tiny_transformer: d_model={d_model} is not divisible by num_heads={num_heads}"
        )
    return TinyTransformer(
        vocab,
        d_model,
        num_layers,
        num_heads,
        d_ff,
        max_seq_len,
        _dropout("tiny_transformer", dropout),
    )
