"""Gradient accumulation, clipping and health checks for the worker loop.

The loop uses them like this (``n`` = ``accumulation_steps``)::

    for batch_idx, batch in enumerate(batches):
        loss = strategy.compute_loss(...)
        scaler.scale(accumulator.scale_loss(loss)).backward()   # loss / n
        if accumulator.should_update_optimizer(batch_idx):      # every n-th batch
            scaler.unscale_(optimizer)                          # before clipping (AMP)
            accumulator.clip_gradients(model)                   # one pass over grads
            monitor.check_step(model)                           # every check_interval calls
            scaler.step(optimizer); scaler.update(); optimizer.zero_grad()

Under DDP the gradients are already all-reduced when clipping runs, so every
rank computes the same norm and clips the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from kiln.errors import ConfigError, GradientExplosionError

__all__ = [
    "AccumulationStats",
    "GradientAccumulator",
    "GradientHealth",
    "GradientMonitor",
    "GradientExplosionError",
    "check_gradient_health",
]

logger = logging.getLogger(__name__)

ParamsLike = torch.nn.Module | Iterable[torch.nn.Parameter]


def _grads(params: ParamsLike) -> list[torch.Tensor]:
    ps = params.parameters() if isinstance(params, torch.nn.Module) else params
    return [p.grad for p in ps if p.grad is not None]


def _num_trainable(params: ParamsLike) -> int:
    ps = params.parameters() if isinstance(params, torch.nn.Module) else params
    return sum(p.numel() for p in ps if p.requires_grad)


def _as_list(params: ParamsLike) -> list[torch.nn.Parameter]:
    return list(params.parameters() if isinstance(params, torch.nn.Module) else params)


@dataclass
class AccumulationStats:
    """Counters and the last clipping result of a :class:`GradientAccumulator`."""

    global_step: int = 0
    effective_step: int = 0
    accumulated_loss: float = 0.0
    norm_before_clip: float | None = None
    norm_after_clip: float | None = None
    num_parameters: int = 0


class GradientAccumulator:
    """Accumulates gradients over ``accumulation_steps`` batches and clips them.

    Args:
        accumulation_steps: batches per optimizer step (>= 1).
        max_gradient_norm: clip threshold; None disables clipping.
        clip_by_global_norm: True clips the L2 norm of all gradients together
            (``clip_grad_norm_``); False clamps each gradient element to
            ``[-max_gradient_norm, max_gradient_norm]`` (``clip_grad_value_``).
        measure_norm: with clipping off, still measure the global norm (one extra
            pass over the gradients). Off by default, so disabled clipping costs nothing.
    """

    def __init__(
        self,
        accumulation_steps: int = 1,
        max_gradient_norm: float | None = 1.0,
        clip_by_global_norm: bool = True,
        measure_norm: bool = False,
    ) -> None:
        errors = []
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int):
            errors.append(f"accumulation_steps must be an int >= 1; got {accumulation_steps!r}")
        elif accumulation_steps < 1:
            errors.append(f"accumulation_steps must be >= 1; got {accumulation_steps!r}")
        if max_gradient_norm is not None and not (
            isinstance(max_gradient_norm, (int, float)) and max_gradient_norm > 0
        ):
            errors.append(f"max_gradient_norm must be > 0 or None; got {max_gradient_norm!r}")
        if errors:
            raise ConfigError("; ".join(errors))
        self.accumulation_steps = accumulation_steps
        self.max_gradient_norm = None if max_gradient_norm is None else float(max_gradient_norm)
        self.clip_by_global_norm = bool(clip_by_global_norm)
        self.measure_norm = bool(measure_norm)
        self.reset()

    def reset(self) -> None:
        """Forget all counters and the last clipping result."""
        self._global_step = 0
        self._window_loss: torch.Tensor | float = 0.0
        self._window_count = 0
        self._norm_before: float | None = None
        self._norm_after: float | None = None
        self._num_parameters = 0
        self._num_clipped = 0

    def should_update_optimizer(self, step: int) -> bool:
        """True when batch ``step`` (0-based) completes an accumulation window."""
        return (step + 1) % self.accumulation_steps == 0

    def get_effective_step(self, global_step: int) -> int:
        """Optimizer steps completed after ``global_step`` backward passes."""
        return global_step // self.accumulation_steps

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return ``loss / accumulation_steps`` and count one backward pass.

        The unscaled loss is summed (detached, on its device: no sync) for
        :meth:`get_statistics`.
        """
        if self._window_count == self.accumulation_steps:
            self._window_loss, self._window_count = 0.0, 0
        self._window_loss = self._window_loss + loss.detach()
        self._window_count += 1
        self._global_step += 1
        if self.accumulation_steps == 1:
            return loss
        return loss / self.accumulation_steps

    def clip_gradients(self, model: ParamsLike) -> float:
        """Clip gradients in place; return the global L2 norm before clipping.

        Returns NaN without touching the gradients when clipping is off and
        ``measure_norm`` is False. The norm is read back with one device sync.
        """
        params = _as_list(model)
        self._num_parameters = _num_trainable(params)
        grads = _grads(params)
        if not grads:
            self._norm_before = self._norm_after = 0.0
            return 0.0
        max_norm = self.max_gradient_norm
        if max_norm is None:
            if not self.measure_norm:
                self._norm_before = self._norm_after = None
                return math.nan
            before = float(torch.nn.utils.get_total_norm(grads))
            self._norm_before = self._norm_after = before
            return before
        if self.clip_by_global_norm:
            before = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            # clip_grad_norm_ scales by max_norm / (norm + 1e-6) when that is < 1.
            factor = min(1.0, max_norm / (before + 1e-6)) if math.isfinite(before) else math.nan
            after = before * factor
        else:
            before = float(torch.nn.utils.get_total_norm(grads))
            torch.nn.utils.clip_grad_value_(params, max_norm)
            after = float(torch.nn.utils.get_total_norm(grads))
        if after != before:
            self._num_clipped += 1
        self._norm_before, self._norm_after = before, after
        return before

    @property
    def stats(self) -> AccumulationStats:
        """Current counters as an :class:`AccumulationStats`."""
        loss = self._window_loss
        return AccumulationStats(
            global_step=self._global_step,
            effective_step=self.get_effective_step(self._global_step),
            accumulated_loss=float(loss),
            norm_before_clip=self._norm_before,
            norm_after_clip=self._norm_after,
            num_parameters=self._num_parameters,
        )

    def get_statistics(self) -> dict[str, Any]:
        """Counters and the last clip as a dict (``norm_before``, ``norm_after``, ...)."""
        s = self.stats
        return {
            "norm_before": s.norm_before_clip,
            "norm_after": s.norm_after_clip,
            "global_step": s.global_step,
            "effective_step": s.effective_step,
            "accumulated_loss": s.accumulated_loss,
            "num_parameters": s.num_parameters,
            "num_clipped": self._num_clipped,
            "accumulation_steps": self.accumulation_steps,
            "max_gradient_norm": self.max_gradient_norm,
            "clip_by_global_norm": self.clip_by_global_norm,
        }


@dataclass
class GradientHealth:
    """Per-parameter gradient norms summarised at one check."""

    max_norm: float
    min_norm: float
    mean_norm: float
    has_exploding_gradients: bool
    has_vanishing_gradients: bool
    num_zero_gradients: int
    timestamp: str
    num_nonfinite_gradients: int = 0
    num_gradients: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _per_param_norms(model: ParamsLike) -> list[float]:
    grads = _grads(model)
    if not grads:
        return []
    norms = [torch.linalg.vector_norm(g.detach().float()) for g in grads]
    # FSDP's gradients are DTensor shards: each norm is reduced over the ranks
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return torch.stack(norms).cpu().tolist()  # one sync for all parameters


def _health(norms: list[float], threshold_max: float, threshold_min: float) -> GradientHealth:
    now = datetime.now(timezone.utc).isoformat()
    if not norms:
        return GradientHealth(0.0, 0.0, 0.0, False, False, 0, now)
    finite = [n for n in norms if math.isfinite(n)]
    nonfinite = len(norms) - len(finite)
    max_norm = math.inf if nonfinite else max(finite)
    min_norm = min(finite) if finite else math.nan
    mean_norm = sum(norms) / len(norms)
    return GradientHealth(
        max_norm=max_norm,
        min_norm=min_norm,
        mean_norm=mean_norm,
        has_exploding_gradients=nonfinite > 0 or max_norm > threshold_max,
        has_vanishing_gradients=bool(finite) and min_norm < threshold_min,
        num_zero_gradients=sum(1 for n in finite if n == 0.0),
        timestamp=now,
        num_nonfinite_gradients=nonfinite,
        num_gradients=len(norms),
    )


def check_gradient_health(
    model: ParamsLike, threshold_max: float = 1.0, threshold_min: float = 1e-7
) -> GradientHealth:
    """Summarise per-parameter gradient norms; parameters without a gradient are skipped.

    Exploding: any norm above ``threshold_max`` or any NaN/inf (then ``max_norm`` is
    inf). Vanishing: the smallest finite norm is below ``threshold_min`` (a parameter
    whose gradient is exactly zero counts, and also in ``num_zero_gradients``).
    """
    return _health(_per_param_norms(model), threshold_max, threshold_min)


_HIST_EDGES = tuple(range(-10, 4))  # log10 buckets: <1e-10, [1e-10, 1e-9), ..., >=1e3


def _bucket(norm: float) -> str:
    if not math.isfinite(norm):
        return "nonfinite"
    if norm == 0.0:
        return "zero"
    exp = math.floor(math.log10(norm))
    if exp < _HIST_EDGES[0]:
        return f"<1e{_HIST_EDGES[0]}"
    if exp >= _HIST_EDGES[-1]:
        return f">=1e{_HIST_EDGES[-1]}"
    return f"1e{exp}"


@dataclass
class GradientMonitor:
    """Checks gradient health every ``check_interval`` calls and keeps the history.

    A check is *critical* when the largest per-parameter norm exceeds
    ``norm_threshold_critical`` or any gradient is NaN/inf, and a *warning* when it
    exceeds ``norm_threshold_warning``. Both are counted and logged; a critical
    check raises :class:`GradientExplosionError` when ``raise_on_critical``.
    ``log_distribution`` keeps a histogram of per-parameter norms by power of ten.
    """

    check_interval: int = 10
    norm_threshold_warning: float = 1.0
    norm_threshold_critical: float = 10.0
    log_distribution: bool = True
    raise_on_critical: bool = False
    vanishing_threshold: float = 1e-7
    mean_norm_history: list[float] = field(default_factory=list, init=False)
    max_norm_history: list[float] = field(default_factory=list, init=False)
    distribution: dict[str, int] = field(default_factory=dict, init=False)
    check_count: int = field(default=0, init=False)
    warnings: int = field(default=0, init=False)
    criticals: int = field(default=0, init=False)
    _calls: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.check_interval, int) or self.check_interval < 1:
            errors.append(f"check_interval must be an int >= 1; got {self.check_interval!r}")
        if not self.norm_threshold_warning > 0:
            errors.append(
                f"norm_threshold_warning must be > 0; got {self.norm_threshold_warning!r}"
            )
        if not self.norm_threshold_critical >= self.norm_threshold_warning:
            errors.append(
                f"norm_threshold_critical must be >= norm_threshold_warning "
                f"({self.norm_threshold_warning!r}); got {self.norm_threshold_critical!r}"
            )
        if errors:
            raise ConfigError("; ".join(errors))

    def check_step(self, model: ParamsLike) -> GradientHealth | None:
        """Check on calls 0, N, 2N, ... (N = ``check_interval``); None on the others."""
        call = self._calls
        self._calls += 1
        if call % self.check_interval != 0:
            return None
        norms = _per_param_norms(model)
        health = _health(norms, self.norm_threshold_warning, self.vanishing_threshold)
        self.check_count += 1
        self.mean_norm_history.append(health.mean_norm)
        self.max_norm_history.append(health.max_norm)
        if self.log_distribution:
            for n in norms:
                key = _bucket(n)
                self.distribution[key] = self.distribution.get(key, 0) + 1
        if health.num_nonfinite_gradients or health.max_norm > self.norm_threshold_critical:
            self.criticals += 1
            message = (
                f"critical gradient norm at check {self.check_count} (call {call}): "
                f"max {health.max_norm:.4g} > {self.norm_threshold_critical!r}, "
                f"{health.num_nonfinite_gradients} NaN/inf gradients"
            )
            if self.raise_on_critical:
                raise GradientExplosionError(
                    message + "; lower the learning rate or set max_grad_norm"
                )
            logger.warning(message)
        elif health.max_norm > self.norm_threshold_warning:
            self.warnings += 1
            logger.warning(
                "large gradient norm at check %d: max %.4g > %r",
                self.check_count,
                health.max_norm,
                self.norm_threshold_warning,
            )
        if health.has_vanishing_gradients and health.num_zero_gradients < health.num_gradients:
            logger.debug("vanishing gradient: min norm %.3g", health.min_norm)
        return health

    def get_statistics(self) -> dict[str, Any]:
        """Histories and counters since construction."""
        return {
            "mean_norm_history": list(self.mean_norm_history),
            "max_norm_history": list(self.max_norm_history),
            "check_count": self.check_count,
            "warnings": self.warnings,
            "criticals": self.criticals,
            "norm_distribution": dict(self.distribution),
        }
