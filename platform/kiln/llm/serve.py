"""``/generate`` on Ray Serve for a fine-tuned model folder (full, merged, or adapter).

One replica loads the model once (an adapter folder loads its base and the
adapter), then answers::

    POST /generate  {"messages": [...]} or {"prompt": "..."}, max_new_tokens,
                    temperature (0: greedy), top_p, stop
                    -> {"text", "prompt_tokens", "completion_tokens"}
    GET  /healthz   {"status": "ok", "model": ...}
    GET  /metadata  model folder, kind (adapter/full), base model, vocabulary size

Bad bodies get the same answers as ``/predict``: 400 (not JSON), 413 (too large),
422 (valid JSON, invalid request), 405/404 for wrong methods and routes, 401 without
the API key when one is set; Serve itself answers 503 when its queue is full
(``max_queued_requests``).

    app = build_generate_app("outputs/tiny-chat")
    serve.run(app, name="llm", route_prefix="/")

``kiln serve`` (and its alias ``kiln llm serve``) serves a fine-tuned folder or a
registered LLM (``NAME@TAG``) this way: :func:`llm_source` tells it which sources
are language models.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from kiln.errors import ConfigError
from kiln.serve.options import DEFAULT_MAX_BODY_BYTES

__all__ = ["GenerateDeployment", "build_generate_app", "is_llm_dir", "llm_source"]

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
        key = options.get("api_key_sha256")
        self._key_digest = bytes.fromhex(key) if key else None
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
        if options.get("served_as"):
            meta["served_as"] = options["served_as"]
        self._metadata = json.dumps(meta).encode()
        self._health = json.dumps({"status": "ok", "model": meta["model_dir"]}).encode()

    async def __call__(self, request: Request) -> Response:
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            if route != "healthz" and not self._authorized(request):
                return _error(401, "missing or wrong API key; send 'Authorization: Bearer <key>'")
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

    def _authorized(self, request: Request) -> bool:
        """True without an API key, or when the request carries it (constant-time compare)."""
        if self._key_digest is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self._key_digest)

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
    api_key_sha256: str | None = None,
    runtime_env_vars: dict[str, str] | None = None,
    served_as: str | None = None,
) -> serve.Application:
    """A Serve application answering ``/generate`` for ``model_dir``, ready for ``serve.run``.

    ``api_key_sha256``: clients must send ``Authorization: Bearer <key>`` (all but
    ``/healthz``). ``runtime_env_vars``: environment for the replicas (what
    :func:`kiln.serve.runner.start_serve` returns when Ray was already running).
    """
    path = Path(model_dir)
    if not is_llm_dir(path):
        raise ConfigError(
            f"model_dir={str(model_dir)!r} is not a model folder (config.json) or a LoRA "
            "adapter folder (adapter_config.json)"
        )
    actor_options: dict[str, Any] = {"num_cpus": num_cpus}
    if runtime_env_vars:
        actor_options["runtime_env"] = {"env_vars": dict(runtime_env_vars)}
    # serve.deployment's overloads type the class form as a decorator factory.
    deployment = serve.deployment(GenerateDeployment).options(  # type: ignore[attr-defined]
        name="KilnGenerate",
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        ray_actor_options=actor_options,
    )
    options = {
        "base": base,
        "max_body_bytes": max_body_bytes,
        "max_new_tokens_limit": max_new_tokens_limit,
        "threads": threads,
        "api_key_sha256": api_key_sha256,
        "served_as": served_as,
    }
    return deployment.bind(str(path.resolve()), options)


def is_llm_dir(path: str | os.PathLike[str]) -> bool:
    """True for a Hugging Face model folder or a LoRA adapter folder (not a kiln bundle)."""
    from kiln.export.manifest import MANIFEST_NAME

    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return True
    return (p / "config.json").is_file() and not (p / MANIFEST_NAME).is_file()


_LLM_KINDS = ("lora_adapter", "causal_lm")  # what TrainerEngine registers


def llm_source(source: str, db: Any, artifacts: Any) -> tuple[Path, str] | None:
    """``(model folder, key)`` when ``source`` is a language model, else None.

    ``source`` is a folder (a fine-tuned output, merged or adapter) or a registry
    reference (``NAME@TAG`` / ``NAME:VERSION``) to a model registered by a fine-tuning
    job. The key changes when a tag points at another version (for rollouts).
    """
    from kiln.export import is_model_ref

    if not is_model_ref(source):
        return (Path(source), "") if is_llm_dir(source) else None
    from kiln.tracking import ModelRegistry

    registry = ModelRegistry(db, artifacts)
    try:
        entry = registry.resolve(source)
        if (entry.config or {}).get("kind") not in _LLM_KINDS:
            return None
        folder = Path(registry.load_checkpoint_path(entry))
    finally:
        registry.close()
    return folder, f"{entry.name}:{entry.version}:{getattr(entry, 'sha256', '')}"
