"""`kiln serve`: serve a bundle or a registered model on Ray Serve until Ctrl-C.

    kiln serve exports/my_model [--port 8000] [--host 127.0.0.1] [--replicas N]
    kiln serve digits@production --reload-on-promote [--poll-interval 5]

Starts (or joins, with ``--address``/``RAY_ADDRESS``) Ray, deploys the bundle, prints
the URL and blocks. ``NAME@TAG`` is exported once into ``$KILN_HOME/bundles``, keyed by
the registered weights' sha256; with ``--reload-on-promote`` the tag is polled and a
newly promoted version is rolled out under the same app (in-flight requests finish).
``--ingress haproxy`` (default) puts HAProxy in front of the replicas; its stats and
metrics listeners (ports 8404/9101 unless RAY_SERVE_HAPROXY_STATS_PORT/_METRICS_PORT
are set) bind ``--host`` like the HTTP port, except when joining a cluster whose head
node is another machine (a warning says so). ``--ingress optimized`` keeps Serve's
own proxy (slower, no extra listeners).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _resolver(args: argparse.Namespace):
    """A function returning ``(bundle_dir, key)`` for the current target of ``args.source``."""
    from kiln.cli.export import registry_paths
    from kiln.export import export_registered, is_model_ref, load_bundle

    if not is_model_ref(args.source):
        bundle = load_bundle(args.source, verify=True)
        key = bundle.artifact_sha256["onnx"] if "onnx" in bundle.formats else ""
        return lambda: (bundle.path, key)
    from kiln.cli.runs import run_paths

    db, artifacts = registry_paths(args)
    cache = Path(args.cache_dir) if args.cache_dir else run_paths(args).bundles

    def resolve() -> tuple[Path, str]:
        bundle_dir, entry = export_registered(args.source, db, artifacts, cache, "onnx")
        return bundle_dir, f"{entry.name}:{entry.version}:{entry.sha256}"

    return resolve


def _options(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
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
    }
    if args.num_cpus is not None:
        opts["num_cpus"] = args.num_cpus
    return opts


def cmd_serve(args: argparse.Namespace) -> int:
    from ray import serve

    from kiln.serve import build_app
    from kiln.serve.runner import TagFollower, deploy, start_serve

    resolve = _resolver(args)
    bundle_dir, key = resolve()
    address = args.address or os.environ.get("RAY_ADDRESS")
    env = start_serve(host=args.host, port=args.port, address=address, ingress=args.ingress)
    options = _options(args, env)

    def redeploy(path: Path) -> None:
        deploy(build_app(str(path), **options), name=args.name)

    redeploy(bundle_dir)
    url = f"http://{args.host}:{args.port}"
    print(f"serving {bundle_dir} at {url}/predict  (GET {url}/healthz, {url}/metadata)")
    print("Ctrl-C to stop", flush=True)
    follower = TagFollower(resolve=resolve, redeploy=redeploy, current_key=key)
    try:
        if args.reload_on_promote:
            follower.follow(args.poll_interval)
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a bundle or NAME@TAG over HTTP with Ray Serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="bundle directory, or NAME@TAG / NAME:VERSION")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
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
