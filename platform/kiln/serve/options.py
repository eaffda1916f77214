"""``ServeOptions``: every knob of a served bundle, validated in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from kiln.errors import ConfigError

__all__ = ["ServeOptions", "DEFAULT_MAX_BODY_BYTES"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class ServeOptions:
    """How a bundle is served.

    Attributes:
        name: Serve application name (a redeploy under the same name rolls replicas).
        route_prefix: HTTP prefix of the app; endpoints are ``<prefix>/predict`` etc.
        batching: Group concurrent requests with ``@serve.batch``. Off by default:
            measured on small models it costs latency at concurrency 1 and gains
            nothing at 16 (see benchmarks/bench_serve.py).
        max_batch_size: Most requests per batch when batching.
        batch_wait_timeout_s: How long a batch waits to fill.
        num_replicas: Fixed replica count (ignored when ``autoscaling_config`` is set).
        autoscaling_config: Ray Serve autoscaling dict (min_replicas, max_replicas, ...).
        max_ongoing_requests: Requests a replica works on at once.
        max_queued_requests: Requests waiting per caller before Serve answers 503 (-1: no limit).
        max_body_bytes: Larger request bodies are answered 413; counted while the
            body is read, so a chunked upload stops at the limit.
        body_timeout_s: A client that has not sent its whole body in this many
            seconds is answered 408 (a slow or stalled client holds no slot longer).
        api_key_sha256: sha256 hex digest of the API key; when set, ``/predict`` and
            ``/metadata`` need ``Authorization: Bearer <key>`` (``/healthz`` stays
            open). Only the digest travels to the replicas.
        num_cpus: CPUs reserved per replica.
        intra_op_threads: onnxruntime threads per replica.
        runtime_env_vars: Environment of the replica processes (``start_serve`` returns
            the one its ingress needs).
        served_as: The reference the server was started with (``digits@production``);
            ``/metadata`` reports it beside the bundle's model name and version.
    """

    name: str = "kiln"
    route_prefix: str = "/"
    batching: bool = False
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.002
    num_replicas: int = 1
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = 64
    max_queued_requests: int = 512
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = 30.0
    api_key_sha256: str | None = None
    num_cpus: float = 1.0
    intra_op_threads: int = 1
    runtime_env_vars: dict[str, str] | None = None
    served_as: str | None = None

    def __post_init__(self) -> None:
        errors = []
        if not self.name or "/" in self.name:
            errors.append(f"name: {self.name!r} must be a non-empty name without '/'")
        if not self.route_prefix.startswith("/"):
            errors.append(f"route_prefix: {self.route_prefix!r} must start with '/'")
        for attr in ("max_batch_size", "num_replicas", "max_ongoing_requests", "max_body_bytes"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{attr}: {value!r} must be an integer >= 1")
        if not (self.max_queued_requests == -1 or self.max_queued_requests >= 1):
            errors.append(
                f"max_queued_requests: {self.max_queued_requests!r} must be -1 (no limit) or >= 1"
            )
        if not 0 <= self.batch_wait_timeout_s <= 10:
            errors.append(f"batch_wait_timeout_s: {self.batch_wait_timeout_s!r} must be in [0, 10]")
        if not 0 < self.body_timeout_s <= 3600:
            errors.append(f"body_timeout_s: {self.body_timeout_s!r} must be in (0, 3600]")
        key = self.api_key_sha256
        if key is not None and not (
            isinstance(key, str) and len(key) == 64 and set(key) <= set("0123456789abcdef")
        ):
            errors.append(
                "api_key_sha256: must be a sha256 hex digest (64 lowercase hex characters); "
                "pass the key's digest, not the key"
            )
        if self.num_cpus < 0:
            errors.append(f"num_cpus: {self.num_cpus!r} must be >= 0")
        if self.intra_op_threads < 0:
            errors.append(f"intra_op_threads: {self.intra_op_threads!r} must be >= 0")
        if self.autoscaling_config is not None and not isinstance(self.autoscaling_config, dict):
            errors.append(f"autoscaling_config: {self.autoscaling_config!r} must be a dict")
        if self.batching and self.max_ongoing_requests < self.max_batch_size:
            errors.append(
                f"max_ongoing_requests: {self.max_ongoing_requests!r} is below max_batch_size="
                f"{self.max_batch_size!r}; batches could never fill"
            )
        if errors:
            raise ConfigError(errors)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeOptions:
        """Build from a dict (a YAML ``args`` block); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"serve options: unknown keys {unknown!r}; allowed keys are {sorted(known)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
