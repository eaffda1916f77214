"""The one place kiln starts or joins Ray."""

from __future__ import annotations

import logging
import sys


def ensure_ray(address: str | None = None, *, dashboard: bool = False) -> None:
    """Join ``address`` / $RAY_ADDRESS / a cluster from ``ray start``, else start a local Ray.

    A Ray that kiln starts itself has no dashboard unless asked (the dashboard adds
    about 9 s to start-up on 2 cores); run ``ray start --head`` for a long-lived
    cluster with the dashboard and kiln joins it.
    """
    import ray

    if not ray.is_initialized():
        try:
            ctx = ray.init(
                address=address, include_dashboard=dashboard, logging_level=logging.WARNING
            )
        except ValueError as exc:  # joining an existing cluster: it owns its dashboard
            if "include_dashboard" not in str(exc):
                raise
            ctx = ray.init(address=address, logging_level=logging.WARNING)
        url = getattr(ctx, "dashboard_url", None)
        if url:  # where to watch jobs and Train runs (stderr: stdout may be a data pipe)
            shown = url if url.startswith("http") else f"http://{url}"
            print(f"kiln: Ray dashboard at {shown}", file=sys.stderr, flush=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
