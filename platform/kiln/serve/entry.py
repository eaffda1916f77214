"""Import path for Ray Serve config files: ``import_path: kiln.serve.entry:app_builder``.

``args`` in the YAML hold ``bundle`` (a bundle directory) plus any
``ServeOptions`` field, e.g. ``max_batch_size`` or ``num_replicas``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import ConfigError
from kiln.serve.deployment import build_app
from kiln.serve.options import ServeOptions

__all__ = ["app_builder"]


def app_builder(args: dict[str, Any]):
    """Build the kiln app from a Serve config's ``args`` block."""
    args = dict(args)
    bundle = args.pop("bundle", None)
    if not bundle:
        raise ConfigError("args.bundle: missing; set it to the export bundle directory")
    if not Path(bundle).is_dir():
        raise ConfigError(
            f"args.bundle: {str(bundle)!r} does not exist (paths are relative to where "
            "`serve run` starts); make it with `kiln export NAME@TAG -o DIR`"
        )
    return build_app(str(bundle), ServeOptions.from_dict(args))
