"""kiln's Ray Serve endpoint end to end on a local Ray, bound to 127.0.0.1.

One Serve instance (HAProxy ingress, as `kiln serve` runs it) holds three apps:
the main one (batching on, to exercise request splitting), a deliberately slow
one with a tiny queue (overload -> 503) and one served from a registry tag.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from kiln.export import create_export_bundle
from kiln.serve import Predictor, build_app
from kiln.serve._ports import free_port
from kiln.serve.runner import start_serve

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

CLASSES = ["setosa", "versicolor", "virginica"]


def _mlp(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("bundles")
    task = {"task_type": "classification", "input_shape": [4], "class_names": CLASSES}
    bundle = create_export_bundle(_mlp(), None, task, None, root, bundle_name="main")
    # Slow: a wide MLP so a large batch takes a while on one replica slot.
    slow = create_export_bundle(
        nn.Sequential(nn.Linear(4, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.Linear(2048, 3)),
        None,
        task,
        None,
        root,
        bundle_name="slow",
    )
    port = free_port()
    env = start_serve(host="127.0.0.1", port=port, ingress="haproxy")
    common = {"num_cpus": 0.25, "runtime_env_vars": env}
    serve.run(
        build_app(
            bundle, batching=True, batch_wait_timeout_s=0.005, max_body_bytes=64 * 1024, **common
        ),
        name="main",
        route_prefix="/",
    )
    serve.run(
        build_app(slow, max_ongoing_requests=1, max_queued_requests=1, **common),
        name="slow",
        route_prefix="/slow",
    )
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "bundle": bundle, "slow": slow, "env": env, "root": root}
    serve.shutdown()


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served["url"], timeout=60) as c:
        yield c


def test_predict_matches_in_process_onnxruntime(served, client):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    r = client.post("/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    want = Predictor(served["bundle"]).predict(x.tolist())
    assert body["predictions"] == want["predictions"]
    assert all(p in CLASSES for p in body["predictions"])
    np.testing.assert_allclose(body["probabilities"], want["probabilities"], atol=1e-6)


def test_health_and_metadata(served, client):
    assert client.get("/healthz").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["inputs"][0]["shape"] == ["batch", 4]
    assert meta["preprocessing"]["class_names"] == CLASSES
    text = json.dumps(meta)
    assert '"path"' not in text and str(served["root"]) not in text and "files" not in meta


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "JSON"),
        (b'{"inputs": [[1, 2]]}', 422, "[batch, 4]"),
        (b'{"inputs": [[1, 2, 3, 4], [1, 2, 3]]}', 422, "[batch, 4]"),
        (b'{"inputs": [["a", "b", "c", "d"]]}', 422, "[batch, 4]"),
        (b'{"inputs": [[1, NaN, 3, 4]]}', 422, "NaN"),
        (b'{"inputs": [[1, Infinity, 3, 4]]}', 422, "inf"),
        (b'{"inputs": []}', 422, "[batch, 4]"),
        (b'{"rows": [[1, 2, 3, 4]]}', 422, "[batch, 4]"),
        (b'{"inputs": [' + b"[1,2,3,4]," * 8000 + b"[1,2,3,4]]}", 413, "limit"),
    ],
    ids=[
        "malformed",
        "short-row",
        "ragged",
        "strings",
        "nan",
        "inf",
        "empty",
        "no-inputs",
        "too-big",
    ],
)
def test_bad_input_is_answered(client, body, status, needle):
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_routes_and_replica_survives(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/predict").status_code == 405
    assert client.post("/predict", content=b"\xff\xfe").status_code == 400
    r = client.post("/predict", json={"inputs": [[0.1, 0.2, 0.3, 0.4]]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1


def test_200_concurrent_requests_nothing_lost_or_mixed(served):
    rng = np.random.default_rng(7)
    # Distinct inputs with 1-3 rows each, so a mix-up inside a batch would show.
    inputs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(200)]
    ref = Predictor(served["bundle"])
    expected = [ref.predict(x.tolist()) for x in inputs]

    async def run() -> list[httpx.Response]:
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=served["url"], timeout=60) as c:

            async def one(x: np.ndarray) -> httpx.Response:
                async with limit:
                    return await c.post("/predict", json={"inputs": x.tolist()})

            return await asyncio.gather(*(one(x) for x in inputs))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 200
    for r, want in zip(responses, expected, strict=True):
        got = r.json()
        assert got["predictions"] == want["predictions"]
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)


def test_overload_answers_503(served):
    """One slot and a queue of one on the slow app: a burst must be partly refused."""
    big = np.random.default_rng(1).standard_normal((3000, 4)).astype(np.float32).tolist()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=served["url"], timeout=120) as c:
            rs = await asyncio.gather(
                *(c.post("/slow/predict", json={"inputs": big}) for _ in range(16))
            )
        return [r.status_code for r in rs]

    seen: list[list[int]] = []
    for _ in range(3):  # overlap depends on scheduling; a few bursts make it certain
        codes = asyncio.run(burst())
        seen.append(codes)
        assert set(codes) <= {200, 503}, codes
        if 503 in codes and 200 in codes:
            break
    else:
        pytest.fail(f"no burst was partly refused: {seen}")
    r = httpx.get(served["url"] + "/slow/healthz", timeout=30)
    assert r.status_code == 200  # the overloaded replica is still up


def test_tampered_bundle_is_refused(served, tmp_path):
    import shutil

    from kiln.errors import IntegrityError

    copy = tmp_path / "copy"
    shutil.copytree(served["bundle"], copy)
    (copy / "artifacts" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(IntegrityError):
        build_app(copy)


def _register(registry, ckpt_root, name: str, seed: int, tags=()):
    """Save a kiln-style checkpoint (model.pt + metadata.json) and register it."""
    from kiln.models import build_model

    cfg = {"name": "mlp", "hidden": [8]}
    torch.manual_seed(seed)
    model = build_model(cfg, input_shape=(4,), num_outputs=3)
    d = ckpt_root / f"ckpt-{seed}"
    d.mkdir()
    torch.save(model.state_dict(), d / "model.pt")
    meta = {
        "model_config": cfg,
        "input_shape": [4],
        "num_outputs": 3,
        "task_spec": {"task_type": "classification", "input_shape": [4]},
        "training_config": {"model": cfg},
    }
    (d / "metadata.json").write_text(json.dumps(meta))
    model_id = registry.register_model(
        name, d, config={"model": cfg}, task_type="classification", tags=list(tags)
    )
    return model_id, model.eval()


def test_serve_by_tag_and_reload_on_promote(served, tmp_path):
    pytest.importorskip("kiln.tracking")
    from ray import serve

    from kiln.export import export_registered
    from kiln.serve.runner import TagFollower, deploy
    from kiln.tracking import ModelRegistry

    db, artifacts, cache = tmp_path / "kiln.db", tmp_path / "artifacts", tmp_path / "bundles"
    registry = ModelRegistry(db, artifacts)
    _, m1 = _register(registry, tmp_path, "iris", seed=1, tags=["production"])
    id2, m2 = _register(registry, tmp_path, "iris", seed=2)

    def resolve():
        bundle, entry = export_registered("iris@production", db, artifacts, cache, "onnx")
        return bundle, entry.sha256

    def redeploy(path):
        deploy(
            build_app(
                str(path),
                num_cpus=0.25,
                runtime_env_vars=served["env"],
                served_as="iris@production",
            ),
            name="tagged",
            route_prefix="/tagged",
        )

    bundle, key = resolve()
    assert resolve() == (bundle, key)  # cached by sha256, not exported twice
    redeploy(bundle)
    x = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)

    def probs(model):
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()

    url = served["url"] + "/tagged/predict"
    got = httpx.post(url, json={"inputs": x.tolist()}, timeout=60).json()
    np.testing.assert_allclose(got["probabilities"], probs(m1), atol=1e-5)

    follower = TagFollower(resolve=resolve, redeploy=redeploy, current_key=key)
    assert follower.poll() is False
    registry.promote_model(id2, "production")

    codes: list[int] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                codes.append(c.post(url, json={"inputs": x.tolist()}).status_code)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        assert follower.poll() is True  # redeploys; serve.run waits for the new replicas
    finally:
        stop.set()
        t.join()
    assert codes and set(codes) == {200}, codes  # nothing dropped during the rollout
    got = httpx.post(url, json={"inputs": x.tolist()}, timeout=60).json()
    np.testing.assert_allclose(got["probabilities"], probs(m2), atol=1e-5)
    meta = httpx.get(served["url"] + "/tagged/metadata", timeout=60).json()
    assert meta["served_as"] == "iris@production"
    assert meta["model"] == {
        "name": "iris",
        "version": "1.1.0",
        "model_id": id2,
        "tag": "production",
    }
    serve.delete("tagged")
    registry.close()
