"""``/generate`` on Ray Serve for a fine-tuned model folder (full, merged, or adapter).

One replica loads the model once (an adapter folder loads its base and the
adapter), then answers::

    POST /generate  {"messages": [...]} or {"prompt": "..."}, max_new_tokens,
                    temperature (0: greedy), top_p, stop
                    -> {"text", "prompt_tokens", "completion_tokens"}
    GET  /healthz   {"status": "ok", "model": ...}
    GET  /metadata  model folder, kind (adapter/full), base model, vocabulary size

Bad bodies get the same answers as ``/predict``: 400 (not JSON), 413 (too large),
422 (valid JSON, invalid request), 405/404 for wrong methods and routes; Serve
itself answers 503 when its queue is full (``max_queued_requests``).

    app = build_generate_app("outputs/tiny-chat")
    serve.run(app, name="llm", route_prefix="/")
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from kiln.errors import ConfigError
from kiln.serve.options import DEFAULT_MAX_BODY_BYTES

__all__ = ["GenerateDeployment", "build_generate_app"]

logger = logging.getLogger(__name__)
_JSON = "application/json"


def _error(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}).encode(), status_code=status, media_type=_JSON)


class GenerateDeployment:
    """Serves one causal LM (one instance per replica)."""

    def __init__(self, model_dir: str, options: dict[str, Any]) -> None:
        import torch

        from kiln.llm.modeling import is_adapter_dir, load_for_inference

        torch.set_num_threads(max(1, int(options.get("threads", 1))))
        self.model, self.tokenizer = load_for_inference(model_dir, base=options.get("base"))
        self.max_body = int(options.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES))
        self.max_new_tokens_limit = int(options.get("max_new_tokens_limit", 1024))
        self._lock = asyncio.Lock()  # one generate at a time per replica: the CPU is the limit
        adapter = is_adapter_dir(model_dir)
        meta = {
            "model_dir": str(Path(model_dir).resolve()),
            "kind": "lora_adapter" if adapter else "causal_lm",
            "vocab_size": len(self.tokenizer),
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
        }
        if adapter:
            meta["base_model"] = json.loads(
                (Path(model_dir) / "adapter_config.json").read_text()
            ).get("base_model_name_or_path")
        self._metadata = json.dumps(meta).encode()
        self._health = json.dumps({"status": "ok", "model": meta["model_dir"]}).encode()

    async def __call__(self, request: Request) -> Response:
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            if route == "generate":
                if request.method != "POST":
                    return _error(405, "use POST /generate")
                return await self._generate(request)
            if request.method != "GET":
                return _error(405, f"use GET /{route}")
            if route == "healthz":
                return Response(self._health, media_type=_JSON)
            if route == "metadata":
                return Response(self._metadata, media_type=_JSON)
            return _error(404, "unknown route; use POST /generate, GET /healthz, GET /metadata")
        except Exception as exc:  # a bug must not take the replica down
            logger.exception("unexpected error serving %s", request.url.path)
            return _error(500, f"internal error: {type(exc).__name__}")

    async def _generate(self, request: Request) -> Response:
        from kiln.llm.generate import GenerationRequest, generate

        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return _error(413, f"body of {length} bytes is over the limit of {self.max_body}")
        body = await request.body()
        if len(body) > self.max_body:
            return _error(413, f"body of {len(body)} bytes is over the limit of {self.max_body}")
        try:
            data = json.loads(body)
        except ValueError as exc:
            return _error(400, f"body is not valid JSON: {exc}")
        try:
            req = GenerationRequest.from_dict(data).validate(self.max_new_tokens_limit)
        except (ConfigError, TypeError) as exc:
            return _error(422, str(exc))
        async with self._lock:
            out = await asyncio.to_thread(generate, self.model, self.tokenizer, req)
        return Response(json.dumps(out).encode(), media_type=_JSON)


def build_generate_app(
    model_dir: str | Path,
    *,
    base: str | None = None,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    max_ongoing_requests: int = 8,
    max_queued_requests: int = 64,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_new_tokens_limit: int = 1024,
    threads: int = 1,
) -> serve.Application:
    """A Serve application answering ``/generate`` for ``model_dir``, ready for ``serve.run``."""
    path = Path(model_dir)
    if not path.is_dir() or not (
        (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    ):
        raise ConfigError(
            f"model_dir={str(model_dir)!r} is not a model folder (config.json) or a LoRA "
            "adapter folder (adapter_config.json)"
        )
    # serve.deployment's overloads type the class form as a decorator factory.
    deployment = serve.deployment(GenerateDeployment).options(  # type: ignore[attr-defined]
        name="KilnGenerate",
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        ray_actor_options={"num_cpus": num_cpus},
    )
    options = {
        "base": base,
        "max_body_bytes": max_body_bytes,
        "max_new_tokens_limit": max_new_tokens_limit,
        "threads": threads,
    }
    return deployment.bind(str(path.resolve()), options)
