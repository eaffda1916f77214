"""MetricsEngine (seed 002): epoch metrics, drift checks, confidence and alerts.

Composed of small pieces: a :class:`~kiln.tracking.tracker.MetricsTracker` stores the
values (in an ExperimentDB run when given), :func:`~kiln.tracking.drift.compare_profiles`
scores drift, and :class:`AlertMonitor` turns epoch metrics into alerts.

Alerts (each a dict with ``type``, ``message``, ``epoch``, ``value``, ``threshold``):

- ``val_loss_spike``: validation loss above its best so far by more than
  ``val_loss_spike_threshold`` (relative) for ``patience_epochs`` epochs in a row;
- ``accuracy_drop``: validation accuracy below its best by more than
  ``accuracy_drop_threshold`` (relative), same patience;
- ``gradient_norm``: gradient norm above ``gradient_norm_threshold``, same patience;
- ``non_finite_loss``: a NaN or infinite train/validation loss (at once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.tracking.drift import DriftMetrics, compare_profiles
from kiln.tracking.experiments import ExperimentDB
from kiln.tracking.tracker import MetricsSummary, MetricsTracker

__all__ = ["AlertConfig", "AlertMonitor", "MetricsEngine", "confidence_metrics"]


@dataclass
class AlertConfig:
    """Alert thresholds; each condition must hold ``patience_epochs`` epochs in a row."""

    val_loss_spike_threshold: float = 0.2
    accuracy_drop_threshold: float = 0.05
    gradient_norm_threshold: float = 10.0
    patience_epochs: int = 1

    def __post_init__(self) -> None:
        errors = [
            f"{name}={getattr(self, name)!r} must be > 0"
            for name in (
                "val_loss_spike_threshold",
                "accuracy_drop_threshold",
                "gradient_norm_threshold",
            )
            if not getattr(self, name) > 0
        ]
        if not (isinstance(self.patience_epochs, int) and self.patience_epochs >= 1):
            errors.append(f"patience_epochs={self.patience_epochs!r} must be an int >= 1")
        if errors:
            from kiln.errors import ConfigError

            raise ConfigError([f"AlertConfig.{e}" for e in errors])


class AlertMonitor:
    """Checks each epoch's metrics against an :class:`AlertConfig`; keeps the alerts."""

    def __init__(self, config: AlertConfig) -> None:
        self.config = config
        self.alerts: list[dict[str, Any]] = []
        self._best: dict[str, float] = {}
        self._streak: dict[str, int] = {}

    def observe(
        self,
        epoch: int,
        train_metrics: Mapping[str, float],
        val_metrics: Mapping[str, float],
        gradient_norm: float | None,
    ) -> list[dict[str, Any]]:
        """Record one epoch; return the alerts it raised."""
        cfg, new = self.config, []
        for split, metrics in (("train", train_metrics), ("val", val_metrics)):
            loss = metrics.get("loss")
            if loss is not None and not math.isfinite(loss):
                new.append(
                    self._alert("non_finite_loss", epoch, loss, None, f"{split} loss is {loss}")
                )
        val_loss = val_metrics.get("loss")
        if val_loss is not None and math.isfinite(val_loss):
            best = self._best.get("val_loss")
            rise = (val_loss - best) / abs(best) if best else 0.0
            if self._held("val_loss", rise > cfg.val_loss_spike_threshold):
                new.append(self._alert("val_loss_spike", epoch, val_loss, cfg.val_loss_spike_threshold,
                                       f"val loss {val_loss:.4g} is {rise:.1%} above its best {best:.4g}"))  # fmt: skip
            self._best["val_loss"] = min(val_loss, best if best is not None else val_loss)
        acc = val_metrics.get("accuracy", val_metrics.get("acc"))
        if acc is not None and math.isfinite(acc):
            best = self._best.get("val_accuracy")
            drop = (best - acc) / abs(best) if best else 0.0
            if self._held("val_accuracy", drop > cfg.accuracy_drop_threshold):
                new.append(self._alert("accuracy_drop", epoch, acc, cfg.accuracy_drop_threshold,
                                       f"val accuracy {acc:.4g} is {drop:.1%} below its best {best:.4g}"))  # fmt: skip
            self._best["val_accuracy"] = max(acc, best if best is not None else acc)
        if gradient_norm is not None and self._held(
            "gradient_norm", gradient_norm > cfg.gradient_norm_threshold
        ):
            new.append(self._alert("gradient_norm", epoch, gradient_norm, cfg.gradient_norm_threshold,
                                   f"gradient norm {gradient_norm:.4g} exceeds {cfg.gradient_norm_threshold}"))  # fmt: skip
        self.alerts.extend(new)
        return new

    def observe_row(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Record one epoch given as a flat history row (``train_loss``, ``val_accuracy``,
        ``grad_norm``, ...); return the alerts it raised."""

        def split(prefix: str) -> dict[str, float]:
            return {
                k[len(prefix) :]: float(v)
                for k, v in row.items()
                if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool)
            }

        grad = row.get("grad_max_norm", row.get("grad_norm"))
        return self.observe(
            int(row.get("epoch", 0)),
            split("train_"),
            split("val_"),
            float(grad) if isinstance(grad, (int, float)) else None,
        )

    def _held(self, key: str, condition: bool) -> bool:
        """True once ``condition`` has held ``patience_epochs`` times in a row (then resets)."""
        self._streak[key] = self._streak.get(key, 0) + 1 if condition else 0
        if self._streak[key] >= self.config.patience_epochs:
            self._streak[key] = 0
            return True
        return False

    @staticmethod
    def _alert(kind: str, epoch: int, value: float, threshold: float | None, msg: str) -> dict:
        return {"type": kind, "message": f"epoch {epoch}: {msg}", "epoch": epoch,
                "value": float(value), "threshold": threshold}  # fmt: skip


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence_metrics(logits: Any, labels: Any = None) -> dict[str, float]:
    """Mean top-1 / top-k (k = min(5, classes)) softmax confidence and entropy (nats);
    with labels, top-1 and top-k accuracy too. ``logits`` is [N, C] (or [..., C])."""
    arr = logits.detach().cpu().float().numpy() if hasattr(logits, "detach") else np.asarray(logits)
    arr = arr.astype(np.float64).reshape(-1, arr.shape[-1])
    probs = _softmax(arr)
    k = min(5, probs.shape[1])
    top = np.sort(probs, axis=1)[:, ::-1][:, :k]
    entropy = -np.sum(probs * np.log(np.clip(probs, 1e-12, None)), axis=1)
    out = {
        "top1_confidence": float(top[:, 0].mean()),
        "top5_confidence": float(top.sum(axis=1).mean()),
        "entropy": float(entropy.mean()),
    }
    if labels is not None:
        y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
        y = y.reshape(-1)
        topk = np.argsort(-probs, axis=1)[:, :k]
        out["top1_accuracy"] = float((topk[:, 0] == y).mean())
        out["top5_accuracy"] = float((topk == y[:, None]).any(axis=1).mean())
    return out


class MetricsEngine:
    """Epoch metrics with drift detection and alerts (seed 002).

    Args:
        use_wandb: Also log to Weights & Biases (needs ``wandb``).
        gradient_accumulation_steps: ``log_scalar`` steps are micro-batch counts and are
            stored as optimizer steps (``step // gradient_accumulation_steps``).
        drift_threshold_warning: JS divergence at which drift is a warning.
        drift_threshold_critical: JS divergence at which drift is critical.
        alert_config: Alert thresholds (defaults of :class:`AlertConfig` when None).
        db: Store values in this ExperimentDB run (with ``run_id``); in memory if None.
        run_id: The run to store into.
    """

    def __init__(
        self,
        use_wandb: bool = False,
        gradient_accumulation_steps: int = 1,
        drift_threshold_warning: float = 0.1,
        drift_threshold_critical: float = 0.2,
        alert_config: AlertConfig | None = None,
        db: ExperimentDB | None = None,
        run_id: int | None = None,
    ) -> None:
        errors = []
        if not (isinstance(gradient_accumulation_steps, int) and gradient_accumulation_steps >= 1):
            errors.append(
                f"gradient_accumulation_steps={gradient_accumulation_steps!r} must be an int >= 1"
            )
        if not 0 < drift_threshold_warning <= drift_threshold_critical <= 1:
            errors.append(
                f"drift thresholds warning={drift_threshold_warning!r}, critical="
                f"{drift_threshold_critical!r} must satisfy 0 < warning <= critical <= 1"
            )
        if errors:
            from kiln.errors import ConfigError

            raise ConfigError(errors)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.drift_threshold_warning = drift_threshold_warning
        self.drift_threshold_critical = drift_threshold_critical
        self.alert_config = alert_config or AlertConfig()
        self.tracker = MetricsTracker(db=db, run_id=run_id, use_wandb=use_wandb)
        self.monitor = AlertMonitor(self.alert_config)
        self.drift_history: list[DriftMetrics] = []

    def log_epoch(
        self,
        epoch: int,
        train_metrics: Mapping[str, float] | None = None,
        val_metrics: Mapping[str, float] | None = None,
        learning_rate: float | None = None,
        gradient_norm: float | None = None,
        epoch_duration: float | None = None,
        reference_profile: Mapping[str, Any] | None = None,
        current_profile: Mapping[str, Any] | Any = None,
    ) -> DriftMetrics | None:
        """Record one epoch, check alerts, and score drift when both profiles are given.

        ``current_profile`` may be a profile or raw data (binned on the reference edges).
        Returns the drift, or None when no profiles were given.
        """
        drift = None
        extra: dict[str, float] = {}
        if reference_profile is not None and current_profile is not None:
            drift = self.check_drift(reference_profile, current_profile)
            extra["drift_js_divergence"] = drift.js_divergence
        self.tracker.log_epoch(
            epoch, train_metrics, val_metrics, learning_rate, gradient_norm, epoch_duration, **extra
        )
        self.monitor.observe(epoch, train_metrics or {}, val_metrics or {}, gradient_norm)
        return drift

    def check_drift(
        self, reference_profile: Mapping[str, Any], current: Mapping[str, Any] | Any
    ) -> DriftMetrics:
        """Drift of ``current`` (profile or raw data) against the reference, by this
        engine's thresholds."""
        drift = compare_profiles(
            reference_profile,
            current,
            warning=self.drift_threshold_warning,
            critical=self.drift_threshold_critical,
        )
        self.drift_history.append(drift)
        return drift

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        """Record one scalar (e.g. ``train/batch_loss``) at a micro-batch ``step``."""
        opt_step = None if step is None else step // self.gradient_accumulation_steps
        self.tracker.update({name: value}, step=opt_step)

    def log_confidence(self, logits: Any, labels: Any = None, step: int | None = None) -> dict:
        """Record and return :func:`confidence_metrics` of a batch of logits."""
        values = confidence_metrics(logits, labels)
        self.tracker.update(values, step=step)
        return values

    def has_alerts(self) -> bool:
        return bool(self.monitor.alerts)

    def get_alerts(self, clear: bool = False) -> list[dict[str, Any]]:
        """The alerts raised so far (a copy); ``clear=True`` empties the list."""
        alerts = list(self.monitor.alerts)
        if clear:
            self.monitor.alerts.clear()
        return alerts

    def get_summary(self) -> MetricsSummary:
        """Per-metric summary (see :meth:`MetricsTracker.get_summary`)."""
        return self.tracker.get_summary()
