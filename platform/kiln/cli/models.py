"""`kiln models`: the model registry from the command line.

    kiln models list [--name NAME] [--limit N] [--active]
    kiln models show NAME[:VERSION|@TAG]
    kiln models promote NAME:VERSION TAG
    kiln models history NAME [--tag TAG]
    kiln models rollback NAME TAG
    kiln models retire NAME:VERSION
    kiln models drift NAME[:VERSION|@TAG] DATA   (DATA: dataset id, parquet/csv/jsonl path or .npy)

The registry lives in ``--db`` (artifacts beside it in ``artifacts/``) or in
``$KILN_HOME/kiln.db`` and ``$KILN_HOME/artifacts``. Unknown names, versions or tags
print a message listing what exists and exit with 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.cli.runs import add_output_options, db_path, emit, handles_errors, print_table
from kiln.errors import KilnError

if TYPE_CHECKING:
    pass

__all__ = ["register"]


def _open(args: argparse.Namespace) -> Any:
    from kiln.cli.runs import run_paths
    from kiln.tracking.registry import ModelRegistry

    paths = run_paths(args).with_overrides(artifacts=getattr(args, "artifacts", None))
    return ModelRegistry(paths.db, paths.artifacts)


def _pinned(ref: str) -> tuple[str, str]:
    if ":" not in ref:
        raise KilnError(f"{ref!r} names no version; write NAME:VERSION, e.g. {ref}:1.0.0")
    name, version = ref.rsplit(":", 1)
    return name, version


@handles_errors
def cmd_list(args: argparse.Namespace) -> int:
    df = _open(args).list_models(limit=args.limit, name=args.name, include_retired=not args.active)
    if df.empty:
        print("no models registered yet")
        return 0
    if args.format != "table":
        emit(df, args, list(df.columns), title="models")
        return 0
    df.insert(0, "model", df["name"] + ":" + df["version"].astype(str))
    df["created"] = df["created_at"].str.slice(0, 16).str.replace("T", " ")
    df["tags"] = [", ".join(t) if isinstance(t, list) else (t or "") for t in df["tags"]]
    metrics = [c for c in _SCANNED_METRICS if c in df.columns and df[c].notna().any()][:2]
    columns = ["model", "tags", "status", *metrics, "created"]
    emit(df, args, columns, title="models (newest first)", keep_whole=("model",))
    return 0


# The metrics `kiln models list` shows by default, in order of preference (two at most).
_SCANNED_METRICS = ("test_accuracy", "val_loss", "val_accuracy", "test_loss", "val_mae")


@handles_errors
def cmd_show(args: argparse.Namespace) -> int:
    import pandas as pd  # imported lazily: keeps `kiln --help` fast

    reg = _open(args)
    entry = reg.resolve(args.ref)
    rows = [
        ("model_id", entry.model_id),
        ("name", entry.name),
        ("version", entry.version),
        ("status", entry.status),
        ("tags", ", ".join(entry.tags)),
        ("task_type", entry.task_type),
        ("created_at", entry.created_at),
        ("checkpoint_path", entry.checkpoint_path),
        ("sha256", entry.sha256),
        ("model_size_mb", entry.model_size_mb),
        ("export_formats", ", ".join(entry.export_formats)),
        ("training_run_id", entry.training_run_id),
        ("parent_model_id", entry.parent_model_id),
        ("config_hash", entry.config_hash),
        ("description", entry.description),
    ]
    print_table(pd.DataFrame(rows, columns=["field", "value"]), title=entry.ref)
    if entry.metrics:
        print_table(pd.DataFrame(sorted(entry.metrics.items()), columns=["metric", "value"]))
    evaluations = reg.evaluations(entry.model_id)
    if not evaluations.empty:  # recorded by `kiln eval`
        evaluations["created_at"] = evaluations["created_at"].str.slice(0, 19)
        print_table(evaluations.drop(columns=["details"]), title="evaluations (newest first)")
    lineage = reg.lineage(entry.model_id)
    if len(lineage) > 1:
        print("lineage: " + " <- ".join(e.ref for e in lineage))
    return 0


@handles_errors
def cmd_promote(args: argparse.Namespace) -> int:
    reg = _open(args)
    name, version = _pinned(args.ref)
    entry = reg.get_model(name=name, version=version)
    reg.promote_model(entry.model_id, args.tag)
    print(f"{entry.ref} is now {name}@{args.tag}")
    return 0


@handles_errors
def cmd_history(args: argparse.Namespace) -> int:
    df = _open(args).tag_history(args.name, tag=args.tag)
    if df.empty:
        print(f"no tag has been moved for {args.name!r}")
        return 0
    df["at"] = df["at"].str.slice(0, 19)
    for col in ("metrics", "previous_metrics"):
        df[col] = [json.dumps(m, sort_keys=True) if m else "" for m in df[col]]
    print_table(df, title=f"tag history of {args.name}")
    return 0


@handles_errors
def cmd_rollback(args: argparse.Namespace) -> int:
    entry = _open(args).rollback(args.name, args.tag)
    print(f"{args.name}@{args.tag} rolled back to {entry.ref}")
    return 0


@handles_errors
def cmd_retire(args: argparse.Namespace) -> int:
    reg = _open(args)
    name, version = _pinned(args.ref)
    entry = reg.get_model(name=name, version=version)
    reg.delete_model(entry.model_id)
    print(
        f"{entry.ref} retired" + (f" (removed tags: {', '.join(entry.tags)})" if entry.tags else "")
    )
    return 0


@handles_errors
def cmd_drift(args: argparse.Namespace) -> int:
    import pandas as pd  # imported lazily: keeps `kiln --help` fast

    from kiln.tracking import ExperimentDB, model_drift
    from kiln.tracking.monitoring import reference_profile

    registry, db = _open(args), ExperimentDB(db_path(args))
    x = _load_inputs(args.data, reference_profile(registry, db, args.ref), args.label)
    drift = model_drift(registry, db, args.ref, x, warning=args.warning, critical=args.critical)
    rows = sorted(drift.details.items(), key=lambda kv: -kv[1])
    df = pd.DataFrame(rows, columns=["feature", "js_divergence"])
    print_table(df.head(args.top), title=f"drift of {args.data} against {args.ref} ({len(x)} rows)")
    affected = ", ".join(drift.affected_features[:10]) or "none"
    print(
        f"status: {drift.status}  js_divergence (max over features): {drift.js_divergence:.4f}  "
        f"affected: {affected}"
    )
    return 0 if drift.status != "critical" or not args.fail_on_critical else 3


def _load_inputs(source: str, profile: dict[str, Any], label: str | None) -> Any:
    """Feature rows from a .npy file, a local parquet/csv/jsonl file, or a dataset id.

    Files need no label column (``--label COL`` names one to leave out); their columns
    are matched to the training features by name where the names agree.
    """
    import numpy as np
    import pandas as pd

    from kiln.tracking.monitoring import inputs_like_profile

    path = Path(source)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".jsonl": _read_jsonl}
    if path.suffix in readers:
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {source}")
        return inputs_like_profile(profile, readers[path.suffix](path), label)
    from kiln.data import ArrayDataset, get_dataset

    dataset = get_dataset(source)
    if isinstance(dataset, ArrayDataset):
        return dataset.x
    from kiln.data.files import FileDataset

    if isinstance(dataset, FileDataset):
        return dataset.local_arrays()[0]
    raise KilnError(f"{source!r} cannot be read as feature rows here; export it to parquet")


def _read_jsonl(path: Path) -> Any:
    import pandas as pd

    return pd.read_json(path, lines=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command and its subcommands to the kiln CLI."""
    models = subparsers.add_parser("models", help="list, show, tag and retire registered models")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="registered models, newest first")
    p.add_argument("--name", help="only versions of this model")
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    p.add_argument("--active", action="store_true", help="hide retired models")
    add_output_options(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="one model: NAME, NAME:VERSION or NAME@TAG")
    p.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("promote", help="point TAG at NAME:VERSION (moving it)")
    p.add_argument("ref", metavar="NAME:VERSION")
    p.add_argument("tag", metavar="TAG")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("history", help="every tag move of NAME, with metrics of both versions")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--tag", help="only this tag")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("rollback", help="move TAG of NAME back to its previous holder")
    p.add_argument("name", metavar="NAME")
    p.add_argument("tag", metavar="TAG")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("retire", help="retire NAME:VERSION (it loses its tags)")
    p.add_argument("ref", metavar="NAME:VERSION")
    p.set_defaults(func=cmd_retire)

    p = sub.add_parser("drift", help="drift of new inputs against the model's training data")
    p.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    p.add_argument(
        "data", metavar="DATA", help="parquet/csv/jsonl file (labels optional), .npy, or dataset id"
    )
    p.add_argument(
        "--label", metavar="COL", help="the label column of labelled data, left out of the drift"
    )
    p.add_argument("--warning", type=float, default=0.1, help="JS divergence warning threshold")
    p.add_argument("--critical", type=float, default=0.2, help="JS divergence critical threshold")
    p.add_argument("--top", type=int, default=10, help="features shown")
    p.add_argument("--fail-on-critical", action="store_true", help="exit 3 on critical drift")
    p.set_defaults(func=cmd_drift)
