"""Serve export bundles over HTTP with Ray Serve (onnxruntime inside each replica).

    from ray import serve
    from kiln.serve import build_app
    serve.run(build_app("exports/model_x", num_replicas=2), name="kiln")

``kiln serve BUNDLE_DIR | NAME@TAG`` does the same from the command line.
"""

from kiln.serve.deployment import KilnModelDeployment, build_app
from kiln.serve.options import DEFAULT_MAX_BODY_BYTES, ServeOptions
from kiln.serve.predictor import Predictor, RequestError

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "KilnModelDeployment",
    "Predictor",
    "RequestError",
    "ServeOptions",
    "build_app",
]
