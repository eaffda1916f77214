"""What runs in each batch-prediction actor: rows in, predictions (or rejects) out.

``BundleScorer`` is the callable class :func:`kiln.predict.predict` hands to Ray Data's
``map_batches``; each actor builds one onnxruntime session, once, from a
``ScorerSpec`` the driver read from a verified bundle. It imports only numpy,
onnxruntime and pyarrow: importing ``kiln.export`` would pull in torch, seconds per
actor start on a small machine.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ConfigError
from kiln.predict._files import Location

__all__ = ["BundleScorer", "ScorerSpec"]


@dataclass(frozen=True)
class ScorerSpec:
    """What an actor needs from a verified bundle, read in the driver.

    The actors import only onnxruntime and numpy (not torch, which importing
    ``kiln.export`` would pull in: seconds per actor start on a small machine).
    """

    onnx_path: str
    onnx_sha256: str
    input_name: str
    output_name: str
    row_shape: tuple[int, ...]
    dtype: str
    task_type: str
    class_names: list[str] | None
    num_outputs: int
    mean: np.ndarray | None
    inv_std: np.ndarray | None
    allow_non_finite: bool

    @classmethod
    def of(cls, bundle: Any) -> ScorerSpec:
        from kiln.export.preprocess import stats_array

        manifest = bundle.manifest
        pre = manifest.get("preprocessing") or {}
        row_shape = tuple(int(d) for d in bundle.input_shape)
        norm = pre.get("normalize")
        return cls(
            onnx_path=str(bundle.artifact_path("onnx")),
            onnx_sha256=bundle.artifact_sha256["onnx"],
            input_name=manifest["inputs"][0]["name"],
            output_name=manifest["outputs"][0]["name"],
            row_shape=row_shape,
            dtype=bundle.input_dtype,
            task_type=bundle.task_type,
            class_names=pre.get("class_names"),
            num_outputs=int(np.prod(manifest["outputs"][0]["shape"][1:] or [1])),
            mean=stats_array(norm["mean"], row_shape) if norm else None,
            inv_std=1.0 / stats_array(norm["std"], row_shape) if norm else None,
            allow_non_finite=bool(pre.get("allow_non_finite", False)),
        )


class BundleScorer:
    """A Ray Data actor: one onnxruntime session over a bundle's ONNX file, loaded once.

    ``__call__`` takes a numpy batch (dict of columns) and returns the kept columns,
    ``prediction`` and, for classifiers, ``prob_<class>`` columns, for the rows that
    could be scored; the others go to a rejects part file under ``rejects``.
    """

    def __init__(
        self, spec: ScorerSpec, features: list[str] | str, keep: list[str], rejects: str
    ) -> None:
        import hashlib

        import onnxruntime as ort

        with open(spec.onnx_path, "rb") as fh:  # the driver verified it; check it still is
            if hashlib.sha256(fh.read()).hexdigest() != spec.onnx_sha256:
                raise ConfigError(
                    f"{spec.onnx_path!r} no longer matches the sha256 in its bundle's manifest"
                )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # one actor per CPU; more threads only contend
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            spec.onnx_path, opts, providers=["CPUExecutionProvider"]
        )
        self.spec, self.features, self.keep = spec, features, keep
        self.width = int(np.prod(spec.row_shape))
        self.rejects = Location.of(rejects)
        self.tag = uuid.uuid4().hex[:12]
        self.parts = 0
        self.prob_columns = (
            [f"prob_{n}" for n in (spec.class_names or range(spec.num_outputs))]
            if spec.task_type == "classification"
            else []
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values()))) if batch else 0
        x, reasons = self._rows(batch, n)
        out = {c: np.asarray(batch[c]) for c in self.keep}
        if reasons:  # the common case, no rejects, copies nothing here
            ok = np.ones(n, dtype=bool)
            ok[list(reasons)] = False
            self._reject(batch, reasons)
            out = {c: v[ok] for c, v in out.items()}
            x = x[ok]
        x = x.reshape((-1, *self.spec.row_shape)).astype(self.spec.dtype, copy=False)
        if self.spec.mean is not None:
            x = ((x - self.spec.mean) * self.spec.inv_std).astype(self.spec.dtype)
        raw = (
            self.session.run([self.spec.output_name], {self.spec.input_name: x})[0]
            if len(x)
            else None
        )
        out.update(self._format(raw, len(x)))
        return out

    # -- rows -----------------------------------------------------------------------
    def _rows(self, batch: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, dict[int, str]]:
        """Features as float32 ``[n, width]`` and ``{row: reason}`` of the rows to reject."""
        reasons: dict[int, str] = {}
        strict = not self.spec.allow_non_finite
        if isinstance(self.features, str):
            x = self._list_column(np.asarray(batch[self.features]), n, reasons)
            if strict:
                for i in np.flatnonzero(~np.isfinite(x).all(axis=1)):
                    reasons.setdefault(int(i), f"{self.features!r} holds NaN or infinite values")
        else:
            x = np.zeros((n, len(self.features)), dtype=np.float32)
            for j, name in enumerate(self.features):
                x[:, j] = _numeric(np.asarray(batch[name]), name, reasons, strict)
        if reasons:
            x = x if x.flags.writeable else x.copy()  # Ray's zero-copy batches are read-only
            x[list(reasons)] = 0.0
        return x, reasons

    def _list_column(self, col: np.ndarray, n: int, reasons: dict[int, str]) -> np.ndarray:
        name = self.features
        if col.dtype != object and col.ndim >= 2:  # a regular tensor column: one check
            flat = col.reshape(n, -1)
            if flat.shape[1] == self.width and flat.dtype.kind in "fiub":
                return flat.astype(np.float32, copy=False)
            col = np.array(list(flat) + [None], dtype=object)[:-1]
        x = np.zeros((n, self.width), dtype=np.float32)
        for i, value in enumerate(col):
            if value is None:
                reasons[i] = f"{name!r} is empty"
                continue
            try:
                row = np.asarray(value, dtype=np.float32).reshape(-1)
            except (TypeError, ValueError):
                reasons[i] = f"{name!r} holds values that are not numbers: {_short(value)}"
                continue
            if row.size != self.width:
                reasons[i] = f"{name!r} has {row.size} values; the model takes {self.width}"
                continue
            x[i] = row
        return x

    # -- outputs --------------------------------------------------------------------
    def _format(self, raw: np.ndarray | None, n: int) -> dict[str, np.ndarray]:
        # Columns come from the spec, not the batch: a batch whose rows were all rejected
        # must have the same columns (and dtypes) as the others.
        if self.spec.task_type == "regression":
            width = self.spec.num_outputs
            values = np.zeros((0, width)) if raw is None else raw.reshape(n, width)
            values = values.astype(np.float32, copy=False)
            if width == 1:
                return {"prediction": values[:, 0]}
            return {f"prediction_{k}": values[:, k] for k in range(width)}
        k = len(self.prob_columns)
        probs = np.zeros((0, k), np.float32) if raw is None else _softmax(raw)
        idx = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        names = self.spec.class_names
        out = {"prediction": np.asarray(names, dtype=object)[idx] if names else idx}
        out.update({c: probs[:, j] for j, c in enumerate(self.prob_columns)})
        return out

    def _reject(self, batch: dict[str, np.ndarray], reasons: dict[int, str]) -> None:
        lines = []
        for i, reason in sorted(reasons.items()):
            record: dict[str, Any] = {"reason": reason}
            record.update({c: _plain(batch[c][i]) for c in self.keep})
            record["row"] = {c: _plain(v[i]) for c, v in batch.items()}
            lines.append(json.dumps(record, default=str))
        self.parts += 1
        name = f"part-{self.tag}-{self.parts:06d}.jsonl"
        final = self.rejects.child(name)
        data = ("\n".join(lines) + "\n").encode()
        if self.rejects.is_local:  # temp name, fsync, rename: never half a part
            tmp = Path(self.rejects.path) / f".{name}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final.path)
        else:  # object stores publish a whole object on close
            with self.rejects.fs.open_output_stream(final.path) as out:
                out.write(data)


def _numeric(col: np.ndarray, name: str, reasons: dict[int, str], strict: bool) -> np.ndarray:
    """One scalar feature column as float32; rows that cannot be scored get a reason.

    Numeric columns take one vectorised check; only other columns (strings, objects)
    are parsed value by value. An empty cell reads as NaN in a numeric column.
    """
    if col.dtype.kind in "iub":
        return col.astype(np.float32)
    if col.dtype.kind == "f":
        values = col.astype(np.float32, copy=False)
        if strict:
            for i in np.flatnonzero(~np.isfinite(values)):
                what = "infinite" if np.isinf(values[i]) else "empty or NaN"
                reasons.setdefault(int(i), f"column {name!r} is {what}")
        return values
    import pandas as pd

    series = pd.Series(col, dtype=object)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    missing = series.isna().to_numpy()
    for i in np.flatnonzero(np.isnan(values) | (strict & np.isinf(values))):
        if missing[i]:
            reason = f"column {name!r} is empty"
        elif np.isnan(values[i]):
            reason = f"column {name!r} is not a number: {_short(col[i])}"
        else:
            reason = f"column {name!r} is infinite"
        reasons.setdefault(int(i), reason)
    return values.astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    # kiln.export.preprocess.softmax, restated: importing kiln.export imports torch.
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(_plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
