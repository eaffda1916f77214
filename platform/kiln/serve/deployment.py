"""The Ray Serve deployment of a bundle, and ``build_app`` that binds it.

One replica loads and verifies the bundle once, then answers::

    POST /predict   {"inputs": [[...], ...]} -> {"predictions": [...], "probabilities": [[...]]}
    GET  /healthz   {"status": "ok", "pid": ..., ...}   (open even with an API key)
    GET  /metadata  the manifest without file paths

Every refusal is a 4xx with ``{"error": "..."}`` saying what was wrong: 400 bad
JSON, 401 missing or wrong API key, 404/405 route or method, 408 body not sent in
time, 413 body over the limit (counted while reading, so a chunked upload stops
there), 415 a content type other than JSON, 422 inputs of the wrong type or shape.

Requests are plain Starlette requests routed by their last path segment (no
FastAPI app in the hot path). Concurrent requests may be grouped by
``@serve.batch`` when ``ServeOptions.batching`` is on.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from kiln.export.manifest import Bundle, load_bundle
from kiln.serve.options import ServeOptions
from kiln.serve.predictor import Predictor, RequestError

__all__ = ["KilnModelDeployment", "build_app"]

logger = logging.getLogger(__name__)
_JSON = "application/json"
# Runs predicted shorter than this stay on the event loop (a stall this short is harmless).
_INLINE_S = 0.002


def _error(status: int, message: str) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(
        json.dumps({"error": message}).encode(),
        status_code=status,
        media_type=_JSON,
        headers=headers,
    )


def _is_json(content_type: str | None) -> bool:
    """No content type, ``application/json`` or a ``+json`` type (parameters ignored)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == _JSON or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, counted while it arrives: 413 as soon as it passes ``limit``.

    A declared ``Content-Length`` over the limit is refused before reading anything;
    a chunked upload is read only up to the limit, never buffered whole.
    """
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise RequestError(400, f"content-length {length[:32]!r} is not a byte count")
        if int(length) > limit:
            raise RequestError(413, f"body of {int(length)} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes (read {size})")
        chunks.append(chunk)
    return b"".join(chunks)


class KilnModelDeployment:
    """Serves one verified bundle on onnxruntime (one instance per replica)."""

    def __init__(self, bundle_path: str, artifact_sha256: dict[str, str], options: dict) -> None:
        bundle = load_bundle(bundle_path, verify=True)
        if bundle.artifact_sha256 != artifact_sha256:
            raise RuntimeError(
                f"bundle {bundle_path!r} changed since the app was built; refusing to serve it"
            )
        self.options = ServeOptions.from_dict(options)
        self.predictor = Predictor(bundle, intra_op_threads=self.options.intra_op_threads)
        # One thread: runs stay serial as on the event loop, which stays free meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-onnx")
        self._s_per_row: float | None = None  # running cost of one row, for _run
        self.max_body = self.options.max_body_bytes
        key = self.options.api_key_sha256
        self._key_digest = bytes.fromhex(key) if key else None
        self.batching = self.options.batching
        if self.batching:
            # @serve.batch adds these setters at run time; typing cannot see them.
            self._run_batched.set_max_batch_size(self.options.max_batch_size)  # type: ignore[attr-defined]
            self._run_batched.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)  # type: ignore[attr-defined]
        meta = bundle.metadata()
        if self.options.served_as:
            meta["served_as"] = self.options.served_as
            name, _, tag = self.options.served_as.partition("@")
            if tag:
                meta.setdefault("model", {"name": name})["tag"] = tag
        self._metadata = json.dumps(meta).encode()
        self._health = json.dumps(
            {
                "status": "ok",
                "name": meta["name"],
                "sha256": bundle.artifact_sha256.get("onnx"),
                "pid": os.getpid(),
            }
        ).encode()

    async def __call__(self, request: Request) -> Response:
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        method = request.method
        try:
            if route == "healthz" and method == "GET":
                return Response(self._health, media_type=_JSON)
            self._authorize(request)
            if route == "predict":
                if method != "POST":
                    return _error(405, "use POST /predict")
                return await self._predict(request)
            if method != "GET":
                return _error(405, f"use GET /{route}")
            if route == "metadata":
                return Response(self._metadata, media_type=_JSON)
            return _error(404, "unknown route; use POST /predict, GET /healthz, GET /metadata")
        except RequestError as exc:
            return _error(exc.status, exc.message)
        except Exception as exc:  # a bug must not take the replica down
            logger.exception("unexpected error serving %s", request.url.path)
            return _error(500, f"internal error: {type(exc).__name__}")

    def _authorize(self, request: Request) -> None:
        """401 unless an API key is set and the request carries it (constant-time compare)."""
        if self._key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._key_digest):
            raise RequestError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'")

    async def _predict(self, request: Request) -> Response:
        if not _is_json(request.headers.get("content-type")):
            raise RequestError(
                415,
                f"content-type {request.headers['content-type'][:64]!r} is not JSON; "
                "send application/json",
            )
        try:
            body = await asyncio.wait_for(
                read_body(request, self.max_body), self.options.body_timeout_s
            )
        except asyncio.TimeoutError:
            raise RequestError(
                408, f"body not received within {self.options.body_timeout_s:g} s"
            ) from None
        x = self.predictor.parse(body)
        out = await self._run_batched(x) if self.batching else await self._run(x)
        return Response(json.dumps(self.predictor.format(out)).encode(), media_type=_JSON)

    async def _run(self, x: np.ndarray) -> np.ndarray:
        """Run the model: inline when it is quick, else on the replica's inference thread.

        onnxruntime releases the GIL, so on the thread the event loop keeps reading
        requests and answering 503s, 413s and health checks while a large batch runs
        (inline, a 2000-row batch of a wide MLP held the loop for seconds and overload
        503s waited behind it). The hop costs ~70 us a request (measured in-process on
        2 cores, ~9 % of a 0.8 ms round trip), so batches predicted to take under
        ``_INLINE_S`` from the running cost per row stay inline.
        """
        predicted = self._s_per_row * len(x) if self._s_per_row is not None else None
        t0 = time.perf_counter()
        if predicted is not None and predicted < _INLINE_S:
            out = self.predictor.run(x)
        else:
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self._executor, self.predictor.run, x)
        per_row = (time.perf_counter() - t0) / max(len(x), 1)
        old = self._s_per_row
        self._s_per_row = per_row if old is None else 0.8 * old + 0.2 * per_row
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _run_batched(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        if len(batches) == 1:
            return [await self._run(batches[0])]
        out = await self._run(np.concatenate(batches))
        return np.split(out, np.cumsum([len(b) for b in batches])[:-1])


def build_app(
    bundle: Bundle | str,
    options: ServeOptions | None = None,
    **overrides: Any,
) -> serve.Application:
    """A Serve application for a bundle, ready for ``serve.run``.

    Args:
        bundle: A ``Bundle`` or a bundle directory (verified here, and again in each replica).
        options: ``ServeOptions``; keyword ``overrides`` replace single fields
            (``build_app(path, max_batch_size=32, num_replicas=2)``).

    Raises:
        IntegrityError: the bundle's files do not match its manifest.
        KilnError: the bundle has no ONNX artifact (the only format served).
    """
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=True)
    loaded.artifact_path("onnx")  # raises if the bundle cannot be served
    opts = options or ServeOptions()
    if overrides:
        opts = ServeOptions.from_dict({**opts.to_dict(), **overrides})
    deployment_options: dict[str, Any] = {
        "name": "KilnModel",
        "max_ongoing_requests": opts.max_ongoing_requests,
        "max_queued_requests": opts.max_queued_requests,
        "ray_actor_options": {"num_cpus": opts.num_cpus},
    }
    if opts.runtime_env_vars:
        deployment_options["ray_actor_options"]["runtime_env"] = {
            "env_vars": dict(opts.runtime_env_vars)
        }
    if opts.autoscaling_config:
        deployment_options["autoscaling_config"] = opts.autoscaling_config
    else:
        deployment_options["num_replicas"] = opts.num_replicas
    # serve.deployment's overloads type the class form as a decorator factory.
    deployment = serve.deployment(KilnModelDeployment).options(**deployment_options)  # type: ignore[attr-defined]
    return deployment.bind(str(loaded.path), loaded.artifact_sha256, opts.to_dict())
