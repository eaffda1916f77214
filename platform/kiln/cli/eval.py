"""`kiln eval`: loss and the task's metrics of a model on a labelled set.

    kiln eval digits@production digits --split val --plot cm.png
    kiln eval runs/digits-.../checkpoints/epoch_0005 data/test.parquet [--workers 2] [--json]

MODEL is ``NAME@TAG`` / ``NAME:VERSION`` from the registry, or a checkpoint (or run)
folder. DATA is a dataset id or a parquet/csv/jsonl file or folder. ``--split``:
``all`` (default), ``train``/``val`` (the split the run trained with), ``test`` (the
dataset's own test split; its validation rows when it has none). The result is
recorded against the registered model with these weights (``kiln models show``).
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]

# kiln.predict.evaluation.SPLITS and DEFAULT_BATCH_SIZE (not imported: it imports torch,
# which `kiln --help` should not wait for; a unit test keeps them equal).
SPLITS = ("all", "train", "val", "test")
DEFAULT_BATCH_SIZE = 512


def cmd_eval(args: argparse.Namespace) -> int:
    import pandas as pd  # imported lazily: keeps `kiln --help` fast

    from kiln.cli.runs import print_table, run_paths
    from kiln.predict import evaluate

    result = evaluate(
        args.model,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        num_workers=args.workers,
        record=not args.no_record,
        paths=run_paths(args),
    )
    if args.plot:
        print(f"confusion matrix written to {result.plot_confusion_matrix(args.plot)}")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    title = f"{result.model or result.checkpoint} on {result.dataset} ({result.split})"
    rows = sorted(result.metrics.items())
    print_table(pd.DataFrame(rows, columns=["metric", "value"]), title=title)
    if result.per_class:
        print_table(pd.DataFrame(result.per_class), title="per class")
    for note in result.notes:
        print(f"note: {note}")
    if result.evaluation_id is not None:
        print(f"recorded as evaluation {result.evaluation_id} of {result.model}")
    else:
        print("not recorded: no registered model has these weights")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="loss and metrics of a model on a labelled set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="NAME@TAG, NAME:VERSION, or a checkpoint folder")
    p.add_argument("data", metavar="DATA", help="dataset id, or a parquet/csv/jsonl file or folder")
    p.add_argument("--split", choices=SPLITS, default="all", help="which rows (default: all)")
    p.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per forward pass"
    )
    p.add_argument("--workers", type=int, default=0, help="Ray Train workers (0: in this process)")
    p.add_argument("--plot", metavar="PNG", help="draw the confusion matrix to this PNG")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-record", action="store_true", help="do not record it in the registry")
    p.set_defaults(func=cmd_eval)
