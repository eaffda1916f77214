"""A served bundle under hostile input, overload and a killed replica (HAProxy ingress).

One Serve instance on the shared test Ray holds three apps: ``/`` (the bundle as
`kiln serve` runs it, with a 2 s body timeout so the slow-client case is quick),
``/keyed`` (an API key) and ``/busy`` (a slow model, one request at a time and a
queue of four, for overload).

Pass rules (issue 12 C): every hostile request is a 4xx with a JSON ``error``, no
5xx, the replica is the same process afterwards and a valid request answers
byte-for-byte as before. Under overload the excess gets 503 and nothing hangs.
A killed replica means 503s (not hangs) until Serve has replaced it. The figures
(4xx/5xx split, 503 latencies, recovery times) are printed; run with ``-s`` to
see them. Timings are measured, never asserted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import signal
import socket
import time

import httpx
import numpy as np
import pytest
import torch
from drill_record import record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from kiln.export import create_export_bundle
from kiln.serve import build_app
from kiln.serve._ports import free_port
from kiln.serve.runner import deploy, start_serve

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "k" * 24
LIMIT = 8 * 1024 * 1024
VALID = {"inputs": [[0.1, -0.2, 0.3, 0.4], [1.0, 2.0, -3.0, 0.5]]}
FIGURES: dict[str, object] = {"statuses": {}}


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("hostile_bundles")
    task = {"task_type": "classification", "input_shape": [4], "class_names": ["a", "b", "c"]}
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    bundle = create_export_bundle(small, None, task, None, root, bundle_name="main")
    wide = nn.Sequential(nn.Linear(4, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(1024, 3))
    busy = create_export_bundle(wide, None, task, None, root, bundle_name="busy")
    port = free_port()
    # As `kiln serve` without --reload-on-promote: no fallback proxy, so no replica = 503.
    env = start_serve(host="127.0.0.1", port=port, ingress="haproxy", keep_fallback=False)
    common = {"num_cpus": 0.25, "runtime_env_vars": env}
    # deploy() as `kiln serve` does: it also caps each app's replicas in HAProxy.
    deploy(build_app(bundle, body_timeout_s=2.0, **common), name="main", route_prefix="/")
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    deploy(build_app(bundle, api_key_sha256=digest, **common), name="keyed", route_prefix="/keyed")
    deploy(
        build_app(busy, max_ongoing_requests=1, max_queued_requests=4, **common),
        name="busy",
        route_prefix="/busy",
    )
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30) as c:
        before = c.post("/predict", json=VALID)
        assert before.status_code == 200, before.text
        pid = c.get("/healthz").json()["pid"]
    yield {"url": url, "port": port, "pid": pid, "answer": before.content}
    serve.shutdown()


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served["url"], timeout=30) as c:
        yield c


def _assert_refused(r: httpx.Response, what: object) -> None:
    statuses = FIGURES["statuses"]
    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), (what, r.headers)
    message = r.json()["error"]
    assert isinstance(message, str) and len(message) > 10, (what, message)


DEEP = b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
DEEP_OBJECT = b'{"a": ' * 10_000 + b"1" + b"}" * 10_000
HAND = [
    (b'{"inputs": [[1, NaN, 3, 4]]}', None),
    (b'{"inputs": [[1, Infinity, 3, 4]]}', None),
    (b'{"inputs": [[1, -Infinity, 3, 4]]}', None),
    (b'{"inputs": [[1e309, 2, 3, 4]]}', None),
    (b'{"inputs": [["1", "2", "3", "4"]]}', None),
    (b'{"inputs": [["1.5", 2, 3, 4]]}', None),
    (b'{"inputs": [[true, false, 1, 2]]}', None),
    (b'{"inputs": [[1, 2, 3, null]]}', None),
    (b'{"inputs": [[1, 2, 3, {}]]}', None),
    (b'{"inputs": [[1, 2, 3, 4' + b"0" * 5000 + b"]]}", None),
    (b'{"inputs": [[1, 2, 3, 1' + b"0" * 400 + b"]]}", None),
    (b'{"inputs": []}', None),
    (b'{"inputs": [[]]}', None),
    (b'{"inputs": [[1, 2, 3]]}', None),
    (b'{"inputs": [[1, 2, 3, 4, 5]]}', None),
    (b'{"inputs": [[1, 2, 3, 4], [1, 2]]}', None),
    (b'{"inputs": [[[1, 2, 3, 4]]]}', None),
    (b'{"inputs": [1, 2, 3, 4]}', None),
    (b'{"inputs": {"a": [1, 2, 3, 4]}}', None),
    (b'{"inputs": "1,2,3,4"}', None),
    (b'{"inputs": null}', None),
    (b'{"rows": [[1, 2, 3, 4]]}', None),
    (b"[[1, 2, 3, 4]]", None),
    (b"", None),
    (b"   ", None),
    (b"{", None),
    (b'{"inputs": [[1, 2, 3, \xff]]}', None),
    (b"\xff\xfe\x00\x00garbage", None),
    ('{"inputs": [[1, 2, 3, 4]]}'.encode("utf-16"), None),
    (DEEP, None),
    (DEEP_OBJECT, None),
    (json.dumps(VALID).encode(), "text/plain"),
    (json.dumps(VALID).encode(), "application/x-www-form-urlencoded"),
    (json.dumps(VALID).encode(), "multipart/form-data; boundary=x"),
    (json.dumps(VALID).encode(), "application/xml"),
    (b'{"inputs": [' + b"[1,2,3,4]," * (LIMIT // 10) + b"[1,2,3,4]]}", None),
    (b" " * (LIMIT + 1), None),
]


@pytest.mark.parametrize(("body", "ctype"), HAND, ids=range(len(HAND)))
def test_hand_written_hostile_requests_are_4xx(client, body, ctype):
    r = client.post("/predict", content=body, headers={"content-type": ctype or "application/json"})
    _assert_refused(r, body[:80])


def test_wrong_methods_routes_and_keys_are_4xx(client):
    _assert_refused(client.get("/predict"), "GET /predict")
    _assert_refused(client.put("/predict", json=VALID), "PUT")
    _assert_refused(client.get("/nowhere"), "404")
    _assert_refused(client.post("/keyed/predict", json=VALID), "no key")
    wrong = {"authorization": "Bearer " + "x" * 24}
    _assert_refused(client.post("/keyed/predict", json=VALID, headers=wrong), "wrong key")
    basic = {"authorization": "Basic " + KEY}
    _assert_refused(client.post("/keyed/predict", json=VALID, headers=basic), "basic")
    _assert_refused(client.get("/keyed/metadata"), "metadata needs the key")
    assert client.post("/keyed/predict", json=VALID).headers["www-authenticate"] == "Bearer"
    assert client.get("/keyed/healthz").status_code == 200  # open for load balancers
    good = {"authorization": f"Bearer {KEY}"}
    r = client.post("/keyed/predict", json=VALID, headers=good)
    assert r.status_code == 200 and r.json() == client.post("/predict", json=VALID).json()


def _valid_rows(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(row, list)
            and len(row) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
            for row in value
        )
    )


_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json = st.recursive(
    _leaf, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c, max_size=3)
)
_number_text = st.floats(allow_nan=False, allow_infinity=False).map(repr)
_hostile = st.one_of(
    _json.filter(lambda v: not _valid_rows(v)).map(lambda v: {"inputs": v}),
    _json.filter(lambda v: not isinstance(v, dict) or "inputs" not in v),
    st.lists(
        st.lists(st.floats(), min_size=0, max_size=9).filter(lambda r: len(r) != 4),
        min_size=1,
        max_size=4,
    ).map(lambda v: {"inputs": v}),
    st.lists(st.lists(_number_text, min_size=4, max_size=4), min_size=1, max_size=3).map(
        lambda v: {"inputs": v}
    ),
    st.lists(
        st.lists(
            st.sampled_from([float("nan"), float("inf"), -float("inf"), 1.0]),
            min_size=4,
            max_size=4,
        ),
        min_size=1,
        max_size=3,
    )
    .filter(lambda v: not np.isfinite(v).all())
    .map(lambda v: {"inputs": v}),
)
_bodies = st.one_of(
    _hostile.map(lambda v: (json.dumps(v).encode(), "application/json")),
    st.binary(max_size=64)
    .filter(lambda b: not b.strip().startswith(b"{"))
    .map(lambda b: (b, "application/json")),
    st.tuples(
        st.just(json.dumps(VALID).encode()),
        st.sampled_from(["text/plain", "text/html", "application/octet-stream", "image/png"]),
    ),
)


@settings(
    max_examples=960,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=_bodies)
def test_generated_hostile_requests_are_4xx(served, case):
    body, ctype = case
    with httpx.Client(base_url=served["url"], timeout=30) as c:
        r = c.post("/predict", content=body, headers={"content-type": ctype})
    _assert_refused(r, body[:80])


def _read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """Status line + headers and the whole body (by Content-Length) from a raw socket."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {raw[:300]!r}"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-body: {head!r}"
        body += chunk
    return head, body


def test_slow_client_gets_408_and_does_not_block_others(served, client):
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=30) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"inputs": [[1, 2'
        )
        assert client.post("/predict", json=VALID).status_code == 200  # served meanwhile
        head, body = _read_response(s)
    assert head.split()[1] == b"408", head
    assert "not received" in json.loads(body)["error"]
    FIGURES["statuses"][408] = FIGURES["statuses"].get(408, 0) + 1


def test_chunked_100mb_upload_stops_at_the_limit(served):
    """Transfer-Encoding: chunked, no Content-Length: 413 once 8 MiB have arrived."""
    chunk = b"[1,2,3,4]," * 6554  # 64 KiB
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=30) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n6\r\n{"a":[\r\n'
        )
        deadline = time.monotonic() + 120
        while sent < 100 * 1024 * 1024 and time.monotonic() < deadline:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        s.settimeout(30)
        head, body = _read_response(s)
    assert head.split()[1] == b"413", head
    assert "over the limit" in json.loads(body)["error"]
    assert sent < 100 * 1024 * 1024  # stopped long before the whole upload
    record("serve_chunked", {"status": 413, "MiB sent before the answer": round(sent / 2**20, 1)})


def test_replica_survived_and_answers_identically(served, client):
    assert client.get("/healthz").json()["pid"] == served["pid"]
    assert client.post("/predict", json=VALID).content == served["answer"]
    counts = FIGURES["statuses"]
    print(
        f"\nhostile requests: {sum(counts.values())} answered, by status {sorted(counts.items())}"
    )
    assert sum(counts.values()) >= 1000 and not [s for s in counts if s >= 500]
    record(
        "serve_hostile",
        {
            "requests": sum(counts.values()),
            "4xx": sum(n for s, n in counts.items() if 400 <= s < 500),
            "5xx": sum(n for s, n in counts.items() if s >= 500),
            "by status": {str(s): n for s, n in sorted(counts.items())},
            "replica pid unchanged": True,
        },
    )


async def _raw_post(port: int, request: bytes, go: asyncio.Event) -> tuple[int, float]:
    """One client on its own connection: connect, wait for ``go``, send, time the answer.

    Raw streams, so the time is the server's, not a client library's (httpx spent
    seconds of CPU on 256 requests on 2 busy cores, which showed up as latency).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await go.wait()
        t0 = time.perf_counter()
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        elapsed = time.perf_counter() - t0
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        return int(head.split()[1]), elapsed
    finally:
        writer.close()


def test_overload_256_clients_get_503_not_hangs(served):
    rows = np.random.default_rng(1).standard_normal((500, 4)).astype(np.float32).tolist()
    body = json.dumps({"inputs": rows}).encode()
    request = (
        b"POST /busy/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body

    async def burst() -> list[tuple[int, float]]:
        go = asyncio.Event()
        clients = [asyncio.create_task(_raw_post(served["port"], request, go)) for _ in range(256)]
        await asyncio.sleep(1.0)  # every connection open before the first byte is sent
        go.set()
        return await asyncio.wait_for(asyncio.gather(*clients), timeout=300)

    results = asyncio.run(burst())
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert codes.count(503) > 0 and codes.count(200) > 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        r = httpx.post(served["url"] + "/busy/predict", json=VALID, timeout=30)
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200
    recovery = time.monotonic() - t0
    fails = sorted(t for code, t in results if code == 503)
    oks = sorted(t for code, t in results if code == 200)
    FIGURES["overload"] = {
        "200": len(oks),
        "503": len(fails),
        "503_p50_ms": round(1000 * fails[len(fails) // 2], 1),
        "503_p99_ms": round(1000 * fails[min(len(fails) - 1, int(0.99 * len(fails)))], 1),
        "200_max_ms": round(1000 * oks[-1], 1),
        "single_request_back_s": round(recovery, 2),
    }
    print(f"\noverload, 256 clients: {FIGURES['overload']}")
    record("serve_overload", FIGURES["overload"])


def test_killed_replica_gives_503_then_comes_back(served, client):
    pid = client.get("/healthz").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    codes: list[int] = []
    new_pid = pid
    fresh = {"connection": "close"}  # a new connection each: no keep-alive reuse races
    dropped = 0
    while time.monotonic() - t0 < 120:
        try:
            r = httpx.post(served["url"] + "/predict", json=VALID, headers=fresh, timeout=10)
        except httpx.TimeoutException:
            pytest.fail(f"a request hung after the replica was killed (answers so far {codes})")
        except httpx.RemoteProtocolError:
            # HAProxy reloads when Serve drops the dead replica; a connection it had
            # just accepted can be closed unanswered then. Counted, not hidden.
            dropped += 1
            continue
        codes.append(r.status_code)
        if r.status_code == 200:
            new_pid = httpx.get(served["url"] + "/healthz", headers=fresh, timeout=10).json()["pid"]
            if new_pid != pid:
                break
        time.sleep(0.05)
    back = time.monotonic() - t0
    assert new_pid != pid, f"no new replica within 120 s: {codes[-20:]}"
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert dropped <= 3, f"{dropped} connections dropped unanswered (HAProxy reloads)"
    FIGURES["replica_kill"] = {
        "requests": len(codes) + dropped,
        "503": codes.count(503),
        "dropped_unanswered": dropped,
        "back_after_s": round(back, 1),
    }
    # Serve may reload HAProxy once more as it settles the new replica: a client that
    # honours Retry-After (as the 503 asks) gets the same answer as before the kill.
    r = client.post("/predict", json=VALID)
    deadline = time.monotonic() + 30
    while r.status_code == 503 and time.monotonic() < deadline:
        assert r.headers.get("retry-after") == "1", r.headers
        time.sleep(1.0)
        r = client.post("/predict", json=VALID)
    assert r.content == served["answer"]
    print(f"\nreplica kill -9: {FIGURES['replica_kill']}")
    record("serve_replica_kill", FIGURES["replica_kill"])
