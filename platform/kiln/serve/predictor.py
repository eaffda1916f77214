"""The request path of a served bundle, free of Ray: parse, validate, run, format.

``Predictor`` owns one onnxruntime session over a verified bundle's ONNX file
(never TorchScript or pickle). Every bad request becomes a ``RequestError``
carrying the HTTP status to answer with, so the Serve deployment around it
only maps exceptions to responses and a bad request never takes a replica down.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kiln.errors import RequestError
from kiln.export.manifest import Bundle, load_bundle
from kiln.export.preprocess import softmax, stats_array

__all__ = ["RequestError", "Predictor"]


def _has_bool(value: Any, depth: int = 0) -> bool:
    """Whether a parsed JSON value holds true/false anywhere (numpy would cast them to 1/0)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, list) and depth < 64:
        return any(_has_bool(v, depth + 1) for v in value)
    return False


class Predictor:
    """Runs one bundle's ONNX model on validated JSON batches.

    Args:
        bundle: A ``Bundle`` or a bundle path (verified against its manifest when a path).
        intra_op_threads: onnxruntime threads per session (0 lets onnxruntime choose).
    """

    def __init__(self, bundle: Bundle | str, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=True)
        manifest = self.bundle.manifest
        self.row_shape = tuple(int(d) for d in self.bundle.input_shape)
        self.dtype = np.dtype(self.bundle.input_dtype)
        self.expected = f"[batch, {', '.join(map(str, self.row_shape))}]"
        self.task_type = self.bundle.task_type
        pre = manifest.get("preprocessing") or {}
        self.allow_non_finite = bool(pre.get("allow_non_finite", False))
        self.class_names = pre.get("class_names")
        norm = pre.get("normalize")
        self.mean = stats_array(norm["mean"], self.row_shape) if norm else None
        self.inv_std = 1.0 / stats_array(norm["std"], self.row_shape) if norm else None

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        self.input_name = manifest["inputs"][0]["name"]
        self.output_name = manifest["outputs"][0]["name"]
        self.session = ort.InferenceSession(
            str(self.bundle.artifact_path("onnx")), opts, providers=["CPUExecutionProvider"]
        )

    def parse(self, body: bytes) -> np.ndarray:
        """Decode ``{"inputs": [...]}`` into a validated, preprocessed batch."""
        try:
            text = body.decode("utf-8")  # JSON between systems is UTF-8 (RFC 8259, 8.1)
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"body is not UTF-8: {exc}") from None
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise RequestError(400, f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise RequestError(400, "body is nested too deeply to be a batch of rows") from None
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise RequestError(
                422,
                f'body must be an object {{"inputs": ...}} with inputs of shape {self.expected}',
            )
        inputs = payload["inputs"]
        if (b"true" in body or b"false" in body) and _has_bool(inputs):
            raise RequestError(
                422, f"inputs must be numbers, not true/false; expected {self.expected}"
            )
        return self.validate(inputs)

    def validate(self, inputs: Any) -> np.ndarray:
        """Turn nested lists into a ``[batch, *row_shape]`` array, or raise ``RequestError``."""
        if not isinstance(inputs, list) or not inputs:
            raise RequestError(
                422, f"inputs must be a non-empty list of rows, expected shape {self.expected}"
            )
        bad = RequestError(
            422,
            f"inputs must be {self.dtype.name} numbers in a regular array of shape {self.expected}",
        )
        try:
            # Inferred first, so strings ("1.5"), booleans and None are refused rather
            # than converted; then cast.
            raw = np.asarray(inputs)
        except (ValueError, TypeError, RecursionError, OverflowError):
            raise bad from None
        if raw.dtype.kind not in "iuf":
            raise bad
        try:
            x = raw.astype(self.dtype, copy=False)
        except (ValueError, TypeError, OverflowError):
            raise bad from None
        if x.shape[1:] != self.row_shape:
            raise RequestError(
                422, f"inputs have shape {list(x.shape)}, expected shape {self.expected}"
            )
        if not self.allow_non_finite and self.dtype.kind == "f" and not np.isfinite(x).all():
            raise RequestError(422, f"inputs contain NaN or inf; expected finite {self.dtype.name}")
        if self.mean is not None:
            x = ((x - self.mean) * self.inv_std).astype(self.dtype, copy=False)
        return x

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw model output for one batch."""
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def format(self, out: np.ndarray) -> dict[str, Any]:
        """Turn raw outputs into the response body."""
        if self.task_type == "regression":
            values = out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out
            return {"predictions": values.tolist()}
        if self.task_type != "classification":
            return {"predictions": out.tolist()}
        probs = softmax(out.astype(np.float32, copy=True))
        idx = probs.argmax(axis=1)
        if self.class_names:
            names = self.class_names
            preds: list[Any] = [names[i] for i in idx]
        else:
            preds = idx.tolist()
        return {"predictions": preds, "probabilities": probs.tolist()}

    def predict(self, inputs: Any) -> dict[str, Any]:
        """Validate, run and format in one call (for tests and in-process use)."""
        return self.format(self.run(self.validate(inputs)))
