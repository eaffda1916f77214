"""MetricMode: whether a smaller or a larger value of a metric is better.

One enum carries the comparison every ranking needs (checkpoints, early stopping,
run and trial selection), instead of each place comparing ``"min"``/``"max"``.
It is a ``str`` enum, so configs, JSON and Ray Tune keep the plain strings.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from kiln.errors import ConfigError

__all__ = ["MetricMode"]

T = TypeVar("T")


class MetricMode(str, enum.Enum):
    """``min``: smaller is better (losses); ``max``: larger is better (accuracy)."""

    MIN = "min"
    MAX = "max"

    @classmethod
    def parse(cls, value: Any, field: str = "mode") -> MetricMode:
        """``value`` as a MetricMode; ConfigError naming ``field`` when it is neither."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{field}={value!r} must be 'min' or 'max'") from None

    @property
    def sign(self) -> int:
        """+1 for min, -1 for max: ``sign * value`` sorts best first."""
        return 1 if self is MetricMode.MIN else -1

    def better(self, a: float, b: float | None) -> bool:
        """Whether ``a`` is strictly better than ``b`` (anything beats None)."""
        return b is None or (a < b if self is MetricMode.MIN else a > b)

    def best(self, items: Iterable[T], key: Callable[[T], float]) -> T | None:
        """The best of ``items`` by ``key`` (the first of equals), or None when empty."""
        ranked = sorted(items, key=lambda item: self.sign * key(item))
        return ranked[0] if ranked else None

    @property
    def sql_order(self) -> str:
        """``ASC`` or ``DESC``: best first in an ORDER BY."""
        return "ASC" if self is MetricMode.MIN else "DESC"
