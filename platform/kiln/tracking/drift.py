"""Data profiles and drift: histograms of the training data, compared by JS divergence.

A *profile* (:func:`compute_profile`) holds, for each input feature, a histogram over
fixed bin edges taken from the reference (training) data, plus an underflow and an
overflow bin; and, when predictions are given, the distribution of predicted classes
(or a histogram of predicted values). It is plain JSON, stored with the run
(:meth:`ExperimentDB.set_profile`), so data arriving later can be checked against the
model that is being served: :func:`compare_profiles` bins the new data on the
reference edges and scores each feature with the Jensen-Shannon divergence (base 2,
so 0 = same distribution, 1 = disjoint).

Inputs with more than ``max_features`` values per sample (images) are reduced to
``max_features`` contiguous chunks, each summarised by its per-sample mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np

from kiln.errors import DriftError

__all__ = [
    "DriftMetrics",
    "compare_profiles",
    "compute_profile",
    "drift_status",
    "js_divergence",
]

PROFILE_VERSION = 1
PREDICTIONS = "predictions"


@dataclass
class DriftMetrics:
    """Drift of current data against a reference profile.

    ``js_divergence`` is the largest per-feature divergence (so a single drifted
    feature is not averaged away); ``mean_divergence`` is the mean over features;
    ``details`` has each feature's score; ``affected_features`` are those at or above
    the warning threshold, worst first.
    """

    js_divergence: float
    status: Literal["healthy", "warning", "critical"]
    affected_features: list[str]
    timestamp: str
    details: dict[str, float] = field(default_factory=dict)
    mean_divergence: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two histograms (counts or probs)."""
    pa = np.asarray(p, dtype=np.float64)
    qa = np.asarray(q, dtype=np.float64)
    if pa.shape != qa.shape:
        raise DriftError(f"histograms differ in length: {pa.shape[0]} vs {qa.shape[0]} bins")
    ps, qs = pa.sum(), qa.sum()
    if ps <= 0 or qs <= 0:
        return 0.0 if ps <= 0 and qs <= 0 else 1.0
    pa, qa = pa / ps, qa / qs
    m = 0.5 * (pa + qa)

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return float(min(1.0, max(0.0, 0.5 * kl(pa) + 0.5 * kl(qa))))


def drift_status(score: float, warning: float, critical: float) -> str:
    """``critical`` at or above ``critical``, ``warning`` at or above ``warning``, else healthy."""
    if score >= critical:
        return "critical"
    return "warning" if score >= warning else "healthy"


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _feature_matrix(
    x: Any, max_features: int, reduction: str | None = None
) -> tuple[np.ndarray, str]:
    arr = _as_numpy(x).astype(np.float64, copy=False)
    if arr.ndim == 0:
        raise DriftError("x must have a sample axis; got a scalar")
    arr = arr.reshape(arr.shape[0], -1)
    if reduction is None:
        reduction = "chunk_mean" if arr.shape[1] > max_features else "none"
    if reduction == "chunk_mean":
        chunks = np.array_split(np.arange(arr.shape[1]), min(max_features, arr.shape[1]))
        arr = np.stack([arr[:, idx].mean(axis=1) for idx in chunks], axis=1)
    return arr, reduction


def _counts(values: np.ndarray, edges: np.ndarray) -> list[int]:
    """Counts in [underflow, bin_1 .. bin_B, overflow]; the top edge belongs to bin_B."""
    values = values[~np.isnan(values)]
    idx = np.searchsorted(edges, values, side="right")
    idx[values == edges[-1]] = len(edges) - 1
    return np.bincount(idx, minlength=len(edges) + 1).astype(int).tolist()


def _edges(values: np.ndarray, bins: int) -> np.ndarray:
    values = values[~np.isnan(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def _prediction_hist(predictions: Any, reference: Mapping[str, Any] | None) -> dict[str, Any]:
    pred = _as_numpy(predictions)
    if pred.ndim == 2 and pred.shape[1] > 1:  # logits / probabilities -> predicted class
        classes, num = pred.argmax(axis=1), pred.shape[1]
    elif np.issubdtype(pred.dtype, np.integer):
        classes = pred.reshape(-1)
        num = int(reference["num_classes"]) if reference else int(classes.max(initial=0)) + 1
    else:
        values = pred.reshape(-1).astype(np.float64)
        edges = np.asarray(reference["edges"]) if reference else _edges(values, 10)
        return {"kind": "value", "edges": edges.tolist(), "counts": _counts(values, edges)}
    if reference is not None:
        num = max(num, int(reference["num_classes"]))
    counts = np.bincount(classes.astype(np.int64), minlength=num)
    return {"kind": "class", "num_classes": int(len(counts)), "counts": counts.tolist()}


def compute_profile(
    x: Any,
    predictions: Any = None,
    bins: int = 10,
    feature_names: Sequence[str] | None = None,
    max_features: int = 64,
) -> dict[str, Any]:
    """Profile reference data ``x`` [N, ...] (and optional predictions) as JSON-able dict."""
    if bins < 1 or max_features < 1:
        raise DriftError(f"bins={bins!r} and max_features={max_features!r} must be >= 1")
    matrix, reduction = _feature_matrix(x, max_features)
    names = _names(feature_names, matrix.shape[1], reduction)
    features = {}
    for j, name in enumerate(names):
        edges = _edges(matrix[:, j], bins)
        features[name] = {"edges": edges.tolist(), "counts": _counts(matrix[:, j], edges)}
    profile: dict[str, Any] = {
        "version": PROFILE_VERSION,
        "n_samples": int(matrix.shape[0]),
        "bins": bins,
        "max_features": max_features,
        "reduction": reduction,
        # Column order, kept as a list: JSON stores (and may sort) "features" by name.
        "feature_order": names,
        "features": features,
    }
    if predictions is not None:
        profile[PREDICTIONS] = _prediction_hist(predictions, None)
    return profile


def _names(feature_names: Sequence[str] | None, n: int, reduction: str) -> list[str]:
    if feature_names is None or reduction != "none":
        prefix = "chunk_" if reduction != "none" else "feature_"
        return [f"{prefix}{j}" for j in range(n)]
    if len(feature_names) != n:
        raise DriftError(f"feature_names has {len(feature_names)} names for {n} features")
    return [str(n) for n in feature_names]


def profile_like(reference: Mapping[str, Any], x: Any, predictions: Any = None) -> dict[str, Any]:
    """Profile ``x`` on the reference's bin edges, feature names and reduction."""
    matrix, _ = _feature_matrix(x, int(reference["max_features"]), reference["reduction"])
    names = _column_order(reference)
    if matrix.shape[1] != len(names):
        raise DriftError(
            f"current data has {matrix.shape[1]} features after reduction, the reference "
            f"profile has {len(names)}; profile data of the same shape"
        )
    features = {
        name: {
            "edges": reference["features"][name]["edges"],
            "counts": _counts(matrix[:, j], np.asarray(reference["features"][name]["edges"])),
        }
        for j, name in enumerate(names)
    }
    out = {**reference, "n_samples": int(matrix.shape[0]), "features": features}
    out.pop(PREDICTIONS, None)
    if predictions is not None:
        out[PREDICTIONS] = _prediction_hist(predictions, reference.get(PREDICTIONS))
    return out


def _column_order(reference: Mapping[str, Any]) -> list[str]:
    """Feature names in column order (profiles read back from JSON may have sorted keys)."""
    if reference.get("feature_order"):
        return list(reference["feature_order"])
    names = list(reference["features"])
    suffixes = [n.rpartition("_")[2] for n in names]
    if all(
        n.startswith(("feature_", "chunk_")) and s.isdigit()
        for n, s in zip(names, suffixes, strict=True)
    ):
        return sorted(names, key=lambda n: int(n.rpartition("_")[2]))
    return names


def compare_profiles(
    reference: Mapping[str, Any],
    current: Mapping[str, Any] | Any,
    warning: float = 0.1,
    critical: float = 0.2,
    current_predictions: Any = None,
) -> DriftMetrics:
    """Score ``current`` (a profile, or raw data binned on the reference edges)."""
    if not isinstance(current, Mapping):
        current = profile_like(reference, current, current_predictions)
    missing = sorted(set(reference["features"]) ^ set(current["features"]))
    if missing:
        raise DriftError(f"profiles describe different features; not in both: {missing}")
    for name, feat in reference["features"].items():
        if not np.allclose(feat["edges"], current["features"][name]["edges"]):
            raise DriftError(
                f"feature {name!r} of the current profile uses other bin edges than the "
                f"reference; build it with profile_like(reference, x) or pass raw data"
            )
    details = {
        name: js_divergence(feat["counts"], current["features"][name]["counts"])
        for name, feat in reference["features"].items()
    }
    if PREDICTIONS in reference and PREDICTIONS in current:
        ref_c, cur_c = reference[PREDICTIONS]["counts"], current[PREDICTIONS]["counts"]
        width = max(len(ref_c), len(cur_c))
        details[PREDICTIONS] = js_divergence(
            np.pad(ref_c, (0, width - len(ref_c))), np.pad(cur_c, (0, width - len(cur_c)))
        )
    scores = list(details.values())
    worst = max(scores) if scores else 0.0
    affected = sorted((n for n, s in details.items() if s >= warning), key=lambda n: -details[n])
    return DriftMetrics(
        js_divergence=worst,
        status=drift_status(worst, warning, critical),  # type: ignore[arg-type]
        affected_features=affected,
        timestamp=datetime.now(timezone.utc).isoformat(),
        details=details,
        mean_divergence=float(np.mean(scores)) if scores else 0.0,
    )
