"""Serve export bundles over HTTP with Ray Serve (onnxruntime inside each replica).

    from ray import serve
    from kiln.serve import build_app
    serve.run(build_app("exports/model_x", num_replicas=2), name="kiln")

``kiln serve BUNDLE_DIR | NAME@TAG`` does the same from the command line. The names
below are imported on first use, so ``kiln serve``'s supervisor process (which only
needs ``kiln.serve._lifetime``) never loads Ray Serve or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "KilnModelDeployment",
    "Predictor",
    "RequestError",
    "ServeOptions",
    "build_app",
]

_WHERE = {
    "DEFAULT_MAX_BODY_BYTES": "kiln.serve.options",
    "ServeOptions": "kiln.serve.options",
    "KilnModelDeployment": "kiln.serve.deployment",
    "build_app": "kiln.serve.deployment",
    "Predictor": "kiln.serve.predictor",
    "RequestError": "kiln.serve.predictor",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kiln.serve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
