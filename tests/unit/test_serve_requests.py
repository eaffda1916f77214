"""The request path of a replica without Ray: body limits, timeouts, keys, strict inputs.

``KilnModelDeployment`` is a plain class until ``build_app`` wraps it, so it is
driven here with Starlette requests whose bodies arrive chunk by chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from starlette.requests import Request
from torch import nn

from kiln.errors import ConfigError, IntegrityError, PortInUseError
from kiln.export import create_export_bundle, load_bundle
from kiln.serve import RequestError, ServeOptions, _ports
from kiln.serve._ports import check_free, free_port
from kiln.serve.deployment import KilnModelDeployment, read_body

KEY = "s3cret-key-of-24-chars!!"
VALID = {"inputs": [[0.1, -0.2, 0.3, 0.4]]}


def _request(method: str, path: str, chunks, headers: dict[str, str] | None = None, delay=0.0):
    """A Request whose body arrives as ``chunks`` (an iterable); returns it and the chunks read."""
    it = iter(chunks)
    consumed: list[bytes] = []

    async def receive():
        if delay:
            await asyncio.sleep(delay)
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed.append(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return Request(scope, receive), consumed


def _call(dep: KilnModelDeployment, method: str, path: str, body: bytes = b"", **kw):
    request, _ = _request(method, path, [body] if body else [], **kw)
    response = asyncio.run(dep(request))
    return response.status_code, json.loads(response.body)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    task = {"task_type": "classification", "input_shape": [4], "class_names": ["a", "b", "c"]}
    return Path(create_export_bundle(model, None, task, None, tmp_path_factory.mktemp("b")))


def _deployment(bundle: Path, **options) -> KilnModelDeployment:
    sha = load_bundle(bundle).artifact_sha256
    return KilnModelDeployment(str(bundle), sha, ServeOptions(**options).to_dict())


def test_chunked_body_is_read_only_up_to_the_limit():
    chunk = b"x" * 65536
    endless = (chunk for _ in range(1600))  # 100 MiB, never all read
    request, consumed = _request("POST", "/predict", endless)
    with pytest.raises(RequestError) as err:
        asyncio.run(read_body(request, 8 * 2**20))
    assert err.value.status == 413 and "over the limit" in err.value.message
    assert len(consumed) == 8 * 2**20 // 65536 + 1


def test_declared_length_over_the_limit_is_refused_before_reading():
    request, consumed = _request("POST", "/predict", [b"x" * 10], {"content-length": "999999"})
    with pytest.raises(RequestError) as err:
        asyncio.run(read_body(request, 1000))
    assert err.value.status == 413 and consumed == []
    request, _ = _request("POST", "/predict", [b"x"], {"content-length": "12abc"})
    with pytest.raises(RequestError) as err:
        asyncio.run(read_body(request, 1000))
    assert err.value.status == 400


def test_predict_and_refusals(bundle):
    dep = _deployment(bundle)
    status, body = _call(dep, "POST", "/predict", json.dumps(VALID).encode())
    assert status == 200 and body["predictions"][0] in "abc"
    cases = {
        b'{"inputs": [["1", "2", "3", "4"]]}': 422,
        b'{"inputs": [[true, false, 1, 2]]}': 422,
        b'{"inputs": [[1, 2, 3, null]]}': 422,
        b'{"inputs": [[1, 2, 3, 1' + b"0" * 400 + b"]]}": 422,
        b'{"inputs": [[1e309, 2, 3, 4]]}': 422,
        b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}": 400,
        b'{"inputs": [[1, 2, 3, 4' + b"0" * 5000 + b"]]}": 400,  # over int digit limit
        b"\xff\xfe": 400,
        '{"inputs": [[1, 2, 3, 4]]}'.encode("utf-16"): 400,  # JSON is UTF-8
    }
    for raw, want in cases.items():
        status, body = _call(dep, "POST", "/predict", raw)
        assert (status, raw[:40]) == (want, raw[:40]), body
        assert body["error"]
    status, body = _call(dep, "POST", "/predict", b"{}", headers={"content-type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]
    ok = {"content-type": "application/vnd.api+json; charset=utf-8"}
    assert _call(dep, "POST", "/predict", json.dumps(VALID).encode(), headers=ok)[0] == 200


def test_slow_body_gets_408(bundle):
    dep = _deployment(bundle, body_timeout_s=0.2)
    request, _ = _request("POST", "/predict", [b'{"inputs"', b": [[1,2,3,4]]}"], delay=0.15)
    response = asyncio.run(dep(request))
    assert response.status_code == 408 and b"not received" in response.body


def test_api_key_guards_predict_and_metadata_not_healthz(bundle):
    dep = _deployment(bundle, api_key_sha256=hashlib.sha256(KEY.encode()).hexdigest())
    data = json.dumps(VALID).encode()
    assert _call(dep, "POST", "/predict", data)[0] == 401
    assert _call(dep, "GET", "/metadata")[0] == 401
    wrong = {"authorization": "Bearer " + "x" * 24}
    assert _call(dep, "POST", "/predict", data, headers=wrong)[0] == 401
    assert _call(dep, "POST", "/predict", data, headers={"authorization": KEY})[0] == 401
    good = {"authorization": f"Bearer {KEY}"}
    assert _call(dep, "POST", "/predict", data, headers=good)[0] == 200
    status, body = _call(dep, "GET", "/healthz")
    assert status == 200 and body["pid"] == os.getpid()


def test_options_take_a_digest_not_a_key():
    with pytest.raises(ConfigError) as err:
        ServeOptions(api_key_sha256=KEY)
    assert KEY not in str(err.value)  # a secret is never echoed


def _serve_args(**kw) -> argparse.Namespace:
    base = {"host": "127.0.0.1", "api_key": None, "insecure": False}
    return argparse.Namespace(**{**base, **kw})


def test_non_loopback_host_needs_a_key_or_insecure(monkeypatch, capsys, bundle):
    from kiln.cli import main
    from kiln.cli.serve import _api_key

    monkeypatch.delenv("KILN_API_KEY", raising=False)
    assert main(["serve", str(bundle), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "KILN_API_KEY" in err and "--insecure" in err and "'0.0.0.0'" in err
    assert _api_key(_serve_args(host="0.0.0.0", insecure=True)) is None
    assert _api_key(_serve_args(host="::1")) is None
    assert _api_key(_serve_args(host="localhost")) is None
    with pytest.raises(ConfigError):
        _api_key(_serve_args(host="10.0.0.5"))
    with pytest.raises(ConfigError, match="at least 16"):
        _api_key(_serve_args(host="0.0.0.0", api_key="short"))
    monkeypatch.setenv("KILN_API_KEY", KEY)
    assert _api_key(_serve_args(host="0.0.0.0")) == KEY


def test_free_port_avoids_ephemeral_and_ray_worker_ports(monkeypatch):
    """Picked ports sit between Ray's worker ports (10002-19999) and the kernel's
    ephemeral range, which outgoing connections and port-0 binds draw from."""
    monkeypatch.setattr(_ports, "_ephemeral_ports", lambda: range(32768, 61000))
    picks = {free_port() for _ in range(50)}
    assert all(20000 <= p < 32768 for p in picks), picks
    assert len(picks) == 50  # random, and never the same port twice in one process
    with socket.socket() as held:  # a taken port is never returned
        held.bind(("127.0.0.1", 0))
        monkeypatch.setattr(_ports, "_ephemeral_ports", lambda: range(20000 + 1000, 61000))
        taken = held.getsockname()[1]
        monkeypatch.setattr(_ports.random.SystemRandom, "choice", lambda self, r: taken)
        assert free_port() != taken  # the OS picks once every random pick was taken


def test_haproxy_bind_failure_names_the_port():
    from kiln.serve.runner import _unbound_port

    line = (
        "RuntimeError: HAProxy crashed during startup: [ALERT]    (8982) : Binding "
        "[/tmp/haproxy-serve/96/haproxy.cfg:45] for frontend prometheus: cannot bind "
        "socket (Address already in use) for [127.0.0.1:37255]"
    )
    assert _unbound_port(RuntimeError(line)) == 37255
    assert _unbound_port(RuntimeError("cannot bind socket (Permission denied) for [:80]")) == 80
    assert _unbound_port(RuntimeError("HAProxy crashed: bad config line 3")) is None


def test_taken_port_names_its_holder():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUseError) as err:
            check_free("127.0.0.1", port, "HAProxy stats", "--stats-port")
    message = str(err.value)
    assert f"port {port} (HAProxy stats)" in message and "--stats-port" in message
    assert f"pid {os.getpid()}" in message and "\n" not in message
    check_free("127.0.0.1", port, "HTTP", "--port")  # free again once closed


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_bundle_paths_leaving_the_bundle_are_refused(bundle, tmp_path, how):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    info = manifest["artifacts"]["onnx"]
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((copy / info["path"]).read_bytes())
    if how == "dotdot":
        info["path"] = "../outside.onnx"
    elif how == "absolute":
        info["path"] = str(outside)
    else:
        (copy / "artifacts" / "link.onnx").symlink_to(outside)
        info["path"] = "artifacts/link.onnx"
    manifest_path.write_text(json.dumps(manifest))
    for verify in (True, False):
        with pytest.raises(IntegrityError, match="inside the bundle"):
            load_bundle(copy, verify=verify)
