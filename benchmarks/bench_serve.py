"""Serving benchmark: kiln's Ray Serve endpoint against simpler ways to serve one ONNX file.

    .venv/bin/python benchmarks/bench_serve.py [--requests 600] [--quick]

Rows (same ONNX file, same JSON request, loopback only, keep-alive clients):
  (a) kiln: `kiln serve`'s setup (Serve throughput mode + HAProxy ingress), @serve.batch off/on
  (a') kiln behind Serve's default Python proxy (no throughput settings)
  (b) a minimal hand-written Ray Serve deployment with Serve's defaults
  (c) plain FastAPI + uvicorn + onnxruntime (uvicorn in a subprocess)
  (d) onnxruntime called in-process (no HTTP)
Each row reports p50/p99 latency and requests/s at concurrency 1 and 16. Prints a
markdown table and the ratios (a)/(c); it writes no files outside a temp dir.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.serve._ports import free_port

IN_FEATURES, HIDDEN, CLASSES = 64, 128, 10


def make_bundle(root: Path) -> Path:
    import torch
    from torch import nn

    from kiln.export import create_export_bundle

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )
    task = {"task_type": "classification", "input_shape": [IN_FEATURES]}
    return create_export_bundle(model, None, task, None, root, bundle_name="bench")


def body() -> bytes:
    row = np.random.default_rng(0).standard_normal(IN_FEATURES).round(4).tolist()
    return json.dumps({"inputs": [row]}).encode()


# -- load generation -------------------------------------------------------------------


def measure(call_factory: Callable[[], Callable[[], None]], concurrency: int, total: int) -> dict:
    """Run ``total`` calls over ``concurrency`` threads; each thread gets its own caller."""
    per_thread = max(1, total // concurrency)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    callers = [call_factory() for _ in range(concurrency)]
    for c in callers:  # warm up connections and the server
        for _ in range(5):
            c()
    barrier = threading.Barrier(concurrency + 1)

    def worker(i: int) -> None:
        call, out = callers[i], latencies[i]
        barrier.wait()
        for _ in range(per_thread):
            t0 = time.perf_counter()
            call()
            out.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array([x for xs in latencies for x in xs]) * 1000
    return {
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "rps": len(lat) / wall,
    }


def http_caller(port: int, path: str, payload: bytes) -> Callable[[], Callable[[], None]]:
    def factory() -> Callable[[], None]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "application/json"}

        def call() -> None:
            conn.request("POST", path, payload, headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")

        return call

    return factory


def bench_row(name: str, factory, total: int) -> dict:
    row = {"name": name}
    for conc in (1, 16):
        r = measure(factory, conc, total)
        row.update({f"p50_{conc}": r["p50"], f"p99_{conc}": r["p99"], f"rps_{conc}": r["rps"]})
        print(f"  {name} c={conc}: {r['rps']:.0f} req/s p50 {r['p50']:.2f} ms", flush=True)
    return row


# -- the servers -----------------------------------------------------------------------

FASTAPI_APP = textwrap.dedent(
    """
    import json, sys
    import numpy as np, onnxruntime as ort
    from fastapi import FastAPI, Request, Response

    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request):
        x = np.array(json.loads(await request.body())["inputs"], dtype=np.float32)
        out = sess.run(None, {"input": x})[0]
        z = np.exp(out - out.max(axis=1, keepdims=True)); z /= z.sum(axis=1, keepdims=True)
        return Response(json.dumps({"predictions": z.argmax(1).tolist(),
                                    "probabilities": z.tolist()}), media_type="application/json")

    if __name__ == "__main__":
        import uvicorn
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                    access_log=False)
    """
)


def run_fastapi(onnx_path: Path, payload: bytes, total: int, tmp: Path) -> dict:
    script = tmp / "fastapi_server.py"
    script.write_text(FASTAPI_APP)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(onnx_path), str(port)])
    try:
        _wait_http(port)
        return bench_row(
            "(c) FastAPI + uvicorn + onnxruntime", http_caller(port, "/predict", payload), total
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_http(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not start")


class MinimalServe:
    """(b): the smallest Serve deployment of the same ONNX file, all defaults."""

    def __init__(self, onnx_path: str) -> None:
        import onnxruntime as ort

        self.sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])

    async def __call__(self, request):
        x = np.array((await request.json())["inputs"], dtype=np.float32)
        out = self.sess.run(None, {"input": x})[0]
        z = np.exp(out - out.max(axis=1, keepdims=True))
        z /= z.sum(axis=1, keepdims=True)
        return {"predictions": z.argmax(1).tolist(), "probabilities": z.tolist()}


def run_serve_phase(bundle: Path, payload: bytes, total: int, throughput: bool) -> list[dict]:
    """One Ray session: Serve defaults (b, a') or kiln's setup (a, with batching off/on)."""
    import ray
    from ray import serve

    from kiln.serve import build_app
    from kiln.serve.runner import start_serve

    port = free_port()
    rows = []
    env = start_serve(port=port, ingress="haproxy" if throughput else "proxy")
    try:
        if throughput:
            variants = (
                ("off", {"batching": False}),
                ("on, wait 2 ms", {"batching": True, "batch_wait_timeout_s": 0.002}),
                ("on, wait 0", {"batching": True, "batch_wait_timeout_s": 0.0}),
            )
            for label, opts in variants:
                serve.run(
                    build_app(bundle, runtime_env_vars=env, **opts), name="kiln", route_prefix="/"
                )
                caller = http_caller(port, "/predict", payload)
                rows.append(bench_row(f"(a) kiln, @serve.batch {label}", caller, total))
        else:
            serve.run(build_app(bundle), name="kiln", route_prefix="/")
            rows.append(
                bench_row(
                    "(a') kiln, Serve's default proxy",
                    http_caller(port, "/predict", payload),
                    total,
                )
            )
            serve.delete("kiln")
            minimal = serve.deployment(MinimalServe).bind(str(bundle / "artifacts/model.onnx"))
            serve.run(minimal, name="minimal", route_prefix="/")
            rows.append(
                bench_row(
                    "(b) minimal Ray Serve (defaults)", http_caller(port, "/", payload), total
                )
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def run_in_process(bundle: Path, payload: bytes, total: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        str(bundle / "artifacts/model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    x = np.array(json.loads(payload)["inputs"], dtype=np.float32)

    def factory():
        return lambda: sess.run(None, {"input": x})

    return bench_row("(d) onnxruntime in-process", factory, total)


def table(rows: list[dict]) -> str:
    lines = [
        "| setup | c=1 req/s | c=1 p50 ms | c=1 p99 ms | c=16 req/s | c=16 p50 ms | c=16 p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['rps_1']:.0f} | {r['p50_1']:.2f} | {r['p99_1']:.2f} | "
            f"{r['rps_16']:.0f} | {r['p50_16']:.2f} | {r['p99_16']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=800, help="requests per measurement")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundle = make_bundle(tmp)
        payload = body()
        print(
            f"bundle {bundle}, body {len(payload)} bytes, {args.requests} requests per cell",
            flush=True,
        )
        rows += run_serve_phase(bundle, payload, args.requests, throughput=False)
        rows += run_serve_phase(bundle, payload, args.requests, throughput=True)
        rows.append(run_fastapi(bundle / "artifacts/model.onnx", payload, args.requests, tmp))
        rows.append(run_in_process(bundle, payload, args.requests))
    print()
    print(table(rows))
    by = {r["name"]: r for r in rows}
    c = by["(c) FastAPI + uvicorn + onnxruntime"]
    print()
    for r in rows:
        if r["name"].startswith("(a"):
            print(
                f"- {r['name']} / (c): req/s x{r['rps_1'] / c['rps_1']:.2f} at c=1, "
                f"x{r['rps_16'] / c['rps_16']:.2f} at c=16; p50 at c=1 is "
                f"{r['p50_1'] / c['p50_1']:.2f}x (c)'s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
