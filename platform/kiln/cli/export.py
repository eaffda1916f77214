"""`kiln export`: a checkpoint folder or a registered model as an export bundle.

    kiln export CHECKPOINT_DIR -o exports/my_model [--formats onnx,pytorch] [--overwrite]
    kiln export NAME@TAG -o exports/my_model          # e.g. digits@production

A checkpoint folder is one kiln wrote (model.pt + metadata.json). ``NAME@TAG`` and
``NAME:VERSION`` resolve in the registry at ``--db`` or ``$KILN_HOME/kiln.db``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "registry_paths"]


def registry_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """``(db_path, artifacts_dir)``: the registry's database and the artifacts beside it."""
    from kiln.cli.runs import run_paths

    paths = run_paths(args)
    return paths.db, paths.artifacts


def cmd_export(args: argparse.Namespace) -> int:
    from kiln.export import export_checkpoint, is_model_ref, registered_checkpoint

    out = Path(args.output).expanduser().resolve()
    source = args.source
    if is_model_ref(source):
        checkpoint, entry = registered_checkpoint(source, *registry_paths(args))
        print(f"{source} -> {entry.name}:{entry.version} ({checkpoint})")
    else:
        checkpoint = Path(source)
    bundle = export_checkpoint(
        checkpoint, out.parent, args.formats, bundle_name=out.name, overwrite=args.overwrite
    )
    print(f"bundle written to {bundle}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint or registered model as a bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="checkpoint directory, or NAME@TAG / NAME:VERSION")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument(
        "--formats",
        default="onnx,pytorch",
        help="comma-separated: onnx, torchscript, pytorch, safetensors, torch_export",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--db", default=argparse.SUPPRESS, help="registry database for NAME@TAG")
    p.set_defaults(func=cmd_export)
