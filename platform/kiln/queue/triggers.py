"""RetrainingTrigger: should a model be retrained, and why (or why not)?

    trigger = RetrainingTrigger(monitor_metric="val_loss", degradation_threshold=0.1)
    decision = trigger.decide({"val_loss": 0.42}, {"val_loss": 0.38}, drift_score=0.15)
    decision.retrain, decision.reasons   # True, ["val_loss degraded 10.5% (0.38 -> 0.42) ..."]

Two conditions fire it: the monitored metric degraded by more than
``degradation_threshold`` (relative to the reference; a loss that rises and an
accuracy that falls both degrade), or the data drift score reached
``drift_threshold``. A retrain less than ``min_days_between_retrains`` ago blocks
both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from kiln.errors import ConfigError

__all__ = ["RetrainingTrigger", "TriggerDecision", "metric_mode"]

_HIGHER_IS_BETTER = ("acc", "f1", "auc", "precision", "recall", "r2", "score", "map", "bleu")


def metric_mode(metric: str) -> str:
    """``"max"`` for metrics where higher is better (accuracy, f1, auc...), else ``"min"``."""
    name = metric.lower()
    return "max" if any(part in name for part in _HIGHER_IS_BETTER) else "min"


@dataclass(frozen=True)
class TriggerDecision:
    """The trigger's answer with its reasons and numbers.

    ``fired`` names the conditions that fired (``degradation``, ``drift``);
    ``blocked_by`` is ``"min_days"`` when a recent retrain vetoed them.
    """

    retrain: bool
    reasons: list[str]
    fired: list[str] = field(default_factory=list)
    blocked_by: str | None = None
    degradation: float | None = None
    drift_score: float | None = None
    days_since_retrain: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RetrainingTrigger:
    """Retrain when the monitored metric degrades or the data drifts (see module doc).

    Args:
        monitor_metric: The metric compared between current and reference.
        degradation_threshold: Relative degradation that fires (0.1: 10 % worse).
        min_days_between_retrains: Fewer days since the last retrain block a retrain.
        drift_threshold: Drift score (Jensen-Shannon, 0-1) at which drift fires.
        mode: ``"min"`` (lower is better) or ``"max"``; None infers it from the name.
    """

    def __init__(
        self,
        monitor_metric: str = "val_loss",
        degradation_threshold: float = 0.1,
        min_days_between_retrains: float = 7,
        drift_threshold: float = 0.2,
        mode: str | None = None,
    ) -> None:
        errors = []
        if not isinstance(monitor_metric, str) or not monitor_metric:
            errors.append(f"monitor_metric={monitor_metric!r} must be a metric name")
        for name, value in (
            ("degradation_threshold", degradation_threshold),
            ("min_days_between_retrains", min_days_between_retrains),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                errors.append(f"{name}={value!r} must be a number >= 0")
        if (
            isinstance(drift_threshold, bool)
            or not isinstance(drift_threshold, (int, float))
            or not 0 < drift_threshold <= 1
        ):
            errors.append(f"drift_threshold={drift_threshold!r} must be in (0, 1]")
        if mode not in (None, "min", "max"):
            errors.append(f"mode={mode!r} must be 'min', 'max' or None (inferred from the metric)")
        if errors:
            raise ConfigError(errors)
        self.monitor_metric = monitor_metric
        self.degradation_threshold = float(degradation_threshold)
        self.min_days_between_retrains = float(min_days_between_retrains)
        self.drift_threshold = float(drift_threshold)
        self.mode = mode or metric_mode(monitor_metric)

    def should_retrain(
        self,
        current_metrics: dict[str, float],
        reference_metrics: dict[str, float],
        drift_score: float | None = None,
        last_retrain_at: str | datetime | None = None,
        now: datetime | None = None,
    ) -> bool:
        """True when :meth:`decide` says retrain."""
        return self.decide(
            current_metrics, reference_metrics, drift_score, last_retrain_at, now
        ).retrain

    def decide(
        self,
        current_metrics: dict[str, float],
        reference_metrics: dict[str, float],
        drift_score: float | None = None,
        last_retrain_at: str | datetime | None = None,
        now: datetime | None = None,
    ) -> TriggerDecision:
        """The decision and its reasons: which condition fired and by how much, or why not."""
        reasons: list[str] = []
        fired: list[str] = []
        degradation = self._degradation(current_metrics, reference_metrics, reasons)
        if degradation is not None:
            pct = f"{degradation * 100:+.1f}%"
            limit = f"{self.degradation_threshold * 100:.1f}%"
            was, now_value = (
                reference_metrics[self.monitor_metric],
                current_metrics[self.monitor_metric],
            )
            change = f"({was:.4g} -> {now_value:.4g}, {'lower' if self.mode == 'min' else 'higher'} is better)"
            if degradation > self.degradation_threshold:
                fired.append("degradation")
                reasons.append(f"{self.monitor_metric} degraded {pct} {change}, threshold {limit}")
            else:
                reasons.append(f"{self.monitor_metric} changed {pct} {change}, within {limit}")
        if drift_score is not None:
            if drift_score >= self.drift_threshold:
                fired.append("drift")
                reasons.append(f"drift {drift_score:.3f} >= threshold {self.drift_threshold:.3f}")
            else:
                reasons.append(f"drift {drift_score:.3f} < threshold {self.drift_threshold:.3f}")
        else:
            reasons.append("no drift score given")
        days = _days_since(last_retrain_at, now)
        blocked = None
        if fired and days is not None and days < self.min_days_between_retrains:
            blocked = "min_days"
            reasons.append(
                f"retrained {days:.1f} days ago, minimum is {self.min_days_between_retrains:g}"
            )
        retrain = bool(fired) and blocked is None
        if not fired:
            reasons.append("no condition fired")
        return TriggerDecision(
            retrain=retrain,
            reasons=reasons,
            fired=fired,
            blocked_by=blocked,
            degradation=degradation,
            drift_score=None if drift_score is None else float(drift_score),
            days_since_retrain=days,
        )

    def _degradation(
        self, current: dict[str, float], reference: dict[str, float], reasons: list[str]
    ) -> float | None:
        key = self.monitor_metric
        missing = [
            name for name, metrics in (("current", current), ("reference", reference))
            if metrics.get(key) is None
        ]  # fmt: skip
        if missing:
            reasons.append(f"{key} missing from the {' and '.join(missing)} metrics")
            return None
        cur, ref = float(current[key]), float(reference[key])
        worse = cur - ref if self.mode == "min" else ref - cur
        return worse / abs(ref) if ref != 0 else worse

    def to_dict(self) -> dict[str, Any]:
        return {
            "monitor_metric": self.monitor_metric,
            "degradation_threshold": self.degradation_threshold,
            "min_days_between_retrains": self.min_days_between_retrains,
            "drift_threshold": self.drift_threshold,
            "mode": self.mode,
        }


def _days_since(moment: str | datetime | None, now: datetime | None) -> float | None:
    if moment is None:
        return None
    then = datetime.fromisoformat(moment) if isinstance(moment, str) else moment
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    current = now or datetime.now(timezone.utc)
    if current.tzinfo is None:
        current = current.replace(tzinfo=timezone.utc)
    return (current - then).total_seconds() / 86400.0
