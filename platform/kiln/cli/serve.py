"""`kiln serve`: serve a bundle or a registered model on Ray Serve until Ctrl-C or SIGTERM.

    kiln serve exports/my_model [--port 8000] [--host 127.0.0.1] [--replicas N]
    kiln serve digits@production --reload-on-promote [--poll-interval 5]
    KILN_API_KEY=... kiln serve exports/my_model --host 0.0.0.0
    kiln serve outputs/tiny-chat            a fine-tuned language model: POST /generate
    kiln serve tiny-lora@production         an LLM registered by `kiln llm train`

A bundle answers ``POST /predict``; a language model (a fine-tuned output folder,
merged or LoRA adapter, or a model registered by a fine-tuning job) answers
``POST /generate`` (see ``kiln.llm.serve``). Both have ``/healthz`` and ``/metadata``.

Starts (or joins, with ``--address``/``RAY_ADDRESS``) Ray, deploys the bundle, prints
the URL and blocks. ``NAME@TAG`` is exported once into ``$KILN_HOME/bundles``, keyed by
the registered weights' sha256; with ``--reload-on-promote`` the tag is polled and a
newly promoted version is rolled out under the same app (in-flight requests finish).

The server runs in a session of its own, ended with it however it ends (Ctrl-C,
SIGTERM, SIGKILL of this command, ``ray stop``): no HAProxy or Ray agent outlives it
(see ``kiln.serve._lifetime``). A port already taken (a leftover server) is named in
one line with the pid holding it.

A host other than loopback needs an API key (``$KILN_API_KEY`` or ``--api-key``;
clients send ``Authorization: Bearer <key>``) unless ``--insecure`` is given.
``--ingress haproxy`` (default) puts HAProxy in front of the replicas; its stats and
metrics listeners bind ``--host`` like the HTTP port, on ``--stats-port`` and
``--metrics-port`` (default: free ports, printed at start), except when joining a
cluster whose head node is another machine (a warning says so). ``--ingress
optimized`` keeps Serve's own proxy (slower, no extra listeners).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]

API_KEY_ENV = "KILN_API_KEY"


def _resolver(args: argparse.Namespace):
    """A function returning ``(bundle_dir or LLM folder, key)`` for ``args.source`` now."""
    from kiln.cli.export import registry_paths
    from kiln.export import export_registered, is_model_ref, load_bundle
    from kiln.llm.serve import is_llm_dir, llm_source

    if not is_model_ref(args.source) and is_llm_dir(args.source):
        return lambda: (Path(args.source), "")
    if not is_model_ref(args.source):
        bundle = load_bundle(args.source, verify=True)
        key = bundle.artifact_sha256["onnx"] if "onnx" in bundle.formats else ""
        return lambda: (bundle.path, key)
    from kiln.cli.runs import run_paths

    db, artifacts = registry_paths(args)
    cache = Path(args.cache_dir) if args.cache_dir else run_paths(args).bundles

    def resolve() -> tuple[Path, str]:
        llm = llm_source(args.source, db, artifacts)
        if llm is not None:
            return llm
        bundle_dir, entry = export_registered(args.source, db, artifacts, cache, "onnx")
        return bundle_dir, f"{entry.name}:{entry.version}:{entry.sha256}"

    return resolve


def _options(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    from kiln.export import is_model_ref

    opts: dict[str, Any] = {
        "name": args.name,
        "num_replicas": args.replicas,
        "batching": args.batching,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_ms / 1000.0,
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "max_body_bytes": args.max_body_bytes,
        "runtime_env_vars": env or None,
        "served_as": args.source if is_model_ref(args.source) else None,
    }
    if args.num_cpus is not None:
        opts["num_cpus"] = args.num_cpus
    return opts


def _build(path: Path, options: dict[str, Any], args: argparse.Namespace) -> Any:
    """The Serve app for ``path``: ``/generate`` for a language model, else ``/predict``."""
    from kiln.llm.serve import build_generate_app, is_llm_dir

    if not is_llm_dir(path):
        from kiln.serve import build_app

        return build_app(str(path), **options)
    return build_generate_app(
        path,
        base=args.base,
        num_replicas=options["num_replicas"],
        num_cpus=options.get("num_cpus", 1.0),
        max_ongoing_requests=options["max_ongoing_requests"],
        max_queued_requests=options["max_queued_requests"],
        max_body_bytes=options["max_body_bytes"],
        api_key_sha256=options.get("api_key_sha256"),
        runtime_env_vars=options["runtime_env_vars"],
        served_as=options["served_as"],
    )


def _api_key(args: argparse.Namespace) -> str | None:
    """The API key (``--api-key`` or ``$KILN_API_KEY``); refuse an open non-loopback host."""
    from kiln.errors import ConfigError

    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if key is not None and len(key) < 16:
        raise ConfigError(f"--api-key/{API_KEY_ENV}: must be at least 16 characters")
    if key is None and not args.insecure and not _is_loopback(args.host):
        raise ConfigError(
            f"--host {args.host!r} serves /predict beyond this machine: set {API_KEY_ENV} "
            "(or --api-key) so clients must send 'Authorization: Bearer <key>', or pass "
            "--insecure to serve without a key"
        )
    return key


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _haproxy_ports(args: argparse.Namespace, own_ray: bool) -> tuple[int | None, int | None]:
    """HAProxy's (stats, metrics) ports the user chose: flag, else $RAY_SERVE_HAPROXY_*_PORT
    (None: ``start_serve`` picks free ones).

    When this server starts its own Ray, every port it will listen on is checked first,
    so a leftover server shows up as one line naming the port and its pid.
    """
    from kiln.serve._ports import check_free
    from kiln.serve.runner import METRICS_PORT_ENV, STATS_PORT_ENV

    bind = "127.0.0.1" if args.host == "localhost" else args.host
    if own_ray:
        check_free(bind, args.port, "HTTP", "--port")
    if args.ingress != "haproxy":
        return None, None
    ports: list[int | None] = []
    for value, env, what, flag in (
        (args.stats_port, STATS_PORT_ENV, "HAProxy stats", "--stats-port"),
        (args.metrics_port, METRICS_PORT_ENV, "HAProxy metrics", "--metrics-port"),
    ):
        port = value or int(os.environ.get(env) or 0)
        if port and own_ray:
            check_free(bind, port, what, flag)
        ports.append(port or None)
    return ports[0], ports[1]


def _supervised(args: argparse.Namespace) -> int:
    """Re-run this command as the server, in a session of its own (see kiln.serve._lifetime)."""
    import kiln
    from kiln.serve._lifetime import supervise

    env = dict(os.environ)
    source_root = str(Path(kiln.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    return supervise([sys.executable, "-m", "kiln.cli", *args.argv], env)


def cmd_serve(args: argparse.Namespace) -> int:
    from kiln.serve._lifetime import LIFELINE_ENV

    key = _api_key(args)  # refuse before starting anything
    lifeline = os.environ.get(LIFELINE_ENV)
    if lifeline is None and getattr(args, "argv", None):
        return _supervised(args)
    return _serve(args, key, int(lifeline) if lifeline else None)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait(args: argparse.Namespace, follower: Any) -> str:
    """Block until Ray dies under the server (returns which process), polling the tag."""
    from kiln.serve._lifetime import ray_lost

    next_poll = time.monotonic() + args.poll_interval
    while (lost := ray_lost()) is None:
        time.sleep(1.0)
        if args.reload_on_promote and time.monotonic() >= next_poll:
            follower.poll()
            next_poll = time.monotonic() + args.poll_interval
    return lost


def _serve(args: argparse.Namespace, key: str | None, lifeline: int | None) -> int:
    """The server: start Ray and Serve, deploy, wait; stop on SIGTERM/SIGINT or Ray's death."""
    import ray
    from ray import serve

    from kiln.llm.serve import is_llm_dir
    from kiln.serve._lifetime import end_session, start_reaper, watch_lifeline
    from kiln.serve.runner import (
        METRICS_PORT_ENV,
        STATS_PORT_ENV,
        TagFollower,
        deploy,
        start_serve,
    )

    if lifeline is not None:
        watch_lifeline(lifeline)
        start_reaper()
    resolve = _resolver(args)
    bundle_dir, current = resolve()
    address = args.address or os.environ.get("RAY_ADDRESS")
    own_ray = not address and not ray.is_initialized()
    stats, metrics = _haproxy_ports(args, own_ray)
    env = start_serve(
        host=args.host,
        port=args.port,
        address=address,
        ingress=args.ingress,
        stats_port=stats,
        metrics_port=metrics,
        # Rollouts (a promoted tag) need Serve's proxy as HAProxy's fallback; a single
        # deploy does not, and without it a dead replica's gap answers 503 at once.
        keep_fallback=args.reload_on_promote,
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)  # as cleanly as Ctrl-C
    options = _options(args, env)
    if key is not None:
        options["api_key_sha256"] = hashlib.sha256(key.encode()).hexdigest()

    def redeploy(path: Path) -> None:
        deploy(_build(path, options, args), name=args.name)

    rc = 0
    try:
        redeploy(bundle_dir)
        url = f"http://{args.host}:{args.port}"
        route = "/generate" if is_llm_dir(bundle_dir) else "/predict"
        print(f"serving {bundle_dir} at {url}{route}  (GET {url}/healthz, {url}/metadata)")
        if STATS_PORT_ENV in env:
            print(
                f"HAProxy stats on {args.host}:{env[STATS_PORT_ENV]}, "
                f"metrics on {args.host}:{env[METRICS_PORT_ENV]}"
            )
        if key is not None:
            print(f"{route} and /metadata need 'Authorization: Bearer <key>'")
        print("Ctrl-C to stop", flush=True)
        follower = TagFollower(resolve=resolve, redeploy=redeploy, current_key=current)
        lost = _wait(args, follower)
        print(f"kiln serve: Ray's {lost} exited under the server (ray stop?); stopping", flush=True)
        if lifeline is not None:  # Ray is gone: nothing to shut down cleanly, end the rest
            end_session(os.getsid(0), spare=(os.getpid(),))
            os._exit(1)
        rc = 1
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        if rc == 0:
            serve.shutdown()
        if own_ray:
            ray.shutdown()
        if lifeline is not None:  # anything Ray left behind (its agents) goes too
            end_session(os.getsid(0), spare=(os.getpid(),))
    return rc


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a bundle or NAME@TAG over HTTP with Ray Serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source",
        help="bundle directory, fine-tuned LLM folder (merged or adapter), or NAME@TAG / "
        "NAME:VERSION",
    )
    p.add_argument("--base", help="base model folder of a LoRA adapter (default: its record)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument(
        "--api-key",
        help=f"clients must send 'Authorization: Bearer KEY' to /predict (prefer ${API_KEY_ENV}: "
        "a command line is visible to other users); required with a non-loopback --host",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without an API key",
    )
    p.add_argument(
        "--stats-port",
        type=int,
        default=None,
        help="HAProxy stats port (default $RAY_SERVE_HAPROXY_STATS_PORT, else a free port)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="HAProxy Prometheus port (default $RAY_SERVE_HAPROXY_METRICS_PORT, else a free port)",
    )
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas of the model")
    p.add_argument("--name", default="kiln", help="Serve application name")
    p.add_argument(
        "--ingress",
        choices=("haproxy", "optimized", "proxy"),
        default="haproxy",
        help="HTTP front: HAProxy (fastest; its stats/metrics ports also bind --host), "
        "Serve's proxy tuned, or Serve's defaults",
    )
    p.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="group concurrent requests with @serve.batch (default off)",
    )
    p.add_argument("--max-batch-size", type=int, default=16, help="rows per @serve.batch call")
    p.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="how long a batch waits to fill"
    )
    p.add_argument(
        "--max-ongoing-requests", type=int, default=64, help="requests a replica runs at once"
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=512,
        help="beyond this many waiting requests Serve answers 503",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies get 413"
    )
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica (default 1)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument(
        "--reload-on-promote",
        action="store_true",
        help="poll NAME@TAG and roll out a newly promoted version",
    )
    p.add_argument("--poll-interval", type=float, default=5.0, help="seconds between tag polls")
    p.add_argument(
        "--cache-dir", help="where NAME@TAG bundles are exported (default $KILN_HOME/bundles)"
    )
    p.add_argument("--db", default=argparse.SUPPRESS, help="registry database for NAME@TAG")
    p.set_defaults(func=cmd_serve)
