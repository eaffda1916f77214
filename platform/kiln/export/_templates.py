"""Text of the files a bundle carries besides its artifacts.

``inference.py`` must run with only onnxruntime and numpy installed, so it is a
self-contained script that re-implements the few lines of pre/post-processing
the server also applies (normalisation, softmax, class names).
"""

from __future__ import annotations

import json
from typing import Any

INFERENCE_PY = '''\
"""Standalone inference for this kiln bundle: needs only onnxruntime and numpy.

    python inference.py --input x.json            # {"inputs": [[...], ...]} or a bare list
    python inference.py --input - < x.json        # read stdin

Prints {"predictions": [...], "probabilities": [[...]]} (classification) or
{"predictions": [...]} (regression) as JSON.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent


def load_manifest():
    return json.loads((HERE / "manifest.json").read_text())


def stats_array(values, row_shape):
    arr = np.asarray(values, dtype=np.float32)
    if arr.size == 1:
        return arr.reshape(())
    if arr.ndim <= len(row_shape) and tuple(arr.shape) == tuple(row_shape[len(row_shape) - arr.ndim:]):
        return arr
    if arr.ndim == 1 and len(row_shape) > 1 and arr.shape[0] == row_shape[0]:
        return arr.reshape((-1,) + (1,) * (len(row_shape) - 1))
    raise ValueError(f"normalisation stats of shape {arr.shape} do not fit rows of shape {row_shape}")


def predict(inputs, manifest=None, session=None):
    manifest = manifest or load_manifest()
    spec = manifest["inputs"][0]
    row_shape = list(spec["shape"][1:])
    x = np.asarray(inputs, dtype=spec["dtype"])
    if x.ndim != len(row_shape) + 1 or list(x.shape[1:]) != row_shape or x.shape[0] == 0:
        raise ValueError(f"inputs must have shape [batch>=1, {', '.join(map(str, row_shape))}], got {list(x.shape)}")
    norm = (manifest.get("preprocessing") or {}).get("normalize")
    if norm:
        x = ((x - stats_array(norm["mean"], row_shape)) / stats_array(norm["std"], row_shape)).astype(spec["dtype"])
    if session is None:
        info = manifest["artifacts"]["onnx"]
        path = HERE / info["path"]
        if hashlib.sha256(path.read_bytes()).hexdigest() != info["sha256"]:
            raise SystemExit(f"{path} does not match the sha256 in manifest.json; refusing to load it")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run([manifest["outputs"][0]["name"]], {spec["name"]: x})[0]
    if manifest["task_type"] == "regression":
        preds = out[:, 0] if out.shape[1] == 1 else out
        return {"predictions": preds.tolist()}
    z = out - out.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    idx = probs.argmax(axis=1)
    names = (manifest.get("preprocessing") or {}).get("class_names")
    preds = [names[i] for i in idx] if names else idx.tolist()
    return {"predictions": preds, "probabilities": probs.tolist()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="JSON file, or - for stdin")
    args = parser.parse_args(argv)
    try:
        raw = sys.stdin.read() if args.input == "-" else Path(args.input).read_text()
    except OSError as exc:
        print(f"error: cannot read --input {args.input}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        data = json.loads(raw)
    except ValueError as exc:
        print(f"error: --input {args.input} is not valid JSON: {exc}", file=sys.stderr)
        return 2
    inputs = data.get("inputs") if isinstance(data, dict) else data
    if inputs is None:
        print('error: the JSON must be {"inputs": [[...], ...]} or a list of rows', file=sys.stderr)
        return 2
    try:
        result = predict(inputs)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

DOCKERFILE = """\
# Batch inference with onnxruntime only (no kiln, no torch):
#   docker build -t {name} .
#   docker run --rm -v "$PWD:/data" {name} --input /data/x.json
# To serve over HTTP with replicas and batching, use kiln: `kiln serve <this dir>`.
FROM python:3.11-slim
WORKDIR /bundle
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN useradd --create-home kiln
USER kiln
ENTRYPOINT ["python", "inference.py"]
"""


def requirements_txt(onnxruntime_version: str, numpy_version: str) -> str:
    """Pinned lower bounds of what ``inference.py`` imports."""
    return f"onnxruntime>={onnxruntime_version}\nnumpy>={numpy_version}\n"


def serve_config_yaml(name: str, bundle_path: str, port: int = 8000) -> str:
    """A Ray Serve config that serves this bundle with kiln's deployment."""
    import yaml

    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": name,
                "route_prefix": "/",
                "import_path": "kiln.serve.entry:app_builder",
                "args": {"bundle": bundle_path},
            }
        ],
    }
    header = (
        "# Ray Serve config for this bundle (needs kiln installed):\n"
        "#   serve run configs/serve_config.yaml\n"
        "# args.bundle is where the bundle was written; edit it if you move the bundle.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def readme_md(manifest: dict[str, Any]) -> str:
    """Quick-start for a bundle, generated from its manifest."""
    spec = manifest["inputs"][0]
    parity = "\n".join(
        f"| {fmt} | `{info['path']}` | {manifest['parity'].get(fmt, {}).get('max_abs_diff', 'n/a')} |"
        for fmt, info in manifest["artifacts"].items()
    )
    example = _example_body(spec["shape"])
    return f"""# {manifest["name"]}

A kiln export bundle ({manifest["task_type"]}). Input `{spec["name"]}`: {spec["dtype"]}
of shape {spec["shape"]} (axis 0 is the batch, any size).

| format | file | max abs diff vs PyTorch |
|---|---|---|
{parity}

## Run it

```bash
pip install -r requirements.txt
python inference.py --input x.json      # x.json: {{"inputs": [[...], ...]}}
```

Serve it over HTTP on Ray Serve (needs kiln):

```bash
kiln serve .                            # POST /predict, GET /healthz, GET /metadata
curl -s localhost:8000/predict -d '{example}'
```

`manifest.json` lists the sha256 of every file; kiln refuses to serve a bundle whose
files do not match it. Built with kiln {manifest["kiln_version"]}, torch {manifest["torch_version"]}.
"""


def _example_body(shape: list[Any]) -> str:
    row_shape = [int(d) for d in shape[1:]]
    size = 1
    for dim in row_shape:
        size *= dim
    if size > 16:
        return '{"inputs": [ROW]}'
    row: Any = 0.0
    for dim in reversed(row_shape):
        row = [row] * dim
    return json.dumps({"inputs": [row]})
