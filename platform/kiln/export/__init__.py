"""Export bundles: a trained model as ONNX / TorchScript / state dict / torch.export,
with its configs, a standalone ``inference.py`` and a hash-checked manifest.

    from kiln.export import create_export_bundle, load_bundle
    bundle_dir = create_export_bundle(model, model_cfg, task_spec, train_cfg, "exports")
    bundle = load_bundle(bundle_dir)          # verifies every sha256
"""

from kiln.export.bundle import FP32_TOLERANCE, create_export_bundle
from kiln.export.formats import DEFAULT_FORMATS, EXPORTERS, ExportError
from kiln.export.from_checkpoint import (
    export_checkpoint,
    export_registered,
    is_model_ref,
    load_checkpoint_model,
    registered_checkpoint,
)
from kiln.export.manifest import Bundle, load_bundle, public_metadata

SUPPORTED_FORMATS = tuple(EXPORTERS)

__all__ = [
    "Bundle",
    "DEFAULT_FORMATS",
    "ExportError",
    "FP32_TOLERANCE",
    "SUPPORTED_FORMATS",
    "create_export_bundle",
    "export_checkpoint",
    "export_registered",
    "is_model_ref",
    "load_bundle",
    "load_checkpoint_model",
    "public_metadata",
    "registered_checkpoint",
]
